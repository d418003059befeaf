//! The web app at `/`: the page a person with only a browser uses to chat with the models on
//! their own machine. Its files are embedded in the binary at build time (`build.rs` reads the
//! committed bundle in `web/dist`), so the relay needs no second server, no CDN and no request to
//! any third party, and works air-gapped. Conversations live in the browser; the relay stores
//! nothing for the page.
//!
//! Each file is served pre-compressed (brotli or gzip, as the browser accepts), hashed assets
//! with a year-long `immutable` lifetime and `index.html` revalidated on every load, all behind
//! a strict Content-Security-Policy: scripts and styles from this origin only, nothing inline,
//! network access to this origin and, with `[login]`, the identity provider's.
//!
//! Two small endpoints exist for the page: `GET /cloudllm/devices` (the caller's connected
//! devices and the models each has, which the merged `/api/tags` cannot say) and the one-time
//! codes behind `cloudllm open` (`POST /cloudllm/open` with an agent token mints a code, `POST
//! /cloudllm/open/exchange` trades it once for a short-lived client token; see [`OpenCodes`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use cloudllm_proto as proto;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::auth::Scope;
use crate::client_addr::client_ip;
use crate::config::RelayConfig;
use crate::{AppState, Denied};

mod embedded {
    use super::Asset;
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

/// The path of the devices endpoint.
pub const DEVICES_PATH: &str = "/cloudllm/devices";
/// The path of the page's sign-in settings.
pub const WEB_CONFIG_PATH: &str = "/cloudllm/web";
/// The path where a daemon mints a one-time sign-in code for `cloudllm open`.
pub const OPEN_PATH: &str = proto::OPEN_WEB_PATH;
/// The path where the page trades a one-time code for a client token.
pub const EXCHANGE_PATH: &str = "/cloudllm/open/exchange";

/// Hashed assets never change under their name: browsers may keep them for a year without
/// asking again.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// `index.html` (and the unhashed icon) names the current assets: always revalidated, so a
/// relay upgrade reaches every browser at its next load.
const REVALIDATE: &str = "no-cache";

/// How long a one-time code from `cloudllm open` stays valid: the browser opens within a
/// second or two on the same machine; 60 s covers a slow first start of the browser.
pub const OPEN_CODE_TTL: Duration = Duration::from_secs(60);
/// Lifetime of the client token a one-time code buys: a working day. It cannot be refreshed;
/// `cloudllm open` again gives a new one. Short, so a token left in a browser dies soon.
pub const OPEN_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Live codes one user may hold: a person opens the page a few times a minute at most; more
/// would only fill the relay's memory.
const MAX_CODES_PER_USER: usize = 8;
/// Live codes in all, over every user: bounds the table's memory (≈100 bytes each).
const MAX_CODES: usize = 10_000;
/// Length of a one-time code, in random bytes: 256 bits cannot be guessed within its TTL.
const CODE_BYTES: usize = 32;
/// Largest exchange request body: `{"code": "<64 hex>"}` and some room.
const MAX_EXCHANGE_BODY: usize = 1024;

/// One embedded file of the bundle.
#[derive(Debug)]
pub struct Asset {
    /// Its URL path, e.g. `/index.html` or `/assets/index-3f9a.js`.
    pub path: &'static str,
    /// The file as built.
    pub raw: &'static [u8],
    /// Its gzip encoding, when the bundle has one.
    pub gzip: Option<&'static [u8]>,
    /// Its brotli encoding, when the bundle has one.
    pub brotli: Option<&'static [u8]>,
    /// A quoted hash of `raw`, for `ETag`.
    pub etag: &'static str,
}

/// Every file of the bundle (empty when the relay was built without `web/dist`).
pub fn assets() -> &'static [Asset] {
    embedded::ASSETS
}

/// What the web routes share: the security headers computed from the config once.
#[derive(Debug, Clone)]
pub struct Site {
    csp: HeaderValue,
}

