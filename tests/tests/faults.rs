//! Fault injection: the local Ollama killed mid-stream and restarted, Ollama starting after the
//! daemon, the network path to the relay going silent with a stream in flight, and the tunnel's
//! WebSocket closed with each kind of close code. For each fault: what the API user gets
//! (status and body), what the daemon reports (`cloudllm status`), and that everything comes
//! back without a manual step.
//!
//! The relay killed with SIGKILL is in `relay/tests/faults.rs` and the daemon frozen with
//! SIGSTOP in `daemon/tests/faults.rs`: those faults need processes of their own. A relay
//! restart with a graceful drain is in `resilience.rs`.

use std::path::Path;
use std::time::Duration;

use cloudllm_e2e::close_proxy::CLOSE_REASON;
use cloudllm_e2e::{
    CloseProxy, FakeOllama, STEP, StallProxy, TestDaemon, TestRelay, client, daemon_config,
    is_connected, relay_config, take_lines, token, wait_connected, wait_status,
};
use cloudllm_proto::ipc::{Connection, Ollama, Request, Response};
use cloudllm_relay::Scope;
use serde_json::json;
use tokio::time::{Instant, timeout};
use url::Url;

/// How long the daemon's status may lag behind Ollama: it polls Ollama every 10 s; one poll
/// and some slack.
const OLLAMA_NOTICED: Duration = Duration::from_secs(15);

/// A generation request of alice's that streams `lines` lines `interval_ms` apart.
fn generate(
    relay: &TestRelay,
    user: &str,
    tag: &str,
    lines: usize,
    interval_ms: u64,
) -> reqwest::RequestBuilder {
    client()
        .post(relay.api("/api/generate"))
        .bearer_auth(token(user, Scope::Client))
        .json(&json!({"prompt": tag, "options": {"num_predict": lines}, "fake_interval_ms": interval_ms}))
}

/// Reads until at least `count` NDJSON lines arrived.
async fn read_lines(response: &mut reqwest::Response, count: usize) -> Vec<serde_json::Value> {
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    while lines.len() < count {
        let chunk = timeout(STEP, response.chunk())
            .await
            .expect("a line in time")
            .expect("the stream is alive")
            .expect("more lines");
        buf.extend_from_slice(&chunk);
        lines.extend(take_lines(&mut buf));
    }
    lines
}

/// Sends `request` within [`STEP`] and gives status and body.
async fn send(request: reqwest::RequestBuilder) -> (u16, String) {
    let response = timeout(STEP, request.send())
        .await
        .expect("the request hung")
        .expect("the relay answers");
    let status = response.status().as_u16();
    let body = timeout(STEP, response.text())
        .await
        .expect("the body hung")
        .expect("a body");
    (status, body)
}

/// The error message of an Ollama-style error body (`{"error": …}`).
fn error_message(body: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("a JSON error body: {body}"));
    value["error"]
        .as_str()
        .unwrap_or_else(|| panic!("an error message: {body}"))
        .to_owned()
}

