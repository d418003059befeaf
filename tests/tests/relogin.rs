//! Logging in again, to another relay, while the tunnel to the first one is failing: `cloudllm
//! status` (and the tray, which watches the same state) must show the new tunnel as soon as it
//! is up, and keep showing it while the old tunnel winds down. Only the current tunnel may
//! write the daemon's connection state; a tunnel being switched out used to overwrite it with
//! its own "reconnecting … connection refused" for as long as it kept redialling, and then the
//! wrong state stayed for good.
//!
//! The daemon's log lines go to the in-memory buffer `cloudllm logs` reads, so the tests wait
//! for what the old tunnel does (its failed redials, its end) instead of sleeping. The lines
//! name the old relay's address, which is each test's own.

use std::time::Duration;

use cloudllm_daemon::logs::LogBuffer;
use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, TestRelay, daemon_config, daemon_status, logged_out,
    relay_config, token, wait_status,
};
use cloudllm_ipc_client::Client;
use cloudllm_proto::Secret;
use cloudllm_proto::ipc::{Connection, Request, Response, Status};
use cloudllm_relay::{Keys, Scope};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, timeout, timeout_at};
use url::Url;

/// Relay B's signing secret: another relay, as a second `scripts/dev` would be, with keys of
/// its own, so relay A's token means nothing there.
const SECRET_B: &str = "relay-b-secret-relay-b-secret-relay-b-0123";

/// How soon after the login the status must show the new relay: the tunnel is up on loopback in
/// milliseconds; 5 s leaves room for a loaded machine and is far below the 15 s a stale state
/// used to last (and then for good).
const SHOWN_WITHIN: Duration = Duration::from_secs(5);

async fn connect(socket: &std::path::Path) -> Client {
    timeout(STEP, Client::connect(socket))
        .await
        .expect("connecting to the daemon timed out")
        .expect("connecting to the daemon")
}

/// `cloudllm login --relay RELAY --with-token`, over the daemon's socket.
async fn login(socket: &std::path::Path, relay: &Url, token: String) {
    let mut daemon = connect(socket).await;
    let request = Request::LoginWithToken {
        relay_url: Some(relay.to_string()),
        token: Secret::new(token),
    };
    let reply = timeout(STEP, daemon.call(&request))
        .await
        .expect("login timed out")
        .expect("login");
    assert!(
        matches!(reply, Response::LoginDone { .. }),
        "login to {relay}: {reply:?}"
    );
}

/// Relay B's agent token for alice.
fn token_b() -> String {
    Keys::new(&Secret::new(SECRET_B))
        .issue("alice", Scope::Agent, None, Duration::from_secs(3600))
        .expect("relay B's token")
}

fn connected_to(status: &Status, relay: &Url) -> bool {
    matches!(status.connection, Connection::Connected { .. })
        && status.relay_url.as_deref() == Some(relay.as_str())
}

/// A daemon logged in to relay A, whose tunnel redials A after A has stopped.
struct Switch {
    socket: std::path::PathBuf,
    /// Relay A's address, as the daemon's log lines name it.
    a_host: String,
    _daemon: TestDaemon,
    _backend: FakeOllama,
}

impl Switch {
    async fn start() -> Switch {
        cloudllm_e2e::init_logs();
        let relay_a = TestRelay::start(relay_config()).await;
        let url_a = relay_a.url();
        let backend = FakeOllama::start().await;
        let config = logged_out(daemon_config(&url_a, "alice", "laptop", &backend.url()));
        let socket = config.socket_path.clone().expect("socket path");
        let daemon = TestDaemon::start(config);
        // Once it answers at all, whatever its state.
        wait_status(&socket, STEP, |_| true).await;
        login(&socket, &url_a, token("alice", Scope::Agent)).await;
        wait_status(&socket, STEP, |s| connected_to(s, &url_a)).await;
        relay_a.stop().await;
        wait_status(&socket, STEP, |s| match &s.connection {
            Connection::Reconnecting { last_error, .. } => last_error.contains("refused"),
            _ => false,
        })
        .await;
        Switch {
            socket,
            a_host: url_a.authority().to_owned(),
            _daemon: daemon,
            _backend: backend,
        }
    }

    /// Watches the daemon's state, as the tray does: every state it reports, in order. (A
    /// task of its own reads the stream, so that waiting for something else never cuts a
    /// line in half.)
    async fn watch(&self) -> mpsc::UnboundedReceiver<Status> {
        let mut watch = connect(&self.socket).await;
        timeout(STEP, watch.send(&Request::Watch))
            .await
            .expect("watch timed out")
            .expect("watch");
        let (states, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(reply) = watch.recv().await {
                let Response::Status(status) = reply else {
                    panic!("watch sent {reply:?}");
                };
                if states.send(status).is_err() {
                    return;
                }
            }
        });
        received
    }
}

