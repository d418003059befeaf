//! The HTTP client every login flow talks to the identity provider through, and the mapping
//! of its failures to what the user is told.
//!
//! The `oauth2` crate does the protocol and leaves the transport to its caller; this client is
//! bounded in time ([`HTTP_TIMEOUT`]) and size ([`MAX_RESPONSE_BYTES`], read with the shared
//! bounded reader, so an endless answer is cut off at the limit), and follows no redirects.
//! It never puts a response body in an error: a body may hold tokens.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use cloudllm_tunnel::body::{BodyError, read_limited};
use oauth2::{
    AsyncHttpClient, ErrorResponseType, HttpRequest, HttpResponse, RequestTokenError,
    StandardErrorResponse,
};
use tokio::time::timeout;

use super::{LoginError, clean, describe};

/// Time for one request to the identity provider, body included: 30 s covers a slow link and a
/// provider under load, and a user waiting at a prompt still hears back within the minute.
pub(super) const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Time for the TCP and TLS connect alone, to a provider or a relay, so an unreachable one
/// fails fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer read from the provider: discovery documents (Keycloak's, among the largest,
/// is about 10 KiB) and token responses carrying an ID token (a few KiB) fit with room to spare.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Which grant an error came from: an `invalid_grant` means "log in again" only for a refresh.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Grant {
    /// The refresh grant.
    Refresh,
    /// Any grant that starts a login.
    Other,
}

/// A transport failure talking to the provider.
#[derive(Debug, thiserror::Error)]
pub(super) enum HttpError {
    /// The provider took longer than [`HTTP_TIMEOUT`].
    #[error("no answer within {} s", HTTP_TIMEOUT.as_secs())]
    Timeout,
    /// The provider could not be reached, or the connection failed.
    #[error("{0}")]
    Network(String),
    /// A server error or a redirect.
    #[error("HTTP {0}")]
    Status(u16),
    /// The answer is over [`MAX_RESPONSE_BYTES`].
    #[error("the answer is larger than {} KiB", MAX_RESPONSE_BYTES / 1024)]
    TooLarge,
}

/// How the daemon's HTTP clients for providers and relays start: no redirects (one could send a
/// code or a token to another host), [`CONNECT_TIMEOUT`], `timeout` for a whole request, and
/// cloudllmd's user agent.
pub(crate) fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        .tcp_nodelay(true)
        .user_agent(concat!("cloudllmd/", env!("CARGO_PKG_VERSION")))
}

/// The HTTP client the `oauth2` crate talks through: bounded in time and size, following no
/// redirects (the crate's advice: a redirect could send a code to another host), and
/// remembering whether the latest attempt failed, since the device grant's polling retries
/// through failures.
pub(super) struct Http {
    client: reqwest::Client,
    last_failure: Mutex<Option<String>>,
    last_status: AtomicU16,
}

impl Http {
    /// A client for one login step.
    pub(super) fn new() -> Result<Http, LoginError> {
        let client = client_builder(HTTP_TIMEOUT)
            .build()
            .map_err(|e| LoginError::Network(format!("setting up HTTPS: {}", chain(&e))))?;
        Ok(Http {
            client,
            last_failure: Mutex::new(None),
            last_status: AtomicU16::new(0),
        })
    }

    /// One request, bounded by [`HTTP_TIMEOUT`] and [`MAX_RESPONSE_BYTES`]. Server errors and
    /// redirects come back as [`HttpError::Status`], so the device grant's polling retries them.
    pub(super) async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let request = reqwest::Request::try_from(request.map(reqwest::Body::from))
            .map_err(|e| HttpError::Network(chain(&e)))?;
        let exchange = async {
            let response = self
                .client
                .execute(request)
                .await
                .map_err(transport_error)?;
            let status = response.status();
            self.last_status.store(status.as_u16(), Ordering::Relaxed);
            if status.is_server_error() || status.is_redirection() {
                return Err(HttpError::Status(status.as_u16()));
            }
            let headers = response.headers().clone();
            let body = read_limited(reqwest::Body::from(response), MAX_RESPONSE_BYTES)
                .await
                .map_err(|e| match e {
                    BodyError::TooLarge { .. } => HttpError::TooLarge,
                    BodyError::Read(e) => transport_error(e),
                })?;
            let mut out = http::Response::new(body.to_vec());
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            Ok(out)
        };
        let result = timeout(HTTP_TIMEOUT, exchange)
            .await
            .unwrap_or(Err(HttpError::Timeout));
        // Only the latest attempt counts: a failure followed by an answer is forgotten.
        if let Ok(mut last) = self.last_failure.lock() {
            *last = result.as_ref().err().map(|e| e.to_string());
        }
        result
    }

    /// What went wrong with the latest attempt, if it failed.
    pub(super) fn last_failure(&self) -> Option<String> {
        self.last_failure.lock().ok().and_then(|last| last.clone())
    }

    /// Maps the `oauth2` crate's error to what the user is told. Never includes a response
    /// body: it may hold tokens.
    pub(super) fn token_error<T>(
        &self,
        error: RequestTokenError<HttpError, StandardErrorResponse<T>>,
        grant: Grant,
    ) -> LoginError
    where
        T: ErrorResponseType + AsRef<str> + fmt::Display,
    {
        match error {
            RequestTokenError::ServerResponse(response) => {
                match (response.error().as_ref(), grant) {
                    ("access_denied", _) => LoginError::Denied,
                    ("expired_token", _) => LoginError::Expired,
                    ("invalid_grant", Grant::Refresh) => LoginError::Revoked,
                    (code, _) => LoginError::Provider(describe(
                        code,
                        response.error_description().map(String::as_str),
                    )),
                }
            }
            RequestTokenError::Request(HttpError::Timeout) => LoginError::Timeout,
            RequestTokenError::Request(HttpError::TooLarge) => {
                LoginError::InvalidResponse(HttpError::TooLarge.to_string())
            }
            RequestTokenError::Request(e) => LoginError::Network(e.to_string()),
            // Only the JSON path of the problem: serde's message may quote a value.
            RequestTokenError::Parse(e, _body) => LoginError::InvalidResponse(format!(
                "HTTP {} with a malformed or missing `{}`",
                self.last_status.load(Ordering::Relaxed),
                e.path()
            )),
            RequestTokenError::Other(message) => LoginError::InvalidResponse(clean(&message)),
        }
    }
}

impl<'c> AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// A reqwest failure as an [`HttpError`]: a timeout, or a network failure with its causes.
fn transport_error(error: reqwest::Error) -> HttpError {
    match error.is_timeout() {
        true => HttpError::Timeout,
        false => HttpError::Network(chain(&error)),
    }
}

/// An error and its causes on one line (reqwest's own message hides the cause).
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
