//! Test harness for cloudllm's end-to-end tests: a relay and daemons started in-process through
//! their library entry points on `127.0.0.1:0`, a fake Ollama backend for exact timing and fault
//! injection, a TCP proxy that can stall a connection, and a WebSocket proxy that closes the
//! tunnel with a chosen close code. [`Stack`] starts the usual relay, fake Ollama and daemon in
//! one call; the request helpers bound every HTTP exchange by [`STEP`]. `tokens` signs
//! hand-made claims for tests of what the relay refuses; `metrics` reads a relay's `/metrics`,
//! which tests wait on instead of sleeping.
//!
//! `nginx` runs a real nginx with the snippet operators include, in front of a relay or a
//! cluster; `cluster` runs relay nodes on a real Redis (`redis`).
//!
//! `oidc` runs a real OpenID Provider (Node.js `oidc-provider`) and plays its user in a browser,
//! for the login and JWKS tests. `browser` runs the web page's checks in headless Chromium
//! (`web/e2e`) and serves a fake chat backend for them.
//!
//! The fake backend is a fake: it speaks enough of Ollama's API shape to exercise streaming,
//! cancellation and failures deterministically. Conformance with the real Ollama is tested
//! against the genuine server, which `real_ollama` starts.

pub mod browser;
pub mod close_proxy;
pub mod cluster;
pub mod fake_ollama;
pub mod metrics;
pub mod nginx;
pub mod oidc;
pub mod real_ollama;
pub mod redis;
mod requests;
mod stack;
pub mod stall_proxy;
pub mod tokens;

use std::net::SocketAddr;
use std::time::Duration;

use cloudllm_daemon::DaemonConfig;
use cloudllm_proto::Secret;
use cloudllm_relay::config::TierLimits;
use cloudllm_relay::{Keys, Relay, RelayConfig, Scope};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

pub use close_proxy::CloseProxy;
pub use fake_ollama::FakeOllama;
pub use requests::{
    assert_ollama_error, client, client_from, next_chunk, read_to_end, send, send_for_json, served,
    take_lines, timed_lines, tunnel_upgrade, tunnel_ws_request,
};
pub use stack::Stack;
pub use stall_proxy::StallProxy;

/// Every await in these tests that could hang is bounded by this.
pub const STEP: Duration = Duration::from_secs(20);

/// The signing secret of test relays.
pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// Sets up this test binary's logging, once: to the test output as `RUST_LOG` asks, and the
/// daemons' lines at info level to the buffer their `logs` IPC call reads (as cloudllmd's own
/// subscriber does), for tests of `cloudllm logs` and the tray's "Save logs". One subscriber
/// does both, so that whichever test of the binary sets it up first, every test gets both.
pub fn init_logs() {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let to_output = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(tracing_subscriber::EnvFilter::from_default_env());
    let to_buffer = cloudllm_daemon::logs::LogBuffer::global()
        .layer()
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let _ = tracing_subscriber::registry()
        .with(to_output)
        .with(to_buffer)
        .try_init();
}

/// A relay config for tests: loopback port 0, the test secret.
pub fn relay_config() -> RelayConfig {
    let mut config = RelayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        secret: Some(Secret::new(SECRET)),
        default_tier: TEST_TIER.to_owned(),
        // Tests send many bad tokens from 127.0.0.1 on purpose; the limit has its own test.
        auth_failures_per_minute: 0,
        ..RelayConfig::default()
    };
    config.tiers.insert(
        TEST_TIER.to_owned(),
        TierLimits {
            requests_per_minute: 1_000_000,
            concurrent_requests: 100_000,
            devices: 1000,
            ..TierLimits::premium()
        },
    );
    config
}

/// The default tier of [`relay_config`]: limits no test reaches unless it sets its own, so
/// tests of other behaviour never trip them.
pub const TEST_TIER: &str = "test";

/// The test tier's limits, to change one of them.
pub fn test_tier(config: &mut RelayConfig) -> &mut TierLimits {
    config
        .tiers
        .get_mut(TEST_TIER)
        .expect("relay_config has the test tier")
}

/// Tokens signed with [`SECRET`].
pub fn keys() -> Keys {
    Keys::new(&Secret::new(SECRET))
}

