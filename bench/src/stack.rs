//! The components under test, each on its own runtime as if it were its own process: the fake
//! backend, the relay and the load generator each get a multi-thread tokio runtime with
//! [`WORKERS`] worker threads of their own, and the daemon one thread, as `cloudllmd` runs
//! ([`OneThread`]), all sharing the machine's cores.
//!
//! A task runs on the runtime it was spawned on, and so do the sockets it opens and the tasks it
//! spawns: starting the relay with `relay.spawn(cloudllm_relay::serve(..))` keeps every relay
//! connection on the relay's threads, wherever the caller runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use cloudllm_daemon::DaemonConfig;
use cloudllm_daemon::config::StoreChoice;
use cloudllm_proto::Secret;
use cloudllm_relay::config::TierLimits;
use cloudllm_relay::registry::Registry;
use cloudllm_relay::{Keys, RelayConfig, Scope};

/// The benchmark user's tier.
const TIER: &str = "bench";
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::scratch::Scratch;

/// Worker threads per component: 2, as a small process on a small machine would have.
pub const WORKERS: usize = 2;

/// Signing secret of the benchmark relay (32+ bytes, as the relay requires).
const SECRET: &str = "cloudllm-bench-secret-0123456789abcdef";

/// The user that owns the benchmark device.
const USER: &str = "bench";

/// How long the tokens are valid: far longer than any run.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// How long the daemon gets to dial the relay and register: 10 s, far above the few
/// milliseconds it takes on loopback.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Shutdown grace for relay and daemon: nothing is in flight when the benchmark stops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// How long stopping a component may take before it is abandoned.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The four runtimes.
pub struct Runtimes {
    /// The fake backend's.
    pub backend: Runtime,
    /// The relay's.
    pub relay: Runtime,
    /// The daemon's.
    pub daemon: OneThread,
    /// The load generator's.
    pub load: Runtime,
}

impl Runtimes {
    /// Builds the four runtimes.
    pub fn new() -> anyhow::Result<Runtimes> {
        Ok(Runtimes {
            backend: runtime("backend")?,
            relay: runtime("relay")?,
            daemon: OneThread::start("daemon")?,
            load: runtime("load")?,
        })
    }

    /// Handles to spawn onto the backend, relay and daemon runtimes from the load generator.
    pub fn handles(&self) -> Handles {
        Handles {
            backend: self.backend.handle().clone(),
            relay: self.relay.handle().clone(),
            daemon: self.daemon.handle.clone(),
        }
    }

