//! cloudllmd: the long-lived process on the user's machine.
//!
//! It dials the relay, keeps the tunnel up, and forwards the requests that come through it to
//! the local Ollama, within an endpoint allowlist.

pub mod allowlist;
mod backoff;
pub mod config;
mod dial;
mod forward;
mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::DaemonConfig;
use forward::Forwarder;

/// How long the start-up check of Ollama may take before it is reported missing.
const OLLAMA_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the daemon until `shutdown` is cancelled: keeps the tunnel to the relay open and
/// forwards requests to Ollama. Returns an error only for a configuration it cannot run with.
pub async fn run(config: DaemonConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let forwarder = Arc::new(Forwarder::new(
        config.ollama_url.clone(),
        config.allow_model_management,
        config.device_name.clone(),
    )?);
    probe_ollama(forwarder.ollama_url()).await;
    tunnel::run(Arc::new(config), forwarder, shutdown).await
}

/// Says in one line whether Ollama answers; the daemon runs either way, since Ollama may start
/// later and each request reports its absence to the caller.
async fn probe_ollama(url: &url::Url) {
    let addr = match url.socket_addrs(|| Some(11434)) {
        Ok(addrs) if !addrs.is_empty() => addrs[0],
        _ => return warn!(%url, "cannot resolve the Ollama address"),
    };
    match tokio::time::timeout(OLLAMA_PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => info!(%url, "Ollama is reachable"),
        _ => warn!(
            %url,
            "Ollama is not reachable: start it with `ollama serve`, or point CLOUDLLM_OLLAMA_URL at another address"
        ),
    }
}