impl Site {
    /// The site for `config`: the CSP allows the `[login]` provider's origin for the page's
    /// sign-in requests (discovery, token, refresh).
    pub fn new(config: &RelayConfig) -> anyhow::Result<Site> {
        let csp = content_security_policy(config);
        Ok(Site {
            csp: HeaderValue::from_str(&csp)
                .map_err(|_| anyhow::anyhow!("[login] issuer makes an invalid CSP header"))?,
        })
    }

    /// Puts the security headers every page response carries on `headers`.
    fn secure(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONTENT_SECURITY_POLICY, self.csp.clone());
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(
            "cross-origin-opener-policy",
            HeaderValue::from_static("same-origin"),
        );
    }
}

/// The page's Content-Security-Policy: nothing inline, nothing from another origin, except
/// network requests to the `[login]` provider.
pub fn content_security_policy(config: &RelayConfig) -> String {
    let provider = config
        .login
        .as_ref()
        .and_then(|login| url::Url::parse(&login.issuer).ok())
        .map(|issuer| issuer.origin())
        .filter(url::Origin::is_tuple)
        .map(|origin| format!(" {}", origin.ascii_serialization()))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
         font-src 'self'; connect-src 'self'{provider}; manifest-src 'self'; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    )
}

/// The routes of the page and its endpoints.
pub(crate) fn routes(site: Site) -> axum::Router<Arc<AppState>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/", get(page))
        .route("/index.html", get(page))
        .route("/assets/{*file}", get(page))
        .route("/favicon.svg", get(page))
        .route(DEVICES_PATH, get(devices))
        .route(WEB_CONFIG_PATH, get(web_config))
        .route(OPEN_PATH, post(mint))
        .route(EXCHANGE_PATH, post(exchange))
        .layer(Extension(Arc::new(site)))
}

/// Serves one embedded file.
async fn page(Extension(site): Extension<Arc<Site>>, req: Request) -> Response {
    let path = match req.uri().path() {
        "/" => "/index.html",
        other => other,
    };
    let mut response = match assets().iter().find(|asset| asset.path == path) {
        Some(asset) => serve_asset(asset, req.headers()),
        None if path == "/index.html" => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "the web app was not built into this relay: build it with `npm ci && npm run build` in web/, then rebuild the relay\n",
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no such file\n",
        )
            .into_response(),
    };
    site.secure(response.headers_mut());
    response
}

/// The response for `asset`: 304 when the browser has it, else its best encoding.
fn serve_asset(asset: &Asset, request: &HeaderMap) -> Response {
    let cache = if asset.path.starts_with("/assets/") {
        IMMUTABLE
    } else {
        REVALIDATE
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if let Ok(etag) = HeaderValue::from_str(&format!("W/{}", asset.etag)) {
        headers.insert(header::ETAG, etag);
    }
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|tag| tag.trim().trim_start_matches("W/") == asset.etag)
        });
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(asset.path)),
    );
    let accepted = Accepted::parse(request);
    let body = match (asset.brotli, asset.gzip) {
        (Some(br), _) if accepted.brotli => {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
            br
        }
        (_, Some(gz)) if accepted.gzip => {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            gz
        }
        _ => asset.raw,
    };
    (StatusCode::OK, headers, body).into_response()
}

/// The encodings a request's `Accept-Encoding` allows (a `q=0` refuses one).
#[derive(Debug, Default, PartialEq, Eq)]
struct Accepted {
    brotli: bool,
    gzip: bool,
}

impl Accepted {
    fn parse(headers: &HeaderMap) -> Accepted {
        let mut accepted = Accepted::default();
        for value in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut parts = item.split(';');
                let name = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
                let refused = parts.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                match name.as_str() {
                    "br" => accepted.brotli = !refused,
                    "gzip" | "x-gzip" => accepted.gzip = !refused,
                    "*" if !refused => {
                        accepted.brotli = true;
                        accepted.gzip = true;
                    }
                    _ => {}
                }
            }
        }
        accepted
    }
}

