//! A relay cluster on a real Redis: three nodes, daemons spread over them, and requests that
//! enter at any node. Every device is reachable from every node, model lists merge across
//! nodes, a stream crosses the hop line by line, a caller hanging up stops the generation on
//! the far side, and a node-to-node request that is not signed with the shared secret (or is
//! replayed, late or at once) is refused.

use std::time::Duration;

use cloudllm_e2e::cluster::{CLUSTER_SECRET, Node, TestCluster};
use cloudllm_e2e::fake_ollama::StreamEnd;
use cloudllm_e2e::redis::RedisServer;
use cloudllm_e2e::{
    FakeOllama, TestDaemon, client, init_logs, next_chunk, send, send_for_json, served, token,
    wait_for, wait_until,
};
use cloudllm_relay::Scope;
use cloudllm_relay::cluster::peer::Peers;
use serde_json::{Value, json};

/// Three nodes on one Redis (the second through the `valkey://` alias).
async fn three_nodes() -> Option<TestCluster> {
    TestCluster::start(&["n1", "n2", "n3"], |_, cluster| {
        if cluster.node == "n2" {
            cluster.redis_url = cluster.redis_url.replacen("redis://", "valkey://", 1);
        }
    })
    .await
}

/// A fake Ollama listing `models`, and a daemon of `user`'s `device` on `node`.
async fn device(
    node: &Node,
    user: &str,
    device: &str,
    models: &[&str],
) -> (FakeOllama, TestDaemon) {
    let backend = FakeOllama::start().await;
    backend.set_models(models);
    let daemon = TestDaemon::dial(&node.url(), user, device, &backend);
    (backend, daemon)
}

