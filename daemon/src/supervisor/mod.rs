//! The daemon's core: it owns the credentials, the user's wish to be connected, the running
//! tunnel, and token refresh. The IPC server turns client requests into calls here.
//!
//! What should run is one value, [`Desired`], in a watch channel; the tunnel manager follows it.
//! A new token (refresh, re-login) starts a new tunnel first and drains the old one once the new
//! one is registered, so streams in flight finish and new requests never find the device gone.
//! A tunnel that another connection with this device id replaced on the relay ends the wish to
//! be connected until the user says `cloudllm connect` (or the daemon restarts): see
//! [`crate::tunnel`] for why it does not fight back.
//!
//! This file holds the [`Supervisor`] itself, what should run, and the settings; each other
//! concern has its module: `account` (logging in and out, the stored credentials, the relay's
//! public description), `preflight` (what a pasted token and relay URL are checked for before
//! they are stored), `claims` (what the daemon reads from a token it cannot verify),
//! `tunnels` (starting, switching and stopping tunnels), `refresh` (renewing OAuth tokens) and
//! `state_files` (the device id and preferences kept in the state directory).

mod account;
mod claims;
mod preflight;
mod refresh;
mod state_files;
mod tunnels;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use url::Url;

use crate::config::{self, DaemonConfig, StoreChoice};
use crate::credentials::{CredentialStore, Credentials};
use crate::state::State;
use crate::tunnel::Session;

use self::claims::unverified_claims;
use self::state_files::{Prefs, create_private_dir, read_prefs, stable_device_id, write_prefs};

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

impl Desired {
    /// The user's wish to be connected (or not). Connecting (or disconnecting) is the user's
    /// answer to a replacement: the tunnel starts again even if nothing else changed.
    fn set_connect(&mut self, connect: bool) {
        self.connect = connect;
        self.replaced = None;
    }
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
        self.publish_with(|_| {});
    }

    /// [`Supervisor::publish`], with `change` made to the [`Desired`] state in the same step,
    /// so the tunnel manager never sees a mix of old and new (and never starts a tunnel for
    /// it).
    fn publish_with(&self, change: impl FnOnce(&mut Desired)) {
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
            change(desired);
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
        self.save_connect(connect)?;
        self.desired.send_modify(|d| d.set_connect(connect));
        Ok(())
    }

    /// Keeps the wish to be connected (or not) for the next start.
    fn save_connect(&self, connect: bool) -> Result<(), ControlError> {
        let dir = self.config().state_dir();
        write_prefs(&dir, &Prefs { connect }).map_err(ControlError::Internal)
    }

    /// Changes a setting in the config file and applies it (reconnecting if it matters).
    /// Settings that came from the environment or the command line stay as they are, except
    /// the one being changed. `socket_path`, `state_dir` and `credential_store` take effect
    /// at the next start.
    pub async fn set_config(&self, key: &str, value: &str) -> Result<(), ControlError> {
        self.change_setting(key, value)?;
        self.publish();
        Ok(())
    }

    /// Changes a setting in the config file and in the settings in use, without yet acting on
    /// it (see [`Supervisor::set_config`]).
    fn change_setting(&self, key: &str, value: &str) -> Result<(), ControlError> {
        let from_file = config::set_in_file(&self.config_path, key, value)
            .map_err(ControlError::InvalidConfig)?;
        let mut config = (*self.config()).clone();
        if !matches!(key, "socket_path" | "state_dir" | "credential_store") {
            config.copy_setting(key, &from_file);
        }
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        info!(key, "setting changed");
        Ok(())
    }
}

/// The time now, Unix seconds, as token claims count it.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The OS user name, naming the keyring entry.
fn whoami() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "cloudllm".to_owned())
}