fn socket_of(config: &cloudllm_daemon::DaemonConfig) -> std::path::PathBuf {
    config
        .socket_path
        .clone()
        .expect("the harness sets a socket")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_killed_mid_stream_gives_an_error_then_502_and_comes_back_when_restarted() {
    let relay = TestRelay::start(relay_config()).await;
    let backend = FakeOllama::start().await;
    // Ollama's port is a proxy to the fake: dropping it closes the port and cuts every
    // connection at once, as a killed Ollama process does.
    let port = StallProxy::start(backend.addr).await;
    let ollama_addr = port.addr;
    let ollama_url = Url::parse(&format!("http://{ollama_addr}")).unwrap();
    let config = daemon_config(&relay.url(), "alice", "laptop", &ollama_url);
    let socket = socket_of(&config);
    let _daemon = TestDaemon::start(config);
    relay.wait_for_devices("alice", 1).await;
    wait_status(&socket, STEP, |s| matches!(s.ollama, Ollama::Up { .. })).await;

    let mut response = timeout(
        STEP,
        generate(&relay, "alice", "killed", 100_000, 10).send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 200);
    read_lines(&mut response, 3).await;
    drop(port);

    // The caller: the stream ends with an error (not a clean end, not a hang), and what did
    // arrive never claims to be complete.
    let (mut buf, outcome) = cloudllm_e2e::read_to_end(response).await;
    assert!(outcome.is_err(), "a cut stream must not look complete");
    assert!(take_lines(&mut buf).iter().all(|l| l["done"] == false));

    // New requests: 502 with a message that says what is wrong and what to do.
    let (status, body) = send(generate(&relay, "alice", "while-down", 3, 0)).await;
    assert_eq!(status, 502, "{body}");
    let message = error_message(&body);
    assert!(
        message.contains("cannot reach Ollama")
            && message.contains("laptop")
            && message.contains("ollama serve"),
        "{message}"
    );
    // The daemon: Ollama down with the reason, the tunnel still up.
    let down = wait_status(&socket, OLLAMA_NOTICED, |s| {
        matches!(s.ollama, Ollama::Down { .. })
    })
    .await;
    assert!(is_connected(&down), "{down:?}");

    // Ollama comes back on its port: requests work at once, no daemon restart.
    let _port = StallProxy::start_on(ollama_addr, backend.addr).await;
    let (status, body) = send(generate(&relay, "alice", "restarted", 3, 0)).await;
    assert_eq!(status, 200, "{body}");
    let mut buf = body.into_bytes();
    assert_eq!(take_lines(&mut buf).last().unwrap()["done"], true);
    // Nothing counts as in flight any more: the cut stream was let go.
    wait_status(&socket, OLLAMA_NOTICED, |s| {
        matches!(s.ollama, Ollama::Up { .. }) && is_connected(s) && s.requests_in_flight == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_starting_after_the_daemon_gives_502_until_it_listens_then_works() {
    let relay = TestRelay::start(relay_config()).await;
    // A free port where nothing listens yet.
    let reserved = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ollama_addr = reserved.local_addr().unwrap();
    drop(reserved);
    let ollama_url = Url::parse(&format!("http://{ollama_addr}")).unwrap();
    let config = daemon_config(&relay.url(), "alice", "laptop", &ollama_url);
    let socket = socket_of(&config);
    let _daemon = TestDaemon::start(config);

    // The tunnel comes up regardless; the daemon says Ollama is down and why.
    relay.wait_for_devices("alice", 1).await;
    let status = wait_status(&socket, STEP, |s| {
        matches!(s.ollama, Ollama::Down { .. }) && is_connected(s)
    })
    .await;
    let Ollama::Down { error } = &status.ollama else {
        unreachable!()
    };
    assert!(!error.is_empty());
    let (code, body) = send(generate(&relay, "alice", "too-early", 3, 0)).await;
    assert_eq!(code, 502, "{body}");
    assert!(
        error_message(&body).contains(&format!("cannot reach Ollama at http://{ollama_addr}")),
        "{body}"
    );

    // Ollama starts: the next request works, and the status follows within one poll.
    let backend = FakeOllama::serve(tokio::net::TcpListener::bind(ollama_addr).await.unwrap());
    let (code, body) = send(generate(&relay, "alice", "on-time", 3, 0)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(backend.records.hit_count(), 1);
    let up = wait_status(&socket, OLLAMA_NOTICED, |s| {
        matches!(s.ollama, Ollama::Up { .. })
    })
    .await;
    assert!(is_connected(&up), "{up:?}");
    // And the relay learns its models with the same poll.
    relay
        .wait_for_models("alice", "laptop", &["fake:latest"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_network_ends_the_stream_in_flight_gives_503_and_the_daemon_says_why() {
    cloudllm_e2e::init_logs();
    let bound = Duration::from_secs(1);
    let mut config = relay_config();
    config.ping_interval = bound;
    config.ping_timeout = bound;
    let relay = TestRelay::start(config).await;
    let path = StallProxy::start(relay.relay.addr).await;
    let backend = FakeOllama::start().await;
    let via_path = Url::parse(&format!("http://{}", path.addr)).unwrap();
    let mut config = daemon_config(&via_path, "alice", "laptop", &backend.url());
    config.ping_interval = bound;
    config.ping_timeout = bound;
    let socket = socket_of(&config);
    let _daemon = TestDaemon::start(config);
    relay.wait_for_devices("alice", 1).await;

    let mut response = timeout(
        STEP,
        generate(&relay, "alice", "stalled", 100_000, 20).send(),
    )
    .await
    .unwrap()
    .unwrap();
    read_lines(&mut response, 3).await;
    path.set_stalled(true);
    let stalled_at = Instant::now();

    // The caller: the stream fails once the relay gives the tunnel up (interval + timeout =
    // 2 s, plus scheduling slack), instead of hanging.
    let (_, outcome) = cloudllm_e2e::read_to_end(response).await;
    assert!(outcome.is_err(), "a cut stream must not look complete");
    let failed_after = stalled_at.elapsed();
    assert!(
        failed_after < Duration::from_secs(4),
        "the stream failed after {failed_after:?}"
    );
    // New requests: 503 saying the device is offline.
    let (code, body) = send(generate(&relay, "alice", "offline", 3, 0)).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        error_message(&body).contains("your device is offline"),
        "{body}"
    );
    // The daemon: reconnecting, and the last error names the silence — noticed by the
    // WebSocket's own liveness check or by HTTP/2's PING, whichever fires first.
    let status = wait_status(&socket, Duration::from_secs(5), |s| {
        matches!(&s.connection, Connection::Reconnecting { last_error, .. }
            if last_error.contains("silent") || last_error.contains("keep-alive timed out"))
    })
    .await;
    assert!(stalled_at.elapsed() < Duration::from_secs(5), "{status:?}");

    // The path heals: the daemon is back and serves, with nobody touching it.
    path.set_stalled(false);
    relay.wait_for_devices("alice", 1).await;
    wait_connected(&socket).await;
    let (code, body) = send(generate(&relay, "alice", "healed", 3, 0)).await;
    assert_eq!(code, 200, "{body}");
    // The stream cut by the stall no longer counts as in flight.
    wait_status(&socket, STEP, |s| s.requests_in_flight == 0).await;
}

/// Every state the daemon at `socket` goes through, as `cloudllm status --watch` sees them.
fn watch_states(socket: &Path) -> tokio::sync::mpsc::UnboundedReceiver<Connection> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let socket = socket.to_owned();
    tokio::spawn(async move {
        let Ok(mut daemon) = cloudllm_ipc_client::Client::connect(&socket).await else {
            return;
        };
        if daemon.send(&Request::Watch).await.is_err() {
            return;
        }
        while let Ok(Response::Status(status)) = daemon.recv().await {
            if tx.send(status.connection).is_err() {
                return;
            }
        }
    });
    rx
}

/// What one close code did to a daemon over three closes in a row.
struct CloseOutcome {
    /// Close to redial, for each close.
    redials: Vec<Duration>,
    /// Every `Reconnecting` state the daemon reported meanwhile.
    reported: Vec<Connection>,
}

/// A daemon of its own (user `closes-CODE`) behind a [`CloseProxy`]: its tunnel is closed
/// with `code` three times; after each the daemon must dial again and serve.
async fn close_three_times(relay: &TestRelay, backend: &FakeOllama, code: u16) -> CloseOutcome {
    let user = format!("closes-{code}");
    let proxy = CloseProxy::start(relay.relay.addr).await;
    let via_proxy = Url::parse(&format!("http://{}", proxy.addr)).unwrap();
    let config = daemon_config(&via_proxy, &user, "laptop", &backend.url());
    let socket = socket_of(&config);
    let _daemon = TestDaemon::start(config);
    relay.wait_for_devices(&user, 1).await;
    wait_connected(&socket).await;
    let mut states = watch_states(&socket);
    let mut redials = Vec::new();
    for round in 0..3 {
        let closed_at = Instant::now();
        proxy.close_with(code);
        while proxy.accepted() < round + 2 {
            assert!(closed_at.elapsed() < STEP, "{code}: no redial");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        redials.push(closed_at.elapsed());
        // Serves again: a request through the new tunnel completes.
        let deadline = Instant::now() + STEP;
        loop {
            let (status, body) =
                send(generate(relay, &user, &format!("{user}-{round}"), 2, 0)).await;
            if status == 200 && body.contains("\"done\":true") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{code}: not serving: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_connected(&socket).await;
    }
    let mut reported = Vec::new();
    while let Ok(state) = states.try_recv() {
        if matches!(state, Connection::Reconnecting { .. }) {
            reported.push(state);
        }
    }
    CloseOutcome { redials, reported }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_closes_redial_at_once_for_restarts_and_with_backoff_otherwise() {
    let relay = TestRelay::start(relay_config()).await;
    let backend = FakeOllama::start().await;

    // 1001 going away, 1012 service restart: a drain — redial at once, nothing to report.
    for code in [1001, 1012] {
        let outcome = close_three_times(&relay, &backend, code).await;
        for redial in &outcome.redials {
            assert!(
                *redial < Duration::from_millis(300),
                "{code}: redial after {redial:?}"
            );
        }
        assert!(
            outcome.reported.is_empty(),
            "{code}: {:?}",
            outcome.reported
        );
    }
    // Normal closure, policy violation, internal error, an application code: the tunnel was
    // lost — back off (full jitter, so a single delay may be tiny) and say why in `status`.
    for code in [1000, 1008, 1011, 4000] {
        let outcome = close_three_times(&relay, &backend, code).await;
        let said = outcome.reported.iter().any(|state| {
            matches!(state, Connection::Reconnecting { attempt, last_error, .. }
                if *attempt >= 1
                    && last_error.contains(&format!("code {code}"))
                    && last_error.contains(CLOSE_REASON))
        });
        assert!(said, "{code}: reported {:?}", outcome.reported);
        // Three closes in a row back off from 500 ms to 1 s to 2 s (the harness's cap).
        let slowest = outcome.redials.iter().max().unwrap();
        assert!(
            *slowest < Duration::from_secs(3),
            "{code}: redials {:?}",
            outcome.redials
        );
    }
}
