//! The device login: OAuth's device authorization grant (RFC 8628), for machines without a
//! browser (a server over SSH): the provider hands out a short code, the user enters it on
//! another device, and the daemon polls the token endpoint until the user has approved.
//!
//! The `oauth2` crate polls; this module bounds the wait whatever the provider says (at most
//! [`MAX_DEVICE_WAIT`], never faster than [`MIN_POLL_INTERVAL`]) and, when polling ended in
//! expiry after transport failures, reports the failure rather than the expiry.

use std::fmt;
use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{ClientId, DeviceAuthorizationUrl, StandardDeviceAuthorizationResponse, TokenUrl};
use tokio::time::timeout;
use tracing::info;

use super::http::{Grant, HTTP_TIMEOUT, Http};
use super::{LoginError, Provider, Tokens, now_unix, scopes, tokens};

/// The longest a device login is waited for, whatever the provider allows: 30 minutes is the
/// most common providers give (Microsoft 15, Google 30), enough to fetch a phone and sign in.
const MAX_DEVICE_WAIT: Duration = Duration::from_secs(30 * 60);

/// Shortest pause between polls of the token endpoint in the device grant, whatever the
/// provider says: RFC 8628's default interval, so a provider answering 0 is not hammered.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// A device login in progress: what to show the user, and what to poll with.
pub struct DeviceLogin {
    /// The page where the user enters [`user_code`](Self::user_code).
    pub verification_uri: String,
    /// The same page with the code filled in (for a link or a QR code), if the provider has one.
    pub verification_uri_complete: Option<String>,
    /// The code the user enters; short-lived and useless without approval, so shown freely.
    pub user_code: String,
    /// When the code expires, in Unix seconds (at most 30 minutes from the start, whatever the provider allows).
    pub expires_at: u64,
    details: StandardDeviceAuthorizationResponse,
}

impl fmt::Debug for DeviceLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceLogin")
            .field("verification_uri", &self.verification_uri)
            .field("verification_uri_complete", &self.verification_uri_complete)
            .field("user_code", &self.user_code)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Starts a device login (RFC 8628 §3.1): the provider hands out a user code to enter at its
/// verification page.
pub async fn device_start(provider: &Provider) -> Result<DeviceLogin, LoginError> {
    let endpoint = provider
        .device_authorization_endpoint
        .clone()
        .ok_or(LoginError::NoDeviceFlow)?;
    let client = BasicClient::new(ClientId::new(provider.client_id.clone()))
        .set_device_authorization_url(DeviceAuthorizationUrl::from_url(endpoint));
    let http = Http::new()?;
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(scopes(provider))
        .request_async(&http)
        .await
        .map_err(|e| http.token_error(e, Grant::Other))?;
    let wait = details.expires_in().min(MAX_DEVICE_WAIT);
    let login = DeviceLogin {
        verification_uri: details.verification_uri().to_string(),
        verification_uri_complete: details
            .verification_uri_complete()
            .map(|uri| uri.secret().clone()),
        user_code: details.user_code().secret().clone(),
        expires_at: now_unix().saturating_add(wait.as_secs()),
        details,
    };
    info!(issuer = %provider.issuer, expires_in = wait.as_secs(), "device login started");
    Ok(login)
}

/// Polls until the user approves (honouring interval and slow_down), denies, or the code expires.
pub async fn device_finish(provider: &Provider, login: &DeviceLogin) -> Result<Tokens, LoginError> {
    let client = BasicClient::new(ClientId::new(provider.client_id.clone()))
        .set_token_uri(TokenUrl::from_url(provider.token_endpoint.clone()));
    let http = Http::new()?;
    let wait = Duration::from_secs(login.expires_at.saturating_sub(now_unix()));
    // The crate's loop stops at `wait` between polls; this bounds the last poll and any
    // slow_down pauses beyond it too.
    let bound = wait + HTTP_TIMEOUT + MIN_POLL_INTERVAL;
    let polled = timeout(
        bound,
        client
            .exchange_device_access_token(&login.details)
            .request_async(
                &http,
                |pause: Duration| tokio::time::sleep(pause.max(MIN_POLL_INTERVAL)),
                Some(wait),
            ),
    )
    .await;
    let response = match polled {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            return Err(match http.token_error(e, Grant::Other) {
                // The crate retries through transport failures until the code expires; the
                // failure says more than the expiry it ended in.
                LoginError::Expired => match http.last_failure() {
                    Some(failure) => LoginError::Network(failure),
                    None => LoginError::Expired,
                },
                other => other,
            });
        }
        Err(_) => return Err(LoginError::Expired),
    };
    info!(issuer = %provider.issuer, "device login approved");
    tokens(response, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn device_start_needs_a_device_endpoint() {
        let provider = super::super::unreachable_provider();
        let result = device_start(&provider).await;
        assert!(
            matches!(result, Err(LoginError::NoDeviceFlow)),
            "{result:?}"
        );
    }
}
