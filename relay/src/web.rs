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

use std::sync::Arc;

use axum::Extension;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use cloudllm_proto as proto;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::auth::{Identity, Scope};
use crate::client_addr::client_ip;
use crate::config::RelayConfig;
use crate::{AppState, Denied};

mod devices;
mod open;

pub use devices::{DeviceInfo, Devices, WebConfig, WebOidc, web_config_of};
pub use open::{Exchanged, MintError, Minted, OPEN_CODE_TTL, OPEN_TOKEN_TTL, OpenCodes};

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
        .route(DEVICES_PATH, get(devices::devices))
        .route(WEB_CONFIG_PATH, get(devices::web_config))
        .route(OPEN_PATH, post(open::mint))
        .route(EXCHANGE_PATH, post(open::exchange))
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

/// The caller of one of the page's endpoints, signed in with a token of scope `need` (and so
/// no longer counted as unauthenticated); else the answer to give them: 401, or 429 for an
/// address over its failure budget. (`req` is `&mut` only so that the future is `Send`: a
/// request's body is not `Sync`.)
async fn signed_in(state: &AppState, req: &mut Request, need: Scope) -> Result<Identity, Response> {
    let addr = caller(state, req);
    match state.authenticate(req.headers(), addr, need, "api").await {
        Ok(identity) => {
            crate::connections::admitted(req.extensions());
            Ok(identity)
        }
        Err(refused) => Err(denied(state, addr, refused)),
    }
}

/// The caller's address, as the proxy computes it (trusted proxies may name it).
fn caller(state: &AppState, req: &Request) -> Option<std::net::IpAddr> {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    client_ip(peer, req.headers(), &state.config.trusted_proxies)
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
