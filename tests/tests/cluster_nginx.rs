//! The example deployment in `packaging/cluster/`, run as shipped (addresses replaced by
//! loopback ports): three relay nodes configured from `relay-node.toml`, a Redis that requires
//! the password in the URL, and a real nginx with `upstream.conf` and the single relay's
//! `packaging/nginx/cloudllm-relay.conf`. Daemons connect through nginx and land on different
//! nodes; every device answers through nginx whichever node nginx picks.
//!
//! Needs `nginx` (`CLOUDLLM_SKIP_NGINX_TEST=1` skips) and `redis-server`
//! (`CLOUDLLM_SKIP_CLUSTER_TEST=1` skips).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloudllm_e2e::cluster::{Node, secret_file};
use cloudllm_e2e::redis::RedisServer;
use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, client, daemon_config, relay_config, scratch_dir, token,
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

/// nginx with `upstream.conf` (pointing at `nodes`) and the relay snippet; `None` if nginx is
/// missing and may be skipped.
fn nginx(nodes: &[SocketAddr]) -> Option<(Child, SocketAddr, PathBuf)> {
    let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let Some(binary) = binary else {
        assert!(
            std::env::var("CLOUDLLM_SKIP_NGINX_TEST").as_deref() == Ok("1"),
            "nginx not found: install it (Debian: nginx), or set CLOUDLLM_SKIP_NGINX_TEST=1"
        );
        return None;
    };
    let upstream = read("cluster/upstream.conf")
        .replace("10.0.0.11:8080", &nodes[0].to_string())
        .replace("10.0.0.12:8080", &nodes[1].to_string())
        .replace("10.0.0.13:8080", &nodes[2].to_string());
    let snippet = packaging("nginx/cloudllm-relay.conf");
    for _ in 0..5 {
        let dir = scratch_dir();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let temp = |name: &str| dir.join(name).display().to_string();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {pid};\n\
             error_log {log} info;\nevents {{ worker_connections 256; }}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {body};\nproxy_temp_path {proxy};\n\
             fastcgi_temp_path {fcgi};\nuwsgi_temp_path {uwsgi};\nscgi_temp_path {scgi};\n\
             {upstream}\nserver {{\nlisten {addr};\ninclude {snippet};\n}}\n}}\n",
            pid = temp("nginx.pid"),
            log = temp("error.log"),
            body = temp("body"),
            proxy = temp("proxy"),
            fcgi = temp("fastcgi"),
            uwsgi = temp("uwsgi"),
            scgi = temp("scgi"),
            snippet = snippet.display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut child = Command::new(&binary)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx");
        let deadline = std::time::Instant::now() + STEP;
        loop {
            if child.try_wait().unwrap().is_some() {
                break; // its port was taken: try another
            }
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some((child, addr, dir));
            }
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("nginx did not start in five attempts");
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
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let Some((mut nginx, addr, _dir)) = nginx(&addrs) else {
        return;
    };
    let url = url::Url::parse(&format!("http://{addr}")).unwrap();
    let mut backends = Vec::new();
    let mut daemons = Vec::new();
    for device in ["laptop", "desktop", "tablet"] {
        let backend = FakeOllama::start().await;
        daemons.push(TestDaemon::start(daemon_config(
            &url,
            "alice",
            device,
            &backend.url(),
        )));
        backends.push((device, backend));
        // One at a time, so nginx's round robin spreads them.
        let deadline = tokio::time::Instant::now() + STEP;
        while nodes
            .iter()
            .map(|n| n.registry.devices_of("alice").len())
            .sum::<usize>()
            < daemons.len()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{device} did not connect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
            let response = client()
                .post(format!("{url}api/generate"))
                .bearer_auth(token("alice", Scope::Client))
                .header("x-cloudllm-device", *device)
                .json(&json!({"model": "fake", "prompt": format!("{device}-{round}")}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{device} round {round}");
            response.bytes().await.unwrap();
        }
        assert_eq!(backend.records.hit_count(), 3, "{device}");
    }
    let mut forwarded = 0.0;
    for node in &nodes {
        let text = client()
            .get(node.api("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        forwarded += text
            .lines()
            .find_map(|l| {
                l.strip_prefix("cloudllm_cluster_forwarded_out_total ")?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0);
    }
    assert!(
        forwarded > 0.0,
        "no request needed a hop: the test proved nothing"
    );
    let _ = nginx.kill();
    let _ = nginx.wait();
}
