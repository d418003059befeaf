//! A user's tier limits hold over the whole cluster, not per node: devices (exact, one Lua
//! script at registration), requests in flight and requests per minute (Redis counters).

use std::time::Duration;

use cloudllm_e2e::cluster::{Node, cluster_config};
use cloudllm_e2e::redis::RedisServer;
use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, client, daemon_config, init_logs, relay_config, test_tier, token,
};
use cloudllm_relay::Scope;
use cloudllm_relay::config::TierLimits;
use serde_json::json;

/// Three nodes whose test tier has `limits` applied.
async fn nodes(redis: &RedisServer, limits: impl Fn(&mut TierLimits)) -> Vec<Node> {
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let mut config = relay_config();
        limits(test_tier(&mut config));
        config.cluster = Some(cluster_config(&redis.url("redis"), name));
        nodes.push(Node::start(config).await);
    }
    nodes
}

async fn metric(node: &Node, series: &str) -> f64 {
    let text = client()
        .get(node.api("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn wait_metric(node: &Node, series: &str, at_least: f64) {
    let deadline = tokio::time::Instant::now() + STEP;
    while metric(node, series).await < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} on {} stayed below {at_least}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const DEVICES_REFUSED: &str = "cloudllm_rate_limited_total{limit=\"devices\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_limit_counts_devices_on_every_node() {
    if !RedisServer::available() {
        return;
    }
    init_logs();
    let redis = RedisServer::start().await;
    let nodes = nodes(&redis, |tier| tier.devices = 2).await;
    let backend = FakeOllama::start().await;
    let _laptop = TestDaemon::start(daemon_config(
        &nodes[0].url(),
        "alice",
        "laptop",
        &backend.url(),
    ));
    let _desktop = TestDaemon::start(daemon_config(
        &nodes[1].url(),
        "alice",
        "desktop",
        &backend.url(),
    ));
    nodes[2]
        .wait_for_remote("alice", &["desktop", "laptop"])
        .await;
    // A third device, on a node that holds none of alice's: refused at the door.
    let _tablet = TestDaemon::start(daemon_config(
        &nodes[2].url(),
        "alice",
        "tablet",
        &backend.url(),
    ));
    wait_metric(&nodes[2], DEVICES_REFUSED, 1.0).await;
    assert_eq!(nodes[2].registry.devices_of("alice").len(), 0);

    // Two devices racing for the last place on two nodes at once: exactly one gets it.
    let redis2 = RedisServer::start().await;
    let racing = self::nodes(&redis2, |tier| tier.devices = 1).await;
    let _a = TestDaemon::start(daemon_config(&racing[0].url(), "bob", "a", &backend.url()));
    let _b = TestDaemon::start(daemon_config(&racing[1].url(), "bob", "b", &backend.url()));
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let refused =
            metric(&racing[0], DEVICES_REFUSED).await + metric(&racing[1], DEVICES_REFUSED).await;
        let held: usize = racing
            .iter()
            .map(|n| n.registry.devices_of("bob").len())
            .sum();
        assert!(held <= 1, "bob holds {held} devices with a limit of 1");
        if refused >= 1.0 && held == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "refused {refused}, held {held}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_and_per_minute_count_on_every_node() {
    if !RedisServer::available() {
        return;
    }
    init_logs();
    let redis = RedisServer::start().await;
    let nodes = nodes(&redis, |tier| {
        tier.concurrent_requests = 2;
        tier.requests_per_minute = 6;
    })
    .await;
    let backend = FakeOllama::start().await;
    let _daemon = TestDaemon::start(daemon_config(
        &nodes[0].url(),
        "alice",
        "laptop",
        &backend.url(),
    ));
    nodes[2].wait_for_remote("alice", &["laptop"]).await;
    // The window is a calendar minute: start early in one, so that all of it fits.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second > 40 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let generate = |node: &Node, tag: &str, lines: u32| {
        client()
            .post(node.api("/api/generate"))
            .bearer_auth(token("alice", Scope::Client))
            .json(&json!({"model": "fake", "prompt": tag, "options": {"num_predict": lines}, "fake_interval_ms": 100}))
            .send()
    };
    // Two long streams in flight, entering at two nodes…
    let mut first = generate(&nodes[0], "one", 1000).await.unwrap();
    let mut second = generate(&nodes[1], "two", 1000).await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    for response in [&mut first, &mut second] {
        tokio::time::timeout(STEP, response.chunk())
            .await
            .unwrap()
            .unwrap();
    }
    // …fill the tier's two places everywhere: a third at the third node is refused.
    let third = generate(&nodes[2], "three", 1).await.unwrap();
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    assert!(third.text().await.unwrap().contains("at once"));
    // One ends: its place is free again, on any node.
    drop(first);
    backend.records.wait_end("one").await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let response = generate(&nodes[2], "four", 1).await.unwrap();
        if response.status() == 200 {
            response.bytes().await.unwrap();
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(second);
    // Six a minute over the cluster: whatever was admitted so far counts, then the rest
    // spread over the nodes until the seventh, which is refused though each node saw few.
    let mut admitted = 0;
    let mut refused = None;
    for i in 0..10 {
        let response = generate(&nodes[i % 3], "rpm", 1).await.unwrap();
        if response.status() == 429 {
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        admitted += 1;
    }
    let refused = refused.expect("the cluster-wide rate limit refused a request");
    // Admitted before this loop: "one", "two" and "four" (refused for concurrency, the
    // other tries of "four" and "three" never reached the minute's count).
    assert_eq!(admitted, 3, "admitted past a limit of 6 a minute");
    assert!(refused.headers().contains_key("retry-after"));
    assert!(refused.text().await.unwrap().contains("per minute"));
}