/// The `Content-Type` of a bundle file, by its extension.
fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json" | "webmanifest") => "application/json",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// A JSON error in the shape of the Ollama API's (`{"error": "..."}`), which the page reads.
fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        proto::ollama_error(message),
    )
        .into_response()
}

/// A 200 JSON answer that no cache keeps (it names the caller's devices or a credential).
fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode the answer",
        ),
    }
}

/// The answer to a refused authentication.
fn denied(state: &AppState, addr: Option<std::net::IpAddr>, denied: Denied) -> Response {
    match denied {
        Denied::Limited(refusal) => {
            state.record_refusal(None, addr, "api", &refusal);
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, &refusal.message);
            refusal.set_retry_after(response.headers_mut());
            response
        }
        Denied::Auth(err) => {
            let mut response = error(err.status(), &err.to_string());
            if err.status() == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

/// The page's sign-in settings, `GET /cloudllm/web` (public, like `/.well-known/cloudllm`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WebConfig {
    /// OpenID Connect in the page, with `[login]` and `[web_login]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc: Option<WebOidc>,
}

/// The provider and client the page signs in with.
#[derive(Debug, Serialize, Deserialize)]
pub struct WebOidc {
    /// The provider's issuer URL.
    pub issuer: String,
    /// The page's client id.
    pub client_id: String,
    /// The scopes it asks for.
    pub scopes: Vec<String>,
}

/// The [`WebConfig`] of `config`.
pub fn web_config_of(config: &RelayConfig) -> WebConfig {
    let oidc = match (&config.login, &config.web_login) {
        (Some(login), Some(web)) => Some(WebOidc {
            issuer: login.issuer.clone(),
            client_id: web.client_id.clone(),
            scopes: web.scopes.clone(),
        }),
        _ => None,
    };
    WebConfig { oidc }
}

async fn web_config(State(state): State<Arc<AppState>>) -> Response {
    json(&web_config_of(&state.config))
}

/// The caller's address, as the proxy computes it (trusted proxies may name it).
fn caller(state: &AppState, req: &Request) -> Option<std::net::IpAddr> {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    client_ip(peer, req.headers(), &state.config.trusted_proxies)
}

/// One connected device, as `GET /cloudllm/devices` lists it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's name (what `x-cloudllm-device` takes).
    pub name: String,
    /// Its stable id (also accepted by `x-cloudllm-device`).
    pub id: String,
    /// The models its Ollama has, as the daemon last reported them.
    pub models: Vec<String>,
    /// Requests it is serving now.
    pub busy: usize,
}

/// The body of `GET /cloudllm/devices`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Devices {
    /// The caller's connected devices, by name.
    pub devices: Vec<DeviceInfo>,
}

