//! Real daemons (`cloudllm_daemon::run`, the library behind `cloudllmd`), many in this
//! process, each with its own scratch directory for socket, state and config, its own device
//! id and name, and its own agent token. They can be stopped and started again (same id), as
//! a user restarting `cloudllmd` would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cloudllm_daemon::DaemonConfig;
use cloudllm_daemon::config::StoreChoice;
use cloudllm_proto::Secret;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use url::Url;

/// Shutdown grace of each daemon: 1 s, so that a restart cuts what is in flight quickly, as a
/// daemon killed by its user would.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// How long a daemon may take to stop before it is abandoned.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconnect cap of the benchmark daemons: 2 s instead of the default 30 s, so a device
/// whose first dial races the relay's start is back quickly.
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// What makes one daemon.
#[derive(Clone)]
pub struct Spec {
    /// Device name (and id) on the relay.
    pub name: String,
    /// The relay's base URL.
    pub relay: String,
    /// The Ollama (or fake) it forwards to.
    pub backend: SocketAddr,
    /// Its owner's agent token.
    pub token: String,
}

/// One daemon, running or stopped.
pub struct Daemon {
    spec: Spec,
    dir: PathBuf,
    running: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
}

impl Daemon {
    /// Creates the daemon's directory (under `root`) and starts it on `handle`.
    pub fn start(spec: Spec, root: &std::path::Path, handle: &Handle) -> anyhow::Result<Daemon> {
        let dir = root.join(&spec.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut daemon = Daemon {
            spec,
            dir,
            running: None,
        };
        daemon.restart(handle)?;
        Ok(daemon)
    }

    /// A daemon that was never started, for tests of code that holds one.
    #[cfg(test)]
    pub fn for_test() -> Daemon {
        Daemon {
            spec: Spec {
                name: "test".into(),
                relay: "http://127.0.0.1:9".into(),
                backend: SocketAddr::from(([127, 0, 0, 1], 9)),
                token: String::new(),
            },
            dir: PathBuf::new(),
            running: None,
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Starts the daemon again (it must be stopped).
    pub fn restart(&mut self, handle: &Handle) -> anyhow::Result<()> {
        anyhow::ensure!(self.running.is_none(), "{} is running", self.spec.name);
        let config = DaemonConfig {
            relay_url: Some(Url::parse(&self.spec.relay)?),
            ollama_url: Url::parse(&format!("http://{}", self.spec.backend))?,
            token: Some(Secret::new(self.spec.token.clone())),
            device_name: self.spec.name.clone(),
            device_id: Some(self.spec.name.clone()),
            shutdown_grace: SHUTDOWN_GRACE,
            reconnect_max: RECONNECT_MAX,
            // Keep clear of a real daemon's socket, state and keyring entry.
            socket_path: Some(self.dir.join("cloudllmd.sock")),
            state_dir: Some(self.dir.join("state")),
            credential_store: StoreChoice::File,
            file: Some(self.dir.join("cloudllmd.toml")),
            ..DaemonConfig::default()
        };
        let shutdown = CancellationToken::new();
        let done = handle.spawn(cloudllm_daemon::run(config, shutdown.clone()));
        self.running = Some((shutdown, done));
        Ok(())
    }

    /// Stops the daemon: in-flight requests get the short grace period, then are cut.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some((shutdown, done)) = self.running.take() else {
            return Ok(());
        };
        shutdown.cancel();
        timeout(STOP_TIMEOUT, done)
            .await
            .with_context(|| format!("{} did not stop", self.spec.name))?
            .context("daemon task")?
            .with_context(|| format!("daemon {}", self.spec.name))
    }
}
