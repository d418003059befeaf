//! cloudllmd: the long-lived process on the user's machine.
//!
//! It owns all state on the desktop side: the tunnel to the relay, the forwarding of requests
//! to the local Ollama within an endpoint allowlist, the credentials, and the IPC socket that
//! the `cloudllm` CLI and the tray use (the daemon owns state; clients only ask).
//!
//! How it is laid out: [`run`] (below) opens the IPC socket and starts the tasks. The
//! `supervisor` owns what should run — credentials, the wish to be connected, settings — and
//! starts, switches and stops tunnels to match; `tunnel` keeps one tunnel to the relay open
//! (`dial` opens the WebSocket, `backoff` spaces the retries, `lanes` adds connections on
//! threads of their own while the device is busy) and `forward` passes each request to Ollama
//! (over `upstream`'s connections) within the `allowlist`. `state` is what `cloudllm status` shows; [`ipc`] serves it
//! and turns clients' requests into calls on the supervisor. [`login`] runs the OpenID Connect
//! flows, [`credentials`] keeps their result, [`config`] reads and edits the settings, `ollama`
//! watches the local Ollama, and [`logs`] keeps recent log lines for `cloudllm logs`.
//! [`web_open`] asks the relay for the one-time link of `cloudllm open`.

pub mod allowlist;
pub mod backoff;
pub mod config;
pub mod credentials;
mod dial;
mod forward;
pub mod ipc;
mod lanes;
pub mod login;
pub mod logs;
mod ollama;
mod state;
mod supervisor;
mod tunnel;
mod upstream;
pub mod web_open;
#[cfg(windows)]
pub mod windows_service;

use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::DaemonConfig;
use logs::LogBuffer;
use supervisor::Supervisor;

/// Runs the daemon until `shutdown` is cancelled: opens the IPC socket, keeps the tunnel to
/// the relay open while logged in and connected, forwards requests to Ollama, and refreshes
/// tokens. On shutdown, in-flight requests finish within the grace period. Returns an error
/// only for a configuration it cannot run with (bad setting, socket in use).
///
/// Under systemd (`$NOTIFY_SOCKET` set) it sends `READY=1` once the IPC socket listens,
/// `WATCHDOG=1` at half of `WatchdogSec=` while it runs, and `STOPPING=1` when `shutdown` fires.
pub async fn run(config: DaemonConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    // A bad ca_file is a start-up error, not a tunnel that never comes up.
    dial::tls_config(&config)?;
    let socket_path = config.socket_path()?;
    let listener = ipc::bind(
        &socket_path,
        config.system,
        config.operator_group.as_deref(),
    )
    .await?;
    let supervisor = Supervisor::new(config, shutdown.clone()).await?;
    info!(socket = %socket_path.display(), credentials = %supervisor.state().snapshot().credential_store, "cloudllmd ready");

    let ipc = tokio::spawn(ipc::serve(
        listener,
        supervisor.clone(),
        LogBuffer::global(),
        shutdown.clone(),
    ));
    let watch = tokio::spawn(ollama::watch(supervisor.clone(), shutdown.clone()));
    let refresh = tokio::spawn(supervisor.clone().run_refresh());
    // The socket is listening (connections queue until accepted) and the supervisor answers.
    let running = cloudllm_lifecycle::service::announce_ready(&shutdown);
    supervisor.run_tunnels().await;
    let _ = tokio::join!(ipc, watch, refresh);
    running.finish().await;
    info!("cloudllmd stopped");
    Ok(())
}