/// `GET /cloudllm/devices` with a client token: the caller's connected devices and their models.
async fn devices(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let addr = caller(&state, &req);
    let identity = match state
        .authenticate(req.headers(), addr, Scope::Client, "api")
        .await
    {
        Ok(identity) => identity,
        Err(refused) => return denied(&state, addr, refused),
    };
    crate::connections::admitted(req.extensions());
    let mut list: Vec<DeviceInfo> = state
        .registry
        .devices_of(&identity.user)
        .iter()
        .map(|device| DeviceInfo {
            name: device.name.clone(),
            id: device.id.clone(),
            models: device.models(),
            busy: device.in_flight(),
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    json(&Devices { devices: list })
}

/// The one-time codes of `cloudllm open`, in memory only (they live a minute).
///
/// Why this is safe: the daemon mints a code with its agent token (a credential that already
/// names the user) and opens `RELAY/#open=CODE`. The code is in the URL's fragment, which the
/// browser never sends to any server, so it reaches no access log and no `Referer`; the page
/// removes it from the address bar and history at once. It is 256 random bits, valid for
/// [`OPEN_CODE_TTL`], good for one exchange, and it buys only a client token (no tunnel)
/// that expires after [`OPEN_TOKEN_TTL`]. Wrong codes count against the address's failure
/// budget like bad tokens. No long-lived secret ever travels in a URL.
#[derive(Debug, Default)]
pub struct OpenCodes {
    codes: Mutex<HashMap<String, Pending>>,
}

#[derive(Debug)]
struct Pending {
    user: String,
    tier: Option<String>,
    expires: Instant,
}

/// Why a code was not minted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MintError {
    /// The user holds [`MAX_CODES_PER_USER`] live codes.
    #[error("too many sign-in codes at once: wait a minute and try again")]
    PerUser,
    /// The table holds [`MAX_CODES`].
    #[error("the relay is handing out too many sign-in codes right now: try again in a minute")]
    Full,
}

impl OpenCodes {
    /// A new code for `user` (with their `tier`), valid for [`OPEN_CODE_TTL`] from `now`.
    pub fn mint(&self, user: &str, tier: Option<&str>, now: Instant) -> Result<String, MintError> {
        let mut codes = self.codes.lock().unwrap_or_else(|e| e.into_inner());
        codes.retain(|_, pending| pending.expires > now);
        if codes.len() >= MAX_CODES {
            return Err(MintError::Full);
        }
        if codes.values().filter(|p| p.user == user).count() >= MAX_CODES_PER_USER {
            return Err(MintError::PerUser);
        }
        let mut bytes = [0u8; CODE_BYTES];
        getrandom::fill(&mut bytes).map_err(|_| MintError::Full)?;
        let code: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        codes.insert(
            code.clone(),
            Pending {
                user: user.to_owned(),
                tier: tier.map(str::to_owned),
                expires: now + OPEN_CODE_TTL,
            },
        );
        Ok(code)
    }

    /// Takes `code` if it is live: the user and tier it was minted for. A code works once.
    pub fn take(&self, code: &str, now: Instant) -> Option<(String, Option<String>)> {
        let mut codes = self.codes.lock().unwrap_or_else(|e| e.into_inner());
        let pending = codes.remove(code)?;
        (pending.expires > now).then_some((pending.user, pending.tier))
    }
}

/// The answer of `POST /cloudllm/open` (the daemon reads the same type).
pub type Minted = proto::OpenWebCode;

/// `POST /cloudllm/open` with an agent token (the daemon's): a one-time sign-in code for the
/// page, for `cloudllm open`.
async fn mint(
    State(state): State<Arc<AppState>>,
    Extension(codes): Extension<Arc<OpenCodes>>,
    req: Request,
) -> Response {
    let addr = caller(&state, &req);
    let identity = match state
        .authenticate(req.headers(), addr, Scope::Agent, "api")
        .await
    {
        Ok(identity) => identity,
        Err(refused) => return denied(&state, addr, refused),
    };
    crate::connections::admitted(req.extensions());
    if state.config.secret.is_none() {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "this relay has no signing secret (only [jwks]), so it cannot sign you in from a code: sign in on the page with your identity provider",
        );
    }
    match codes.mint(&identity.user, identity.tier.as_deref(), Instant::now()) {
        Ok(code) => json(&Minted {
            path: proto::Secret::new(format!("/#open={code}")),
            code: proto::Secret::new(code),
            expires_in: OPEN_CODE_TTL.as_secs(),
        }),
        Err(err) => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, &err.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            response
        }
    }
}

/// The body of `POST /cloudllm/open/exchange`.
#[derive(Debug, Deserialize)]
struct ExchangeRequest {
    code: String,
}

