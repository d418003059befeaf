//! The daemon's login flows (`cloudllm_daemon::login`) against a real OpenID Provider:
//! `oidc-provider` from npm, started from `tests/oidc/provider.mjs` on `127.0.0.1:0`, one
//! process per test (see `cloudllm_e2e::oidc`). The user's part is played as a browser would: a
//! cookie-keeping HTTP client that submits the provider's development login, consent and
//! device-confirmation forms.
//!
//! Needs Node.js (20.18 or newer) and npm; `tests/oidc/node_modules` is installed with `npm ci`
//! when missing. Without Node.js the tests fail, naming what to install, unless
//! `CLOUDLLM_SKIP_OIDC_TEST=1` is set.

use cloudllm_daemon::login::{self, LoginError, Provider, Tokens};
use cloudllm_e2e::STEP;
use cloudllm_e2e::oidc::{
    AUDIENCE, Browser, CLIENT_ID, DEVICE_LOGIN_TIMEOUT, OidcProvider, User, device_login, scopes,
};
use cloudllm_e2e::tokens::now_unix;
use cloudllm_proto::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use url::Url;

/// A browser that keeps cookies, as the provider's login pages need.
fn browser() -> Browser {
    Browser::new(
        reqwest::Client::builder()
            .cookie_store(true)
            .timeout(STEP)
            .build()
            .expect("browser client"),
    )
}

fn payload(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let part = jwt.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("JWT payload is base64url");
    serde_json::from_slice(&bytes).expect("JWT payload is JSON")
}

/// Starts a provider with `env` (see [`OidcProvider::start`]) and discovers it as the daemon
/// does; `None` when the test is to be skipped. The provider runs as long as the returned
/// [`OidcProvider`] lives.
async fn start_provider(env: &[(&str, &str)]) -> Option<(OidcProvider, Provider)> {
    cloudllm_e2e::init_logs();
    let idp = OidcProvider::start(env).await?;
    let provider = idp.discover().await;
    Some((idp, provider))
}

/// A browser login the daemon has begun: the provider's page the user is sent to, the daemon's
/// loopback redirect, and the daemon's task that waits for that redirect.
struct PendingBrowserLogin {
    authorize_url: Url,
    redirect: Url,
    finishing: JoinHandle<Result<Tokens, LoginError>>,
}

/// Begins a browser login with `provider` as `cloudllm login` does, and waits for its redirect
/// in the background.
async fn begin_browser_login(provider: &Provider) -> PendingBrowserLogin {
    let browser_login = timeout(STEP, login::browser_start(provider))
        .await
        .expect("browser_start timed out")
        .expect("browser_start");
    let authorize_url = browser_login.authorize_url.clone();
    let redirect = browser_login.redirect_uri().clone();
    let provider = provider.clone();
    let finishing =
        tokio::spawn(async move { login::browser_finish(&provider, browser_login).await });
    PendingBrowserLogin {
        authorize_url,
        redirect,
        finishing,
    }
}

impl PendingBrowserLogin {
    /// The user approves in the browser: the provider redirects to the daemon, which answers
    /// with its "close this tab" page.
    async fn approve(&self) {
        let page = browser().log_in(&self.authorize_url, User::Approves).await;
        assert!(
            page.url.as_str().starts_with(self.redirect.as_str()),
            "the browser ended at {} instead of the daemon",
            page.url
        );
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(page.body.contains("close this tab"), "{}", page.body);
    }

    /// How the daemon's side of the login ended.
    async fn outcome(self) -> Result<Tokens, LoginError> {
        timeout(STEP, self.finishing)
            .await
            .expect("browser_finish timed out")
            .expect("browser_finish task")
    }
}

/// Refreshes with `refresh_token` as the daemon does before its access token expires.
async fn refresh(provider: &Provider, refresh_token: &Secret) -> Result<Tokens, LoginError> {
    timeout(
        STEP,
        login::refresh(&provider.token_endpoint, CLIENT_ID, refresh_token),
    )
    .await
    .expect("refresh timed out")
}

/// Refreshes `tokens`, which must succeed with an access token other than the old one.
async fn refresh_to_new_token(provider: &Provider, tokens: &Tokens) -> Tokens {
    let refresh_token = tokens.refresh_token.as_ref().expect("a refresh token");
    let refreshed = refresh(provider, refresh_token).await.expect("refresh");
    assert_ne!(
        refreshed.access_token.expose(),
        tokens.access_token.expose()
    );
    refreshed
}

