//! The daemon's core: it owns the credentials, the user's wish to be connected, the running
//! tunnel, and token refresh. The IPC server turns client requests into calls here.
//!
//! What should run is one value, [`Desired`], in a watch channel; the tunnel manager follows it.
//! A new token (refresh, re-login) starts a new tunnel first and drains the old one once the new
//! one is registered, so streams in flight finish and new requests never find the device gone.
//! A tunnel that another connection with this device id replaced on the relay ends the wish to
//! be connected until the user says `cloudllm connect` (or the daemon restarts): see
//! [`crate::tunnel`] for why it does not fight back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use cloudllm_proto::ipc::{Connection, LoginFlow, LoginPrompt};
use cloudllm_proto::{RelayAuth, RelayInfo, Secret};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use url::Url;

use crate::config::{self, DaemonConfig, StoreChoice};
use crate::credentials::{CredentialStore, Credentials};
use crate::login;
use crate::state::State;
use crate::tunnel::{self, Finished, Session, Stop};

/// How long an old tunnel keeps serving while its replacement registers. Past it the old one
/// drains anyway: a replacement that cannot register in 15 s is failing, and the old token is
/// about to expire.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Refresh at most this long before expiry (less for short-lived tokens: half their rest).
const REFRESH_MARGIN: Duration = Duration::from_secs(120);

/// Delay between refresh attempts after a failure.
const REFRESH_RETRY: Duration = Duration::from_secs(10);

/// What should be running.
#[derive(Clone, Default)]
struct Desired {
    /// The user wants the tunnel open.
    connect: bool,
    /// What to open it with; `None` when logged out.
    session: Option<Session>,
    /// Why the credentials no longer work, when they don't.
    login_required: Option<String>,
    /// When (Unix seconds) another connection with this device id replaced the tunnel, until
    /// the user connects again.
    replaced: Option<u64>,
}

/// Preferences that survive restarts.
#[derive(Debug, Serialize, Deserialize)]
struct Prefs {
    /// `cloudllm connect` / `disconnect`.
    connect: bool,
}

/// Why an IPC request was refused, in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No credentials yet.
    #[error("not logged in: run `cloudllm login --relay URL` first")]
    NotLoggedIn,
    /// A setting was refused.
    #[error("{0:#}")]
    InvalidConfig(anyhow::Error),
    /// The login failed.
    #[error("{0}")]
    LoginFailed(String),
    /// Anything else.
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

/// The daemon's core; see the module docs.
pub struct Supervisor {
    config: Mutex<Arc<DaemonConfig>>,
    /// The config file `config set` writes.
    config_path: PathBuf,
    /// Blocking (keyring calls go over D-Bus): used from blocking tasks only.
    store: Arc<CredentialStore>,
    /// Credentials from the store (or the environment), if logged in.
    credentials: Mutex<Option<Credentials>>,
    /// `CLOUDLLM_TOKEN` was set: it wins over the store, and logout cannot forget it.
    from_env: bool,
    device_id: String,
    state: Arc<State>,
    desired: watch::Sender<Desired>,
    shutdown: CancellationToken,
}

