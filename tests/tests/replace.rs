//! One device id, one tunnel: a newer tunnel with the same user and device id closes the older
//! one with the "replaced" close code; a user's open tunnels are bounded by the tier whatever
//! their ids; a daemon displaced by someone else's tunnel says so in `status` and stays off
//! until `cloudllm connect`; and a hello whose fields could forge log lines is refused.

use std::path::PathBuf;
use std::time::Duration;

use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, TestRelay, daemon_config, relay_config, scratch_dir, send,
    test_tier, token, tunnel_ws_request, wait_connected, wait_status,
};
use cloudllm_proto::ipc::{Connection, Request, Response};
use cloudllm_proto::{self as proto, Control, Hello};
use cloudllm_relay::{RelayConfig, Scope};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Ws = WebSocketStream<TcpStream>;

/// A relay whose test tier allows one device.
fn one_device() -> RelayConfig {
    let mut config = relay_config();
    test_tier(&mut config).devices = 1;
    config
}

/// Dials `/tunnel` as `user`'s daemon with `device_id`: the WebSocket, or the HTTP status and
/// body of the refusal.
async fn dial(relay: &TestRelay, user: &str, device_id: &str) -> Result<Ws, (u16, String)> {
    let request = tunnel_ws_request(relay, user, device_id, "box");
    let tcp = timeout(STEP, TcpStream::connect(relay.relay.addr))
        .await
        .expect("tunnel connect timed out")
        .expect("tunnel connect");
    match timeout(STEP, tokio_tungstenite::client_async(request, tcp))
        .await
        .expect("tunnel dial timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((response.status().as_u16(), body))
        }
        Err(err) => panic!("tunnel dial failed: {err}"),
    }
}

/// Alice's daemon (device `laptop`) with its fake Ollama, connected to `relay`: the daemon, the
/// fake, the daemon's IPC socket and its device id.
async fn alice_connected_to(relay: &TestRelay) -> (TestDaemon, FakeOllama, PathBuf, String) {
    let backend = FakeOllama::start().await;
    let config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    let socket = config.socket_path.clone().expect("socket path");
    let device_id = config.device_id.clone().expect("device id");
    let daemon = TestDaemon::start(config);
    wait_connected(&socket).await;
    (daemon, backend, socket, device_id)
}

/// Sends a hello with `daemon_version`.
async fn hello(ws: &mut Ws, daemon_version: &str) {
    let hello = Control::Hello(Hello {
        protocol_version: proto::PROTOCOL_VERSION,
        daemon_version: daemon_version.to_owned(),
        models: vec!["m:latest".into()],
        lanes: false,
    });
    timeout(STEP, ws.send(Message::Text(hello.to_text().into())))
        .await
        .expect("hello timed out")
        .expect("hello");
}

/// Reads until the relay's `ready`; panics if the tunnel closes first.
async fn ready(ws: &mut Ws) {
    let deadline = Instant::now() + STEP;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                assert_eq!(text.as_str(), Control::Ready.to_text());
                return;
            }
            Ok(Some(Ok(Message::Close(frame)))) => panic!("closed instead of ready: {frame:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("tunnel ended instead of ready: {other:?}"),
            Err(_) => panic!("no ready within {STEP:?}"),
        }
    }
}

/// A tunnel of `user` with `device_id`, registered.
async fn registered(relay: &TestRelay, user: &str, device_id: &str) -> Ws {
    let mut ws = dial(relay, user, device_id)
        .await
        .unwrap_or_else(|(status, body)| panic!("tunnel refused: {status} {body}"));
    hello(&mut ws, env!("CARGO_PKG_VERSION")).await;
    ready(&mut ws).await;
    ws
}

/// Reads (answering pings) until the relay closes `ws`; its close frame, if it sent one.
/// Answers the close, as a daemon does.
async fn closed(ws: &mut Ws) -> Option<CloseFrame> {
    let deadline = Instant::now() + STEP;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                // Reading on sends the answer tungstenite queued, until the relay hangs up.
                while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.next()).await {}
                return frame;
            }
            Ok(Some(Ok(_))) => {}
            Ok(None | Some(Err(_))) => return None,
            Err(_) => panic!("the relay kept the tunnel open for {STEP:?}"),
        }
    }
}

