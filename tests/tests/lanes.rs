//! Lanes: a busy device's daemon opens one more connection to each other relay thread, and a
//! request served on a thread goes over that thread's lane (its own daemon thread and its own
//! connection to Ollama); the lanes close once the device is idle, and the relay refuses a
//! lane that names no tunnel, the wrong thread, or a thread that has one.

use std::collections::HashSet;
use std::time::Duration;

use cloudllm_e2e::{STEP, Stack, next_chunk, relay_config, send, token, tunnel_ws_request};
use cloudllm_relay::Scope;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{self, Message};

/// The relay's threads in these tests.
const THREADS: usize = 3;

/// The relay's `session_idle` in these tests.
const SESSION_IDLE: Duration = Duration::from_millis(500);

/// The relay's gauge of lanes open.
const LANES_OPEN: &str = "cloudllm_tunnel_lanes_open";

fn config() -> cloudllm_relay::RelayConfig {
    let mut config = relay_config();
    config.threads = THREADS;
    config.session_idle = SESSION_IDLE;
    config
}

/// An HTTP client that opens a connection for each request: each is placed anew by the relay.
fn unpooled() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// `GET /api/tags` as alice on a connection of its own.
async fn tags_on_a_new_connection(stack: &Stack) {
    let request = unpooled()
        .get(stack.relay.api("/api/tags"))
        .bearer_auth(token("alice", Scope::Client));
    assert_eq!(send(request).await.status(), 200);
}

