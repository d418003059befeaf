//! HTTP/2 sessions on demand: an idle tunnel holds no HTTP/2 session; the first request opens
//! one, requests share it, a stream longer than `session_idle` keeps it, and it closes once the
//! device has been idle for `session_idle` — after which the next request opens a new one.

use std::time::Duration;

use cloudllm_e2e::{STEP, Stack, relay_config};
use tokio::time::{Instant, timeout};

/// The relay's `session_idle` in these tests.
const SESSION_IDLE: Duration = Duration::from_millis(400);

/// The relay's gauge of tunnel sessions open now.
const SESSIONS_OPEN: &str = "cloudllm_tunnel_sessions_open";

/// The relay's count of tunnel sessions ever opened.
const SESSIONS_TOTAL: &str = "cloudllm_tunnel_sessions_total";

/// Waits until the relay has `open` sessions open; panics after a bound.
async fn wait_open(stack: &Stack, open: f64) {
    let started = Instant::now();
    while stack.relay.metric(SESSIONS_OPEN).await != open {
        assert!(
            started.elapsed() < SESSION_IDLE * 10,
            "sessions open did not become {open}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_open_on_demand_and_close_when_the_device_is_idle() {
    let mut config = relay_config();
    config.session_idle = SESSION_IDLE;
    let stack = Stack::with_relay_config(config).await;

    // Connected and idle: no session yet.
    assert_eq!(stack.relay.metric(SESSIONS_OPEN).await, 0.0);
    assert_eq!(stack.relay.metric(SESSIONS_TOTAL).await, 0.0);

    // Requests open one session and share it.
    for _ in 0..3 {
        let response = timeout(STEP, stack.get("/api/tags").send())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(stack.relay.metric(SESSIONS_OPEN).await, 1.0);
    assert_eq!(stack.relay.metric(SESSIONS_TOTAL).await, 1.0);

    // A stream twice as long as session_idle keeps its session and arrives whole.
    let lines = 16;
    let interval = SESSION_IDLE * 2 / lines;
    let response = stack
        .post("/api/generate")
        .json(&serde_json::json!({
            "model": "fake", "prompt": "long", "options": {"num_predict": lines},
            "fake_interval_ms": interval.as_millis() as u64,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = timeout(STEP, response.text()).await.unwrap().unwrap();
    let lines_read: Vec<serde_json::Value> = body
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines_read.len(), lines as usize + 1);
    assert_eq!(lines_read.last().unwrap()["done"], true);
    assert_eq!(stack.relay.metric(SESSIONS_TOTAL).await, 1.0);

    // Idle for session_idle: the session closes, the tunnel stays.
    wait_open(&stack, 0.0).await;
    assert_eq!(stack.relay.relay.registry.count("alice"), 1);

    // The next request opens a new session at once.
    let started = Instant::now();
    let response = timeout(STEP, stack.get("/api/tags").send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(stack.relay.metric(SESSIONS_TOTAL).await, 2.0);
    wait_open(&stack, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_a_closing_session_are_served() {
    // A session_idle so short that sessions close between most requests.
    let mut config = relay_config();
    config.session_idle = Duration::from_millis(1);
    let stack = Stack::with_relay_config(config).await;
    // Two rounds of requests a few milliseconds apart, racing the closing sessions; between
    // them the session is seen closed, so that even a machine too busy to leave a gap inside
    // a round still has the next request open a session again.
    for round in 0..2 {
        let requests = (0..20).map(|i| {
            let request = stack.get("/api/tags");
            async move {
                tokio::time::sleep(Duration::from_millis(i * 3)).await;
                timeout(STEP, request.send()).await
            }
        });
        for response in futures_util::future::join_all(requests).await {
            assert_eq!(response.unwrap().unwrap().status(), 200, "round {round}");
        }
        wait_open(&stack, 0.0).await;
    }
    let sessions = stack.relay.metric(SESSIONS_TOTAL).await;
    assert!(sessions >= 2.0, "sessions closed and reopened: {sessions}");
}
