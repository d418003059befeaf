//! The relay's audit log: tunnel, auth and request metadata as JSON lines — and never a token,
//! a prompt or a completion.

use cloudllm_e2e::{STEP, Stack, relay_config, scratch_dir, token};
use cloudllm_relay::Scope;
use serde_json::{Value, json};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_carry_metadata_and_never_secrets_or_content() {
    let path = scratch_dir().join("audit.jsonl");
    let mut config = relay_config();
    config.audit_log = Some(path.display().to_string());
    cloudllm_e2e::test_tier(&mut config).requests_per_minute = 3;
    let stack = Stack::with_relay_config(config).await;

    let prompt = "SECRET-PROMPT-42 tell me everything";
    let body =
        json!({"model": "fake-model", "prompt": prompt, "options": {"num_predict": 3}}).to_string();
    let response = stack
        .post("/api/generate")
        .header("x-request-id", "audit-1")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let completion = timeout(STEP, response.text()).await.unwrap().unwrap();
    assert!(completion.contains("\"response\""));

    let forged = stack
        .http
        .get(stack.relay.api("/api/tags"))
        .bearer_auth("forged.token.x")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let offline = stack.relay.get_as("bob", "/api/tags").await;
    assert_eq!(offline.status(), 503);
    // Alice's third request per minute passes, her fourth is refused.
    assert_eq!(stack.get("/api/tags").send().await.unwrap().status(), 200);
    assert_eq!(stack.get("/api/tags").send().await.unwrap().status(), 200);
    assert_eq!(stack.get("/api/tags").send().await.unwrap().status(), 429);

    let Stack { relay, daemon, .. } = stack;
    relay.stop().await;
    drop(daemon);

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let find = |event: &str, matches: &dyn Fn(&Value) -> bool| {
        lines
            .iter()
            .find(|l| l["event"] == event && matches(l))
            .unwrap_or_else(|| panic!("no {event} line in:\n{text}"))
            .clone()
    };
    let connect = find("tunnel_connect", &|l| l["user"] == "alice");
    assert_eq!(connect["device"], "laptop");
    assert_eq!(connect["addr"], "127.0.0.1");
    let request = find("request", &|l| l["request_id"] == "audit-1");
    assert_eq!(request["user"], "alice");
    assert_eq!(request["device"], "laptop");
    assert_eq!(request["method"], "POST");
    assert_eq!(request["path"], "/api/generate");
    assert_eq!(request["status"], 200);
    assert_eq!(request["bytes_in"], body.len());
    assert_eq!(request["bytes_out"], completion.len());
    assert!(request["duration_ms"].is_u64());
    assert_eq!(request["model"], "fake-model");
    let limited = find("rate_limited", &|l| l["user"] == "alice");
    assert_eq!(limited["limit"], "requests_per_minute");
    assert_eq!(limited["route"], "api");
    assert_eq!(limited["addr"], "127.0.0.1");
    let failure = find("auth_failure", &|l| l["route"] == "api");
    assert_eq!(failure["reason"], "invalid token");
    let offline = find("request", &|l| l["user"] == "bob");
    assert_eq!(offline["status"], 503);
    assert!(offline["device"].is_null());
    let disconnect = find("tunnel_disconnect", &|l| l["user"] == "alice");
    assert_eq!(disconnect["reason"], "relay shutdown");
    assert!(lines.iter().all(|l| l["ts"].as_f64().is_some()));

    // Nothing of the content or the credentials.
    assert!(
        !text.contains("SECRET-PROMPT-42"),
        "prompt in the audit log"
    );
    assert!(
        !text.contains("\"response\""),
        "completion in the audit log"
    );
    for secret in [
        token("alice", Scope::Client),
        token("alice", Scope::Agent),
        "forged.token.x".to_owned(),
    ] {
        let signature = secret.rsplit('.').next().unwrap().to_owned();
        assert!(!text.contains(&signature), "a token in the audit log");
    }
    assert!(!text.contains("eyJ"), "no JWT of any kind in the audit log");
}
