//! The daemon's login flows (`cloudllm_daemon::login`) against a real OpenID Provider:
//! `oidc-provider` from npm, started from `tests/oidc/provider.mjs` on `127.0.0.1:0`, one
//! process per test. The user's part is played as a browser would: a cookie-keeping HTTP client
//! that submits the provider's development login, consent and device-confirmation forms.
//!
//! Needs Node.js (20.18 or newer) and npm; `tests/oidc/node_modules` is installed with `npm ci`
//! when missing. Without Node.js the tests fail, naming what to install, unless
//! `CLOUDLLM_SKIP_OIDC_TEST=1` is set.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudllm_daemon::login::{self, LoginError, Provider, Tokens};
use cloudllm_e2e::STEP;
use scraper::{Html, Selector};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::OnceCell;
use tokio::time::timeout;
use url::Url;

/// The provider's one client (see provider.mjs).
const CLIENT_ID: &str = "cloudllmd";

/// The `aud` of the provider's access tokens (see provider.mjs).
const AUDIENCE: &str = "cloudllm";

/// `npm ci` on a cold cache downloads about 40 small packages: a minute is plenty; 5 leaves
/// room for a slow registry.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);

/// A device login takes one poll interval (5 s by RFC 8628's default) after approval, plus
/// the flow itself.
const DEVICE_LOGIN_TIMEOUT: Duration = Duration::from_secs(40);

/// Steps of a login in the browser (form posts); more means the flow is looping.
const MAX_BROWSER_STEPS: usize = 10;

/// The most of the provider's stderr kept to explain a failed start.
const MAX_STDERR: usize = 16 * 1024;

fn oidc_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

