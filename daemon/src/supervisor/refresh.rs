//! Renewing OAuth tokens before they expire. Tokens pasted with `--with-token` have no refresh
//! token: they last until they expire, and then the relay asks for a new login.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use url::Url;

use super::{Supervisor, unix_now};
use crate::login;

/// Refresh at most this long before expiry (less for short-lived tokens: half their rest).
const REFRESH_MARGIN: Duration = Duration::from_secs(120);

/// Delay between refresh attempts after a failure.
const REFRESH_RETRY: Duration = Duration::from_secs(10);

impl Supervisor {
    /// Refreshes OAuth tokens before they expire, until shutdown. A refresh that keeps failing
    /// until the token has expired puts the daemon in "login required".
    pub async fn run_refresh(self: Arc<Self>) {
        loop {
            let credentials = self
                .credentials
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let plan = credentials.as_ref().and_then(|c| {
                Some((
                    c.expires_at?,
                    Url::parse(c.token_endpoint.as_deref()?).ok()?,
                    c.client_id.clone()?,
                    c.refresh_token.clone()?,
                ))
            });
            let Some((expires_at, endpoint, client_id, refresh_token)) = plan else {
                // Nothing to refresh: wait for a login.
                let mut desired = self.desired.subscribe();
                tokio::select! {
                    _ = desired.changed() => continue,
                    () = self.shutdown.cancelled() => return,
                }
            };
            let now = unix_now();
            let left = Duration::from_secs(expires_at.saturating_sub(now));
            let wait = left.saturating_sub(REFRESH_MARGIN.min(left / 2));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.shutdown.cancelled() => return,
            }
            match login::refresh(&endpoint, &client_id, &refresh_token).await {
                Ok(tokens) => {
                    let Some(mut updated) = credentials else {
                        continue;
                    };
                    updated.access_token = tokens.access_token;
                    updated.expires_at = tokens.expires_at;
                    if tokens.refresh_token.is_some() {
                        updated.refresh_token = tokens.refresh_token;
                    }
                    if let Err(err) = self.save_credentials(updated).await {
                        warn!(error = %err, "could not store the refreshed token");
                    }
                    info!("access token refreshed");
                    self.publish();
                }
                Err(err) if unix_now() >= expires_at => {
                    warn!(error = %err, "token expired and could not be refreshed");
                    self.desired.send_modify(|d| {
                        d.login_required = Some(format!("the login expired and could not be renewed ({err}): run `cloudllm login`"));
                    });
                    let mut desired = self.desired.subscribe();
                    tokio::select! {
                        _ = desired.changed() => {}
                        () = self.shutdown.cancelled() => return,
                    }
                }
                Err(err) => {
                    warn!(error = %err, retry_in = ?REFRESH_RETRY, "token refresh failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(REFRESH_RETRY) => {}
                        () = self.shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}
