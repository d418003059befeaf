//! Tier limits seen from outside: each limit answers 429 with `Retry-After` and an error in the
//! API's shape naming the limit (413 for bodies), a long stream is ended at the tier's
//! `max_stream`, a device over the device limit is refused at `/tunnel` and its daemon says why
//! in `status`, failed authentications are limited per client address (`X-Forwarded-For` only
//! from trusted proxies, and garbage in it neither hides a client behind its proxy nor gives
//! it a fresh budget) — and a premium user is never touched by a free user's exhaustion.

use std::time::Duration;

use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, TestRelay, assert_ollama_error, client, client_from,
    daemon_config, keys, relay_config, send, tunnel_upgrade,
};
use cloudllm_proto::Secret;
use cloudllm_proto::ipc::{Connection, Request, Response};
use cloudllm_relay::config::TierLimits;
use cloudllm_relay::{RelayConfig, Scope};

/// A relay whose `free` tier is tiny; `premium` keeps its built-in limits.
fn config() -> RelayConfig {
    let mut config = relay_config();
    config.tiers.insert(
        "free".to_owned(),
        TierLimits {
            requests_per_minute: 5,
            concurrent_requests: 2,
            devices: 1,
            max_body_bytes: 64 * 1024,
            max_stream: Duration::from_secs(2),
        },
    );
    config
}

fn tiered(user: &str, scope: Scope, tier: &str) -> String {
    keys()
        .issue(user, scope, Some(tier), Duration::from_secs(3600))
        .unwrap()
}

/// Relay plus a free user (alice, device laptop) and a premium user (bob, device tower), each
/// with their own fake Ollama.
struct Users {
    relay: TestRelay,
    alice_backend: FakeOllama,
    _bob_backend: FakeOllama,
    alice_daemon: TestDaemon,
    _bob_daemon: TestDaemon,
}

async fn users(config: RelayConfig) -> Users {
    let relay = TestRelay::start(config).await;
    let alice_backend = FakeOllama::start().await;
    let bob_backend = FakeOllama::start().await;
    let mut alice = daemon_config(&relay.url(), "alice", "laptop", &alice_backend.url());
    alice.token = Some(Secret::new(tiered("alice", Scope::Agent, "free")));
    let mut bob = daemon_config(&relay.url(), "bob", "tower", &bob_backend.url());
    bob.token = Some(Secret::new(tiered("bob", Scope::Agent, "premium")));
    let alice_daemon = TestDaemon::start(alice);
    let bob_daemon = TestDaemon::start(bob);
    relay.wait_for_devices("alice", 1).await;
    relay.wait_for_devices("bob", 1).await;
    Users {
        relay,
        alice_backend,
        _bob_backend: bob_backend,
        alice_daemon,
        _bob_daemon: bob_daemon,
    }
}