/// The daemon's connections to Ollama that alice's requests came on since `from` hits.
fn backend_connections(stack: &Stack, from: usize) -> HashSet<std::net::SocketAddr> {
    let peers = stack.backend.records.hit_peers.lock().unwrap();
    peers[from..].iter().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_device_gets_a_lane_to_every_other_thread_until_it_is_idle() {
    let stack = Stack::with_relay_config(config()).await;
    // Connected and idle: the tunnel alone.
    assert_eq!(stack.relay.metric(LANES_OPEN).await, 0.0);

    // The first request makes the device busy: the relay asks for a lane to each other thread.
    tags_on_a_new_connection(&stack).await;
    stack
        .relay
        .wait_metric(LANES_OPEN, (THREADS - 1) as f64)
        .await;

    // Connections now go round the threads, and each thread's requests go over its own lane:
    // requests one after the other reach Ollama on one connection per thread (the tunnel's and
    // each lane's own), where the tunnel alone would reuse one.
    let before = stack.backend.records.hit_peers.lock().unwrap().len();
    for _ in 0..THREADS * 3 {
        tags_on_a_new_connection(&stack).await;
    }
    assert_eq!(backend_connections(&stack, before).len(), THREADS);

    // A stream over a lane arrives whole.
    for _ in 0..THREADS {
        let response = stack
            .post("/api/generate")
            .json(&serde_json::json!({
                "model": "fake", "prompt": "p", "options": {"num_predict": 20}
            }))
            .send()
            .await
            .unwrap();
        let body = timeout(STEP, response.text()).await.unwrap().unwrap();
        assert_eq!(body.lines().count(), 21, "{body}");
    }

    // Idle for session_idle: the lanes close with the session; the tunnel stays.
    stack.relay.wait_metric(LANES_OPEN, 0.0).await;
    assert_eq!(stack.relay.relay.registry.count("alice"), 1);

    // The next busy period asks for them again.
    tags_on_a_new_connection(&stack).await;
    stack
        .relay
        .wait_metric(LANES_OPEN, (THREADS - 1) as f64)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_end_with_their_tunnel() {
    let stack = Stack::with_relay_config(config()).await;
    tags_on_a_new_connection(&stack).await;
    stack
        .relay
        .wait_metric(LANES_OPEN, (THREADS - 1) as f64)
        .await;
    let Stack {
        relay,
        daemon,
        backend: _backend,
        ..
    } = stack;
    daemon.stop().await.expect("the daemon stops");
    relay.wait_metric(LANES_OPEN, 0.0).await;
    assert_eq!(relay.relay.registry.count("alice"), 0);
}

/// Dials a lane upgrade as alice's device with `lane` as the lane header; the upgrade's
/// status, and for an accepted one the close code the relay ends it with.
async fn dial_lane(stack: &Stack, device_id: &str, lane: &str) -> (u16, Option<u16>) {
    let mut request = tunnel_ws_request(&stack.relay, "alice", device_id, "laptop");
    request
        .headers_mut()
        .insert(cloudllm_proto::HEADER_LANE, lane.parse().unwrap());
    let tcp = TcpStream::connect(stack.relay.relay.addr).await.unwrap();
    match timeout(STEP, tokio_tungstenite::client_async(request, tcp))
        .await
        .expect("lane dial timed out")
    {
        Ok((mut ws, response)) => {
            let code = timeout(STEP, async {
                while let Some(message) = ws.next().await {
                    if let Ok(Message::Close(frame)) = message {
                        return frame.map(|f| u16::from(f.code));
                    }
                }
                None
            })
            .await
            .expect("the relay closed the lane");
            (response.status().as_u16(), code)
        }
        Err(tungstenite::Error::Http(response)) => (response.status().as_u16(), None),
        Err(err) => panic!("lane dial: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_lanes_it_did_not_ask_for() {
    let stack = Stack::with_relay_config(config()).await;
    tags_on_a_new_connection(&stack).await;
    stack
        .relay
        .wait_metric(LANES_OPEN, (THREADS - 1) as f64)
        .await;
    let device = stack.relay.relay.registry.devices_of("alice").remove(0);
    let key = device.lane_key().expect("alice's tunnel has lanes");
    let other_key = "0".repeat(32);
    assert_ne!(key, other_key);
    // Not SHARD.KEY.
    assert_eq!(dial_lane(&stack, &device.id, "lane").await, (400, None));
    assert_eq!(dial_lane(&stack, &device.id, "1.short").await, (400, None));
    // A key no tunnel has.
    assert_eq!(
        dial_lane(&stack, &device.id, &format!("1.{other_key}")).await,
        (410, None)
    );
    // Another device's id with the right key.
    assert_eq!(
        dial_lane(&stack, "other", &format!("1.{key}")).await,
        (410, None)
    );
    // A thread the relay does not run: the upgrade lands on another.
    assert_eq!(
        dial_lane(&stack, &device.id, &format!("{THREADS}.{key}"))
            .await
            .0,
        409
    );
    // A thread whose lane is open already: upgraded, then closed as a policy violation.
    let own = (0..THREADS)
        .find(|&shard| device.lanes_missing(THREADS, shard).is_empty())
        .expect("the tunnel's own thread is the one without a lane");
    let laned = (own + 1) % THREADS;
    assert_eq!(
        dial_lane(&stack, &device.id, &format!("{laned}.{key}")).await,
        (101, Some(1008))
    );
    // The lanes the daemon opened are still there, and requests are served.
    assert_eq!(stack.relay.metric(LANES_OPEN).await, (THREADS - 1) as f64);
    tags_on_a_new_connection(&stack).await;
}

/// A slow stream in flight, with what has arrived of it.
type InFlight = (reqwest::Response, Vec<u8>);

/// Makes alice's device busy, waits for its lanes, and starts one slow stream per relay thread,
/// each on a connection of its own: the tunnel carries one, the lanes the others (checked).
/// Returns the lanes' streams and the tunnel's.
async fn a_slow_stream_per_thread(stack: &Stack) -> (Vec<InFlight>, InFlight) {
    // Before there are lanes, the tunnel carries the request: its connection to Ollama is
    // the one this request came on.
    tags_on_a_new_connection(stack).await;
    let tunnel_peer = *stack
        .backend
        .records
        .hit_peers
        .lock()
        .unwrap()
        .last()
        .unwrap();
    stack
        .relay
        .wait_metric(LANES_OPEN, (THREADS - 1) as f64)
        .await;
    let before = stack.backend.records.hit_peers.lock().unwrap().len();
    let mut streams = Vec::new();
    for n in 0..THREADS {
        let request = unpooled()
            .post(stack.relay.api("/api/generate"))
            .bearer_auth(token("alice", Scope::Client))
            .json(&serde_json::json!({
                "prompt": format!("lane {n}"), "options": {"num_predict": 20},
                "fake_interval_ms": 25,
            }));
        let mut response = send(request).await;
        assert_eq!(response.status(), 200);
        let first = next_chunk(&mut response).await.expect("a first line");
        streams.push((response, first.to_vec()));
    }
    assert_eq!(backend_connections(stack, before).len(), THREADS);
    let peers = stack.backend.records.hit_peers.lock().unwrap()[before..].to_vec();
    let on_tunnel = peers
        .iter()
        .position(|peer| *peer == tunnel_peer)
        .expect("one stream on the tunnel");
    let tunnels = streams.remove(on_tunnel);
    (streams, tunnels)
}

/// Reads each stream to its end; panics unless every one arrives whole.
async fn all_arrive_whole(streams: Vec<InFlight>) {
    for (mut response, mut body) in streams {
        while let Some(chunk) = next_chunk(&mut response).await {
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(body).unwrap();
        assert_eq!(text.lines().count(), 21, "{text}");
        assert!(
            text.lines().last().unwrap().contains(r#""done":true"#),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_flight_on_lanes_finish_when_the_relay_shuts_down() {
    let stack = Stack::with_relay_config(config()).await;
    let (mut streams, on_tunnel) = a_slow_stream_per_thread(&stack).await;
    streams.push(on_tunnel);
    // SIGTERM: every stream, on the tunnel and on the lanes, runs to its end.
    stack.relay.begin_shutdown();
    all_arrive_whole(streams).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_flight_on_lanes_finish_when_another_tunnel_takes_the_device() {
    let stack = Stack::with_relay_config(config()).await;
    let (streams, on_tunnel) = a_slow_stream_per_thread(&stack).await;
    // The tunnel's own stream goes away (the caller hung up): the tunnel carries nothing.
    drop(on_tunnel);
    // Another connection with alice's device id: the relay closes her daemon's tunnel as
    // replaced at once, and the lanes' streams still run to their end.
    let old = stack.relay.relay.registry.devices_of("alice").remove(0);
    let request = tunnel_ws_request(&stack.relay, "alice", &old.id, "laptop");
    let tcp = TcpStream::connect(stack.relay.relay.addr).await.unwrap();
    let (mut ws, _) = timeout(STEP, tokio_tungstenite::client_async(request, tcp))
        .await
        .unwrap()
        .unwrap();
    let hello = cloudllm_proto::Control::Hello(cloudllm_proto::Hello {
        protocol_version: cloudllm_proto::PROTOCOL_VERSION,
        daemon_version: "0.0.0-other".into(),
        models: Vec::new(),
        lanes: false,
    });
    ws.send(Message::Text(hello.to_text().into()))
        .await
        .unwrap();
    timeout(STEP, old.replaced())
        .await
        .expect("the tunnel was replaced");
    all_arrive_whole(streams).await;
}
