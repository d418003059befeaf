//! Logging in through the relay's OpenID provider with the real CLI, daemon and relay, against
//! a real, certified provider (`oidc-provider`, started by the test): the device flow, the
//! browser flow with PKCE (and a forged redirect that must not end it), and refresh of
//! short-lived tokens with the tunnel and its streams surviving.

mod common;

use std::time::Duration;

use cloudllm_e2e::oidc::{AUDIENCE, Browser, CLIENT_ID, OidcProvider, User};
use cloudllm_e2e::{SECRET, STEP, take_lines, token};
use cloudllm_relay::{RelayConfig, Scope};
use common::*;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{Instant, timeout};

/// A relay that verifies the provider's tokens (JWKS) and tells clients to log in there; it
/// also keeps its own secret, so tests can mint client tokens.
fn relay_for(provider: &OidcProvider) -> RelayConfig {
    let issuer = provider.issuer.as_str().trim_end_matches('/');
    toml::from_str(&format!(
        r#"
listen = "127.0.0.1:0"
secret = "{SECRET}"
token_grace = "60s"
[jwks]
url = "{issuer}/jwks"
issuer = "{issuer}"
audience = "{AUDIENCE}"
[login]
issuer = "{issuer}"
client_id = "{CLIENT_ID}"
scopes = ["openid", "offline_access", "agent"]
"#
    ))
    .expect("relay config")
}

fn browser() -> Browser {
    Browser::new(
        reqwest::Client::builder()
            .cookie_store(true)
            .no_proxy()
            .build()
            .unwrap(),
    )
}

/// Runs `cloudllm login` with `flags`, plays the user in a browser at the URL it prints (the
/// device page with the code filled in, or the provider's login page), and returns what the
/// CLI printed.
async fn cli_login(f: &Fixture, flags: &[&str]) -> String {
    cli_login_after(f, flags, |_| async {}).await
}