impl Supervisor {
    /// Sets up from `config` (with `config_path` being where it came from): opens the
    /// credential store, loads credentials and preferences.
    pub async fn new(
        config: DaemonConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Supervisor>> {
        let config_path = match &config.file {
            Some(path) => path.clone(),
            None => DaemonConfig::default_path(config.system)
                .context("no config directory on this system: pass --config FILE")?,
        };
        let state_dir = config.state_dir();
        create_private_dir(&state_dir)?;
        let choice = config.credential_store;
        let account = whoami();
        let dir = state_dir.clone();
        let from_env = config.token.is_some();
        // Keyring calls block (D-Bus): open and read off the async threads.
        let (store, stored) = tokio::task::spawn_blocking(move || {
            let store = match choice {
                StoreChoice::Auto => CredentialStore::open(&dir, &account),
                StoreChoice::File => CredentialStore::file_only(&dir),
            };
            let stored = if from_env { Ok(None) } else { store.load() };
            (store, stored)
        })
        .await
        .context("opening the credential store")?;

        let credentials = match (&config.token, &config.relay_url) {
            (Some(token), relay) => Some(Credentials {
                relay_url: relay.as_ref().map(Url::to_string).unwrap_or_default(),
                access_token: token.clone(),
                refresh_token: None,
                expires_at: None,
                token_endpoint: None,
                client_id: None,
            }),
            (None, _) => match stored {
                Ok(credentials) => credentials,
                Err(err) => {
                    warn!(
                        error = format!("{err:#}"),
                        "stored credentials are unreadable: log in again"
                    );
                    None
                }
            },
        };
        let store_name = if from_env {
            "environment (CLOUDLLM_TOKEN)".to_owned()
        } else {
            store.kind().to_string()
        };
        let device_id = match &config.device_id {
            Some(id) => id.clone(),
            None => stable_device_id(&state_dir)?,
        };
        let state = State::new(config.device_name.clone(), store_name);
        let prefs = read_prefs(&state_dir);
        let supervisor = Arc::new(Supervisor {
            config: Mutex::new(Arc::new(config)),
            config_path,
            store: Arc::new(store),
            credentials: Mutex::new(credentials),
            from_env,
            device_id,
            state,
            desired: watch::channel(Desired::default()).0,
            shutdown,
        });
        supervisor
            .desired
            .send_modify(|d| d.connect = prefs.connect);
        supervisor.publish();
        Ok(supervisor)
    }

    /// The daemon's state.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// The current settings.
    pub fn config(&self) -> Arc<DaemonConfig> {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The config file `config set` writes.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Recomputes what should run from settings and credentials, and updates the status.
    fn publish(&self) {
        let config = self.config();
        let credentials = self
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let claims = credentials
            .as_ref()
            .and_then(|c| unverified_claims(c.access_token.expose()));
        self.state.update(|status| {
            status.relay_url = config.relay_url.as_ref().map(Url::to_string);
            status.device_name = config.device_name.clone();
            status.user = claims.as_ref().and_then(|c| c.sub.clone());
            status.tier = claims.as_ref().and_then(|c| c.tier.clone());
        });
        let session = credentials.map(|credentials| Session {
            config: config.clone(),
            token: credentials.access_token,
            device_id: self.device_id.clone(),
        });
        self.desired.send_modify(|desired| {
            desired.session = session.filter(|s| s.config.relay_url.is_some());
        });
    }

    /// Opens the tunnel, now and after restarts.
    pub fn connect(&self) -> Result<(), ControlError> {
        if self
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return Err(ControlError::NotLoggedIn);
        }
        self.set_connect(true)
    }

    /// Closes the tunnel (in-flight requests finish), now and after restarts.
    pub fn disconnect(&self) -> Result<(), ControlError> {
        self.set_connect(false)
    }

    fn set_connect(&self, connect: bool) -> Result<(), ControlError> {
        let dir = self.config().state_dir();
        write_prefs(&dir, &Prefs { connect }).map_err(ControlError::Internal)?;
        // Connecting (or disconnecting) is the user's answer to a replacement: the tunnel
        // starts again even if nothing else changed.
        self.desired.send_modify(|d| {
            d.connect = connect;
            d.replaced = None;
        });
        Ok(())
    }

    /// The configured relay's public description (`/.well-known/cloudllm`), fetched now.
    pub async fn relay_info(&self) -> Result<RelayInfo, ControlError> {
        let relay = self.relay_for_login(None)?;
        login::fetch_relay_info(&relay)
            .await
            .map_err(ControlError::Internal)
    }

    /// Logs in with an agent token: stores it and connects. Returns the token's user.
    pub async fn login_with_token(
        &self,
        relay_url: Option<String>,
        token: Secret,
    ) -> Result<Option<String>, ControlError> {
        let token = Secret::new(token.expose().trim());
        if token.expose().is_empty() || token.expose().contains(char::is_whitespace) {
            return Err(ControlError::LoginFailed(
                "that is not a token: it is empty or has spaces in it".into(),
            ));
        }
        let relay = self.relay_for_login(relay_url)?;
        let claims = unverified_claims(token.expose());
        let credentials = Credentials {
            relay_url: relay.to_string(),
            access_token: token,
            refresh_token: None,
            expires_at: claims.as_ref().and_then(|c| c.exp),
            token_endpoint: None,
            client_id: None,
        };
        self.finish_login(relay, credentials).await?;
        Ok(claims.and_then(|c| c.sub))
    }

    /// Logs in through the relay's identity provider, sending the user's steps to `prompts`.
    pub async fn login_interactive(
        &self,
        relay_url: Option<String>,
        flow: LoginFlow,
        prompts: mpsc::Sender<LoginPrompt>,
    ) -> Result<Option<String>, ControlError> {
        let relay = self.relay_for_login(relay_url)?;
        let info = login::fetch_relay_info(&relay)
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
            Some(url) => Url::parse(&url).map_err(|e| {
                ControlError::InvalidConfig(anyhow::anyhow!(
                    "--relay {url:?} is not a URL ({e}); e.g. https://relay.example.com"
                ))
            }),
            None => self.config().relay_url.clone().ok_or_else(|| {
                ControlError::InvalidConfig(anyhow::anyhow!(
                    "no relay configured: pass --relay URL"
                ))
            }),
        }
    }