async fn get(relay: &TestRelay, token: &str, path: &str) -> reqwest::Response {
    tokio::time::timeout(
        STEP,
        client().get(relay.api(path)).bearer_auth(token).send(),
    )
    .await
    .expect("request timed out")
    .expect("request")
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429_with_retry_after_and_spares_premium() {
    let users = users(config()).await;
    let alice = tiered("alice", Scope::Client, "free");
    let bob = tiered("bob", Scope::Client, "premium");
    for _ in 0..5 {
        assert_eq!(get(&users.relay, &alice, "/api/tags").await.status(), 200);
    }
    let refused = get(&users.relay, &alice, "/api/tags").await;
    assert_eq!(refused.status(), 429);
    // 5 a minute refill one every 12 s.
    assert!((1..=12).contains(&retry_after(&refused)));
    let body: serde_json::Value = refused.json().await.unwrap();
    let message = body["error"].as_str().expect("Ollama's error shape");
    assert!(message.contains("5 requests per minute"), "{message}");
    // The OpenAI API gets OpenAI's shape.
    let refused = get(&users.relay, &alice, "/v1/models").await;
    assert_eq!(refused.status(), 429);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().is_some(), "{body}");

    // Bob, on premium, is untouched.
    for _ in 0..10 {
        assert_eq!(get(&users.relay, &bob, "/api/tags").await.status(), 200);
    }
    // An unknown tier claim gets the default tier (the harness's generous one).
    let unknown = tiered("alice", Scope::Client, "platinum");
    assert_eq!(get(&users.relay, &unknown, "/api/tags").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_counts_streams_until_they_end() {
    let users = users(config()).await;
    let alice = tiered("alice", Scope::Client, "free");
    let bob = tiered("bob", Scope::Client, "premium");
    let slow = |tag: &str| {
        client()
            .post(users.relay.api("/api/generate"))
            .bearer_auth(&alice)
            .json(&serde_json::json!({
                "model": "fake", "prompt": tag,
                "options": {"num_predict": 50}, "fake_interval_ms": 100
            }))
            .send()
    };
    let first = slow("one").await.unwrap();
    let second = slow("two").await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let refused = slow("three").await.unwrap();
    assert_eq!(retry_after(&refused), 1);
    assert_ollama_error(refused, 429, "2 in flight").await;
    assert_eq!(get(&users.relay, &bob, "/api/tags").await.status(), 200);

    // Closing one stream frees its place.
    drop(first);
    users.alice_backend.records.wait_end("one").await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let again = slow("four").await.unwrap();
        if again.status() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no place freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_streams_are_limited_by_tier() {
    let users = users(config()).await;
    let alice = tiered("alice", Scope::Client, "free");
    let bob = tiered("bob", Scope::Client, "premium");
    let generate = |token: &str, prompt: String, lines: usize| {
        client()
            .post(users.relay.api("/api/generate"))
            .bearer_auth(token.to_owned())
            .json(&serde_json::json!({
                "model": "fake", "prompt": prompt,
                "options": {"num_predict": lines}, "fake_interval_ms": 100
            }))
            .send()
    };
    let big = "x".repeat(100 * 1024);
    assert_eq!(
        generate(&alice, big.clone(), 1).await.unwrap().status(),
        413
    );
    assert_eq!(generate(&bob, big, 1).await.unwrap().status(), 200);

    // Free streams last two seconds: a 5 s stream is cut, and the generation stops.
    let started = tokio::time::Instant::now();
    let response = generate(&alice, "long".to_owned(), 50).await.unwrap();
    assert_eq!(response.status(), 200);
    let read = tokio::time::timeout(STEP, response.bytes()).await.unwrap();
    assert!(
        read.is_err(),
        "the cut stream ends with an error, not cleanly"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    let (_, end) = users.alice_backend.records.wait_end("long").await;
    assert_eq!(end, cloudllm_e2e::fake_ollama::StreamEnd::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_the_limit_is_refused_and_its_daemon_says_why() {
    let users = users(config()).await;

    // Straight at /tunnel: 429 before any upgrade, with the reason.
    let upgrade =
        send(
            tunnel_upgrade(&client(), &users.relay, "alice-desktop", "desktop")
                .bearer_auth(tiered("alice", Scope::Agent, "free")),
        )
        .await;
    assert_eq!(upgrade.status(), 429);
    assert_eq!(retry_after(&upgrade), 60);
    let text = upgrade.text().await.unwrap();
    assert!(
        text.contains("device limit") && text.contains("laptop"),
        "{text}"
    );

    // A second daemon of alice's is refused, and `status` says why.
    let backend = FakeOllama::start().await;
    let mut second = daemon_config(&users.relay.url(), "alice", "desktop", &backend.url());
    second.token = Some(Secret::new(tiered("alice", Scope::Agent, "free")));
    let socket = second.socket_path.clone().unwrap();
    let _second = TestDaemon::start(second);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Ok(mut daemon) = cloudllm_ipc_client::Client::connect(&socket).await
            && let Ok(Response::Status(status)) = daemon.call(&Request::Status).await
            && let Connection::Reconnecting { last_error, .. } = &status.connection
            && last_error.contains("device limit")
        {
            assert!(last_error.contains("429"), "{last_error}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused daemon never said why"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    users.relay.wait_for_devices("alice", 1).await;

    // The same device reconnecting (a renewed token) is not a second device.
    drop(users.alice_daemon);
    users.relay.wait_for_devices("alice", 0).await;
    let mut again = daemon_config(
        &users.relay.url(),
        "alice",
        "laptop",
        &users.alice_backend.url(),
    );
    again.token = Some(Secret::new(tiered("alice", Scope::Agent, "free")));
    let _again = TestDaemon::start(again);
    users.relay.wait_for_devices("alice", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_per_client_address() {
    let mut config = config();
    config.auth_failures_per_minute = 3;
    let users = users(config).await;
    let url = users.relay.api("/api/tags");
    let good = tiered("bob", Scope::Client, "premium");
    let attacker = client_from("127.0.0.1");
    for _ in 0..3 {
        let response = attacker
            .get(&url)
            .bearer_auth("forged")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    let blocked = attacker
        .get(&url)
        .bearer_auth("forged")
        .send()
        .await
        .unwrap();
    assert_eq!(blocked.status(), 429);
    assert!(retry_after(&blocked) >= 1);
    // A good token from that address still passes (the budget counts failures; it does not
    // lock out everyone behind a shared address) …
    let response = attacker.get(&url).bearer_auth(&good).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // … while bad tokens keep getting 429, on the tunnel endpoint too.
    let response = attacker
        .get(users.relay.api("/tunnel"))
        .bearer_auth("forged")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    // Another address is not affected.
    let neighbour = client_from("127.0.0.2");
    let response = neighbour.get(&url).bearer_auth(&good).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

/// The status of a request to `url` with a forged token, sent by `client` with
/// `X-Forwarded-For: forwarded_for`.
async fn forged_from(client: &reqwest::Client, url: &str, forwarded_for: &str) -> u16 {
    let request = client
        .get(url)
        .bearer_auth("forged")
        .header("x-forwarded-for", forwarded_for)
        .send();
    let response = tokio::time::timeout(STEP, request)
        .await
        .expect("request timed out")
        .expect("request");
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_behind_a_trusted_proxy() {
    let mut config = config();
    config.auth_failures_per_minute = 2;
    config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    let users = users(config).await;
    let url = users.relay.api("/api/tags");
    let good = tiered("bob", Scope::Client, "premium");
    let proxy = client_from("127.0.0.1");
    // Through the trusted proxy, each forwarded address has its own budget.
    assert_eq!(forged_from(&proxy, &url, "198.51.100.1").await, 401);
    assert_eq!(forged_from(&proxy, &url, "198.51.100.1").await, 401);
    assert_eq!(forged_from(&proxy, &url, "198.51.100.1").await, 429);
    let other = proxy
        .get(&url)
        .bearer_auth(&good)
        .header("x-forwarded-for", "198.51.100.2")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);

    // From an untrusted peer the header is ignored: its failures count against the peer,
    // whatever address it claims.
    let stranger = client_from("127.0.0.3");
    assert_eq!(forged_from(&stranger, &url, "203.0.113.1").await, 401);
    assert_eq!(forged_from(&stranger, &url, "203.0.113.2").await, 401);
    assert_eq!(forged_from(&stranger, &url, "203.0.113.3").await, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_forwarded_for_neither_hides_the_client_nor_gives_it_a_fresh_budget() {
    let mut config = relay_config();
    config.auth_failures_per_minute = 2;
    config.trusted_proxies = vec!["127.0.0.8".parse().unwrap()];
    let relay = TestRelay::start(config).await;
    let url = relay.api("/api/tags");
    let proxy = client_from("127.0.0.8");
    // The client prepends garbage; the proxy appends the address it saw. The failures are
    // the client's …
    assert_eq!(forged_from(&proxy, &url, "x, 198.51.100.1").await, 401);
    assert_eq!(forged_from(&proxy, &url, "x, 198.51.100.1").await, 401);
    assert_eq!(forged_from(&proxy, &url, "x, 198.51.100.1").await, 429);
    // … so without the garbage it is still over budget …
    assert_eq!(forged_from(&proxy, &url, "198.51.100.1").await, 429);
    // … and the proxy's other clients are untouched.
    assert_eq!(forged_from(&proxy, &url, "198.51.100.2").await, 401);
    assert_eq!(forged_from(&proxy, &url, "x").await, 401);
}