/// Verifies an access token as the relay will: signature against the provider's JWKS, issuer,
/// audience, expiry.
async fn verify(issuer: &Url, token: &str) -> serde_json::Value {
    let jwks_url = issuer.join("jwks").expect("jwks URL");
    let jwks: jsonwebtoken::jwk::JwkSet = timeout(STEP, async {
        reqwest::get(jwks_url)
            .await?
            .error_for_status()?
            .json()
            .await
    })
    .await
    .expect("jwks timed out")
    .expect("jwks");
    let header = jsonwebtoken::decode_header(token).expect("JWT header");
    let kid = header.kid.expect("the JWT names its key");
    let jwk = jwks.find(&kid).expect("the JWT's key is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("decoding key");
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&[AUDIENCE]);
    validation.set_issuer(&[issuer.as_str().trim_end_matches('/')]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .expect("the access token verifies against the provider's JWKS")
        .claims
}

#[tokio::test]
async fn device_login_then_refresh() {
    let Some((idp, provider)) = start_provider(&[("ACCESS_TTL", "120")]).await else {
        return;
    };
    assert!(provider.device_authorization_endpoint.is_some());

    let (result, page, device) = device_login(&provider, &browser(), User::Approves).await;
    assert!(
        page.body.contains("Sign-in Success"),
        "the provider did not confirm the device login: {}",
        page.body
    );
    let tokens = result.expect("device login");
    assert!(device.expires_at > now_unix());
    assert_eq!(
        device.verification_uri,
        idp.issuer.join("device").expect("URL").as_str()
    );
    assert!(!device.user_code.is_empty());

    // The relay will verify these with the JWKS: check what it will see.
    let claims = verify(&idp.issuer, tokens.access_token.expose()).await;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert!(
        claims["scope"]
            .as_str()
            .is_some_and(|s| s.split(' ').any(|s| s == "agent")),
        "{claims}"
    );
    let expires_at = tokens.expires_at.expect("expires_in was given");
    assert!(expires_at > now_unix() && expires_at <= now_unix() + 121);
    assert!(
        claims["exp"]
            .as_u64()
            .is_some_and(|exp| exp.abs_diff(expires_at) <= 2)
    );

    // No secret in Debug output.
    let shown = format!("{tokens:?}");
    assert!(!shown.contains(tokens.access_token.expose()), "{shown}");

    let old_refresh = tokens.refresh_token.clone().expect("a refresh token");
    let refreshed = refresh_to_new_token(&provider, &tokens).await;
    let claims = payload(refreshed.access_token.expose());
    assert_eq!(claims["sub"], "alice");
    let new_refresh = refreshed.refresh_token.clone().expect("a refresh token");
    // oidc-provider rotates public clients' refresh tokens; the old one is spent.
    assert_ne!(new_refresh.expose(), old_refresh.expose());

    // Replaying the spent refresh token: the provider revokes the grant, and the daemon is told
    // to log in again rather than to retry.
    let replayed = refresh(&provider, &old_refresh).await;
    assert!(matches!(replayed, Err(LoginError::Revoked)), "{replayed:?}");
    let message = replayed.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("cloudllm login"), "{message}");
    assert!(!message.contains(old_refresh.expose()));
}

#[tokio::test]
async fn browser_login_with_pkce_then_refresh() {
    let Some((idp, provider)) = start_provider(&[]).await else {
        return;
    };
    let pending = begin_browser_login(&provider).await;
    let query: Vec<(String, String)> = pending.authorize_url.query_pairs().into_owned().collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(param("code_challenge_method"), Some("S256"));
    assert_eq!(param("response_type"), Some("code"));
    let redirect = param("redirect_uri").expect("redirect_uri");
    assert!(redirect.starts_with("http://127.0.0.1:") && redirect.ends_with("/callback"));
    assert_eq!(redirect, pending.redirect.as_str());

    pending.approve().await;
    let tokens = pending.outcome().await.expect("browser login");
    let claims = verify(&idp.issuer, tokens.access_token.expose()).await;
    assert_eq!(claims["sub"], "alice");

    refresh_to_new_token(&provider, &tokens).await;
}