fn scopes() -> Vec<String> {
    ["openid", "offline_access", "agent"]
        .map(String::from)
        .to_vec()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

static NODE_READY: OnceCell<bool> = OnceCell::const_new();

/// Checks Node.js and installs the provider's packages once per test binary. `false` means
/// skip (Node.js missing and `CLOUDLLM_SKIP_OIDC_TEST=1`).
async fn node_ready() -> bool {
    *NODE_READY
        .get_or_init(|| async {
            let version = timeout(STEP, Command::new("node").arg("--version").output()).await;
            let version = match version {
                Ok(Ok(out)) if out.status.success() => {
                    String::from_utf8_lossy(&out.stdout).trim().to_owned()
                }
                _ => {
                    if std::env::var("CLOUDLLM_SKIP_OIDC_TEST").as_deref() == Ok("1") {
                        eprintln!("skipping: node not found and CLOUDLLM_SKIP_OIDC_TEST=1");
                        return false;
                    }
                    panic!(
                        "the login tests need Node.js 20.18 or newer and npm (Debian: apt-get install nodejs npm), \
                         or set CLOUDLLM_SKIP_OIDC_TEST=1 to skip them"
                    );
                }
            };
            assert!(
                node_is_recent(&version),
                "the login tests need Node.js 20.18 or newer (oidc-provider uses URL.parse); found {version}"
            );
            let dir = oidc_dir();
            if !dir.join("node_modules/oidc-provider/package.json").exists() {
                eprintln!("installing the test OpenID provider: npm ci in {}", dir.display());
                let npm = Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund"])
                    .current_dir(&dir)
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .output();
                let out = timeout(NPM_TIMEOUT, npm)
                    .await
                    .expect("npm ci timed out")
                    .expect("running npm (install npm with Node.js)");
                assert!(
                    out.status.success(),
                    "npm ci in {} failed:\n{}",
                    dir.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            true
        })
        .await
}

fn node_is_recent(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    major > 20 || (major == 20 && minor >= 18)
}

/// A running `provider.mjs`, killed when dropped.
struct OidcProvider {
    issuer: Url,
    child: Child,
    /// Held open: the provider exits when its stdin closes, even if this process is killed.
    _stdin: ChildStdin,
}

impl OidcProvider {
    /// Starts a provider with extra environment (e.g. `DEVICE_TTL`); `None` if skipped.
    async fn start(env: &[(&str, &str)]) -> Option<OidcProvider> {
        if !node_ready().await {
            return None;
        }
        let mut command = Command::new("node");
        command
            .arg(oidc_dir().join("provider.mjs"))
            .arg("0")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("starting node provider.mjs");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        // Drained so the provider never blocks on a full pipe; kept to explain a failed start.
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut log = sink.lock().expect("stderr log");
                if log.len() < MAX_STDERR {
                    log.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let mut lines = BufReader::new(stdout).lines();
        let first = timeout(STEP, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            other => panic!(
                "provider.mjs printed no issuer ({other:?}); its stderr:\n{}",
                log.lock().expect("stderr log")
            ),
        };
        // The rest of stdout is not read; the provider prints nothing more there.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let issuer = Url::parse(line.trim()).expect("provider.mjs printed a URL");
        Some(OidcProvider {
            issuer,
            child,
            _stdin: stdin,
        })
    }

    async fn discover(&self) -> Provider {
        timeout(STEP, login::discover(&self.issuer, CLIENT_ID, &scopes()))
            .await
            .expect("discovery timed out")
            .expect("discovery")
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A page as the browser got it.
struct Page {
    url: Url,
    status: u16,
    body: String,
}

/// A form found on a page: where it posts, and its fields with their current values.
struct Form {
    action: Url,
    fields: Vec<(String, String)>,
}

impl Form {
    fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|(n, _)| n == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn set(&mut self, name: &str, value: &str) {
        self.fields.retain(|(n, _)| n != name);
        self.fields.push((name.to_owned(), value.to_owned()));
    }

    fn remove(&mut self, name: &str) {
        self.fields.retain(|(n, _)| n != name);
    }
}

impl Page {
    fn form(&self) -> Option<Form> {
        let html = Html::parse_document(&self.body);
        let form_selector = Selector::parse("form").expect("selector");
        let input_selector = Selector::parse("input[name]").expect("selector");
        let form = html.select(&form_selector).next()?;
        let action = form.value().attr("action").unwrap_or("");
        let action = self.url.join(action).expect("form action is a URL");
        let fields = form
            .select(&input_selector)
            .filter_map(|input| {
                let name = input.value().attr("name")?;
                Some((
                    name.to_owned(),
                    input.value().attr("value").unwrap_or("").to_owned(),
                ))
            })
            .collect();
        Some(Form { action, fields })
    }

    /// The provider's "Cancel" link on its login and consent pages.
    fn abort_link(&self) -> Option<Url> {
        let html = Html::parse_document(&self.body);
        let selector = Selector::parse("a[href]").expect("selector");
        html.select(&selector)
            .filter_map(|a| a.value().attr("href"))
            .find(|href| href.contains("/abort"))
            .map(|href| self.url.join(href).expect("abort link is a URL"))
    }
}

/// What the user does at the provider.
#[derive(Clone, Copy, PartialEq, Eq)]
enum User {
    Approves,
    /// Clicks "Abort" on the device confirmation page.
    AbortsDevice,
    /// Clicks "Cancel" on the consent page.
    CancelsConsent,
}

/// The user's browser: keeps cookies, follows redirects (to the daemon's loopback listener too).
struct Browser {
    http: reqwest::Client,
}

impl Browser {
    fn new() -> Browser {
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .timeout(STEP)
            .build()
            .expect("browser client");
        Browser { http }
    }

    async fn read(&self, response: reqwest::Response) -> Page {
        let url = response.url().clone();
        let status = response.status().as_u16();
        let body = timeout(STEP, response.text())
            .await
            .expect("page body timed out")
            .expect("page body");
        Page { url, status, body }
    }

    async fn get(&self, url: &Url) -> Page {
        let response = timeout(STEP, self.http.get(url.clone()).send())
            .await
            .expect("GET timed out")
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        self.read(response).await
    }

    async fn submit(&self, form: &Form) -> Page {
        let response = timeout(
            STEP,
            self.http
                .post(form.action.clone())
                .form(&form.fields)
                .send(),
        )
        .await
        .expect("form post timed out")
        .unwrap_or_else(|e| panic!("POST {}: {e}", form.action));
        self.read(response).await
    }

    /// Plays the user from `start` until a page without a form: the provider's success or
    /// error page, or the daemon's loopback page.
    async fn log_in(&self, start: &Url, user: User) -> Page {
        let mut page = self.get(start).await;
        for _ in 0..MAX_BROWSER_STEPS {
            let Some(mut form) = page.form() else {
                return page;
            };
            if form.value("user_code") == Some("") {
                // The provider asks for a code again (after an abort or a bad code): a user
                // would stop here.
                return page;
            }
            if form.has("login") {
                form.set("login", "alice");
                form.set("password", "any password works here");
            } else if form.value("prompt") == Some("consent") && user == User::CancelsConsent {
                let abort = page
                    .abort_link()
                    .expect("the consent page has a Cancel link");
                page = self.get(&abort).await;
                continue;
            } else if form.has("confirm") && user == User::AbortsDevice {
                form.remove("confirm");
                form.set("abort", "yes");
            }
            page = self.submit(&form).await;
        }
        panic!(
            "the login did not end within {MAX_BROWSER_STEPS} steps; last page {}:\n{}",
            page.url, page.body
        );
    }
}

/// Runs a device login with `user` at the provider; returns what `device_finish` returned, the
/// last page the browser saw, and the login it polled for.
async fn device_login(
    provider: &Provider,
    user: User,
) -> (Result<Tokens, LoginError>, Page, Arc<login::DeviceLogin>) {
    let device = timeout(STEP, login::device_start(provider))
        .await
        .expect("device_start timed out")
        .expect("device_start");
    let link = Url::parse(
        device
            .verification_uri_complete
            .as_deref()
            .expect("oidc-provider gives verification_uri_complete"),
    )
    .expect("verification URI");
    let device = Arc::new(device);
    let finishing = {
        let provider = provider.clone();
        let device = device.clone();
        tokio::spawn(async move { login::device_finish(&provider, &device).await })
    };
    let page = Browser::new().log_in(&link, user).await;
    let result = timeout(DEVICE_LOGIN_TIMEOUT, finishing)
        .await
        .expect("device_finish timed out")
        .expect("device_finish task");
    (result, page, device)
}

fn payload(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let part = jwt.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("JWT payload is base64url");
    serde_json::from_slice(&bytes).expect("JWT payload is JSON")
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
    cloudllm_e2e::init_logs();
    let Some(idp) = OidcProvider::start(&[("ACCESS_TTL", "120")]).await else {
        return;
    };
    let provider = idp.discover().await;
    assert!(provider.device_authorization_endpoint.is_some());

    let (result, page, device) = device_login(&provider, User::Approves).await;
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
    let refreshed = timeout(
        STEP,
        login::refresh(&provider.token_endpoint, CLIENT_ID, &old_refresh),
    )
    .await
    .expect("refresh timed out")
    .expect("refresh");
    assert_ne!(
        refreshed.access_token.expose(),
        tokens.access_token.expose()
    );
    let claims = payload(refreshed.access_token.expose());
    assert_eq!(claims["sub"], "alice");
    let new_refresh = refreshed.refresh_token.clone().expect("a refresh token");
    // oidc-provider rotates public clients' refresh tokens; the old one is spent.
    assert_ne!(new_refresh.expose(), old_refresh.expose());

    // Replaying the spent refresh token: the provider revokes the grant, and the daemon is told
    // to log in again rather than to retry.
    let replayed = timeout(
        STEP,
        login::refresh(&provider.token_endpoint, CLIENT_ID, &old_refresh),
    )
    .await
    .expect("refresh timed out");
    assert!(matches!(replayed, Err(LoginError::Revoked)), "{replayed:?}");
    let message = replayed.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("cloudllm login"), "{message}");
    assert!(!message.contains(old_refresh.expose()));
}

#[tokio::test]
async fn browser_login_with_pkce_then_refresh() {
    cloudllm_e2e::init_logs();
    let Some(idp) = OidcProvider::start(&[]).await else {
        return;
    };
    let provider = idp.discover().await;
    let browser_login = timeout(STEP, login::browser_start(&provider))
        .await
        .expect("browser_start timed out")
        .expect("browser_start");
    let authorize_url = browser_login.authorize_url.clone();
    let query: Vec<(String, String)> = authorize_url.query_pairs().into_owned().collect();
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
    assert_eq!(redirect, browser_login.redirect_uri().as_str());

    let finishing = {
        let provider = provider.clone();
        tokio::spawn(async move { login::browser_finish(&provider, browser_login).await })
    };
    let page = Browser::new().log_in(&authorize_url, User::Approves).await;
    assert!(
        page.url.as_str().starts_with(redirect),
        "the browser ended at {} instead of the daemon",
        page.url
    );
    assert_eq!(page.status, 200);
    assert!(page.body.contains("close this tab"), "{}", page.body);
    let tokens = timeout(STEP, finishing)
        .await
        .expect("browser_finish timed out")
        .expect("browser_finish task")
        .expect("browser login");
    let claims = verify(&idp.issuer, tokens.access_token.expose()).await;
    assert_eq!(claims["sub"], "alice");

    let refreshed = timeout(
        STEP,
        login::refresh(
            &provider.token_endpoint,
            CLIENT_ID,
            tokens.refresh_token.as_ref().expect("a refresh token"),
        ),
    )
    .await
    .expect("refresh timed out")
    .expect("refresh");
    assert_ne!(
        refreshed.access_token.expose(),
        tokens.access_token.expose()
    );
}

#[tokio::test]
async fn browser_login_refuses_a_wrong_state() {
    cloudllm_e2e::init_logs();
    let Some(idp) = OidcProvider::start(&[]).await else {
        return;
    };
    let provider = idp.discover().await;
    let browser_login = timeout(STEP, login::browser_start(&provider))
        .await
        .expect("browser_start timed out")
        .expect("browser_start");
    let mut forged = browser_login.redirect_uri().clone();
    forged.set_query(Some("code=stolen-code&state=not-the-state"));
    let finishing = {
        let provider = provider.clone();
        tokio::spawn(async move { login::browser_finish(&provider, browser_login).await })
    };
    let page = Browser::new().get(&forged).await;
    assert!(page.body.contains("state mismatch"), "{}", page.body);
    let result = timeout(STEP, finishing)
        .await
        .expect("browser_finish timed out")
        .expect("browser_finish task");
    assert!(
        matches!(result, Err(LoginError::StateMismatch)),
        "{result:?}"
    );
    // The listener is closed once the login is over.
    let after = timeout(STEP, reqwest::get(forged))
        .await
        .expect("timed out");
    assert!(after.is_err(), "the listener still answers: {after:?}");
}

#[tokio::test]
async fn browser_login_cancelled_by_the_user_is_denied() {
    cloudllm_e2e::init_logs();
    let Some(idp) = OidcProvider::start(&[]).await else {
        return;
    };
    let provider = idp.discover().await;
    let browser_login = timeout(STEP, login::browser_start(&provider))
        .await
        .expect("browser_start timed out")
        .expect("browser_start");
    let authorize_url = browser_login.authorize_url.clone();
    let finishing = {
        let provider = provider.clone();
        tokio::spawn(async move { login::browser_finish(&provider, browser_login).await })
    };
    let page = Browser::new()
        .log_in(&authorize_url, User::CancelsConsent)
        .await;
    assert!(page.body.contains("declined"), "{}", page.body);
    let result = timeout(STEP, finishing)
        .await
        .expect("browser_finish timed out")
        .expect("browser_finish task");
    assert!(matches!(result, Err(LoginError::Denied)), "{result:?}");
}

#[tokio::test]
async fn device_login_aborted_by_the_user_is_denied() {
    cloudllm_e2e::init_logs();
    let Some(idp) = OidcProvider::start(&[]).await else {
        return;
    };
    let provider = idp.discover().await;
    let (result, page, _) = device_login(&provider, User::AbortsDevice).await;
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
    cloudllm_e2e::init_logs();
    let Some(idp) = OidcProvider::start(&[("DEVICE_TTL", "2")]).await else {
        return;
    };
    let provider = idp.discover().await;
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
