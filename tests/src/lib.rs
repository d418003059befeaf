//! Test harness for cloudllm's end-to-end tests: a relay and daemons started in-process through
//! their library entry points on `127.0.0.1:0`, a fake Ollama backend for exact timing and fault
//! injection, a TCP proxy that can stall a connection, and a WebSocket proxy that closes the
//! tunnel with a chosen close code; `tokens` signs hand-made claims for tests of what the relay
//! refuses; `metrics` reads a relay's `/metrics`, which tests wait on instead of sleeping.
//!
//! `oidc` runs a real OpenID Provider (Node.js `oidc-provider`) and plays its user in a browser,
//! for the login and JWKS tests. `browser` runs the web page's checks in headless Chromium
//! (`web/e2e`) and serves a fake chat backend for them.
//!
//! The fake backend is a fake: it speaks enough of Ollama's API shape to exercise streaming,
//! cancellation and failures deterministically. Conformance with the real Ollama is tested
//! against the genuine server (`real_ollama`).

pub mod browser;
pub mod close_proxy;
pub mod cluster;
pub mod fake_ollama;
pub mod metrics;
pub mod oidc;
pub mod redis;
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
pub use stall_proxy::StallProxy;

/// Every await in these tests that could hang is bounded by this.
pub const STEP: Duration = Duration::from_secs(20);

/// The signing secret of test relays.
pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
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
    /// Starts a relay with `config`.
    pub async fn start(config: RelayConfig) -> TestRelay {
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("daemon runtime");
        let shutdown = CancellationToken::new();
        let task = runtime.spawn(cloudllm_daemon::run(config, shutdown.clone()));
        TestDaemon {
            shutdown,
            task: Some(task),
            runtime: Some(runtime),
        }
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

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Relay, fake backend and one daemon of user `alice` (device `laptop`), connected.
pub struct Stack {
    /// The relay.
    pub relay: TestRelay,
    /// Alice's fake Ollama.
    pub backend: FakeOllama,
    /// Alice's daemon.
    pub daemon: TestDaemon,
    /// An HTTP client.
    pub http: reqwest::Client,
}

impl Stack {
    /// Starts the stack with the default test relay config.
    pub async fn start() -> Stack {
        Stack::with_relay_config(relay_config()).await
    }

    /// Starts the stack with `config` for the relay.
    pub async fn with_relay_config(config: RelayConfig) -> Stack {
        init_logs();
        let relay = TestRelay::start(config).await;
        let backend = FakeOllama::start().await;
        let daemon = TestDaemon::start(daemon_config(
            &relay.url(),
            "alice",
            "laptop",
            &backend.url(),
        ));
        relay.wait_for_devices("alice", 1).await;
        Stack {
            relay,
            backend,
            daemon,
            http: client(),
        }
    }

    /// A request builder for `path` on the relay with alice's client token.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.relay.api(path))
            .bearer_auth(token("alice", Scope::Client))
    }

    /// A GET request builder for `path` on the relay with alice's client token.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(self.relay.api(path))
            .bearer_auth(token("alice", Scope::Client))
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

/// An HTTP client that never pools connections across tests and has no proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .expect("http client")
}

/// Sends `request`, bounded by [`STEP`]; panics if it gets no response.
pub async fn send(request: reqwest::RequestBuilder) -> reqwest::Response {
    tokio::time::timeout(STEP, request.send())
        .await
        .expect("request timed out")
        .expect("request")
}

/// Sends `request` and reads its answer as JSON.
pub async fn send_for_json(request: reqwest::RequestBuilder) -> serde_json::Value {
    tokio::time::timeout(STEP, send(request).await.json())
        .await
        .expect("response body timed out")
        .expect("a JSON answer")
}

/// A daemon's tunnel upgrade request to `relay` (a WebSocket upgrade at this protocol version),
/// as device `device_id` named `device_name`, without a token yet.
pub fn tunnel_upgrade(
    http: &reqwest::Client,
    relay: &TestRelay,
    device_id: &str,
    device_name: &str,
) -> reqwest::RequestBuilder {
    http.get(relay.api("/tunnel"))
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::SEC_WEBSOCKET_VERSION, "13")
        .header(http::header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
        .header(
            cloudllm_proto::HEADER_PROTOCOL,
            cloudllm_proto::PROTOCOL_VERSION.to_string(),
        )
        .header(cloudllm_proto::HEADER_DEVICE_ID, device_id)
        .header(cloudllm_proto::HEADER_DEVICE_NAME, device_name)
}

/// An HTTP client whose connections come from the loopback address `from`: all of 127/8 is
/// loopback on Linux, so each address acts as another client (for per-address limits).
pub fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(
            from.parse::<std::net::IpAddr>()
                .expect("a loopback address"),
        )
        .timeout(STEP)
        .build()
        .expect("http client")
}

/// Reads a response until it ends; gives the bytes and whether it ended cleanly (a stream cut
/// by a fault must end with an error, never look complete). Panics if it neither ends nor
/// fails within [`STEP`].
pub async fn read_to_end(mut response: reqwest::Response) -> (Vec<u8>, Result<(), reqwest::Error>) {
    let mut buf = Vec::new();
    let outcome = tokio::time::timeout(STEP, async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                Ok(None) => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    })
    .await
    .expect("the response neither ended nor failed");
    (buf, outcome)
}

/// Reads a streamed NDJSON response to its end, noting when each line arrived (every read
/// bounded by [`STEP`]).
pub async fn timed_lines(
    mut response: reqwest::Response,
) -> Vec<(tokio::time::Instant, serde_json::Value)> {
    let mut buf = Vec::new();
    let mut received = Vec::new();
    while let Some(chunk) = tokio::time::timeout(STEP, response.chunk())
        .await
        .expect("a line within the step")
        .expect("the stream")
    {
        let now = tokio::time::Instant::now();
        buf.extend_from_slice(&chunk);
        for line in take_lines(&mut buf) {
            received.push((now, line));
        }
    }
    received
}

/// Splits a byte buffer into complete NDJSON lines, keeping the unfinished tail in `buf`.
pub fn take_lines(buf: &mut Vec<u8>) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=end).collect();
        let text = &line[..line.len() - 1];
        if !text.is_empty() {
            lines.push(serde_json::from_slice(text).expect("an NDJSON line"));
        }
    }
    lines
}