/// Any local process (or a page in the browser that guesses the port) can reach the loopback
/// listener: a redirect with the wrong `state`, or none, is answered 400 and ignored, even when
/// it carries an error, and the real redirect still completes the login.
#[tokio::test]
async fn browser_login_ignores_forged_redirects_and_completes() {
    let Some((idp, provider)) = start_provider(&[]).await else {
        return;
    };
    let pending = begin_browser_login(&provider).await;
    let redirect = pending.redirect.clone();
    for query in [
        "code=stolen-code&state=not-the-state",
        "error=access_denied&state=not-the-state",
        "code=stolen-code",
    ] {
        let mut forged = redirect.clone();
        forged.set_query(Some(query));
        let page = browser().get(&forged).await;
        assert_eq!(page.status, 400, "{query}: {}", page.body);
        assert!(page.body.contains("state mismatch"), "{}", page.body);
        assert!(!pending.finishing.is_finished(), "{query} ended the login");
    }

    pending.approve().await;
    let tokens = pending
        .outcome()
        .await
        .expect("the real redirect completes the login");
    let claims = verify(&idp.issuer, tokens.access_token.expose()).await;
    assert_eq!(claims["sub"], "alice");
    // The listener is closed once the login is over.
    let after = timeout(STEP, reqwest::get(redirect))
        .await
        .expect("timed out");
    assert!(after.is_err(), "the listener still answers: {after:?}");
}

/// A local process that opens many idle connections to the loopback listener, or sends an
/// endless request head, does not keep the browser's redirect out.
#[tokio::test]
async fn browser_login_survives_a_flood_of_idle_connections() {
    let Some((_idp, provider)) = start_provider(&[]).await else {
        return;
    };
    let pending = begin_browser_login(&provider).await;
    let port = pending
        .redirect
        .port()
        .expect("the redirect names its port");

    // An oversized request head: refused (431) or cut off, never read without end.
    let mut huge = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let head = format!(
        "GET /callback?state={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "x".repeat(1024 * 1024)
    );
    let _ = timeout(STEP, huge.write_all(head.as_bytes())).await;
    let mut answer = Vec::new();
    let read = timeout(STEP, huge.read_to_end(&mut answer))
        .await
        .expect("the listener kept an oversized request open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_err() || answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    // Far more idle connections than the listener serves at once, all left silent.
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    pending.approve().await;
    pending
        .outcome()
        .await
        .expect("the login completes despite the idle connections");
    drop(idle);
}

#[tokio::test]
async fn browser_login_cancelled_by_the_user_is_denied() {
    let Some((_idp, provider)) = start_provider(&[]).await else {
        return;
    };
    let pending = begin_browser_login(&provider).await;
    let page = browser()
        .log_in(&pending.authorize_url, User::CancelsConsent)
        .await;
    assert!(page.body.contains("declined"), "{}", page.body);
    let result = pending.outcome().await;
    assert!(matches!(result, Err(LoginError::Denied)), "{result:?}");
}

#[tokio::test]
async fn device_login_aborted_by_the_user_is_denied() {
    let Some((_idp, provider)) = start_provider(&[]).await else {
        return;
    };
    let (result, page, _) = device_login(&provider, &browser(), User::AbortsDevice).await;
    assert!(
        page.body.contains("interrupted"),
        "the provider did not record the abort: {}",
        page.body
    );
    assert!(matches!(result, Err(LoginError::Denied)), "{result:?}");
    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("declined"), "{message}");
}

#[tokio::test]
async fn device_login_not_approved_in_time_expires() {
    let Some((_idp, provider)) = start_provider(&[("DEVICE_TTL", "2")]).await else {
        return;
    };
    let device = timeout(STEP, login::device_start(&provider))
        .await
        .expect("device_start timed out")
        .expect("device_start");
    assert!(device.expires_at <= now_unix() + 2);
    let result = timeout(
        DEVICE_LOGIN_TIMEOUT,
        login::device_finish(&provider, &device),
    )
    .await
    .expect("device_finish timed out");
    assert!(matches!(result, Err(LoginError::Expired)), "{result:?}");
    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("expired"), "{message}");
}

#[tokio::test]
async fn discovery_refuses_another_issuer() {
    cloudllm_e2e::init_logs();
    let Some(idp) = OidcProvider::start(&[]).await else {
        return;
    };
    // Same server, but not the issuer it names itself: tokens from it would not verify.
    let mut alias = idp.issuer.clone();
    alias.set_host(Some("localhost")).expect("host");
    let result = timeout(STEP, login::discover(&alias, CLIENT_ID, &scopes()))
        .await
        .expect("discovery timed out");
    assert!(
        matches!(result, Err(LoginError::Discovery(_))),
        "{result:?}"
    );

    // Nothing listens there: a network error that names the problem, within the timeout.
    let dead = Url::parse("http://127.0.0.1:9").expect("url");
    let result = timeout(STEP, login::discover(&dead, CLIENT_ID, &scopes()))
        .await
        .expect("discovery timed out");
    assert!(matches!(result, Err(LoginError::Network(_))), "{result:?}");
}