    async fn finish_login(&self, relay: Url, credentials: Credentials) -> Result<(), ControlError> {
        if self.config().relay_url.as_ref() != Some(&relay) {
            self.set_config("relay_url", relay.as_str()).await?;
        }
        self.save_credentials(credentials).await?;
        self.desired.send_modify(|d| d.login_required = None);
        self.set_connect(true)?;
        self.publish();
        info!(relay = %relay, "logged in");
        Ok(())
    }

    async fn save_credentials(&self, credentials: Credentials) -> Result<(), ControlError> {
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

    /// Changes a setting in the config file and applies it (reconnecting if it matters).
    /// Settings that came from the environment or the command line stay as they are, except
    /// the one being changed. `socket_path`, `state_dir` and `credential_store` take effect
    /// at the next start.
    pub async fn set_config(&self, key: &str, value: &str) -> Result<(), ControlError> {
        let from_file = config::set_in_file(&self.config_path, key, value)
            .map_err(ControlError::InvalidConfig)?;
        let mut config = (*self.config()).clone();
        if !matches!(key, "socket_path" | "state_dir" | "credential_store") {
            config.copy_setting(key, &from_file);
        }
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        info!(key, "setting changed");
        self.publish();
        Ok(())
    }

    /// Runs the tunnel the [`Desired`] state asks for, until shutdown.
    pub async fn run_tunnels(self: Arc<Self>) {
        struct Running {
            stop: Stop,
            task: JoinHandle<()>,
        }
        let mut desired = self.desired.subscribe();
        let mut current: Option<Running> = None;
        let mut running_session: Option<(String, Arc<DaemonConfig>)> = None;
        loop {
            let want = desired.borrow_and_update().clone();
            let session = want.session.clone().filter(|_| {
                want.connect && want.login_required.is_none() && want.replaced.is_none()
            });
            let key = session
                .as_ref()
                .map(|s| (s.token.expose().to_owned(), s.config.clone()));
            let unchanged = match (&key, &running_session) {
                (Some((token, config)), Some((old_token, old_config))) => {
                    token == old_token && Arc::ptr_eq(config, old_config)
                }
                (None, None) => true,
                _ => false,
            };
            if !unchanged {
                running_session = key;
                let old = current.take();
                match session {
                    Some(session) => {
                        let up = CancellationToken::new();
                        if let Some(old) = &old {
                            // Before the new tunnel exists: the relay replacing the old one
                            // with it is then known to be our own doing.
                            old.stop.superseded.cancel();
                        }
                        // Daemon shutdown reaches every tunnel, retiring ones included.
                        let stop = Stop {
                            now: self.shutdown.child_token(),
                            retire: CancellationToken::new(),
                            superseded: CancellationToken::new(),
                        };
                        let run =
                            tunnel::run(session, self.state.clone(), stop.clone(), up.clone());
                        let state = self.state.clone();
                        let supervisor = self.clone();
                        let task = tokio::spawn(async move {
                            match run.await {
                                Ok(Finished::Stopped) => {}
                                Ok(Finished::Replaced { at }) => {
                                    supervisor.desired.send_modify(|d| d.replaced = Some(at));
                                }
                                Err(err) => {
                                    warn!(error = format!("{err:#}"), "tunnel cannot start");
                                    state.set_connection(Connection::Reconnecting {
                                        attempt: 0,
                                        next_try: 0,
                                        last_error: format!(
                                            "cannot start: {err:#}; fix it with `cloudllm config set`"
                                        ),
                                    });
                                }
                            }
                        });
                        if let Some(old) = old {
                            // Make before break: the old tunnel serves until the new one is up.
                            tokio::spawn(async move {
                                tokio::select! {
                                    () = up.cancelled() => {}
                                    () = tokio::time::sleep(SWITCH_TIMEOUT) => {}
                                }
                                old.stop.retire.cancel();
                                let _ = old.task.await;
                            });
                        }
                        current = Some(Running { stop, task });
                    }
                    None => {
                        if let Some(old) = old {
                            old.stop.now.cancel();
                            tokio::spawn(old.task);
                        }
                        self.state
                            .set_connection(match (&want.login_required, &want.session) {
                                (Some(reason), _) => Connection::LoginRequired {
                                    reason: reason.clone(),
                                },
                                (None, None) => Connection::LoggedOut,
                                (None, Some(_)) => match want.replaced {
                                    Some(at) if want.connect => Connection::Replaced { at },
                                    _ => Connection::Disconnected,
                                },
                            });
                    }
                }
            }
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { break },
                () = self.shutdown.cancelled() => break,
            }
        }
        if let Some(current) = current {
            current.stop.now.cancel();
            let _ = current.task.await;
        }
    }

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

/// The claims the daemon shows; read from the token without verifying it (the relay verifies).
#[derive(Debug, Deserialize)]
struct ShownClaims {
    sub: Option<String>,
    tier: Option<String>,
    exp: Option<u64>,
}

fn unverified_claims(token: &str) -> Option<ShownClaims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The OS user name, naming the keyring entry.
fn whoami() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "cloudllm".to_owned())
}

