//! Signing in on the web page through the relay's identity provider, in headless Chromium
//! (`web/e2e/oidc.mjs`): the real `oidc-provider` from `tests/oidc` with the page's own client
//! (`cloudllm-web`, a public web client whose redirect URI is the relay's root URL and whose
//! token endpoint lets the relay's origin in through CORS), a relay that publishes it in
//! `[web_login]` and verifies its tokens through `[jwks]`, and one daemon of the same user in
//! front of a fake chat backend. The provider issues access tokens that live
//! [`ACCESS_TTL_SECS`] seconds, so the run also sees the page renew its token and use the new
//! one.
//!
//! Needs Chromium and Node.js (see `cloudllm_e2e::browser` and `cloudllm_e2e::oidc`);
//! `CLOUDLLM_SKIP_WEB_TEST=1` or `CLOUDLLM_SKIP_OIDC_TEST=1` skips it knowingly.

use std::time::Duration;

use cloudllm_e2e::browser::{FakeChat, run_script, tools_ready};
use cloudllm_e2e::oidc::{AUDIENCE, OidcProvider, WEB_CLIENT_ID};
use cloudllm_e2e::{STEP, TestDaemon, TestRelay, client, daemon_config, relay_config};
use cloudllm_relay::{JwksConfig, LoginConfig, WebLoginConfig};
use jsonwebtoken::Algorithm;
use serde_json::Value;
use tokio::time::timeout;

/// The provider's access token lifetime in this run: long enough for a sign-in and a message
/// on a slow machine, short enough that the page's renewal (half-way through) comes soon.
const ACCESS_TTL_SECS: u64 = 30;

/// The whole browser run: a sign-in, two messages and a wait for the renewal.
const BROWSER_RUN: Duration = Duration::from_secs(240);

/// Who signs in at the provider (any login works there) and owns the daemon.
const USER: &str = "alice";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_signs_in_through_the_identity_provider_and_renews_its_token() {
    if !tools_ready().await {
        return;
    }
    cloudllm_e2e::init_logs();
    let ttl = ACCESS_TTL_SECS.to_string();
    let Some(mut idp) =
        OidcProvider::start(&[("WEB_CLIENT_ID", WEB_CLIENT_ID), ("ACCESS_TTL", &ttl)]).await
    else {
        return;
    };
    let issuer = idp.issuer.to_string();

    let mut config = relay_config();
    config.login = Some(LoginConfig {
        issuer: issuer.clone(),
        client_id: cloudllm_e2e::oidc::CLIENT_ID.to_owned(),
        scopes: cloudllm_e2e::oidc::scopes(),
    });
    config.web_login = Some(WebLoginConfig {
        client_id: WEB_CLIENT_ID.to_owned(),
        scopes: ["openid", "offline_access", "client"]
            .map(String::from)
            .to_vec(),
    });
    config.jwks = Some(JwksConfig {
        url: idp.issuer.join("jwks").expect("jwks URL"),
        issuer: issuer.clone(),
        audience: AUDIENCE.to_owned(),
        algorithms: vec![Algorithm::RS256],
        refresh: Duration::from_secs(600),
        refetch_min: Duration::from_secs(1),
    });
    let relay = TestRelay::start(config).await;
    // The page's redirect URI is the relay's root, known now that it listens.
    idp.set_web_redirect(&relay.url()).await;

    // The relay tells the page how to sign in.
    let published: Value = timeout(STEP, async {
        client()
            .get(relay.api("/cloudllm/web"))
            .send()
            .await?
            .json()
            .await
    })
    .await
    .expect("/cloudllm/web timed out")
    .expect("/cloudllm/web");
    assert_eq!(published["oidc"]["client_id"], WEB_CLIENT_ID, "{published}");

    let (fake_url, fake, _fake_task) = FakeChat::start().await;
    let _daemon = TestDaemon::start(daemon_config(&relay.url(), USER, "laptop", &fake_url));
    relay.wait_for_devices(USER, 1).await;
    relay
        .wait_for_models(USER, "laptop", &FakeChat::MODELS)
        .await;

    let run_config = serde_json::json!({
        "relay": relay.url().as_str(),
        "issuer": issuer,
        "client_id": WEB_CLIENT_ID,
        "user": USER,
        "access_ttl": ACCESS_TTL_SECS,
        "device": "laptop",
        "model": "fake-md:latest",
    });
    run_script("oidc.mjs", run_config, BROWSER_RUN).await;
    // Both messages reached the backend: the relay took the provider's first token and the
    // renewed one.
    assert_eq!(
        fake.chats.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "chat requests that reached the device"
    );
    relay.stop().await;
}