/// Waits until `user` has `count` tunnels open on the relay, whatever their state.
async fn wait_for_tunnels(relay: &TestRelay, user: &str, count: usize) {
    let deadline = Instant::now() + STEP;
    loop {
        let open = relay.relay.registry.tunnels(user);
        if open == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{user} has {open} tunnels open, expected {count}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_tunnel_with_the_same_device_id_closes_the_older_one() {
    let relay = TestRelay::start(one_device()).await;
    // The reported attack: one agent token, one device allowed, the same device id dialled
    // again and again. Each newcomer takes the device; the one before it is closed.
    let mut current = registered(&relay, "mallory", "dup").await;
    for round in 0..20 {
        let next = registered(&relay, "mallory", "dup").await;
        let frame = closed(&mut current)
            .await
            .unwrap_or_else(|| panic!("round {round}: closed without a close frame"));
        assert_eq!(
            u16::from(frame.code),
            proto::CLOSE_REPLACED,
            "round {round}"
        );
        assert_eq!(frame.reason.as_str(), proto::REPLACED_REASON);
        wait_for_tunnels(&relay, "mallory", 1).await;
        current = next;
    }
    assert_eq!(relay.relay.registry.count("mallory"), 1);
    assert_eq!(relay.metric("cloudllm_tunnels_open").await, 1.0);
    assert_eq!(relay.metric("cloudllm_devices_connected").await, 1.0);
    drop(current);
    wait_for_tunnels(&relay, "mallory", 0).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_are_bounded_by_the_tier_whatever_their_ids() {
    let relay = TestRelay::start(one_device()).await;
    // Upgraded but still handshaking (no hello yet): no device registered, so only the count
    // of tunnels can tell these apart from honest ones. One device allows two tunnels.
    let first = dial(&relay, "eve", "id-0").await.expect("first tunnel");
    let second = dial(&relay, "eve", "id-1").await.expect("second tunnel");
    for n in 2..6 {
        let Err((status, body)) = dial(&relay, "eve", &format!("id-{n}")).await else {
            panic!("tunnel {n} of a one-device user was accepted");
        };
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("too many tunnels"), "{body}");
    }
    assert_eq!(relay.relay.registry.tunnels("eve"), 2);
    assert_eq!(relay.metric("cloudllm_tunnels_open").await, 2.0);
    // Another user has a bound of their own.
    let bystander = registered(&relay, "frank", "frank-box").await;

    // Handshakes that give up free their places.
    drop((first, second));
    wait_for_tunnels(&relay, "eve", 0).await;

    // At the device limit, replacing the one device still works...
    let mut laptop = registered(&relay, "eve", "laptop").await;
    let replacement = registered(&relay, "eve", "laptop").await;
    let frame = closed(&mut laptop).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), proto::CLOSE_REPLACED);
    // ...and another device id is over it.
    wait_for_tunnels(&relay, "eve", 1).await;
    let Err((status, body)) = dial(&relay, "eve", "desktop").await else {
        panic!("a second device of a one-device user was accepted");
    };
    assert_eq!(status, 429);
    assert!(body.contains("device limit"), "{body}");
    drop((bystander, replacement));
    wait_for_tunnels(&relay, "eve", 0).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_displaced_daemon_says_so_and_stays_off_until_connect() {
    cloudllm_e2e::init_logs();
    let audit = scratch_dir().join("audit.jsonl");
    let mut config = relay_config();
    config.audit_log = Some(audit.display().to_string());
    let relay = TestRelay::start(config).await;
    let (daemon, _backend, socket, device_id) = alice_connected_to(&relay).await;

    // Someone with alice's agent token dials with her device id.
    let before = cloudllm_e2e::client()
        .get(relay.api("/api/tags"))
        .bearer_auth(token("alice", Scope::Client));
    assert_eq!(send(before).await.status(), 200);
    let mut impostor = registered(&relay, "alice", &device_id).await;

    // The daemon learns it at once, says so, and does not take the device back by itself.
    let status = wait_status(&socket, STEP, |s| {
        matches!(s.connection, Connection::Replaced { .. })
    })
    .await;
    let Connection::Replaced { at } = status.connection else {
        unreachable!()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(at <= now && now - at < 60, "replaced at {at}, now {now}");
    // Its old tunnel is gone from the relay: only the impostor's is open.
    wait_for_tunnels(&relay, "alice", 1).await;

    // `cloudllm connect` takes the device back: the impostor is the one replaced now.
    let mut client = timeout(STEP, cloudllm_ipc_client::Client::connect(&socket))
        .await
        .expect("IPC connect timed out")
        .expect("IPC connect");
    let answer = timeout(STEP, client.call(&Request::Connect))
        .await
        .expect("connect timed out")
        .expect("connect");
    assert!(matches!(answer, Response::Ok), "{answer:?}");
    let frame = closed(&mut impostor).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), proto::CLOSE_REPLACED);
    wait_connected(&socket).await;
    let after = relay.get_as("alice", "/api/tags").await;
    assert_eq!(after.status(), 200);

    drop(daemon);
    relay.stop().await;
    // Three tunnels in all: the daemon's, the impostor's, and the daemon's once told to
    // connect. A daemon that fought back would have dialled more.
    let text = std::fs::read_to_string(&audit).expect("audit log");
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .filter(|l: &Value| l["device_id"] == device_id.as_str())
        .collect();
    let connects = events
        .iter()
        .filter(|l| l["event"] == "tunnel_connect")
        .count();
    assert_eq!(connects, 3, "{text}");
    let replaced = events
        .iter()
        .filter(|l| {
            l["event"] == "tunnel_disconnect"
                && l["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("replaced"))
        })
        .count();
    assert_eq!(replaced, 2, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_that_could_forge_log_lines_is_refused() {
    let relay = TestRelay::start(relay_config()).await;
    let forged = "1.0\n2026-01-01T00:00:00Z  INFO cloudllm_relay: admin logged in\u{1b}[2J";
    let oversized = "1".repeat(250_000);
    for version in [forged, oversized.as_str(), "", "1.0 beta"] {
        let mut ws = dial(&relay, "mallory", "box").await.expect("tunnel");
        hello(&mut ws, version).await;
        let frame = closed(&mut ws).await.expect("a close frame");
        assert_eq!(u16::from(frame.code), 1002, "{:.40?}", version);
        assert!(
            frame.reason.as_str().contains("daemon_version"),
            "{}",
            frame.reason
        );
        assert_eq!(relay.relay.registry.count("mallory"), 0);
    }
    // Not a hello at all, with a quarter of a megabyte of text where a number belongs.
    let mut ws = dial(&relay, "mallory", "box").await.expect("tunnel");
    let garbage = format!(
        r#"{{"type":"hello","protocol_version":"{}","daemon_version":"1"}}"#,
        "\\n".repeat(100_000)
    );
    timeout(STEP, ws.send(Message::Text(garbage.into())))
        .await
        .unwrap()
        .unwrap();
    let frame = closed(&mut ws).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1002);
    assert!(frame.reason.as_str().starts_with("invalid hello"));
    wait_for_tunnels(&relay, "mallory", 0).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_tunnel_finishes_its_streams_before_it_closes() {
    let relay = TestRelay::start(relay_config()).await;
    let (_daemon, _backend, socket, device_id) = alice_connected_to(&relay).await;

    // A generation is running on the daemon's tunnel when another tunnel takes the device.
    let body = serde_json::json!({
        "prompt": "long",
        "options": {"num_predict": 20},
        "fake_interval_ms": 50,
    });
    let mut response = send(
        cloudllm_e2e::client()
            .post(relay.api("/api/generate"))
            .bearer_auth(token("alice", Scope::Client))
            .json(&body),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    while lines.is_empty() {
        let chunk = timeout(STEP, response.chunk()).await.unwrap().unwrap();
        buf.extend_from_slice(&chunk.expect("the stream ended early"));
        lines.extend(cloudllm_e2e::take_lines(&mut buf));
    }
    let _impostor = registered(&relay, "alice", &device_id).await;

    // The stream runs to its end on the replaced tunnel; then the tunnel closes as replaced.
    while let Some(chunk) = timeout(STEP, response.chunk())
        .await
        .unwrap()
        .expect("the replaced tunnel cut the stream")
    {
        buf.extend_from_slice(&chunk);
        lines.extend(cloudllm_e2e::take_lines(&mut buf));
    }
    assert_eq!(lines.len(), 21, "every line arrived");
    assert_eq!(lines.last().unwrap()["done"], true);
    wait_status(&socket, STEP, |s| {
        matches!(s.connection, Connection::Replaced { .. })
    })
    .await;
    wait_for_tunnels(&relay, "alice", 1).await;
}