/// [`cli_login`], with `before` run on the URL the CLI printed before the user signs in.
async fn cli_login_after<F: std::future::Future<Output = ()>>(
    f: &Fixture,
    flags: &[&str],
    before: impl FnOnce(url::Url) -> F,
) -> String {
    let relay = f.relay.url().to_string();
    let mut args = vec!["login", "--relay", relay.as_str()];
    args.extend_from_slice(flags);
    let mut child = cli(&f.socket)
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let url = loop {
        let line = timeout(STEP, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("the CLI printed a login URL");
        printed.push_str(&line);
        printed.push('\n');
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("(or open ") {
            break rest.trim_end_matches(')').to_owned();
        }
        if line.starts_with("http://") {
            break line.to_owned();
        }
    };
    before(url.parse().unwrap()).await;
    let page = browser()
        .log_in(&url.parse().unwrap(), User::Approves)
        .await;
    assert!(
        page.status < 400,
        "the provider's last page: {} {}",
        page.status,
        page.body
    );
    while let Some(line) = timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        printed.push_str(&line);
        printed.push('\n');
    }
    let output = timeout(STEP, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    printed
}

/// A provider started with `env`, a fixture whose relay trusts it, and alice logged in through
/// `cloudllm login --device` with her tunnel up; `None` when the OIDC tests are skipped.
async fn logged_in_with_device_code(env: &[(&str, &str)]) -> Option<(OidcProvider, Fixture)> {
    let provider = OidcProvider::start(env).await?;
    let f = Fixture::with_relay(relay_for(&provider)).await;
    cli_login(&f, &["--device"]).await;
    f.relay.wait_for_devices("alice", 1).await;
    Some((provider, f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_login_through_the_cli_connects_the_tunnel() {
    let Some(provider) = OidcProvider::start(&[]).await else {
        return;
    };
    let f = Fixture::with_relay(relay_for(&provider)).await;
    let printed = cli_login(&f, &["--device"]).await;
    assert!(printed.contains("and enter the code"), "{printed}");
    assert!(printed.contains("Logged in as alice"), "{printed}");
    f.relay.wait_for_devices("alice", 1).await;
    let status = wait_connection(&f.socket, "connected").await;
    assert_eq!(status["user"], "alice");
    let response = f.relay.get_as("alice", "/api/tags").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_with_pkce_through_the_cli_connects_the_tunnel() {
    let Some(provider) = OidcProvider::start(&[]).await else {
        return;
    };
    let f = Fixture::with_relay(relay_for(&provider)).await;
    let printed = cli_login(&f, &["--browser", "--no-browser"]).await;
    assert!(printed.contains("Logged in as alice"), "{printed}");
    f.relay.wait_for_devices("alice", 1).await;
}

/// Another local process (or a page in the browser) that guesses the login's port and sends a
/// redirect of its own gets a 400; the CLI keeps waiting, and the real sign-in still logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_redirect_does_not_end_a_browser_login() {
    let Some(provider) = OidcProvider::start(&[]).await else {
        return;
    };
    let f = Fixture::with_relay(relay_for(&provider)).await;
    let printed = cli_login_after(&f, &["--browser", "--no-browser"], |authorize| async move {
        let redirect = authorize
            .query_pairs()
            .find(|(key, _)| key == "redirect_uri")
            .map(|(_, value)| url::Url::parse(&value).unwrap())
            .expect("the login URL names its redirect");
        let mut forged = redirect.clone();
        forged.set_query(Some("code=forged&state=guessed"));
        let page = browser().get(&forged).await;
        assert_eq!(page.status, 400, "{}", page.body);
        assert!(page.body.contains("ignored"), "{}", page.body);
    })
    .await;
    assert!(printed.contains("Logged in as alice"), "{printed}");
    f.relay.wait_for_devices("alice", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_relay_says_to_use_with_token() {
    let f = Fixture::start().await;
    let output = run(&f.socket, &["login", "--relay", f.relay.url().as_str()]).await;
    assert_fails_saying(&output, "--with-token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_refreshed_and_streams_survive() {
    // Access tokens live 8 s: the daemon refreshes every few seconds.
    let Some((_provider, f)) = logged_in_with_device_code(&[("ACCESS_TTL", "8")]).await else {
        return;
    };
    // A short shutdown grace: the stream below outlives it, so it survives the token switches
    // only because a replaced tunnel drains for longer (tunnel::RETIRE_DRAIN).
    let output = run(&f.socket, &["config", "set", "shutdown_grace", "2s"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    wait_connection(&f.socket, "connected").await;
    let stored = f.state_dir.join("credentials.json");
    let first_token = std::fs::read_to_string(&stored).unwrap();

    // One stream spanning two token lifetimes.
    let started = Instant::now();
    let mut response = cloudllm_e2e::client()
        .post(f.relay.api("/api/generate"))
        .bearer_auth(token("alice", Scope::Client))
        .json(&json!({"prompt": "long", "options": {"num_predict": 60}, "fake_interval_ms": 300}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    while let Some(chunk) = timeout(STEP, response.chunk())
        .await
        .unwrap()
        .expect("the stream broke")
    {
        buf.extend_from_slice(&chunk);
        lines.extend(take_lines(&mut buf));
    }
    assert!(
        started.elapsed() > Duration::from_secs(16),
        "spanned two lifetimes"
    );
    assert_eq!(lines.len(), 61, "every line arrived");
    assert_eq!(lines.last().unwrap()["done"], true);

    // The token was renewed, the tunnel is up, and new requests work.
    assert_ne!(
        std::fs::read_to_string(&stored).unwrap(),
        first_token,
        "refreshed"
    );
    let status = wait_connection(&f.socket, "connected").await;
    assert_eq!(status["user"], "alice");
    let response = f.relay.get_as("alice", "/api/tags").await;
    assert_eq!(response.status(), 200);
    assert_eq!(f.relay.relay.registry.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_keeps_failing_ends_in_login_required() {
    let Some((provider, f)) = logged_in_with_device_code(&[("ACCESS_TTL", "4")]).await else {
        return;
    };
    // The provider goes away: refreshes fail until the token has expired.
    drop(provider);
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        let (code, status) = status_json(&f.socket).await;
        if status["connection"]["state"] == "login_required" {
            assert_eq!(code, 4);
            break status;
        }
        assert!(Instant::now() < deadline, "never login_required: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = status["connection"]["reason"].as_str().unwrap();
    assert!(reason.contains("cloudllm login"), "{reason}");
    f.relay.wait_for_devices("alice", 0).await;
}