/// A token for `user` with `scope`, valid for an hour.
pub fn token(user: &str, scope: Scope) -> String {
    keys()
        .issue(user, scope, None, Duration::from_secs(3600))
        .expect("issue token")
}

/// A relay running in this process.
pub struct TestRelay {
    /// The running relay.
    pub relay: Relay,
    shutdown: CancellationToken,
}

impl TestRelay {
    /// Starts a relay with `config` (and the test's logs, see [`init_logs`]).
    pub async fn start(config: RelayConfig) -> TestRelay {
        init_logs();
        let shutdown = CancellationToken::new();
        let relay = tokio::time::timeout(STEP, cloudllm_relay::serve(config, shutdown.clone()))
            .await
            .expect("relay start timed out")
            .expect("relay start");
        TestRelay { relay, shutdown }
    }

    /// The relay's base URL.
    pub fn url(&self) -> Url {
        Url::parse(&format!("http://{}", self.relay.addr)).expect("relay URL")
    }

    /// The URL of `path` on the relay.
    pub fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.relay.addr)
    }

    /// `GET path` on the relay as `user`'s API client.
    pub async fn get_as(&self, user: &str, path: &str) -> reqwest::Response {
        tokio::time::timeout(
            STEP,
            client()
                .get(self.api(path))
                .bearer_auth(token(user, Scope::Client))
                .send(),
        )
        .await
        .expect("request timed out")
        .expect("request")
    }

    /// Trades the one-time code of a `cloudllm open` link for a client token, as the web page
    /// does.
    pub async fn exchange_open_code(&self, code: &str) -> reqwest::Response {
        send(
            client()
                .post(self.api("/cloudllm/open/exchange"))
                .json(&serde_json::json!({ "code": code })),
        )
        .await
    }

    /// Waits until `user` has `count` devices connected.
    pub async fn wait_for_devices(&self, user: &str, count: usize) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let connected = self
                .relay
                .registry
                .all()
                .iter()
                .filter(|d| d.user == user)
                .count();
            if connected == count {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user} has {connected} devices, expected {count}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `user`'s device `device` reports exactly `models` (sorted).
    pub async fn wait_for_models(&self, user: &str, device: &str, models: &[&str]) {
        // The daemon polls its Ollama every 10 s: allow one poll and a bit.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let reported = self
                .relay
                .registry
                .devices_of(user)
                .iter()
                .find(|d| d.name == device)
                .map(|d| d.models());
            if reported.as_deref().is_some_and(|m| m == models) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user}'s {device} reports {reported:?}, expected {models:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a graceful shutdown (like SIGTERM) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down gracefully and waits until it has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(STEP * 2, self.relay.done)
            .await
            .expect("relay shutdown timed out")
            .expect("relay task")
            .expect("relay result");
    }
}