/// Creates `dir` (and parents) readable only by its owner.
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", dir.display()))?;
    }
    Ok(())
}

/// This machine's device id: made once and kept in the state dir, so the relay recognises the
/// device across restarts.
fn stable_device_id(state_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = state_dir.join("device-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if cloudllm_proto::valid_device_field(id) {
            return Ok(id.to_owned());
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    cloudllm_atomic_write::write(&path, STATE_FILE_MODE, id.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

fn read_prefs(state_dir: &std::path::Path) -> Prefs {
    std::fs::read(state_dir.join("prefs.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Prefs { connect: true })
}

/// Replaces `prefs.json` in one step (two `cloudllm connect` at once each write their own temp
/// file).
fn write_prefs(state_dir: &std::path::Path, prefs: &Prefs) -> anyhow::Result<()> {
    let path = state_dir.join("prefs.json");
    cloudllm_atomic_write::write(&path, STATE_FILE_MODE, &serde_json::to_vec(prefs)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The mode of `device-id` and `prefs.json`: neither is a secret (the relay shows the device
/// id to the user), and the state directory around them is the daemon's own.
const STATE_FILE_MODE: u32 = 0o644;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_read_from_a_jwt_and_garbage_gives_none() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"alice","tier":"premium","exp":5}"#);
        let claims = unverified_claims(&format!("h.{payload}.s")).unwrap();
        assert_eq!(claims.sub.as_deref(), Some("alice"));
        assert_eq!(claims.tier.as_deref(), Some("premium"));
        assert_eq!(claims.exp, Some(5));
        assert!(unverified_claims("opaque-token").is_none());
        assert!(unverified_claims("a.!!!.c").is_none());
    }
}
