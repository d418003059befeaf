//! Who may do what: bad tokens are refused before anything else happens, scopes are enforced,
//! and one user's requests never reach another user's device.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cloudllm_e2e::tokens::{now_unix, sign, sign_with_header};
use cloudllm_e2e::{
    FakeOllama, STEP, Stack, TestDaemon, assert_ollama_error, client, daemon_config, send, token,
    tunnel_upgrade,
};
use cloudllm_proto::Secret;
use cloudllm_relay::{Keys, Scope};
use serde_json::json;
use tokio::time::timeout;

/// Tokens that must all be refused with 401.
fn bad_tokens() -> Vec<(&'static str, String)> {
    let b64 = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = |scope: &str| json!({"sub": "alice", "scope": scope, "exp": now_unix() + 600});
    let other_key = Keys::new(&Secret::new("another-secret-another-secret-0123456"));
    vec![
        ("garbage", "not-a-jwt".to_owned()),
        (
            "expired an hour ago",
            sign(&json!({"sub": "alice", "scope": "client", "exp": now_unix() - 3600})),
        ),
        (
            "unknown scope",
            sign(&json!({"sub": "alice", "scope": "admin", "exp": now_unix() + 600})),
        ),
        (
            "no subject",
            sign(&json!({"scope": "client", "exp": now_unix() + 600})),
        ),
        (
            "no expiry",
            sign(&json!({"sub": "alice", "scope": "client"})),
        ),
        (
            "HS384 with the right secret",
            sign_with_header(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
                &claims("client"),
            ),
        ),
        (
            "wrong signature",
            other_key
                .issue("alice", Scope::Client, None, Duration::from_secs(600))
                .unwrap(),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(json!({"alg": "none", "typ": "JWT"})),
                b64(claims("client"))
            ),
        ),
        ("tampered", {
            let good = token("bob", Scope::Client);
            let parts: Vec<&str> = good.split('.').collect();
            format!("{}.{}.{}", parts[0], b64(claims("client")), parts[2])
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_401_on_the_api_and_nothing_reaches_the_device() {
    let stack = Stack::start().await;
    let http = client();
    let no_token = send(http.get(stack.relay.api("/api/tags"))).await;
    assert_eq!(no_token.status(), 401);
    assert_eq!(no_token.headers()["www-authenticate"], "Bearer");
    assert_ollama_error(no_token, 401, "bearer token").await;
    for (what, bad) in bad_tokens() {
        let response = send(http.get(stack.relay.api("/api/tags")).bearer_auth(&bad)).await;
        assert_eq!(response.status(), 401, "{what}");
        let v1 = send(http.get(stack.relay.api("/v1/models")).bearer_auth(&bad)).await;
        assert_eq!(v1.status(), 401, "{what} on /v1");
        let body: serde_json::Value = v1.json().await.unwrap();
        assert!(
            body["error"]["message"].is_string(),
            "OpenAI error shape on /v1: {body}"
        );
    }
    let agent_token = send(
        http.get(stack.relay.api("/api/tags"))
            .bearer_auth(token("alice", Scope::Agent)),
    )
    .await;
    assert_eq!(
        agent_token.status(),
        403,
        "an agent token cannot send requests"
    );
    let hits = stack.backend.records.hits();
    assert!(hits.is_empty(), "nothing reached the device: {hits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_401_on_the_tunnel_before_any_upgrade() {
    let stack = Stack::start().await;
    let http = client();
    let version = cloudllm_proto::PROTOCOL_VERSION.to_string();
    let upgrade = |token: Option<&str>| {
        let mut request = tunnel_upgrade(&http, &stack.relay, "intruder", "intruder");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(upgrade(None).await.unwrap().status(), 401);
    for (what, bad) in bad_tokens() {
        assert_eq!(upgrade(Some(&bad)).await.unwrap().status(), 401, "{what}");
    }
    let client_scope = upgrade(Some(&token("mallory", Scope::Client)))
        .await
        .unwrap();
    assert_eq!(
        client_scope.status(),
        403,
        "a client token cannot open a tunnel"
    );
    // A good token without a WebSocket upgrade is a plain 400.
    let plain = http
        .get(stack.relay.api("/tunnel"))
        .bearer_auth(token("mallory", Scope::Agent))
        .header("x-cloudllm-protocol", version.as_str())
        .header("x-cloudllm-device-id", "d")
        .header("x-cloudllm-device-name", "d")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    assert!(plain.text().await.unwrap().contains("WebSocket upgrade"));
    // A daemon of another protocol version is told to upgrade, before any upgrade.
    let old = http
        .get(stack.relay.api("/tunnel"))
        .bearer_auth(token("mallory", Scope::Agent))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("x-cloudllm-protocol", "1")
        .header("x-cloudllm-device-id", "d")
        .header("x-cloudllm-device-name", "d")
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 400);
    let text = old.text().await.unwrap();
    assert!(text.contains("upgrade cloudllmd"), "{text}");
    assert_eq!(
        stack.relay.relay.registry.len(),
        1,
        "only alice's device is connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_only_ever_reaches_their_own_devices() {
    let stack = Stack::start().await;
    // Bob has no device yet: his requests fail and never touch alice's.
    let bob = |path: &str| {
        stack
            .http
            .post(stack.relay.api(path))
            .bearer_auth(token("bob", Scope::Client))
    };
    let offline = send(bob("/api/generate").json(&json!({"prompt": "bob-1"}))).await;
    assert_ollama_error(offline, 503, "offline").await;
    // Naming alice's device does not help.
    let named = bob("/api/generate")
        .header("x-cloudllm-device", "laptop")
        .json(&json!({"prompt": "bob-2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(named.status(), 503);
    assert_eq!(stack.backend.records.hit_count(), 0);

    // Bob connects his own device with the same name; each user reaches only their own.
    let bob_backend = FakeOllama::start().await;
    let _bob_daemon = TestDaemon::start(daemon_config(
        &stack.relay.url(),
        "bob",
        "laptop",
        &bob_backend.url(),
    ));
    stack.relay.wait_for_devices("bob", 1).await;
    for i in 0..10 {
        let tag = format!("bob-{i}");
        let response = bob("/api/generate")
            .json(&json!({"prompt": tag}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        timeout(STEP, response.bytes()).await.unwrap().unwrap();
        let tag = format!("alice-{i}");
        let response = stack
            .post("/api/generate")
            .json(&json!({"prompt": tag}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        timeout(STEP, response.bytes()).await.unwrap().unwrap();
    }
    let alice_tags: Vec<String> = stack
        .backend
        .records
        .produced
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let bob_tags: Vec<String> = bob_backend
        .records
        .produced
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(alice_tags.len(), 10);
    assert_eq!(bob_tags.len(), 10);
    assert!(
        alice_tags.iter().all(|t| t.starts_with("alice-")),
        "{alice_tags:?}"
    );
    assert!(
        bob_tags.iter().all(|t| t.starts_with("bob-")),
        "{bob_tags:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_the_relay_makes_itself_carry_a_request_id() {
    let stack = Stack::start().await;
    let http = client();
    let id_of = |response: &reqwest::Response| {
        response
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let is_uuid = |id: Option<String>| id.is_some_and(|id| id.len() == 36 && id.contains('-'));

    let unauthorized = send(http.get(stack.relay.api("/api/tags"))).await;
    assert_eq!(unauthorized.status(), 401);
    assert!(
        is_uuid(id_of(&unauthorized)),
        "{:?}",
        unauthorized.headers()
    );

    let echoed = send(
        http.get(stack.relay.api("/v1/models"))
            .header("x-request-id", "my-trace-7"),
    )
    .await;
    assert_eq!(echoed.status(), 401);
    assert_eq!(id_of(&echoed).as_deref(), Some("my-trace-7"));

    let not_found = send(http.get(stack.relay.api("/no-such-page"))).await;
    assert_eq!(not_found.status(), 404);
    assert!(is_uuid(id_of(&not_found)), "{:?}", not_found.headers());

    let tunnel = send(http.get(stack.relay.api("/tunnel")).bearer_auth("forged")).await;
    assert_eq!(tunnel.status(), 401);
    assert!(is_uuid(id_of(&tunnel)), "{:?}", tunnel.headers());
}