    /// Stops all four, abandoning tasks that do not end within a second.
    pub fn shutdown(self) {
        self.load.shutdown_timeout(Duration::from_secs(1));
        self.daemon.shutdown();
        for runtime in [self.relay, self.backend] {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// A current-thread runtime driven by a thread of its own, named after the component: the
/// daemon's, as `cloudllmd` runs on one thread. Tasks spawned through its handle run on that
/// thread until [`shutdown`](Self::shutdown).
pub struct OneThread {
    handle: Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl OneThread {
    /// Starts the thread `name` and its runtime.
    pub fn start(name: &str) -> anyhow::Result<OneThread> {
        let (started, handle) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let builder = tokio::runtime::Builder::new_current_thread()
            .thread_name(name)
            .enable_all()
            .build();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let runtime = match builder {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = started.send(Err(err));
                        return;
                    }
                };
                let _ = started.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .with_context(|| format!("starting the {name} thread"))?;
        let handle = handle
            .recv()
            .with_context(|| format!("the {name} thread ended at once"))?
            .with_context(|| format!("building the {name} runtime"))?;
        Ok(OneThread {
            handle,
            stop,
            thread,
        })
    }

    /// Ends the runtime (abandoning tasks that do not end within a second) and its thread.
    pub fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

pub(crate) fn runtime(name: &str) -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("building the {name} runtime"))
}

/// Where the components other than the load generator run.
#[derive(Clone)]
pub struct Handles {
    /// The fake backend's runtime.
    pub backend: Handle,
    /// The relay's runtime.
    pub relay: Handle,
    /// The daemon's runtime.
    pub daemon: Handle,
}

/// A relay with one daemon connected to it, forwarding to the backend.
pub struct Stack {
    /// Where users reach the relay.
    pub relay_addr: SocketAddr,
    /// A client token of the device's owner.
    pub client_token: String,
    registry: Arc<Registry>,
    relay_shutdown: CancellationToken,
    relay_done: JoinHandle<anyhow::Result<()>>,
    daemon_shutdown: CancellationToken,
    daemon_done: JoinHandle<anyhow::Result<()>>,
    /// The daemon's socket, state and config file: never the user's own.
    _scratch: Scratch,
}

impl Stack {
    /// Starts the relay and the daemon on their runtimes, the daemon forwarding to the Ollama
    /// API at `backend`, and waits until the daemon has registered.
    pub async fn start(handles: &Handles, backend: SocketAddr) -> anyhow::Result<Stack> {
        let secret = Secret::new(SECRET);
        let keys = Keys::new(&secret);
        let agent_token = keys.issue(USER, Scope::Agent, Some(TIER), TOKEN_TTL)?;
        let client_token = keys.issue(USER, Scope::Client, Some(TIER), TOKEN_TTL)?;

        let relay_shutdown = CancellationToken::new();
        let mut config = RelayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: Some(secret),
            shutdown_grace: SHUTDOWN_GRACE,
            ..RelayConfig::default()
        };
        // The limits are checked on every request as in production, but set out of reach of
        // the load.
        config.tiers.insert(
            TIER.to_owned(),
            TierLimits {
                requests_per_minute: u32::MAX,
                concurrent_requests: u32::MAX,
                ..TierLimits::premium()
            },
        );
        let relay = tokio::time::timeout(
            REGISTER_TIMEOUT,
            handles
                .relay
                .spawn(cloudllm_relay::serve(config, relay_shutdown.clone())),
        )
        .await
        .context("relay start timed out")?
        .context("relay start task")?
        .context("starting the relay")?;

        let daemon_shutdown = CancellationToken::new();
        let scratch = Scratch::create("daemon")?;
        let config = DaemonConfig {
            relay_url: Some(Url::parse(&format!("http://{}", relay.addr))?),
            ollama_url: Url::parse(&format!("http://{backend}"))?,
            token: Some(Secret::new(agent_token)),
            device_name: "bench".into(),
            shutdown_grace: SHUTDOWN_GRACE,
            // Keep clear of a real daemon's socket, state and keyring entry.
            socket_path: Some(scratch.0.join("cloudllmd.sock")),
            state_dir: Some(scratch.0.join("state")),
            credential_store: StoreChoice::File,
            file: Some(scratch.0.join("cloudllmd.toml")),
            ..DaemonConfig::default()
        };
        let daemon_done = handles
            .daemon
            .spawn(cloudllm_daemon::run(config, daemon_shutdown.clone()));
        let stack = Stack {
            relay_addr: relay.addr,
            client_token,
            registry: relay.registry.clone(),
            relay_shutdown,
            relay_done: relay.done,
            daemon_shutdown,
            daemon_done,
            _scratch: scratch,
        };

        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        while relay.registry.len() != 1 {
            if stack.daemon_done.is_finished() {
                bail!("the daemon stopped before it registered (bad config?)");
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the daemon did not register with the relay within {REGISTER_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(stack)
    }

    /// Stops the daemon, then (once the relay has seen the tunnel go) the relay, each within
    /// [`STOP_TIMEOUT`].
    pub async fn stop(self) -> anyhow::Result<()> {
        self.daemon_shutdown.cancel();
        tokio::time::timeout(STOP_TIMEOUT, self.daemon_done)
            .await
            .context("daemon shutdown timed out")?
            .context("daemon task")?
            .context("daemon")?;
        // Else the relay may still hold the tunnel and try to drain it, and warn that it cannot.
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while !self.registry.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.relay_shutdown.cancel();
        tokio::time::timeout(STOP_TIMEOUT, self.relay_done)
            .await
            .context("relay shutdown timed out")?
            .context("relay task")?
            .context("relay")?;
        Ok(())
    }
}
