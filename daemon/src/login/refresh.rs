//! The refresh grant (RFC 6749 §6): a new access token from the saved refresh token, which the
//! daemon runs before the access token expires, with no one at the keyboard. Its one
//! particularity is in the errors: an `invalid_grant` here means the saved login is over
//! ([`LoginError::Revoked`]), so the user is asked to log in again instead of retrying.

use cloudllm_proto::Secret;
use oauth2::basic::BasicClient;
use oauth2::{ClientId, RefreshToken, TokenUrl};
use tracing::debug;
use url::Url;

use super::http::{Grant, Http};
use super::{LoginError, Tokens, tokens};

/// Refresh grant (RFC 6749 §6). A provider that does not rotate refresh tokens returns none:
/// the one passed in then stays valid and is returned again.
pub async fn refresh(
    provider_token_endpoint: &Url,
    client_id: &str,
    refresh_token: &Secret,
) -> Result<Tokens, LoginError> {
    let client = BasicClient::new(ClientId::new(client_id.to_owned()))
        .set_token_uri(TokenUrl::from_url(provider_token_endpoint.clone()));
    let http = Http::new()?;
    let token = RefreshToken::new(refresh_token.expose().to_owned());
    let response = client
        .exchange_refresh_token(&token)
        .request_async(&http)
        .await
        .map_err(|e| http.token_error(e, Grant::Refresh))?;
    debug!(endpoint = %provider_token_endpoint, "access token refreshed");
    tokens(response, Some(refresh_token))
}