/// The next state `watch` reports, by `deadline`.
async fn next_status(
    watch: &mut mpsc::UnboundedReceiver<Status>,
    deadline: Instant,
    what: &str,
) -> Status {
    timeout_at(deadline, watch.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .expect("the watch stream ended")
}

/// Reads `watch` until the daemon logs a line with all of `words`; every state it reports
/// meanwhile must pass `expected`.
async fn hold_until_logged(
    watch: &mut mpsc::UnboundedReceiver<Status>,
    logs: &mut broadcast::Receiver<String>,
    words: &[&str],
    deadline: Instant,
    expected: impl Fn(&Status) -> bool,
) {
    loop {
        tokio::select! {
            status = watch.recv() => {
                let status = status.expect("the watch stream ended");
                assert!(
                    expected(&status),
                    "a tunnel being switched out wrote the state: {status:#?}"
                );
            }
            line = logs.recv() => {
                let line = line.expect("the daemon's log");
                if words.iter().all(|word| line.contains(word)) {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                panic!("the daemon never logged {words:?}");
            }
        }
    }
}

/// Waits until `watch` reports a state that passes `wanted`, within [`SHOWN_WITHIN`].
async fn shown(
    watch: &mut mpsc::UnboundedReceiver<Status>,
    what: &str,
    wanted: impl Fn(&Status) -> bool,
) {
    let deadline = Instant::now() + SHOWN_WITHIN;
    let missing = format!("not shown {what} within {SHOWN_WITHIN:?}");
    while !wanted(&next_status(watch, deadline, &missing).await) {}
}

/// Relay B, with keys of its own.
async fn start_relay_b() -> TestRelay {
    let mut config = relay_config();
    config.secret = Some(Secret::new(SECRET_B));
    TestRelay::start(config).await
}

/// After a login to `relay_b`: the new tunnel shows within seconds, the old one gives way once
/// the new one is up, and until it has, every state the watch reports is "connected to B".
/// Alice's daemon logged in to relay A (now stopped, and redialled), relay B running, and from
/// here on the daemon's states and log lines followed.
async fn before_the_switch() -> (
    Switch,
    TestRelay,
    mpsc::UnboundedReceiver<Status>,
    broadcast::Receiver<String>,
) {
    let switch = Switch::start().await;
    let relay_b = start_relay_b().await;
    let watch = switch.watch().await;
    let logs = LogBuffer::global().follow();
    (switch, relay_b, watch, logs)
}

async fn switched(
    switch: &Switch,
    watch: &mut mpsc::UnboundedReceiver<Status>,
    logs: &mut broadcast::Receiver<String>,
    relay_b: &TestRelay,
) {
    let url_b = relay_b.url();
    shown(watch, &format!("connected to {url_b}"), |s| {
        connected_to(s, &url_b)
    })
    .await;
    relay_b.wait_for_devices("alice", 1).await;
    hold_until_logged(
        watch,
        logs,
        &["tunnel ended", &switch.a_host],
        Instant::now() + SHOWN_WITHIN,
        |s| connected_to(s, &url_b),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_login_to_another_relay_status_shows_the_new_tunnel_and_keeps_showing_it() {
    let (switch, relay_b, mut watch, mut logs) = before_the_switch().await;
    let url_b = relay_b.url();
    login(&switch.socket, &url_b, token_b()).await;

    switched(&switch, &mut watch, &mut logs, &relay_b).await;
    let status = daemon_status(&switch.socket).await.expect("status");
    assert!(connected_to(&status, &url_b), "{status:#?}");
    relay_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_new_relay_refuses_the_token_status_says_so_not_what_the_old_tunnel_sees() {
    let (switch, relay_b, mut watch, mut logs) = before_the_switch().await;
    let url_b = relay_b.url();
    // Relay A's token, which relay B cannot verify; neither can the daemon, which has no key,
    // so it takes the token on trust. The new tunnel never comes up, and the old one serves
    // (or here, redials A) for up to 15 s meanwhile.
    login(&switch.socket, &url_b, token("alice", Scope::Agent)).await;
    let refused_by_b = |s: &Status| {
        s.relay_url.as_deref() == Some(url_b.as_str())
            && matches!(&s.connection, Connection::LoginRequired { reason } if reason.contains("refused the token"))
    };
    shown(&mut watch, "refused by B", refused_by_b).await;
    // Two more failed redials of A by the old tunnel: neither shows.
    let a_host = switch.a_host.as_str();
    for _ in 0..2 {
        hold_until_logged(
            &mut watch,
            &mut logs,
            &["cannot reach the relay", a_host],
            Instant::now() + STEP,
            refused_by_b,
        )
        .await;
    }

    // The right token, within the 15 s: the old tunnel gives way as soon as this one is up,
    // though the one it was waiting for never came up.
    login(&switch.socket, &url_b, token_b()).await;
    switched(&switch, &mut watch, &mut logs, &relay_b).await;
    relay_b.stop().await;
}
