//! Logging in to an OpenID Connect identity provider: discovery, the device authorization grant
//! (RFC 8628, for machines without a browser), the authorization code grant with PKCE and a
//! loopback redirect (RFC 8252, for desktops), and the refresh grant.
//!
//! The daemon runs these flows, not the CLI, because the daemon owns the credentials and
//! refreshes them while the tunnel is up; the CLI only shows the user a link or a code. The
//! protocol work is the `oauth2` crate's; this module adds what it leaves to its caller: an
//! HTTP client bounded in time and size that follows no redirects, the loopback listener for the
//! browser's redirect, and errors that tell a user what happened and what to do.
//!
//! No token, code or verifier ever appears in an error or a log line: errors carry the
//! provider's `error` code and description, the failing URL, or a transport failure.
//!
//! This file holds what every flow shares (the errors, the provider, the tokens, the cleaning
//! of provider text); each flow has its module: `discovery` (the relay's login details and
//! the provider's configuration), `device`, `browser` with its loopback listener
//! (`callback`), `refresh`, and the HTTP client they all use (`http`).

mod browser;
mod callback;
mod device;
mod discovery;
mod http;
mod refresh;

pub(crate) use http::{chain, client_builder};
use std::time::{SystemTime, UNIX_EPOCH};

use cloudllm_proto::Secret;
use oauth2::basic::{BasicTokenResponse, BasicTokenType};
use oauth2::{Scope, TokenResponse};
use url::Url;

pub use browser::{BROWSER_TIMEOUT, BrowserLogin, browser_finish, browser_start};
pub use device::{DeviceLogin, device_finish, device_start};
pub use discovery::{discover, fetch_relay_info};
pub use refresh::refresh;

use self::http::HTTP_TIMEOUT;

/// Longest provider-supplied text (error descriptions) repeated to the user.
const MAX_PROVIDER_TEXT: usize = 300;

/// Why a login or refresh failed. The messages are shown to users as they are.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The user declined at the identity provider.
    #[error("the login was declined at the identity provider; run `cloudllm login` again to retry")]
    Denied,
    /// The device code expired before the user approved it.
    #[error(
        "the login code expired before it was approved; run `cloudllm login` again and approve it sooner"
    )]
    Expired,
    /// The provider has no device authorization endpoint.
    #[error(
        "this identity provider does not offer the device login (RFC 8628); use the browser login instead"
    )]
    NoDeviceFlow,
    /// The browser's redirect carried a `state` that is not this login's: a forged or stale
    /// answer, refused. [`browser_finish`] answers such a redirect with HTTP 400 and keeps
    /// waiting for the real one, so it never ends a login with this error.
    #[error(
        "the browser came back with an answer that belongs to no login in progress (state mismatch), so it was refused; run `cloudllm login` again"
    )]
    StateMismatch,
    /// The redirect came from another issuer than the one the login started with (RFC 9207).
    #[error(
        "the browser's answer came from issuer {0}, not from the one this login started with, so it was refused; run `cloudllm login` again"
    )]
    WrongIssuer(String),
    /// The provider no longer accepts the refresh token: the user must log in again.
    #[error(
        "the identity provider no longer accepts this machine's saved login (expired or revoked); run `cloudllm login` again"
    )]
    Revoked,
    /// The provider answered with an OAuth error: its `error` code and description.
    #[error("the identity provider refused: {0}")]
    Provider(String),
    /// The provider could not be reached, or answered with a server error.
    #[error(
        "could not reach the identity provider: {0}; check the network connection and the issuer URL"
    )]
    Network(String),
    /// A request to the provider took too long.
    #[error(
        "the identity provider did not answer within {} s; check the network connection and try again",
        HTTP_TIMEOUT.as_secs()
    )]
    Timeout,
    /// The browser never came back to the loopback redirect.
    #[error(
        "no answer from the browser within {} minutes; run `cloudllm login` again and finish signing in in the browser",
        BROWSER_TIMEOUT.as_secs() / 60
    )]
    BrowserTimeout,
    /// The provider's OpenID configuration is missing, malformed, insecure or for another issuer.
    #[error("the identity provider's configuration is unusable: {0}; check the issuer URL")]
    Discovery(String),
    /// The provider's answer is not one the protocol allows.
    #[error("the identity provider sent an answer cloudllm cannot use: {0}")]
    InvalidResponse(String),
    /// The loopback listener for the browser's redirect could not be opened.
    #[error("could not listen on 127.0.0.1 for the browser's answer: {0}")]
    Listen(String),
}

