//! CORS for browser apps on other origins (chat UIs, extensions, notebooks) calling `/api/*`
//! and `/v1/*`: the origins in `allowed_origins` (exact `scheme://host[:port]`, or `*`) may call
//! the API with a bearer token. Default: none, so a page on another origin cannot read anything.
//!
//! A preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered here, without a token
//! (browsers never send one on a preflight) and without counting as a failed sign-in. Only the
//! API routes get this layer; the web page, the tunnel and the relay's own endpoints stay
//! same-origin. Tokens travel in `Authorization`, never in cookies, so the relay never allows
//! credentials: `*` opens the API to any page that holds a token, not to the user's cookies.

use std::ops::ControlFlow;
use std::sync::Arc;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use cloudllm_proto as proto;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::around::Around;

/// How long a browser may cache a preflight's answer: 10 minutes (Chromium's cap is 2 hours);
/// a config change reaches browsers within that.
const MAX_AGE: &str = "600";
/// The methods the API takes.
const METHODS: &str = "GET, HEAD, POST, DELETE, OPTIONS";
/// The request headers a cross-origin caller may send: the token, the JSON body, the device
/// choice, a request id, and what the OpenAI SDKs add.
const ALLOWED_HEADERS: &str = "authorization, content-type, x-cloudllm-device, x-request-id, \
     openai-organization, openai-project, x-stainless-lang, x-stainless-package-version, \
     x-stainless-os, x-stainless-arch, x-stainless-runtime, x-stainless-runtime-version, \
     x-stainless-retry-count, x-stainless-timeout";
/// The response headers a cross-origin caller may read: the wait after a 429, the request id to
/// quote in a report, and the device that served.
const EXPOSED_HEADERS: &str = "retry-after, x-request-id, x-cloudllm-device";

/// The configured origins, checked once at startup.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    any: bool,
    origins: Vec<String>,
}

/// Why an `allowed_origins` entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "allowed_origins entry {0:?} is not an origin: write `*` or `scheme://host[:port]` with no path, like \"https://chat.example.com\""
)]
pub struct BadOrigin(pub String);

impl Cors {
    /// The policy for `allowed_origins`.
    pub fn new(allowed: &[String]) -> Result<Cors, BadOrigin> {
        let mut cors = Cors::default();
        for entry in allowed {
            if entry == "*" {
                cors.any = true;
                continue;
            }
            let url = url::Url::parse(entry).map_err(|_| BadOrigin(entry.clone()))?;
            let origin = url.origin();
            // `Url` adds a `/` path to a bare origin; anything more (a path, a query) is a
            // mistake that would never match a browser's `Origin`.
            if !origin.is_tuple()
                || !matches!(url.scheme(), "http" | "https")
                || url.path() != "/"
                || url.query().is_some()
                || url.fragment().is_some()
                || entry.trim_end_matches('/') != origin.ascii_serialization()
            {
                return Err(BadOrigin(entry.clone()));
            }
            cors.origins.push(origin.ascii_serialization());
        }
        Ok(cors)
    }

    /// Whether any origin is allowed at all.
    pub fn is_enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        let origin_text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(origin_text))
            .then(|| origin.clone())
    }
}

/// The policy as the layer on `/api/*` and `/v1/*` (`AroundLayer(cors)`): it leaves a
/// request without `Origin` (every non-browser caller) untouched, answers a preflight itself,
/// and marks the API's answers to a browser.
impl Around for Arc<Cors> {
    /// `None` for a request without `Origin` (left as it is), else the
    /// `Access-Control-Allow-Origin` value if the origin is allowed.
    type Note = Option<Option<HeaderValue>>;

    fn request(&self, req: &mut Request) -> ControlFlow<Response, Self::Note> {
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return ControlFlow::Continue(None);
        };
        let allowed = self.allow(origin);
        let preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            return ControlFlow::Break(preflight_response(allowed));
        }
        ControlFlow::Continue(Some(allowed))
    }

    fn response(note: Self::Note, response: &mut Response) {
        let Some(allowed) = note else {
            return;
        };
        let headers = response.headers_mut();
        vary(headers);
        if let Some(allow) = allowed {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSED_HEADERS),
            );
        }
    }
}

/// The answer to a preflight: the allowed methods and headers, or 403 for an origin not
/// allowed.
fn preflight_response(allowed: Option<HeaderValue>) -> Response {
    match allowed {
        Some(allow) => {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(METHODS),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOWED_HEADERS),
            );
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(MAX_AGE),
            );
            vary(&mut headers);
            (StatusCode::NO_CONTENT, headers).into_response()
        }
        None => {
            let mut response = (
                StatusCode::FORBIDDEN,
                [(header::CONTENT_TYPE, "application/json")],
                proto::ollama_error(
                    "this origin may not call the relay's API from a browser: the relay's operator lists allowed origins in `allowed_origins`",
                ),
            )
                .into_response();
            vary(response.headers_mut());
            response
        }
    }
}

/// Answers differ by `Origin`: caches must keep them apart.
fn vary(headers: &mut HeaderMap) {
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(entries: &[&str]) -> Result<Cors, BadOrigin> {
        Cors::new(&entries.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn origins_are_exact_or_a_star() {
        let none = cors(&[]).unwrap();
        assert!(!none.is_enabled());
        let listed = cors(&["https://chat.example.com", "http://localhost:5173/"]).unwrap();
        assert!(listed.is_enabled());
        let allow = |o: &str| listed.allow(&HeaderValue::from_str(o).unwrap());
        assert!(allow("https://chat.example.com").is_some());
        assert!(allow("http://localhost:5173").is_some());
        assert!(allow("https://chat.example.com.evil.test").is_none());
        assert!(allow("http://chat.example.com").is_none());
        assert!(allow("null").is_none());
        let star = cors(&["*"]).unwrap();
        assert_eq!(
            star.allow(&HeaderValue::from_static("https://x.test")),
            Some(HeaderValue::from_static("*"))
        );
    }

    #[test]
    fn entries_that_are_not_origins_are_refused() {
        for bad in [
            "chat.example.com",
            "https://chat.example.com/app",
            "https://chat.example.com?x=1",
            "ftp://chat.example.com",
            "",
        ] {
            let err = cors(&[bad]).unwrap_err();
            assert!(err.to_string().contains("allowed_origins"), "{err}");
        }
    }
}
