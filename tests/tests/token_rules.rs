//! Token validation and the per-address failure budget, seen from outside: the same rules for
//! every token (`nbf`, no `crit`, a `sub` that can be logged) on the API and the tunnel; and a
//! valid token passes from an address over its failure budget while bad ones still get 429.
//! (`X-Forwarded-For` and the budget: `limits.rs`.)

use cloudllm_e2e::tokens::{now_unix, sign, sign_with_header};
use cloudllm_e2e::{Stack, client_from, relay_config, send, token, tunnel_upgrade};
use cloudllm_relay::Scope;
use serde_json::json;

/// Validly signed tokens that break one rule each, and what the refusal must say.
fn rule_breakers() -> Vec<(&'static str, String, &'static str)> {
    let claims = |sub: &str| json!({"sub": sub, "scope": "client agent", "exp": now_unix() + 600, "iss": "cloudllm-relay"});
    let mut later = claims("alice");
    later["nbf"] = json!(now_unix() + 3600);
    let mut crit = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    crit.crit = Some(vec!["exp-policy".to_owned()]);
    vec![
        ("nbf an hour ahead", sign(&later), "nbf"),
        (
            "a critical header extension",
            sign_with_header(&crit, &claims("alice")),
            "crit",
        ),
        (
            "a newline in sub",
            sign(&claims("alice\nINFO cloudllm_relay: forged")),
            "`sub`",
        ),
        (
            "an escape sequence in sub",
            sign(&claims("alice\u{1b}[2J")),
            "`sub`",
        ),
        ("a sub of 1 KiB", sign(&claims(&"a".repeat(1024))), "`sub`"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_gets_the_same_rules_on_the_api_and_the_tunnel() {
    let stack = Stack::start().await;
    let http = cloudllm_e2e::client();
    for (what, bad, says) in rule_breakers() {
        let response = send(http.get(stack.relay.api("/api/tags")).bearer_auth(&bad)).await;
        assert_eq!(response.status(), 401, "{what}");
        let body: serde_json::Value = response.json().await.unwrap();
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {message}");

        let upgrade = tunnel_upgrade(&http, &stack.relay, "intruder", "intruder");
        let tunnel = send(upgrade.bearer_auth(&bad)).await;
        assert_eq!(tunnel.status(), 401, "{what} on the tunnel");
    }
    assert_eq!(
        stack.relay.relay.registry.len(),
        1,
        "only alice's own daemon is connected"
    );
    let hits = stack.backend.records.hits();
    assert!(hits.is_empty(), "nothing reached the device: {hits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_passes_from_an_address_over_its_failure_budget() {
    let mut config = relay_config();
    config.auth_failures_per_minute = 3;
    let stack = Stack::with_relay_config(config).await;
    let url = stack.relay.api("/api/tags");
    // Someone behind the same NAT as alice guesses tokens until the address is over budget.
    let nat = client_from("127.0.0.7");
    for _ in 0..3 {
        let response = nat.get(&url).bearer_auth("forged").send().await.unwrap();
        assert_eq!(response.status(), 401);
    }
    let blocked = nat.get(&url).bearer_auth("forged").send().await.unwrap();
    assert_eq!(blocked.status(), 429);
    assert!(blocked.headers().contains_key("retry-after"));
    // Alice, from the same address, is served all the same …
    for _ in 0..3 {
        let response = nat
            .get(&url)
            .bearer_auth(token("alice", Scope::Client))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // … and so is her daemon opening its tunnel (the same admission path) …
    let tunnel = |token: String| {
        tunnel_upgrade(&nat, &stack.relay, "alice-desktop", "desktop")
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        tunnel(token("alice", Scope::Agent)).await.unwrap().status(),
        101
    );
    assert_eq!(tunnel("forged".to_owned()).await.unwrap().status(), 429);
    // … while every token that does not verify still gets 429, forged or validly signed but
    // breaking a rule, so guessing from there gains nothing.
    let mut bad: Vec<String> = rule_breakers().into_iter().map(|(_, t, _)| t).collect();
    bad.push("forged".to_owned());
    bad.push(token("alice", Scope::Agent)); // the wrong scope is no pass either
    for token in bad {
        let response = nat.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 429);
    }
}
