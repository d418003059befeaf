//! The browser login: OAuth's authorization code grant with PKCE (RFC 7636) and a loopback
//! redirect (RFC 8252), for desktops where the user can sign in in a browser.
//!
//! This module owns the grant: the authorization URL with its PKCE challenge and `state`, the
//! checks of the redirect (`state` first, then the issuer of RFC 9207, then the provider's
//! error) and the code exchange. The local HTTP server the browser comes back to is
//! [`super::callback`]'s.

use std::fmt;
use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, CsrfToken, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, TokenUrl,
};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tracing::info;
use url::Url;

use super::callback::{CALLBACK_PATH, CallbackListener, CallbackParams};
use super::discovery::same_issuer;
use super::http::{Grant, Http};
use super::{LoginError, Provider, Tokens, clean, describe, scopes, tokens};

/// How long the browser login waits for the redirect: 5 minutes lets a user sign in, find a
/// second factor and consent, and a forgotten login does not hold a port for long.
pub const BROWSER_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// A browser login in progress: the page to open, and the loopback listener waiting for the
/// browser to come back.
pub struct BrowserLogin {
    /// The page to open in the user's browser.
    pub authorize_url: Url,
    listener: TcpListener,
    verifier: PkceCodeVerifier,
    state: CsrfToken,
    redirect_uri: Url,
}

impl BrowserLogin {
    /// Where the provider sends the browser back: `http://127.0.0.1:PORT/callback`.
    pub fn redirect_uri(&self) -> &Url {
        &self.redirect_uri
    }
}

impl fmt::Debug for BrowserLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrowserLogin")
            .field("authorize_url", &self.authorize_url.as_str())
            .field("redirect_uri", &self.redirect_uri.as_str())
            .finish_non_exhaustive()
    }
}

/// Starts a browser login: binds the loopback listener on `127.0.0.1:0` and builds the
/// authorization URL with PKCE (S256), a fresh `state`, and the redirect URI
/// `http://127.0.0.1:PORT/callback`.
pub async fn browser_start(provider: &Provider) -> Result<BrowserLogin, LoginError> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| LoginError::Listen(e.to_string()))?;
    let port = listener
        .local_addr()
        .map_err(|e| LoginError::Listen(e.to_string()))?
        .port();
    let redirect_uri = Url::parse(&format!("http://127.0.0.1:{port}{CALLBACK_PATH}"))
        .map_err(|e| LoginError::Listen(e.to_string()))?;
    let client = BasicClient::new(ClientId::new(provider.client_id.clone()))
        .set_auth_uri(AuthUrl::from_url(provider.authorization_endpoint.clone()))
        .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()));
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (authorize_url, state) = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes(provider))
        .set_pkce_challenge(challenge)
        .url();
    info!(issuer = %provider.issuer, %redirect_uri, "browser login started");
    Ok(BrowserLogin {
        authorize_url,
        listener,
        verifier,
        state,
        redirect_uri,
    })
}

/// Waits for the redirect (at most [`BROWSER_TIMEOUT`]), checks `state` (and `iss`, when the
/// provider sends it), exchanges the code, and answers the browser with a small page saying how
/// it went.
///
/// The listener is reachable by every local process and by any page the browser loads, so a
/// redirect whose `state` is not this login's is answered with HTTP 400 and ignored: the login
/// keeps waiting for the real one until [`BROWSER_TIMEOUT`]. Only a redirect with the right
/// `state` (a secret that only the browser the login was started in has seen) ends the login,
/// whether it carries a code or the provider's error.
pub async fn browser_finish(
    provider: &Provider,
    login: BrowserLogin,
) -> Result<Tokens, LoginError> {
    let BrowserLogin {
        listener,
        verifier,
        state,
        redirect_uri,
        ..
    } = login;
    let mut callbacks = CallbackListener::new(listener, state.secret());
    let waited = timeout(BROWSER_TIMEOUT, async {
        let callback = callbacks.next().await;
        let outcome = redeem(provider, &state, &redirect_uri, verifier, &callback.params).await;
        callback.answer(&outcome);
        outcome
    })
    .await;
    // Let the page reach the browser before the connections are dropped.
    let refused = callbacks.close().await;
    match &waited {
        Ok(Ok(_)) => info!(issuer = %provider.issuer, refused, "browser login completed"),
        Ok(Err(e)) => info!(issuer = %provider.issuer, refused, error = %e, "browser login failed"),
        Err(_) => info!(issuer = %provider.issuer, refused, "browser login timed out"),
    }
    waited.unwrap_or(Err(LoginError::BrowserTimeout))
}

/// Checks the redirect against this login and exchanges its code.
async fn redeem(
    provider: &Provider,
    state: &CsrfToken,
    redirect_uri: &Url,
    verifier: PkceCodeVerifier,
    params: &CallbackParams,
) -> Result<Tokens, LoginError> {
    // The state comes first: an error or an issuer from a forged redirect is not worth reading.
    if params.state.as_deref() != Some(state.secret().as_str()) {
        return Err(LoginError::StateMismatch);
    }
    if let Some(iss) = &params.iss
        && !same_issuer(iss, provider.issuer.as_str())
    {
        return Err(LoginError::WrongIssuer(clean(iss)));
    }
    if let Some(error) = &params.error {
        return Err(match error.as_str() {
            "access_denied" => LoginError::Denied,
            _ => LoginError::Provider(describe(error, params.error_description.as_deref())),
        });
    }
    let code = params.code.as_ref().ok_or_else(|| {
        LoginError::InvalidResponse("the browser came back without an authorization code".into())
    })?;
    let client = BasicClient::new(ClientId::new(provider.client_id.clone()))
        .set_token_uri(TokenUrl::from_url(provider.token_endpoint.clone()))
        .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()));
    let http = Http::new()?;
    let response = client
        .exchange_code(AuthorizationCode::new(code.clone()))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .map_err(|e| http.token_error(e, Grant::Other))?;
    tokens(response, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_wrong_state_is_refused_before_anything_else() {
        let provider = super::super::unreachable_provider();
        let (_, verifier) = PkceCodeChallenge::new_random_sha256();
        let params = CallbackParams::parse("code=c&state=forged&error=access_denied");
        let state = CsrfToken::new("real".into());
        let redirect = Url::parse("http://127.0.0.1:2/callback").unwrap();
        let result = redeem(&provider, &state, &redirect, verifier, &params).await;
        assert!(
            matches!(result, Err(LoginError::StateMismatch)),
            "{result:?}"
        );
    }
}
