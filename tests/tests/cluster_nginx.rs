//! The example deployment in `packaging/cluster/`, run as shipped (addresses replaced by
//! loopback ports): three relay nodes configured from `relay-node.toml`, a Redis that requires
//! the password in the URL, and a real nginx with `upstream.conf` and the single relay's
//! `packaging/nginx/cloudllm-relay.conf`. Daemons connect through nginx and land on different
//! nodes; every device answers through nginx whichever node nginx picks.
//!
//! Needs `nginx` (`CLOUDLLM_SKIP_NGINX_TEST=1` skips) and `redis-server`
//! (`CLOUDLLM_SKIP_CLUSTER_TEST=1` skips).

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudllm_e2e::cluster::{Node, secret_file};
use cloudllm_e2e::nginx::{self, Nginx};
use cloudllm_e2e::redis::RedisServer;
use cloudllm_e2e::{
    FakeOllama, TestDaemon, client, relay_config, scratch_dir, served, token, wait_until,
};
use cloudllm_relay::{RelayConfig, Scope};
use serde_json::json;

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(packaging(file)).unwrap_or_else(|err| panic!("{file}: {err}"))
}

/// `relay-node.toml` for node `index` (0-based) on `redis_url`, as a node's operator would
/// edit it, with the test's token secret and tiers.
fn node_config(index: usize, redis_url: &str, secret: &Path) -> RelayConfig {
    let text = read("cluster/relay-node.toml")
        .replace("redis://:change-me@10.0.0.20:6379/0", redis_url)
        .replace("relay-1", &format!("relay-{}", index + 1))
        .replace("10.0.0.11:8080", "127.0.0.1:0")
        .replace("10.0.0.11:7443", "127.0.0.1:0")
        .replace("10.0.0.10", "127.0.0.1")
        .replace(
            "/etc/cloudllm/cluster.secret",
            &secret.display().to_string(),
        );
    let path = scratch_dir().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    let loaded = RelayConfig::load(&path).unwrap_or_else(|err| panic!("{err:#}"));
    let test = relay_config();
    RelayConfig {
        secret: test.secret,
        default_tier: test.default_tier,
        tiers: test.tiers,
        auth_failures_per_minute: 0,
        ..loaded
    }
}

/// `upstream.conf` pointing at `nodes`.
fn upstream(nodes: &[Node]) -> String {
    read("cluster/upstream.conf")
        .replace("10.0.0.11:8080", &nodes[0].addr.to_string())
        .replace("10.0.0.12:8080", &nodes[1].addr.to_string())
        .replace("10.0.0.13:8080", &nodes[2].addr.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_deployment_serves_every_device_through_nginx() {
    if !RedisServer::available() {
        return;
    }
    cloudllm_e2e::init_logs();
    let redis = RedisServer::start_with_password("change-me").await;
    let secret = secret_file();
    let mut nodes = Vec::new();
    for index in 0..3 {
        nodes.push(Node::start(node_config(index, &redis.url("redis"), &secret)).await);
    }
    let Some(binary) = nginx::binary() else {
        return;
    };
    let nginx = Nginx::start(&binary, &upstream(&nodes)).await;
    let url = nginx.url();
    let mut backends = Vec::new();
    let mut daemons = Vec::new();
    for device in ["laptop", "desktop", "tablet"] {
        let backend = FakeOllama::start().await;
        daemons.push(TestDaemon::dial(&url, "alice", device, &backend));
        backends.push((device, backend));
        // One at a time, so nginx's round robin spreads them.
        wait_until(
            &format!("{device} did not connect"),
            Duration::from_millis(20),
            async || {
                let connected: usize = nodes
                    .iter()
                    .map(|n| n.registry.devices_of("alice").len())
                    .sum();
                connected >= daemons.len()
            },
        )
        .await;
    }
    let holding = nodes
        .iter()
        .filter(|n| !n.registry.devices_of("alice").is_empty())
        .count();
    assert!(holding >= 2, "nginx put every tunnel on one node");
    for node in &nodes {
        let mut others: Vec<&str> = Vec::new();
        for (device, _) in &backends {
            if node
                .registry
                .devices_of("alice")
                .iter()
                .all(|d| d.name != *device)
            {
                others.push(device);
            }
        }
        others.sort();
        node.wait_for_remote("alice", &others).await;
    }
    // Every device, several times: nginx sends the requests to every node in turn.
    for (device, backend) in &backends {
        for round in 0..3 {
            let request = client()
                .post(format!("{url}api/generate"))
                .bearer_auth(token("alice", Scope::Client))
                .header("x-cloudllm-device", *device)
                .json(&json!({"model": "fake", "prompt": format!("{device}-{round}")}));
            served(request, &format!("{device} round {round}")).await;
        }
        assert_eq!(backend.records.hit_count(), 3, "{device}");
    }
    let mut forwarded = 0.0;
    for node in &nodes {
        forwarded += node.metric("cloudllm_cluster_forwarded_out_total").await;
    }
    assert!(
        forwarded > 0.0,
        "no request needed a hop: the test proved nothing"
    );
}
