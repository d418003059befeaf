//! Logging in and out: checking what the user asked for, storing the credentials, and the
//! relay's public description (`/.well-known/cloudllm`) that says how its users log in.
//!
//! A token pasted with `--with-token` is checked first (`preflight`): nothing is stored for a
//! token or a relay URL that cannot work. A login changes three things that must agree — the
//! relay URL in the config file, the credentials in the store, and the wish to be connected —
//! so every flow ends in one place, `finish_login`.

use cloudllm_proto::ipc::{LoginFlow, LoginPrompt};
use cloudllm_proto::{RelayAuth, RelayInfo, Secret};
use tokio::sync::mpsc;
use tracing::info;
use url::Url;

use super::claims::unverified_claims;
use super::{ControlError, Supervisor, preflight, unix_now};
use crate::credentials::Credentials;
use crate::login;

impl Supervisor {
    /// The configured relay's public description (`/.well-known/cloudllm`), fetched now.
    pub async fn relay_info(&self) -> Result<RelayInfo, ControlError> {
        let relay = self.relay_for_login(None)?;
        login::fetch_relay_info(&preflight::fetchable(&relay))
            .await
            .map_err(ControlError::Internal)
    }

    /// The logged-in user's agent token, for `cloudllm open` (`crate::web_open`).
    pub fn agent_token(&self) -> Option<Secret> {
        let credentials = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        credentials.as_ref().map(|c| c.access_token.clone())
    }

    /// Logs in with an agent token: checks it and the relay as far as the daemon can (see
    /// `preflight`: everything but the signature, which only the relay can verify), then stores
    /// it and connects. Returns the token's user. Nothing is stored when a check fails.
    pub async fn login_with_token(
        &self,
        relay_url: Option<String>,
        token: Secret,
    ) -> Result<Option<String>, ControlError> {
        let token = Secret::new(token.expose().trim());
        let claims =
            preflight::check_token(&token, unix_now()).map_err(ControlError::LoginFailed)?;
        let relay = self.relay_for_login(relay_url)?;
        preflight::check_relay(&relay, &self.config().ollama_url)
            .await
            .map_err(ControlError::LoginFailed)?;
        let credentials = Credentials {
            relay_url: relay.to_string(),
            access_token: token,
            refresh_token: None,
            expires_at: claims.exp,
            token_endpoint: None,
            client_id: None,
        };
        self.finish_login(relay, credentials).await?;
        Ok(claims.sub)
    }

    /// Logs in through the relay's identity provider, sending the user's steps to `prompts`.
    pub async fn login_interactive(
        &self,
        relay_url: Option<String>,
        flow: LoginFlow,
        prompts: mpsc::Sender<LoginPrompt>,
    ) -> Result<Option<String>, ControlError> {
        let relay = self.relay_for_login(relay_url)?;
        let info = login::fetch_relay_info(&preflight::fetchable(&relay))
            .await
            .map_err(|e| ControlError::LoginFailed(format!("{e:#}")))?;
        let (issuer, client_id, scopes) = match info.auth {
            RelayAuth::Token => {
                return Err(ControlError::LoginFailed(format!(
                    "the relay at {relay} hands out tokens itself: get an agent token from its operator \
                     (`cloudllm-relay token issue --scope agent`) and run `cloudllm login --with-token`"
                )));
            }
            RelayAuth::Oidc {
                issuer,
                client_id,
                scopes,
            } => (issuer, client_id, scopes),
        };
        let failed = |e: login::LoginError| ControlError::LoginFailed(e.to_string());
        let issuer = Url::parse(&issuer).map_err(|e| {
            ControlError::LoginFailed(format!("the relay names an invalid issuer {issuer:?}: {e}"))
        })?;
        let provider = login::discover(&issuer, &client_id, &scopes)
            .await
            .map_err(failed)?;
        let use_device = match flow {
            LoginFlow::Device => true,
            LoginFlow::Browser => false,
            LoginFlow::Auto => provider.device_authorization_endpoint.is_some(),
        };
        let tokens = if use_device {
            let device = login::device_start(&provider).await.map_err(failed)?;
            let _ = prompts
                .send(LoginPrompt {
                    url: device.verification_uri.clone(),
                    user_code: Some(device.user_code.clone()),
                    url_complete: device.verification_uri_complete.clone(),
                })
                .await;
            login::device_finish(&provider, &device)
                .await
                .map_err(failed)?
        } else {
            let browser = login::browser_start(&provider).await.map_err(failed)?;
            let _ = prompts
                .send(LoginPrompt {
                    url: browser.authorize_url.to_string(),
                    user_code: None,
                    url_complete: None,
                })
                .await;
            login::browser_finish(&provider, browser)
                .await
                .map_err(failed)?
        };
        let claims = unverified_claims(tokens.access_token.expose());
        let credentials = Credentials {
            relay_url: relay.to_string(),
            access_token: tokens.access_token,
            refresh_token: tokens.refresh_token,
            expires_at: tokens.expires_at,
            token_endpoint: Some(provider.token_endpoint.to_string()),
            client_id: Some(provider.client_id.clone()),
        };
        self.finish_login(relay, credentials).await?;
        Ok(claims.and_then(|c| c.sub))
    }

