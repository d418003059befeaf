//! A real OpenID Provider for the end-to-end tests: `oidc-provider` from npm (a certified
//! implementation), started from `tests/oidc/provider.mjs` on `127.0.0.1:0`, one process per
//! test, and a browser that plays the user at its development login, consent and
//! device-confirmation pages.
//!
//! Needs Node.js (20.18 or newer) and npm; `tests/oidc/node_modules` is installed with `npm ci`
//! when missing. Without Node.js the tests that use it fail, naming what to install, unless
//! `CLOUDLLM_SKIP_OIDC_TEST=1` is set (then [`OidcProvider::start`] returns `None`).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudllm_daemon::login::{self, LoginError, Provider, Tokens};
use scraper::{Html, Selector};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::OnceCell;
use tokio::time::timeout;
use url::Url;

use crate::STEP;

/// The provider's one client (see provider.mjs).
pub const CLIENT_ID: &str = "cloudllmd";

/// The `aud` of the provider's access tokens (see provider.mjs).
pub const AUDIENCE: &str = "cloudllm";

/// The id of the web page's client, registered when the provider is started with
/// `("WEB_CLIENT_ID", WEB_CLIENT_ID)` in its environment (see [`OidcProvider::set_web_redirect`]).
pub const WEB_CLIENT_ID: &str = "cloudllm-web";

/// A device login takes one poll interval (5 s by RFC 8628's default) after approval, plus
/// the flow itself.
pub const DEVICE_LOGIN_TIMEOUT: Duration = Duration::from_secs(40);

/// Steps of a login in the browser (form posts); more means the flow is looping.
const MAX_BROWSER_STEPS: usize = 10;

/// The most of the provider's stderr kept to explain a failed start.
const MAX_STDERR: usize = 16 * 1024;

fn oidc_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// The scopes the daemon asks for: a refresh token and the right to open a tunnel.
pub fn scopes() -> Vec<String> {
    ["openid", "offline_access", "agent"]
        .map(String::from)
        .to_vec()
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
            crate::browser::npm_ci(&oidc_dir(), "oidc-provider", "the test OpenID provider").await;
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
pub struct OidcProvider {
    /// The provider's issuer URL, e.g. `http://127.0.0.1:41234`.
    pub issuer: Url,
    child: Child,
    /// Held open: the provider exits when its stdin closes, even if this process is killed.
    /// Its first line is the web client's redirect URI (with `WEB_CLIENT_ID`).
    stdin: ChildStdin,
}

impl OidcProvider {
    /// Starts a provider with extra environment (`ACCESS_TTL`, `DEVICE_TTL` … see
    /// provider.mjs); `None` if skipped.
    pub async fn start(env: &[(&str, &str)]) -> Option<OidcProvider> {
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
            stdin,
        })
    }

    /// Registers the web page's client with `redirect_uri` (the relay's root URL) and waits
    /// until the provider answers with it. Only for a provider started with `WEB_CLIENT_ID` in
    /// its environment: such a provider holds every request until it has this.
    pub async fn set_web_redirect(&mut self, redirect_uri: &Url) {
        use tokio::io::AsyncWriteExt;
        let line = format!("{redirect_uri}\n");
        timeout(STEP, self.stdin.write_all(line.as_bytes()))
            .await
            .expect("writing to the provider timed out")
            .expect("writing the web client's redirect URI to the provider");
        let discovery = self
            .issuer
            .join(".well-known/openid-configuration")
            .expect("discovery URL");
        timeout(STEP, crate::client().get(discovery).send())
            .await
            .expect("the provider did not answer after its web client was registered")
            .expect("discovery")
            .error_for_status()
            .expect("discovery");
    }

    /// The provider as the daemon discovers it, with [`CLIENT_ID`] and [`scopes`].
    pub async fn discover(&self) -> Provider {
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
pub struct Page {
    /// Where the browser ended up, after redirects.
    pub url: Url,
    /// The HTTP status.
    pub status: u16,
    /// The page's text.
    pub body: String,
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
pub enum User {
    /// Logs in, consents and confirms.
    Approves,
    /// Clicks "Abort" on the device confirmation page.
    AbortsDevice,
    /// Clicks "Cancel" on the consent page.
    CancelsConsent,
}

/// The user's browser: keeps cookies, follows redirects (to the daemon's loopback listener too).
pub struct Browser {
    http: reqwest::Client,
}

impl Browser {
    /// A browser around `http`, which must keep cookies (reqwest's `cookie_store(true)`, a
    /// feature only the tests enable): the provider's login pages track the user in cookies.
    pub fn new(http: reqwest::Client) -> Browser {
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

    /// Loads `url`.
    pub async fn get(&self, url: &Url) -> Page {
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
    pub async fn log_in(&self, start: &Url, user: User) -> Page {
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

/// Runs a device login with `user` at the provider in `browser`; returns what `device_finish`
/// returned, the last page the browser saw, and the login it polled for.
pub async fn device_login(
    provider: &Provider,
    browser: &Browser,
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
    let page = browser.log_in(&link, user).await;
    let result = timeout(DEVICE_LOGIN_TIMEOUT, finishing)
        .await
        .expect("device_finish timed out")
        .expect("device_finish task");
    (result, page, device)
}