/// A fresh private directory for one test's files (sockets, state, config).
pub fn scratch_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("cloudllm-e2e-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A daemon config that dials `relay` for `user` with an agent token from the environment
/// (as `CLOUDLLM_TOKEN` would give) and forwards to `ollama`. Its socket, state and config
/// file live in a scratch dir of their own.
pub fn daemon_config(relay: &Url, user: &str, device: &str, ollama: &Url) -> DaemonConfig {
    let dir = scratch_dir();
    DaemonConfig {
        relay_url: Some(relay.clone()),
        ollama_url: ollama.clone(),
        token: Some(Secret::new(token(user, Scope::Agent))),
        device_name: device.to_owned(),
        device_id: Some(format!("{user}-{device}")),
        reconnect_max: Duration::from_secs(2),
        socket_path: Some(dir.join("d.sock")),
        state_dir: Some(dir.join("state")),
        credential_store: cloudllm_daemon::config::StoreChoice::File,
        file: Some(dir.join("cloudllmd.toml")),
        ..DaemonConfig::default()
    }
}

/// `config` as on a fresh install, before `cloudllm login`: no relay and no token.
pub fn logged_out(mut config: DaemonConfig) -> DaemonConfig {
    config.token = None;
    config.relay_url = None;
    config
}

/// A daemon running in this process on a runtime of its own, so that dropping it kills every
/// one of its tasks at once, like a crashed process: the tunnel is cut and nothing drains.
pub struct TestDaemon {
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestDaemon {
    /// Starts a daemon with `config`.
    pub fn start(config: DaemonConfig) -> TestDaemon {
        let runtime = own_runtime();
        let shutdown = CancellationToken::new();
        let task = runtime.spawn(cloudllm_daemon::run(config, shutdown.clone()));
        TestDaemon {
            shutdown,
            task: Some(task),
            runtime: Some(runtime),
        }
    }

    /// Starts `user`'s daemon for `device`, dialling `relay` and forwarding to `backend` (see
    /// [`daemon_config`]).
    pub fn dial(relay: &Url, user: &str, device: &str, backend: &FakeOllama) -> TestDaemon {
        TestDaemon::start(daemon_config(relay, user, device, &backend.url()))
    }

    /// Stops gracefully: in-flight requests finish, then the daemon returns.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(STEP, task)
            .await
            .expect("daemon shutdown timed out")?
    }

    /// Whether the daemon has ended (it should not, except on a bad config).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

/// A runtime of its own for a server or daemon in a test (one worker), so that dropping the
/// runtime drops every task of it at once, like a process killed with SIGKILL.
pub fn own_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a test runtime")
}

/// Asks `check` every `every` until it answers `Ok`, for at most [`STEP`], and gives that
/// answer; panics with its last `Err` (what it saw instead) otherwise.
pub async fn wait_for<T>(every: Duration, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match check().await {
            Ok(answer) => return answer,
            Err(seen) => assert!(
                tokio::time::Instant::now() < deadline,
                "not within {STEP:?}: {seen}"
            ),
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until `done` holds, asking every `every`, for at most [`STEP`]; panics saying `what`
/// otherwise.
pub async fn wait_until(what: &str, every: Duration, mut done: impl AsyncFnMut() -> bool) {
    wait_for(every, async || {
        if done().await {
            Ok(())
        } else {
            Err(what.to_owned())
        }
    })
    .await
}

/// Serves `app` on a fresh loopback port (a test's stand-in for some other server, named
/// `what` in a failure); the task serves until aborted or the runtime ends.
pub async fn serve_on_loopback(app: axum::Router, what: &str) -> (SocketAddr, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|err| panic!("bind the {what}: {err}"));
    let addr = listener.local_addr().expect("a bound address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// Waits until a daemon answers on its IPC socket at `socket`. The file alone is not enough:
/// it exists from `bind` on, and a connection before `listen` is refused.
pub async fn wait_for_socket(socket: &std::path::Path) {
    let deadline = tokio::time::Instant::now() + STEP;
    while daemon_status(socket).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no daemon answering on {} within {STEP:?}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The daemon's state as `cloudllm status` reads it over the IPC socket at `socket`, or
/// `None` while the socket does not answer.
pub async fn daemon_status(socket: &std::path::Path) -> Option<cloudllm_proto::ipc::Status> {
    use cloudllm_proto::ipc::{Request, Response};
    let call = async {
        let mut daemon = cloudllm_ipc_client::Client::connect(socket).await.ok()?;
        match daemon.call(&Request::Status).await.ok()? {
            Response::Status(status) => Some(status),
            _ => None,
        }
    };
    tokio::time::timeout(STEP, call).await.ok().flatten()
}

/// Whether the daemon's tunnel is up.
pub fn is_connected(status: &cloudllm_proto::ipc::Status) -> bool {
    matches!(
        status.connection,
        cloudllm_proto::ipc::Connection::Connected { .. }
    )
}

/// Waits until the daemon at `socket` has its tunnel up; gives its status then.
pub async fn wait_connected(socket: &std::path::Path) -> cloudllm_proto::ipc::Status {
    wait_status(socket, STEP, is_connected).await
}

/// Polls the daemon's status at `socket` until `wanted` holds, at most `limit`; returns the
/// status that matched and panics with the last one seen otherwise.
pub async fn wait_status(
    socket: &std::path::Path,
    limit: Duration,
    wanted: impl Fn(&cloudllm_proto::ipc::Status) -> bool,
) -> cloudllm_proto::ipc::Status {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = None;
    loop {
        if let Some(status) = daemon_status(socket).await {
            if wanted(&status) {
                return status;
            }
            last = Some(status);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon's status did not get there within {limit:?}; last seen: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
