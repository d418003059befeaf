//! Faithful forwarding: what reaches Ollama, what comes back, what is refused, and the errors a
//! user sees when something is missing.

use cloudllm_e2e::{
    STEP, Stack, TestDaemon, TestRelay, assert_ollama_error, daemon_config, relay_config, send,
    token,
};
use cloudllm_relay::Scope;
use serde_json::json;
use tokio::time::timeout;
use url::Url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_sees_its_own_host_and_none_of_the_callers_credentials() {
    let stack = Stack::start().await;
    let response = stack
        .post("/api/show?verbose=true")
        .header("origin", "https://chat.example.com")
        .header("referer", "https://chat.example.com/page")
        .header("cookie", "session=secret")
        .header("x-request-id", "trace-42")
        .header("x-cloudllm-device", "laptop")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("x-real-ip", "10.1.2.3")
        .header("x-api-key", "sk-secret")
        .header("x-http-method-override", "DELETE")
        .header("x-original-url", "/api/delete")
        .header("cookie2", "$Version=1")
        .header("x-forwarded-for", "10.1.2.3")
        .header("user-agent", "probe/1")
        .body(r#"{"model":"fake"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "trace-42");
    let echo: serde_json::Value = response.json().await.unwrap();
    let seen = stack.backend.records.echoed();
    assert_eq!(seen["host"], stack.backend.addr.to_string().as_str());
    assert_eq!(seen["x-request-id"], "trace-42");
    assert_eq!(seen["content-type"], "application/json");
    assert_eq!(seen["accept"], "application/json");
    for gone in [
        "authorization",
        "origin",
        "referer",
        "cookie",
        "x-cloudllm-device",
        "x-real-ip",
        "x-api-key",
        "x-http-method-override",
        "x-original-url",
        "cookie2",
        "x-forwarded-for",
        "user-agent",
    ] {
        assert!(!seen.contains_key(gone), "{gone} reached Ollama");
    }
    // Ollama's API reads no query string: it is dropped, not passed on unreviewed.
    assert_eq!(echo["uri"], "/api/show");
    assert_eq!(
        stack.backend.records.hits.lock().unwrap().last().unwrap(),
        "/api/show"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_generated_when_the_caller_sends_none() {
    let stack = Stack::start().await;
    let response = stack.post("/api/show").send().await.unwrap();
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let seen = stack.backend.records.echoed();
    assert_eq!(seen["x-request-id"], id.as_str());
    // A hostile id is replaced, not forwarded.
    let response = stack
        .post("/api/show")
        .header("x-request-id", "a b\"c")
        .send()
        .await
        .unwrap();
    assert_ne!(response.headers()["x-request-id"], "a b\"c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_an_endpoint_does_not_take_gets_405_with_allow() {
    let stack = Stack::start().await;
    let long = reqwest::Method::from_bytes("X".repeat(5_000).as_bytes()).unwrap();
    for (method, path, allow) in [
        (reqwest::Method::TRACE, "/api/show", "POST"),
        (reqwest::Method::GET, "/api/show", "POST"),
        (reqwest::Method::PUT, "/api/chat", "POST"),
        (reqwest::Method::POST, "/api/tags", "GET, HEAD"),
        (long, "/api/tags", "GET, HEAD"),
        (reqwest::Method::DELETE, "/v1/models/fake:latest", "GET"),
    ] {
        let response = stack
            .http
            .request(method.clone(), stack.relay.api(path))
            .bearer_auth(token("alice", Scope::Client))
            .send()
            .await
            .unwrap();
        let shown = &method.as_str()[..method.as_str().len().min(16)];
        assert_eq!(response.status(), 405, "{shown} {path}");
        assert_eq!(response.headers()["allow"], allow, "{shown} {path}");
        let body: serde_json::Value = response.json().await.unwrap();
        let message = if path.starts_with("/v1/") {
            &body["error"]["message"]
        } else {
            &body["error"]
        };
        let message = message.as_str().unwrap();
        assert!(message.contains(allow), "{message}");
        assert!(
            message.len() < 400,
            "the method is not echoed whole: {message}"
        );
    }
    // HEAD where Ollama takes it.
    let head = stack
        .http
        .head(stack.relay.api("/api/version"))
        .bearer_auth(token("alice", Scope::Client))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        stack.backend.records.hits.lock().unwrap().as_slice(),
        ["/api/version"],
        "only the HEAD reached Ollama"
    );
}

/// Model names and blob digests that smuggle a path (or bytes no name has) past the router.
const PATHS_IN_DISGUISE: [&str; 6] = [
    "/v1/models/..%2F..%2Fapi%2Fpull",
    "/v1/models/..%2f..%2fapi%2fpull",
    "/v1/models/x%2F..%2F..%2Fapi%2Ftags",
    "/v1/models/a%00b",
    "/v1/models/fake%20latest",
    "/api/blobs/..%2F..%2Fapi%2Fpull",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_name_that_hides_a_path_never_reaches_ollama() {
    let stack = Stack::start().await;
    for path in PATHS_IN_DISGUISE {
        let response = stack.get(path).send().await.unwrap();
        if path.starts_with("/api/blobs/") {
            // Management first: the caller learns which setting to ask for.
            assert_eq!(response.status(), 403, "{path}");
        } else {
            assert_eq!(response.status(), 400, "{path}");
            let body: serde_json::Value = response.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("model name"), "{message}");
        }
    }
    assert_eq!(
        stack.backend.records.hit_count(),
        0,
        "nothing reached Ollama"
    );
    // Real names pass, an escaped `:` decoded: the fake has no route for them, so its 404
    // proves they got through.
    for path in ["/v1/models/fake:latest", "/v1/models/library/fake%3Alatest"] {
        let response = stack.get(path).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    assert_eq!(
        stack.backend.records.hits.lock().unwrap().as_slice(),
        ["/v1/models/fake:latest", "/v1/models/library/fake:latest"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_and_bodies_pass_unchanged() {
    let stack = Stack::start().await;
    let tags: serde_json::Value = stack
        .get("/api/tags")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["models"][0]["name"], "fake:latest");
    // The fake's own 400 for a bad body comes back as is.
    let bad = stack
        .post("/api/generate")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(body["error"].is_string());
    // A large streamed request body arrives whole.
    let big = "y".repeat(3 * 1024 * 1024);
    let response = stack
        .post("/api/generate")
        .json(&json!({"prompt": "big", "context_padding": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    timeout(STEP, response.bytes()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_arrive_whole() {
    // Lines far larger than one WebSocket message (16 KiB) and than the relay's 1 KiB read
    // buffer: every byte arrives, in order.
    let stack = Stack::start().await;
    let line_bytes = 300 * 1024;
    let lines = 12;
    let response = stack
        .post("/api/generate")
        .json(&json!({
            "model": "fake",
            "prompt": "large",
            "options": {"num_predict": lines},
            "fake_line_bytes": line_bytes,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = timeout(STEP, response.bytes()).await.unwrap().unwrap();
    let body = std::str::from_utf8(&body).unwrap();
    let received: Vec<&str> = body.lines().collect();
    assert_eq!(received.len(), lines + 1);
    let padding = "x".repeat(line_bytes);
    for (i, line) in received[..lines].iter().enumerate() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(line["response"], format!("t{i}{padding}"), "line {i}");
    }
    let last: serde_json::Value = serde_json::from_str(received[lines]).unwrap();
    assert_eq!(last["done"], true);
}

/// Ollama's endpoints that change the models on the device.
const MANAGEMENT: [&str; 6] = [
    "/api/pull",
    "/api/delete",
    "/api/create",
    "/api/copy",
    "/api/push",
    "/api/blobs/sha256:00",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_management_is_refused_and_names_the_setting() {
    let stack = Stack::start().await;
    for path in MANAGEMENT {
        let response = send(stack.post(path).json(&json!({"model": "x"}))).await;
        assert_eq!(response.status(), 403, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("allow_model_management"), "{path}: {body}");
    }
    let unknown = stack.post("/api/something-new").send().await.unwrap();
    assert_eq!(unknown.status(), 403);
    assert_eq!(
        stack.backend.records.hit_count(),
        0,
        "nothing reached Ollama"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_management_passes_when_the_owner_enables_it() {
    let relay = TestRelay::start(relay_config()).await;
    let backend = cloudllm_e2e::FakeOllama::start().await;
    let mut config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    config.allow_model_management = true;
    let _daemon = TestDaemon::start(config);
    relay.wait_for_devices("alice", 1).await;
    let response = cloudllm_e2e::client()
        .post(relay.api("/api/pull"))
        .bearer_auth(token("alice", Scope::Client))
        .send()
        .await
        .unwrap();
    // The fake has no /api/pull: its 404 proves the request got through.
    assert_eq!(response.status(), 404);
    let digest = format!("sha256:{}", "0a".repeat(32));
    let blob = format!("/api/blobs/{digest}");
    for (method, path) in [
        (reqwest::Method::DELETE, "/api/delete"),
        (reqwest::Method::HEAD, blob.as_str()),
    ] {
        let response = cloudllm_e2e::client()
            .request(method, relay.api(path))
            .bearer_auth(token("alice", Scope::Client))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    // A digest that is not one is refused before Ollama.
    let response = cloudllm_e2e::client()
        .post(relay.api("/api/blobs/sha256:00"))
        .bearer_auth(token("alice", Scope::Client));
    assert_ollama_error(send(response).await, 400, "64 hex digits").await;
    assert_eq!(
        backend.records.hits.lock().unwrap().as_slice(),
        ["/api/pull", "/api/delete", blob.as_str()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_device_gives_503_in_each_api_shape() {
    let relay = TestRelay::start(relay_config()).await;
    let http = cloudllm_e2e::client();
    let response = relay.get_as("alice", "/api/tags").await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("device is offline"),
        "{body}"
    );
    let response = relay.get_as("alice", "/v1/models").await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("offline"),
        "{body}"
    );
    assert_eq!(body["error"]["type"], "api_error");
    // Unknown routes say where the APIs are.
    let response = http.get(relay.api("/nothing")).send().await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_not_running_gives_502_saying_so() {
    let relay = TestRelay::start(relay_config()).await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = Url::parse(&format!("http://{}", closed.local_addr().unwrap())).unwrap();
    drop(closed);
    let _daemon = TestDaemon::start(daemon_config(&relay.url(), "alice", "laptop", &url));
    relay.wait_for_devices("alice", 1).await;
    let response = relay.get_as("alice", "/api/tags").await;
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("cannot reach Ollama") && message.contains("ollama serve"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_declared_or_streamed() {
    let mut config = relay_config();
    cloudllm_e2e::test_tier(&mut config).max_body_bytes = 64 * 1024;
    let stack = Stack::with_relay_config(config).await;
    let big = vec![b'x'; 200 * 1024];
    let declared = send(stack.post("/api/generate").body(big.clone())).await;
    assert_ollama_error(declared, 413, "65536").await;
    // Chunked, no Content-Length: the relay counts as it streams.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(8 * 1024).map(|c| Ok(c.to_vec())).collect();
    let streamed = stack
        .post("/api/generate")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);
    // Just under the limit passes.
    let fits = stack
        .post("/api/generate")
        .json(&json!({"prompt": "fits", "pad": "z".repeat(60 * 1024)}))
        .send()
        .await
        .unwrap();
    assert_eq!(fits.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_ready_and_waits_for_the_identity_providers_keys() {
    let relay = TestRelay::start(relay_config()).await;
    let http = cloudllm_e2e::client();
    let ready = http.get(relay.api("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.text().await.unwrap(), "ready\n");
    assert_eq!(
        http.get(relay.api("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A relay whose identity provider is unreachable is alive but not ready.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config: cloudllm_relay::RelayConfig = toml::from_str(&format!(
        "listen = \"127.0.0.1:0\"\n[jwks]\nurl = \"http://127.0.0.1:{port}/jwks\"\nissuer = \"http://127.0.0.1:{port}\"\naudience = \"cloudllm\"\n"
    ))
    .unwrap();
    let waiting = TestRelay::start(config).await;
    let response = http.get(waiting.api("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.text().await.unwrap().contains("identity provider"));
    assert_eq!(
        http.get(waiting.api("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// The daemon's log line for `request_id` (from its log buffer, as `cloudllm logs` shows it),
/// once it is there.
async fn daemon_request_line(request_id: &str) -> String {
    let needle = format!("request_id=\"{request_id}\" ");
    let started = tokio::time::Instant::now();
    loop {
        let lines = cloudllm_daemon::logs::LogBuffer::global().recent(1000);
        if let Some(line) = lines.into_iter().find(|line| line.contains(&needle)) {
            return line;
        }
        assert!(
            started.elapsed() < STEP,
            "the daemon logged no line for {request_id}: {:?}",
            cloudllm_daemon::logs::LogBuffer::global().recent(5)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_logs_each_request_once_its_response_has_ended() {
    let stack = Stack::start().await;
    let response = stack
        .post("/api/generate")
        .header("x-request-id", "log-line-ended")
        .json(&json!({"model": "fake", "prompt": "logged", "options": {"num_predict": 5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    let line = daemon_request_line("log-line-ended").await;
    for field in [
        "method=POST".to_owned(),
        "path=/api/generate".to_owned(),
        "status=200".to_owned(),
        format!("bytes={}", body.len()),
        "took=".to_owned(),
        "headers_after=".to_owned(),
    ] {
        assert!(line.contains(&field), "{field} is not in: {line}");
    }

    // A caller who leaves before the end: the line says how much was passed on.
    let mut response = stack
        .post("/api/generate")
        .header("x-request-id", "log-line-left")
        .json(
            &json!({"prompt": "left", "options": {"num_predict": 100000}, "fake_interval_ms": 10}),
        )
        .send()
        .await
        .unwrap();
    let first = timeout(STEP, response.chunk())
        .await
        .unwrap()
        .unwrap()
        .expect("a first chunk");
    drop(response);
    let line = daemon_request_line("log-line-left").await;
    let bytes: u64 = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("bytes="))
        .expect("a bytes field")
        .parse()
        .expect("a number");
    assert!(
        bytes >= first.len() as u64 && bytes < 100_000,
        "{bytes} bytes logged for a stream left after {} bytes: {line}",
        first.len()
    );

    // One the allowlist turns away: its own line, with the status it got.
    let response = stack
        .post("/api/pull")
        .header("x-request-id", "log-line-refused")
        .json(&json!({"model": "fake"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let line = daemon_request_line("log-line-refused").await;
    assert!(
        line.contains("request refused") && line.contains("status=403"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_larger_than_the_tunnel_carries_get_431_and_the_tunnel_goes_on() {
    let stack = Stack::start().await;
    // Well within what the relay reads from a client, over what one tunnel request carries.
    let mut request = stack.post("/api/show");
    for n in 0..20 {
        request = request.header(format!("x-padding-{n}"), "p".repeat(4000));
    }
    let response = timeout(STEP, request.send()).await.unwrap().unwrap();
    assert_ollama_error(response, 431, "fewer or shorter headers").await;
    // The next request on the same tunnel is served.
    let response = timeout(STEP, stack.post("/api/show").send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
}
