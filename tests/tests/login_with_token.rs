//! `cloudllm login --with-token` checks what it can before it says "Logged in": the token's
//! scope and expiry, and that the URL is a running cloudllm relay's. Each mistake a first try
//! makes — the client token `scripts/dev` prints, an expired token, Ollama's URL, the relay's
//! `/v1` URL, a relay that is not running — gets an error that says what to do, and nothing is
//! stored: the credentials and the config file stay as they were.

use std::path::{Path, PathBuf};

use cloudllm_e2e::tokens::{now_unix, sign};
use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, TestRelay, daemon_config, daemon_status, logged_out,
    relay_config, token, wait_status,
};
use cloudllm_ipc_client::Client;
use cloudllm_proto::Secret;
use cloudllm_proto::ipc::{Connection, ErrorCode, Request, Response};
use cloudllm_relay::Scope;
use tokio::time::timeout;
use url::Url;

/// A relay, a fake Ollama, and a daemon that forwards to it and is not logged in.
struct Setup {
    relay: TestRelay,
    ollama: FakeOllama,
    socket: PathBuf,
    credentials: PathBuf,
    config_file: PathBuf,
    _daemon: TestDaemon,
}

impl Setup {
    async fn start() -> Setup {
        let relay = TestRelay::start(relay_config()).await;
        let ollama = FakeOllama::start().await;
        let config = logged_out(daemon_config(
            &relay.url(),
            "alice",
            "laptop",
            &ollama.url(),
        ));
        let socket = config.socket_path.clone().expect("socket path");
        let credentials = config
            .state_dir
            .clone()
            .expect("state dir")
            .join("credentials.json");
        let config_file = config.file.clone().expect("config file");
        let daemon = TestDaemon::start(config);
        // Once it answers at all, whatever its state.
        wait_status(&socket, STEP, |_| true).await;
        Setup {
            relay,
            ollama,
            socket,
            credentials,
            config_file,
            _daemon: daemon,
        }
    }

    /// `cloudllm login --relay RELAY --with-token` with `token`: the daemon's answer.
    async fn login(&self, relay: &str, token: &str) -> Response {
        let mut daemon = timeout(STEP, Client::connect(&self.socket))
            .await
            .expect("connecting timed out")
            .expect("connecting to the daemon");
        let request = Request::LoginWithToken {
            relay_url: Some(relay.to_owned()),
            token: Secret::new(token),
        };
        timeout(STEP, daemon.call(&request))
            .await
            .expect("the login timed out")
            .expect("the login")
    }

    /// Logs in with `token` at `relay` and expects a refusal; returns its message, having
    /// checked that nothing was stored.
    async fn refused(&self, relay: &str, token: &str) -> String {
        let before = (read(&self.credentials), read(&self.config_file));
        let message = match self.login(relay, token).await {
            Response::Error {
                code: ErrorCode::LoginFailed,
                message,
            } => message,
            other => panic!("{relay} with that token was not refused: {other:?}"),
        };
        assert_eq!(
            (read(&self.credentials), read(&self.config_file)),
            before,
            "a refused login stores nothing"
        );
        message
    }
}

/// A file's bytes, or `None` when it does not exist.
fn read(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// An agent token for alice, signed with the test relay's secret, that expired an hour ago.
fn expired_token() -> String {
    sign(&serde_json::json!({"sub": "alice", "scope": "agent", "exp": now_unix() - 3600}))
}

/// Asserts that `message` says each of `parts`.
fn assert_says(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

/// A loopback address where nothing listens.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_token_is_refused_naming_the_agent_token_it_needs() {
    let setup = Setup::start().await;
    let message = setup
        .refused(setup.relay.url().as_str(), &token("alice", Scope::Client))
        .await;
    assert_says(
        &message,
        &[
            "this is a client token",
            "needs an agent token",
            "cloudllm-relay token issue --scope agent",
        ],
    );
    let status = daemon_status(&setup.socket).await.expect("status");
    assert_eq!(status.connection, Connection::LoggedOut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_saying_when_it_expired() {
    let setup = Setup::start().await;
    let message = setup
        .refused(setup.relay.url().as_str(), &expired_token())
        .await;
    assert_says(&message, &["expired 1h", "new agent token"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollamas_url_is_refused_as_ollamas() {
    let setup = Setup::start().await;
    let agent = token("alice", Scope::Agent);
    // The daemon's own Ollama: named as such.
    let message = setup.refused(setup.ollama.url().as_str(), &agent).await;
    assert_says(
        &message,
        &["is Ollama's address", "ollama_url", "not a cloudllm relay"],
    );
    // Another server that answers 404 there: not a relay, whatever it is.
    let other = FakeOllama::start().await;
    let message = setup.refused(other.url().as_str(), &agent).await;
    assert_says(
        &message,
        &["is not a cloudllm relay", "404", "relay's base URL"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_v1_url_is_refused_with_its_base_url() {
    let setup = Setup::start().await;
    let agent = token("alice", Scope::Agent);
    let base = setup.relay.url();
    for api in ["v1", "api/"] {
        let url = base.join(api).expect("URL");
        let message = setup.refused(url.as_str(), &agent).await;
        assert_says(
            &message,
            &[
                "one of the relay's APIs",
                &format!("cloudllm login --relay {base} --with-token"),
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_is_not_running_is_named_as_such() {
    let setup = Setup::start().await;
    let nowhere = closed_port().await;
    let message = setup.refused(&nowhere, &token("alice", Scope::Agent)).await;
    let address = Url::parse(&nowhere).expect("URL").authority().to_owned();
    assert_says(
        &message,
        &[
            "no cloudllm relay is running",
            &address,
            "connection refused",
            "cloudllm-relay serve",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_leaves_a_working_login_as_it_was() {
    let setup = Setup::start().await;
    let relay = setup.relay.url();
    let reply = setup
        .login(relay.as_str(), &token("alice", Scope::Agent))
        .await;
    assert_eq!(
        reply,
        Response::LoginDone {
            user: Some("alice".into())
        }
    );
    let connected = |s: &cloudllm_proto::ipc::Status| {
        matches!(s.connection, Connection::Connected { .. })
            && s.relay_url.as_deref() == Some(relay.as_str())
    };
    wait_status(&setup.socket, STEP, connected).await;
    assert!(read(&setup.credentials).is_some());

    // Each mistake, in turn: the files stay as they were (checked by `refused`), and so does
    // the tunnel.
    let nowhere = closed_port().await;
    setup.refused(&nowhere, &token("bob", Scope::Agent)).await;
    setup
        .refused(relay.as_str(), &token("bob", Scope::Client))
        .await;
    setup.refused(relay.as_str(), "not-a-token").await;
    let status = daemon_status(&setup.socket).await.expect("status");
    assert!(connected(&status), "{status:#?}");
    assert_eq!(status.user.as_deref(), Some("alice"));
    setup.relay.wait_for_devices("alice", 1).await;
}
