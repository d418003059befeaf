//! The operator's commands, run as the real `cloudllm-relay` binary against a real Redis and
//! running nodes: `cluster status` lists the live nodes and their devices, `cluster drop-user`
//! closes a user's tunnels on every node (and no one else's), and a config without `[cluster]`
//! or an unreachable Redis is explained.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cloudllm_e2e::cluster::{Node, cluster_config, secret_file};
use cloudllm_e2e::redis::RedisServer;
use cloudllm_e2e::{FakeOllama, STEP, TestDaemon, daemon_config, init_logs, relay_config};

/// The `cloudllm-relay` binary, built now so that it is this tree's.
fn relay_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(["build", "-p", "cloudllm-relay", "--bin", "cloudllm-relay"])
        .status()
        .expect("running cargo build");
    assert!(status.success(), "building cloudllm-relay");
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/cluster_admin-… → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("cloudllm-relay")
}

/// Runs `cloudllm-relay cluster <args>` (off the runtime: it blocks): exit success, stdout,
/// stderr.
async fn run(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(relay_binary())
            .arg("cluster")
            .args(&args)
            .env_remove("CLOUDLLM_RELAY_CONFIG")
            .output()
            .expect("running cloudllm-relay")
    });
    let output = tokio::time::timeout(STEP * 6, output)
        .await
        .expect("cloudllm-relay cluster timed out")
        .expect("join");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A config file whose `[cluster]` table points at `redis_url`.
fn config_file(redis_url: &str) -> PathBuf {
    let path = cloudllm_e2e::scratch_dir().join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[cluster]\nredis_url = \"{redis_url}\"\nnode = \"ops\"\npeer_listen = \"127.0.0.1:0\"\nsecret_file = \"{}\"\n",
            secret_file().display()
        ),
    )
    .expect("write the config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_the_nodes_and_drops_a_users_tunnels_everywhere() {
    if !RedisServer::available() {
        return;
    }
    init_logs();
    let redis = RedisServer::start().await;
    let mut nodes = Vec::new();
    for name in ["n1", "n2"] {
        let mut config = relay_config();
        let mut cluster = cluster_config(&redis.url("redis"), name);
        // A refresh a second: the device counts `status` shows follow quickly.
        cluster.presence_ttl = Duration::from_secs(3);
        config.cluster = Some(cluster);
        nodes.push(Node::start(config).await);
    }
    let backend = FakeOllama::start().await;
    let daemon = |node: &Node, user: &str, device: &str| {
        TestDaemon::start(daemon_config(&node.url(), user, device, &backend.url()))
    };
    let _alice_laptop = daemon(&nodes[0], "alice", "laptop");
    let _alice_desktop = daemon(&nodes[1], "alice", "desktop");
    let _bob = daemon(&nodes[0], "bob", "laptop");
    nodes[0].wait_for_devices("alice", 1).await;
    nodes[0].wait_for_devices("bob", 1).await;
    nodes[1].wait_for_devices("alice", 1).await;
    let file = config_file(&redis.url("valkey"));
    let file = file.to_str().unwrap();

    // Status: both nodes live, with the devices each holds.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (ok, out, err) = run(&["status", "--config", file]).await;
        assert!(ok, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        let shows = |node: &str, devices: u64| {
            lines.iter().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.first() == Some(&node)
                    && words.get(1) == Some(&"live")
                    && words.get(2) == Some(&devices.to_string().as_str())
            })
        };
        if out.contains("2 live node(s), 3 device(s)") && shows("n1", 2) && shows("n2", 1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "status said {out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Drop alice: both nodes close her tunnels; bob keeps his.
    let (ok, out, err) = run(&["drop-user", "--user", "alice", "--config", file]).await;
    assert!(ok, "{err}");
    assert!(out.contains("2 node(s)"), "{out}");
    assert!(out.contains("2 device(s) were connected"), "{out}");
    // The tunnels close at once: the devices are gone from both nodes (before the daemons'
    // reconnect backoff brings them back).
    let deadline = tokio::time::Instant::now() + STEP;
    let mut seen_gone = [false, false];
    while seen_gone != [true, true] {
        for (i, node) in nodes.iter().enumerate() {
            seen_gone[i] |= node.registry.devices_of("alice").is_empty();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice's tunnels stayed open"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(nodes[0].registry.devices_of("bob").len(), 1);

    // A node stopped gracefully leaves the list at once.
    nodes[1].stop().await;
    let (ok, out, err) = run(&["status", "--config", file]).await;
    assert!(ok, "{err}");
    assert!(out.contains("1 live node(s)"), "{out}");
    assert!(!out.contains("n2"), "{out}");
}

#[tokio::test]
async fn a_config_without_cluster_or_an_unreachable_redis_is_explained() {
    let plain = cloudllm_e2e::scratch_dir().join("plain.toml");
    std::fs::write(&plain, "listen = \"127.0.0.1:0\"\n").unwrap();
    let (ok, _, err) = run(&["status", "--config", plain.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(err.contains("has no [cluster] table"), "{err}");
    // A port nothing listens on (bound, then let go), with a password that must not show.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = config_file(&format!("redis://:hunter2@127.0.0.1:{port}"));
    let (ok, _, err) = run(&[
        "drop-user",
        "--user",
        "alice",
        "--config",
        file.to_str().unwrap(),
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("cannot reach Redis"), "{err}");
    assert!(err.contains("[cluster] redis_url"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