    fn relay_for_login(&self, relay_url: Option<String>) -> Result<Url, ControlError> {
        match relay_url {
            Some(url) => match Url::parse(&url) {
                Ok(relay)
                    if matches!(relay.scheme(), "http" | "https" | "ws" | "wss")
                        && relay.host().is_some() =>
                {
                    Ok(relay)
                }
                Ok(_) => Err(ControlError::InvalidConfig(anyhow::anyhow!(
                    "--relay {url:?} must be an http:// or https:// URL with a host, e.g. \
                     https://relay.example.com"
                ))),
                Err(e) => Err(ControlError::InvalidConfig(anyhow::anyhow!(
                    "--relay {url:?} is not a URL ({e}); e.g. https://relay.example.com"
                ))),
            },
            None => self.config().relay_url.clone().ok_or_else(|| {
                ControlError::InvalidConfig(anyhow::anyhow!(
                    "no relay configured: pass --relay URL"
                ))
            }),
        }
    }

    /// Stores a login's result: the relay in the config file, the credentials in the store,
    /// the wish to be connected; then acts on all three at once. Acting on each as it is
    /// written would start a tunnel to the new relay with the old token (refused there), and
    /// the old tunnel would wait for that one to come up before it gives way.
    async fn finish_login(&self, relay: Url, credentials: Credentials) -> Result<(), ControlError> {
        if self.config().relay_url.as_ref() != Some(&relay) {
            self.change_setting("relay_url", relay.as_str())?;
        }
        self.save_credentials(credentials).await?;
        self.save_connect(true)?;
        self.publish_with(|d| {
            d.login_required = None;
            d.set_connect(true);
        });
        info!(relay = %relay, "logged in");
        Ok(())
    }

    pub(super) async fn save_credentials(
        &self,
        credentials: Credentials,
    ) -> Result<(), ControlError> {
        if !self.from_env {
            let store = self.store.clone();
            let to_save = credentials.clone();
            tokio::task::spawn_blocking(move || store.save(&to_save))
                .await
                .map_err(|e| ControlError::Internal(e.into()))?
                .map_err(ControlError::Internal)?;
        }
        *self.credentials.lock().unwrap_or_else(|p| p.into_inner()) = Some(credentials);
        Ok(())
    }

    /// Forgets the credentials and closes the tunnel.
    pub async fn logout(&self) -> Result<(), ControlError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.clear())
            .await
            .map_err(|e| ControlError::Internal(e.into()))?
            .map_err(ControlError::Internal)?;
        *self.credentials.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.publish();
        info!("logged out");
        Ok(())
    }
}
