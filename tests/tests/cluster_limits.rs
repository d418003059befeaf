//! A user's tier limits hold over the whole cluster, not per node: devices (exact, one Lua
//! script at registration), requests in flight and requests per minute (Redis counters).

use std::time::Duration;

use cloudllm_e2e::cluster::{Node, TestCluster, laptop_and_desktop};
use cloudllm_e2e::{FakeOllama, TestDaemon, next_chunk, send, test_tier, wait_for, wait_until};
use cloudllm_relay::config::TierLimits;
use serde_json::json;

/// Three nodes whose test tier has `limits` applied.
async fn nodes(limits: impl Fn(&mut TierLimits)) -> Option<TestCluster> {
    TestCluster::start(&["n1", "n2", "n3"], |config, _| limits(test_tier(config))).await
}

/// Devices refused for the tier's device limit, counted by the node that refused them.
const DEVICES_REFUSED: &str = "cloudllm_rate_limited_total{limit=\"devices\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_limit_counts_devices_on_every_node() {
    let Some(cluster) = nodes(|tier| tier.devices = 2).await else {
        return;
    };
    let nodes = &cluster.nodes;
    let backend = FakeOllama::start().await;
    let _devices = laptop_and_desktop(nodes, &backend).await;
    // A third device, on a node that holds none of alice's: refused at the door.
    let _tablet = TestDaemon::dial(&nodes[2].url(), "alice", "tablet", &backend);
    wait_until(
        "the third device was not refused",
        Duration::from_millis(50),
        async || nodes[2].metric(DEVICES_REFUSED).await >= 1.0,
    )
    .await;
    assert_eq!(nodes[2].registry.devices_of("alice").len(), 0);

    // Two devices racing for the last place on two nodes at once: exactly one gets it.
    let second = self::nodes(|tier| tier.devices = 1)
        .await
        .expect("Redis, as for the first cluster");
    let racing = &second.nodes;
    let _a = TestDaemon::dial(&racing[0].url(), "bob", "a", &backend);
    let _b = TestDaemon::dial(&racing[1].url(), "bob", "b", &backend);
    wait_for(Duration::from_millis(20), async || {
        let refused =
            racing[0].metric(DEVICES_REFUSED).await + racing[1].metric(DEVICES_REFUSED).await;
        let held: usize = racing
            .iter()
            .map(|n| n.registry.devices_of("bob").len())
            .sum();
        assert!(held <= 1, "bob holds {held} devices with a limit of 1");
        if refused >= 1.0 && held == 1 {
            Ok(())
        } else {
            Err(format!("refused {refused}, held {held}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_and_per_minute_count_on_every_node() {
    let Some(cluster) = nodes(|tier| {
        tier.concurrent_requests = 2;
        tier.requests_per_minute = 6;
    })
    .await
    else {
        return;
    };
    let nodes = &cluster.nodes;
    let backend = FakeOllama::start().await;
    let _daemon = nodes[0].connect("alice", "laptop", &backend).await;
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
        send(node.generate(
            "alice",
            &json!({"model": "fake", "prompt": tag, "options": {"num_predict": lines}, "fake_interval_ms": 100}),
        ))
    };
    // Two long streams in flight, entering at two nodes…
    let mut first = generate(&nodes[0], "one", 1000).await;
    let mut second = generate(&nodes[1], "two", 1000).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    for response in [&mut first, &mut second] {
        next_chunk(response).await;
    }
    // …fill the tier's two places everywhere: a third at the third node is refused.
    let third = generate(&nodes[2], "three", 1).await;
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    assert!(third.text().await.unwrap().contains("at once"));
    // One ends: its place is free again, on any node.
    drop(first);
    backend.records.wait_end("one").await;
    wait_until(
        "the place never came back",
        Duration::from_millis(50),
        async || {
            let response = generate(&nodes[2], "four", 1).await;
            let admitted = response.status() == 200;
            if admitted {
                response.bytes().await.unwrap();
            }
            admitted
        },
    )
    .await;
    drop(second);
    // Six a minute over the cluster: whatever was admitted so far counts, then the rest
    // spread over the nodes until the seventh, which is refused though each node saw few.
    let mut admitted = 0;
    let mut refused = None;
    for i in 0..10 {
        let response = generate(&nodes[i % 3], "rpm", 1).await;
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
