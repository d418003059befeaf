//! The tunnel survives the relay going away and notices a peer that died silently.

use std::time::Duration;

use cloudllm_e2e::metrics::metric_value;
use cloudllm_e2e::{
    FakeOllama, STEP, StallProxy, TestDaemon, TestRelay, client, daemon_config, relay_config,
    take_lines, token, wait_status,
};
use cloudllm_proto::ipc::Connection;
use cloudllm_relay::Scope;
use serde_json::json;
use tokio::time::{Instant, timeout};
use url::Url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_in_flight_stream_finishes_and_the_daemon_comes_back() {
    let relay = TestRelay::start(relay_config()).await;
    let addr = relay.relay.addr;
    let backend = FakeOllama::start().await;
    let _daemon = TestDaemon::start(daemon_config(
        &relay.url(),
        "alice",
        "laptop",
        &backend.url(),
    ));
    relay.wait_for_devices("alice", 1).await;
    let http = client();

    // A stream is in flight when the relay is told to stop (SIGTERM).
    let mut response = http
        .post(relay.api("/api/generate"))
        .bearer_auth(token("alice", Scope::Client))
        .json(
            &json!({"prompt": "in-flight", "options": {"num_predict": 20}, "fake_interval_ms": 25}),
        )
        .send()
        .await
        .unwrap();
    let first = timeout(STEP, response.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    relay.begin_shutdown();
    let mut buf = first.to_vec();
    while let Some(chunk) = timeout(STEP, response.chunk()).await.unwrap().unwrap() {
        buf.extend_from_slice(&chunk);
    }
    let lines = take_lines(&mut buf);
    assert_eq!(
        lines.len(),
        21,
        "the in-flight stream finished during the drain"
    );
    assert_eq!(lines.last().unwrap()["done"], true);
    relay.stop().await;

    // A new relay on the same address: the daemon is back without any manual step.
    let mut config = relay_config();
    config.listen = addr;
    let restarted = Instant::now();
    let relay = TestRelay::start(config).await;
    relay.wait_for_devices("alice", 1).await;
    let back_after = restarted.elapsed();
    assert!(
        back_after < Duration::from_secs(5),
        "daemon took {back_after:?} to come back"
    );
    let response = relay.get_as("alice", "/api/tags").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_path_is_noticed_by_both_ends_and_recovers() {
    cloudllm_e2e::init_logs();
    let bound = Duration::from_millis(500);
    let mut config = relay_config();
    config.ping_interval = bound;
    config.ping_timeout = bound;
    let relay = TestRelay::start(config).await;
    let proxy = StallProxy::start(relay.relay.addr).await;
    let backend = FakeOllama::start().await;
    let via_proxy = Url::parse(&format!("http://{}", proxy.addr)).unwrap();
    let mut daemon_config = daemon_config(&via_proxy, "alice", "laptop", &backend.url());
    daemon_config.ping_interval = bound;
    daemon_config.ping_timeout = bound;
    let _daemon = TestDaemon::start(daemon_config);
    relay.wait_for_devices("alice", 1).await;
    assert_eq!(proxy.accepted(), 1);

    proxy.set_stalled(true);
    let stalled_at = Instant::now();
    relay.wait_for_devices("alice", 0).await;
    let relay_noticed = stalled_at.elapsed();
    // Detection bound: interval + timeout = 1 s; allow scheduling slack.
    assert!(
        relay_noticed < Duration::from_secs(3),
        "relay noticed after {relay_noticed:?}"
    );
    let response = relay.get_as("alice", "/api/tags").await;
    assert_eq!(response.status(), 503);

    // The daemon notices on its own and dials again (through the still-stalled path).
    let deadline = Instant::now() + STEP;
    while proxy.accepted() < 2 {
        assert!(Instant::now() < deadline, "daemon never redialled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let daemon_noticed = stalled_at.elapsed();
    assert!(
        daemon_noticed < Duration::from_secs(5),
        "daemon noticed after {daemon_noticed:?}"
    );

    proxy.set_stalled(false);
    relay.wait_for_devices("alice", 1).await;
    let response = relay.get_as("alice", "/api/tags").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_a_rejected_token_keeps_retrying_without_connecting() {
    let relay = TestRelay::start(relay_config()).await;
    let backend = FakeOllama::start().await;
    let mut config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    config.token = Some(cloudllm_proto::Secret::new("forged.token.value"));
    let socket = config.socket_path.clone().expect("a socket path");
    let daemon = TestDaemon::start(config);

    // Proof that it tried, was refused, and tried again: the relay counted two refused
    // tunnels, and the daemon tells the user why.
    let deadline = Instant::now() + STEP;
    loop {
        let refused = tunnel_auth_failures(&relay).await;
        if refused >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay refused {refused} tunnels, expected at least 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_status(&socket, STEP, |s| {
        matches!(&s.connection, Connection::LoginRequired { reason } if reason.contains("refused the token"))
    })
    .await;
    // And none of those attempts got through.
    assert!(relay.relay.registry.is_empty());
    assert!(
        !daemon.is_finished(),
        "the daemon keeps running and retrying"
    );
}

/// How many tunnels the relay refused for a bad token (`cloudllm_auth_failures_total` with
/// `route="tunnel"`), from its `/metrics`.
async fn tunnel_auth_failures(relay: &TestRelay) -> f64 {
    let text = relay.metrics().await;
    metric_value(&text, "cloudllm_auth_failures_total{route=\"tunnel\"}").unwrap_or(0.0)
}