/// The answer of `POST /cloudllm/open/exchange`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Exchanged {
    /// A client token for the code's user.
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// `POST /cloudllm/open/exchange` `{"code": "..."}`: trades a live one-time code, once, for a
/// short-lived client token. A wrong code counts as a failed sign-in of the caller's address.
async fn exchange(
    State(state): State<Arc<AppState>>,
    Extension(codes): Extension<Arc<OpenCodes>>,
    req: Request,
) -> Response {
    let addr = caller(&state, &req);
    if let Some(refusal) = addr.and_then(|ip| state.limits.blocked(ip)) {
        return denied(&state, addr, Denied::Limited(refusal));
    }
    let body = match axum::body::to_bytes(req.into_body(), MAX_EXCHANGE_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is too large",
            );
        }
    };
    let Ok(ExchangeRequest { code }) = serde_json::from_slice(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"code\": \"...\"}: the code from the page's address",
        );
    };
    let Some((user, tier)) = codes.take(&code, Instant::now()) else {
        return match state.auth_failed(addr, "api", crate::auth::AuthError::Invalid) {
            Denied::Limited(refusal) => denied(&state, addr, Denied::Limited(refusal)),
            Denied::Auth(_) => error(
                StatusCode::UNAUTHORIZED,
                "this sign-in link has expired or was already used: run `cloudllm open` again",
            ),
        };
    };
    match state
        .keys
        .issue(&user, Scope::Client, tier.as_deref(), OPEN_TOKEN_TTL)
    {
        Ok(token) => json(&Exchanged {
            token,
            expires_in: OPEN_TOKEN_TTL.as_secs(),
        }),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the relay could not sign a token",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoginConfig;

    fn accept(value: &str) -> Accepted {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap(),
        );
        Accepted::parse(&headers)
    }

    #[test]
    fn accept_encoding_is_read_with_its_weights() {
        assert_eq!(
            accept("gzip, deflate, br, zstd"),
            Accepted {
                brotli: true,
                gzip: true
            }
        );
        assert_eq!(
            accept("gzip"),
            Accepted {
                brotli: false,
                gzip: true
            }
        );
        assert_eq!(
            accept("br;q=0, gzip;q=0.5"),
            Accepted {
                brotli: false,
                gzip: true
            }
        );
        assert_eq!(
            accept("*"),
            Accepted {
                brotli: true,
                gzip: true
            }
        );
        assert_eq!(accept("identity"), Accepted::default());
        assert_eq!(Accepted::parse(&HeaderMap::new()), Accepted::default());
    }

    #[test]
    fn the_csp_names_the_identity_provider_only_when_configured() {
        let mut config = RelayConfig::default();
        let plain = content_security_policy(&config);
        assert!(plain.contains("connect-src 'self';"), "{plain}");
        assert!(plain.contains("script-src 'self';"), "{plain}");
        assert!(!plain.contains("unsafe"), "{plain}");
        assert!(plain.contains("frame-ancestors 'none'"), "{plain}");
        config.login = Some(LoginConfig {
            issuer: "https://idp.example.com/realms/x".into(),
            client_id: "cloudllm".into(),
            scopes: vec![],
        });
        let with_login = content_security_policy(&config);
        assert!(
            with_login.contains("connect-src 'self' https://idp.example.com;"),
            "{with_login}"
        );
    }

    #[test]
    fn codes_work_once_and_expire() {
        let codes = OpenCodes::default();
        let now = Instant::now();
        let code = codes.mint("alice", Some("free"), now).unwrap();
        assert_eq!(code.len(), CODE_BYTES * 2);
        assert_eq!(
            codes.take(&code, now),
            Some(("alice".to_owned(), Some("free".to_owned())))
        );
        assert_eq!(codes.take(&code, now), None, "a code works once");
        let late = codes.mint("alice", None, now).unwrap();
        assert_eq!(codes.take(&late, now + OPEN_CODE_TTL), None, "expired");
        assert_eq!(codes.take("", now), None);
    }

    #[test]
    fn one_user_cannot_fill_the_table() {
        let codes = OpenCodes::default();
        let now = Instant::now();
        for _ in 0..MAX_CODES_PER_USER {
            codes.mint("alice", None, now).unwrap();
        }
        assert_eq!(codes.mint("alice", None, now), Err(MintError::PerUser));
        assert!(codes.mint("bob", None, now).is_ok());
        // Expired codes make room again.
        assert!(codes.mint("alice", None, now + OPEN_CODE_TTL).is_ok());
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type("/index.html"), "text/html; charset=utf-8");
        assert_eq!(
            content_type("/assets/index-abc.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("/assets/x.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("/noext"), "application/octet-stream");
    }
}
