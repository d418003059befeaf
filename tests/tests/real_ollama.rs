//! Conformance against a genuine Ollama server (`scripts/real-ollama`): the tunnel must be
//! transparent to the real thing, including its refusal of foreign `Host` and `Origin` headers.
//! Its model writes garbage quickly: these tests check the protocol, never the words.
//!
//! The server is the repository's own: `scripts/real-ollama start` installs it into the user's
//! cache on first use and starts it (or finds it running). `CLOUDLLM_REAL_OLLAMA_URL` points at
//! one already running instead; `CLOUDLLM_SKIP_REAL_OLLAMA=1` skips these tests knowingly.
//! Otherwise a failure to start is a test failure (they must run in CI), with the script's
//! message saying what is missing.

use std::time::Duration;

use cloudllm_e2e::real_ollama::{self, MODEL};
use cloudllm_e2e::{
    STEP, TestDaemon, TestRelay, assert_ollama_error, client, daemon_config, relay_config,
    take_lines, token,
};
use cloudllm_relay::Scope;
use serde_json::json;
use tokio::time::timeout;

struct Through {
    relay: TestRelay,
    _daemon: TestDaemon,
    http: reqwest::Client,
}

impl Through {
    async fn start() -> Option<Through> {
        let ollama = real_ollama::url().await?;
        let relay = TestRelay::start(relay_config()).await;
        let daemon = TestDaemon::start(daemon_config(&relay.url(), "alice", "desktop", &ollama));
        relay.wait_for_devices("alice", 1).await;
        Some(Through {
            relay,
            _daemon: daemon,
            http: client(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.relay.api(path))
            .bearer_auth(token("alice", Scope::Client))
            // What a browser page would send: real Ollama refuses it unless the daemon drops it.
            .header("origin", "https://chat.example.com")
            .header("referer", "https://chat.example.com/")
            .timeout(Duration::from_secs(120))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_and_version_come_from_the_real_server() {
    let Some(t) = Through::start().await else {
        return;
    };
    let version = t
        .request(reqwest::Method::GET, "/api/version")
        .send()
        .await
        .unwrap();
    assert_eq!(version.status(), 200);
    let version: serde_json::Value = version.json().await.unwrap();
    assert!(version["version"].is_string(), "{version}");

    let tags = t
        .request(reqwest::Method::GET, "/api/tags")
        .send()
        .await
        .unwrap();
    assert_eq!(tags.status(), 200);
    let tags: serde_json::Value = tags.json().await.unwrap();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(names.contains(&MODEL), "{names:?}");

    let models = t
        .request(reqwest::Method::GET, "/v1/models")
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    let models: serde_json::Value = models.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL),
        "{models}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_ndjson_from_the_real_server() {
    let Some(t) = Through::start().await else {
        return;
    };
    let mut response = t
        .request(reqwest::Method::POST, "/api/generate")
        .json(&json!({"model": MODEL, "prompt": "Say hi", "options": {"num_predict": 8, "temperature": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = timeout(STEP * 3, response.chunk()).await.unwrap().unwrap() {
        chunks += 1;
        buf.extend_from_slice(&chunk);
        lines.extend(take_lines(&mut buf));
    }
    assert!(chunks > 1, "streamed in pieces, not buffered");
    let (last, tokens) = lines.split_last().unwrap();
    assert!(!tokens.is_empty());
    for line in tokens {
        assert_eq!(line["model"], MODEL);
        assert!(line["response"].is_string());
        assert_eq!(line["done"], false);
    }
    assert_eq!(last["done"], true);
    assert!(last["eval_count"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_completions_stream_from_the_real_server() {
    let Some(t) = Through::start().await else {
        return;
    };
    let response = t
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .json(&json!({
            "model": MODEL, "stream": true, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = timeout(STEP * 3, response.text()).await.unwrap().unwrap();
    let events: Vec<&str> = body
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks = &events[..events.len() - 1];
    assert!(!chunks.is_empty());
    for event in chunks {
        let chunk: serde_json::Value =
            serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], MODEL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_chat_and_real_errors_pass_through() {
    let Some(t) = Through::start().await else {
        return;
    };
    let response = t
        .request(reqwest::Method::POST, "/api/chat")
        .json(&json!({
            "model": MODEL, "stream": false, "options": {"num_predict": 4},
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["done"], true);
    assert_eq!(body["message"]["role"], "assistant");

    // Ollama's own 404 for a model it does not have comes back unchanged.
    let missing = t
        .request(reqwest::Method::POST, "/api/generate")
        .json(&json!({"model": "no-such-model:1b", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_ollama_error(missing, 404, "not found").await;
    // The relay never forwards model management by default, even to a real server.
    let pull = t
        .request(reqwest::Method::POST, "/api/pull")
        .json(&json!({"model": MODEL}))
        .send()
        .await
        .unwrap();
    assert_eq!(pull.status(), 403);
}