async fn names(response: reqwest::Response, field: &str, key: &str) -> Vec<String> {
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let mut names: Vec<String> = body[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[key].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Requests to `/api/show` that reached `backend` through a tunnel.
fn shows(backend: &FakeOllama) -> usize {
    let hits = backend.records.hits.lock().unwrap();
    hits.iter()
        .filter(|path| path.as_str() == "/api/show")
        .count()
}

/// [`three_nodes`] and alice's desktop (model `beta`) on the second, once that node holds it.
async fn three_nodes_and_a_desktop() -> Option<(TestCluster, FakeOllama, TestDaemon)> {
    let cluster = three_nodes().await?;
    let (backend, daemon) = device(&cluster.nodes[1], "alice", "desktop", &["beta:latest"]).await;
    cluster.nodes[1].wait_for_devices("alice", 1).await;
    Some((cluster, backend, daemon))
}

/// Generates on `nodes[0]` as alice, served by her desktop on `nodes[1]`, once the first node
/// sees it.
async fn generate_across(nodes: &[Node], prompt: &str) -> (FakeOllama, TestDaemon) {
    let (backend, daemon) = device(&nodes[1], "alice", "desktop", &["beta:latest"]).await;
    nodes[0].wait_for_remote("alice", &["desktop"]).await;
    let body = json!({"model": "beta", "prompt": prompt});
    served(nodes[0].generate("alice", &body), "across the hop").await;
    (backend, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_entering_at_any_node_reaches_every_device() {
    let Some(cluster) = three_nodes().await else {
        return;
    };
    let nodes = &cluster.nodes;
    let (laptop, _d1) = device(&nodes[0], "alice", "laptop", &["alpha:latest"]).await;
    let (desktop, _d2) = device(&nodes[1], "alice", "desktop", &["beta:latest"]).await;
    let (_server, _d3) = device(&nodes[2], "bob", "server", &["gamma:latest"]).await;
    nodes[0].wait_for_devices("alice", 1).await;
    nodes[1].wait_for_devices("alice", 1).await;
    nodes[2].wait_for_devices("bob", 1).await;
    nodes[2]
        .wait_for_remote("alice", &["desktop", "laptop"])
        .await;
    for node in nodes {
        // alice's model lists merge across the nodes, whichever node answers.
        let get = |path: &str| {
            client()
                .get(node.api(path))
                .bearer_auth(token("alice", Scope::Client))
        };
        let tags = names(send(get("/api/tags")).await, "models", "name").await;
        assert_eq!(tags, ["alpha:latest", "beta:latest"], "on {}", node.name);
        let models = names(send(get("/v1/models")).await, "data", "id").await;
        assert_eq!(models, ["alpha:latest", "beta:latest"], "on {}", node.name);
        // And the web page's device list names both, with their models.
        let devices = send_for_json(get("/cloudllm/devices")).await;
        let listed: Vec<(&str, &str)> = devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().unwrap(),
                    d["models"][0].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            [("desktop", "beta:latest"), ("laptop", "alpha:latest")]
        );
        // By device name, and by model, from every node.
        let by_device = |target: &str| {
            let body = json!({"model": "x", "prompt": format!("{}-{target}", node.name)});
            node.generate("alice", &body)
                .header("x-cloudllm-device", target)
        };
        let by_model =
            |model: &str| node.generate("alice", &json!({"model": model, "prompt": "by-model"}));
        for (target, request, backend) in [
            ("laptop", by_device("laptop"), &laptop),
            ("desktop", by_device("desktop"), &desktop),
            ("alpha", by_model("alpha"), &laptop),
            ("beta", by_model("beta"), &desktop),
        ] {
            let before = backend.records.hit_count();
            served(request, &format!("{target} via {}", node.name)).await;
            assert_eq!(
                backend.records.hit_count(),
                before + 1,
                "{target} via {}",
                node.name
            );
        }
        // A model no device has is named as such, with every device.
        let response = send(node.generate("alice", &json!({"model": "nope", "prompt": "x"}))).await;
        assert_eq!(response.status(), 404);
        let text = response.text().await.unwrap();
        assert!(
            text.contains("laptop") && text.contains("desktop"),
            "{text}"
        );
        // bob never reaches alice's devices, from any node.
        let response = send(
            node.generate("bob", &json!({"model": "x", "prompt": "x"}))
                .header("x-cloudllm-device", "laptop"),
        )
        .await;
        assert_eq!(
            response.status(),
            503,
            "bob reached alice's laptop via {}",
            node.name
        );
    }
    // The request id travels across the hop to the device, and back.
    let response = send(
        client()
            .post(nodes[2].api("/api/show"))
            .bearer_auth(token("alice", Scope::Client))
            .header("x-cloudllm-device", "laptop")
            .header("x-request-id", "hop-request-1")
            .json(&json!({"model": "alpha"})),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "hop-request-1");
    let echoed = laptop.records.echoed();
    assert_eq!(echoed["x-request-id"], "hop-request-1");
    assert!(
        !echoed
            .keys()
            .any(|k| k.as_str().starts_with("x-cloudllm-peer")),
        "node-to-node headers reached the device: {echoed:?}"
    );
    assert!(!echoed.contains_key("authorization"));
    // No node asks its busy devices for lanes: a lane's upgrade could reach another node.
    for node in nodes {
        assert!(
            node.registry.all().iter().all(|d| !d.has_lanes()),
            "{}",
            node.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_crosses_the_hop_line_by_line_and_hanging_up_stops_it() {
    let Some((cluster, backend, _daemon)) = three_nodes_and_a_desktop().await else {
        return;
    };
    let nodes = &cluster.nodes;
    nodes[0].wait_for_remote("alice", &["desktop"]).await;
    // 10 lines 150 ms apart: the first reaches the caller long before the last is produced.
    let paced = json!({"model": "beta", "prompt": "paced", "options": {"num_predict": 10}, "fake_interval_ms": 150});
    let mut response = send(nodes[0].generate("alice", &paced)).await;
    assert_eq!(response.status(), 200);
    let first = next_chunk(&mut response).await.expect("a first line");
    let first_at = tokio::time::Instant::now();
    assert!(String::from_utf8_lossy(&first).contains("\"done\":false"));
    let (ended_at, end) = backend.records.wait_end("paced").await;
    assert_eq!(end, StreamEnd::Completed);
    assert!(
        ended_at > first_at + Duration::from_millis(500),
        "the hop buffered the stream"
    );
    while next_chunk(&mut response).await.is_some() {}

    // A caller that hangs up mid-stream stops the generation on the node that holds the device.
    let cancelled = json!({"model": "beta", "prompt": "cancelled", "options": {"num_predict": 1000}, "fake_interval_ms": 50});
    let mut response = send(nodes[2].generate("alice", &cancelled)).await;
    next_chunk(&mut response).await.expect("a first line");
    let hung_up = tokio::time::Instant::now();
    drop(response);
    let (ended_at, end) = backend.records.wait_end("cancelled").await;
    assert_eq!(end, StreamEnd::Cancelled);
    assert!(
        ended_at - hung_up < Duration::from_secs(5),
        "{:?}",
        ended_at - hung_up
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_or_late_node_to_node_request_is_refused() {
    let Some((cluster, backend, _daemon)) = three_nodes_and_a_desktop().await else {
        return;
    };
    let peer = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = format!("http://{}/api/show", cluster.nodes[1].peer_addr);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let signed = |secret: &str, at: u128| {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-request-id", http::HeaderValue::from_static("peer-test"));
        Peers::new(secret.as_bytes(), "n1".into()).sign(
            &mut headers,
            ("POST", "/api/show"),
            "alice",
            "alice-desktop",
            at,
        );
        headers
    };
    let send_signed = |headers: http::HeaderMap| send(peer.post(&url).headers(headers).body("{}"));
    let signed_at = |secret: &str, at: u128| send_signed(signed(secret, at));
    // Unsigned: refused, and nothing reaches the device.
    let unsigned = send(
        peer.post(&url)
            .header("x-cloudllm-peer-node", "n1")
            .header("x-cloudllm-peer-user", "616c696365")
            .header("x-cloudllm-device", "alice-desktop"),
    )
    .await;
    assert_eq!(unsigned.status(), 401);
    // Signed with another secret.
    let forged = signed_at("not-the-cluster-secret-not-the-cluster-secret", now).await;
    assert_eq!(forged.status(), 401);
    // Signed properly, but a minute ago: a replay.
    let late = signed_at(CLUSTER_SECRET, now - 60_000).await;
    assert_eq!(late.status(), 401);
    assert_eq!(shows(&backend), 0);
    // Signed properly and fresh: served.
    let captured = signed(CLUSTER_SECRET, now);
    let fresh = send_signed(captured.clone()).await;
    assert_eq!(fresh.status(), 200);
    assert_eq!(shows(&backend), 1);
    // The same signed request captured on the wire and sent again at once, well within the
    // clock window: refused, and nothing more reaches the device.
    let replayed = send_signed(captured).await;
    assert_eq!(replayed.status(), 401);
    assert!(replayed.text().await.unwrap().contains("already used"));
    assert_eq!(shows(&backend), 1);
    assert_eq!(
        cluster.nodes[1]
            .metric("cloudllm_cluster_forwarded_refused_total")
            .await,
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_name_the_node() {
    let dir = cloudllm_e2e::scratch_dir();
    let audit_log = |name: &str| dir.join(format!("{name}.audit")).display().to_string();
    let Some(cluster) = TestCluster::start(&["n1", "n2"], |config, cluster| {
        config.audit_log = Some(audit_log(&cluster.node));
    })
    .await
    else {
        return;
    };
    let (_backend, _daemon) = generate_across(&cluster.nodes, "audited").await;
    let line = wait_for(Duration::from_millis(50), async || {
        let text = std::fs::read_to_string(dir.join("n1.audit")).unwrap_or_default();
        match text.lines().find(|l| l.contains("\"event\":\"request\"")) {
            Some(line) => Ok(serde_json::from_str::<Value>(line).unwrap()),
            None => Err("no request line in n1's audit log".to_owned()),
        }
    })
    .await;
    assert_eq!(line["node"], "n1");
    assert_eq!(line["device"], "desktop");
    let connects = std::fs::read_to_string(dir.join("n2.audit")).unwrap();
    let connect = connects
        .lines()
        .find(|l| l.contains("tunnel_connect"))
        .expect("n2 audited the tunnel");
    assert!(connect.contains("\"node\":\"n2\""), "{connect}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_redis_over_tls_with_a_private_ca() {
    if !RedisServer::available() {
        return;
    }
    init_logs();
    // A private CA and a certificate for localhost, as an internal Redis would have.
    let dir = cloudllm_e2e::scratch_dir();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (ca, cert_file, key_file) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca, &ca_pem).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let (_redis, tls_port) = RedisServer::start_tls(&cert_file, &key_file, &ca).await;
    let url = format!("valkeys://localhost:{tls_port}");
    let mut nodes = Vec::new();
    for name in ["n1", "n2"] {
        nodes.push(Node::on(&url, name, |_, cluster| cluster.ca_file = Some(ca.clone())).await);
    }
    let (backend, _daemon) = generate_across(&nodes, "over-tls").await;
    assert_eq!(backend.records.hit_count(), 1);
    // Without the CA the same URL is refused (the certificate is not a public one): degraded.
    let blind = Node::on(&format!("rediss://localhost:{tls_port}"), "n3", |_, _| {}).await;
    wait_until(
        "a node trusted an unknown CA",
        Duration::from_millis(50),
        async || blind.cluster.is_degraded(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloudllm_open_code_minted_on_one_node_works_once_on_any_other() {
    let Some(cluster) = three_nodes().await else {
        return;
    };
    let nodes = &cluster.nodes;
    // The daemon's `cloudllm open` reaches one node through the balancer …
    let minted = send_for_json(
        client()
            .post(nodes[0].api("/cloudllm/open"))
            .bearer_auth(token("alice", Scope::Agent)),
    )
    .await;
    let code = minted["code"].as_str().expect("a code").to_owned();
    // … and the browser's exchange another: it signs alice in there.
    let exchange = |node: usize| {
        client()
            .post(nodes[node].api("/cloudllm/open/exchange"))
            .json(&serde_json::json!({ "code": code }))
            .send()
    };
    let first = exchange(1).await.unwrap();
    assert_eq!(first.status(), 200, "the code works on another node");
    let signed_in: Value = first.json().await.unwrap();
    let devices = client()
        .get(nodes[2].api("/cloudllm/devices"))
        .bearer_auth(signed_in["token"].as_str().expect("a token"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        devices.status(),
        200,
        "the token it bought is alice's client token"
    );
    // Once only, over every node, the minting one included.
    for node in [2, 0, 1] {
        assert_eq!(
            exchange(node).await.unwrap().status(),
            401,
            "reused on node {node}"
        );
    }
}