/// An identity provider as the login flows need it, from its OpenID configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The issuer identifier, as configured and as the provider names itself.
    pub issuer: Url,
    /// Where the browser login starts.
    pub authorization_endpoint: Url,
    /// Where codes and refresh tokens are exchanged for tokens.
    pub token_endpoint: Url,
    /// Where the device login starts, if the provider offers it.
    pub device_authorization_endpoint: Option<Url>,
    /// This application's (public) client id at the provider.
    pub client_id: String,
    /// The scopes requested at login.
    pub scopes: Vec<String>,
}

/// The tokens a login or refresh produced. `Debug` shows no secret.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// The bearer token for the relay.
    pub access_token: Secret,
    /// The token that gets the next access token, if the provider issued one.
    pub refresh_token: Option<Secret>,
    /// When the access token expires, in Unix seconds, if the provider said.
    pub expires_at: Option<u64>,
}

/// Turns a token endpoint answer into [`Tokens`].
fn tokens(response: BasicTokenResponse, previous: Option<&Secret>) -> Result<Tokens, LoginError> {
    if *response.token_type() != BasicTokenType::Bearer {
        return Err(LoginError::InvalidResponse(format!(
            "token type `{}` is not supported (only Bearer)",
            clean(response.token_type().as_ref())
        )));
    }
    if response.access_token().secret().is_empty() {
        return Err(LoginError::InvalidResponse(
            "the access token is empty".into(),
        ));
    }
    Ok(Tokens {
        access_token: Secret::new(response.access_token().secret().clone()),
        refresh_token: response
            .refresh_token()
            .map(|token| Secret::new(token.secret().clone()))
            .or_else(|| previous.cloned()),
        expires_at: response
            .expires_in()
            .map(|lifetime| now_unix().saturating_add(lifetime.as_secs())),
    })
}

fn scopes(provider: &Provider) -> impl Iterator<Item = Scope> + '_ {
    provider.scopes.iter().cloned().map(Scope::new)
}

/// An OAuth error as users see it: the code and the provider's description.
fn describe(error: &str, description: Option<&str>) -> String {
    match description {
        Some(description) => format!("{}: {}", clean(error), clean(description)),
        None => clean(error),
    }
}

/// Provider-supplied text made fit for a terminal and a log line (see [`printable`]).
fn clean(text: &str) -> String {
    printable(text, MAX_PROVIDER_TEXT)
}

/// Text from a provider or a relay made fit for a terminal and a log line: no control
/// characters (no escape sequences, no forged lines), at most `max_chars` characters, and an
/// ellipsis where it was cut.
pub(crate) fn printable(text: &str, max_chars: usize) -> String {
    let mut out: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(max_chars)
        .collect();
    if text.chars().count() > max_chars {
        out.push('…');
    }
    out
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A provider on a closed loopback port, for tests that must fail before any request.
#[cfg(test)]
fn unreachable_provider() -> Provider {
    Provider {
        issuer: Url::parse("http://127.0.0.1:1").unwrap(),
        authorization_endpoint: Url::parse("http://127.0.0.1:1/auth").unwrap(),
        token_endpoint: Url::parse("http://127.0.0.1:1/token").unwrap(),
        device_authorization_endpoint: None,
        client_id: "c".into(),
        scopes: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_text_loses_control_characters_and_length() {
        assert_eq!(clean("bad\x1b[31m\nthing"), "bad[31mthing");
        let long = "x".repeat(1000);
        assert_eq!(clean(&long).chars().count(), MAX_PROVIDER_TEXT + 1);
        assert_eq!(describe("invalid_scope", Some("no")), "invalid_scope: no");
    }

    #[test]
    fn tokens_do_not_show_in_debug() {
        let tokens = Tokens {
            access_token: Secret::new("at-secret"),
            refresh_token: Some(Secret::new("rt-secret")),
            expires_at: Some(1),
        };
        let shown = format!("{tokens:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
