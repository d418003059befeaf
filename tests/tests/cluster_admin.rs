//! The operator's commands, run as the real `cloudllm-relay` binary against a real Redis and
//! running nodes: `cluster status` lists the live nodes and their devices, `cluster drop-user`
//! closes a user's tunnels on every node (and no one else's), and a config without `[cluster]`
//! or an unreachable Redis is explained.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cloudllm_e2e::cluster::{TestCluster, laptop_and_desktop, secret_file};
use cloudllm_e2e::{FakeOllama, STEP, wait_for, wait_until};

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
    // A refresh a second: the device counts `status` shows follow quickly.
    let ttl = Duration::from_secs(3);
    let Some(mut cluster) =
        TestCluster::start(&["n1", "n2"], |_, cluster| cluster.presence_ttl = ttl).await
    else {
        return;
    };
    let nodes = &mut cluster.nodes;
    let backend = FakeOllama::start().await;
    let _alice = laptop_and_desktop(nodes, &backend).await;
    let _bob = nodes[0].connect("bob", "laptop", &backend).await;
    let file = config_file(&cluster.redis.url("valkey"));
    let file = file.to_str().unwrap();

    // Status: both nodes live, with the devices each holds.
    wait_for(Duration::from_millis(300), async || {
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
            Ok(())
        } else {
            Err(format!("status said {out}"))
        }
    })
    .await;

    // Drop alice: both nodes close her tunnels; bob keeps his.
    let (ok, out, err) = run(&["drop-user", "--user", "alice", "--config", file]).await;
    assert!(ok, "{err}");
    assert!(out.contains("2 node(s)"), "{out}");
    assert!(out.contains("2 device(s) were connected"), "{out}");
    // The tunnels close at once: the devices are gone from both nodes (before the daemons'
    // reconnect backoff brings them back).
    let mut seen_gone = [false, false];
    wait_until(
        "alice's tunnels stayed open",
        Duration::from_millis(5),
        async || {
            for (i, node) in nodes.iter().enumerate() {
                seen_gone[i] |= node.registry.devices_of("alice").is_empty();
            }
            seen_gone == [true, true]
        },
    )
    .await;
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
