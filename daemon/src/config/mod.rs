//! The daemon's configuration: `cloudllmd.toml` in the platform's config directory, then
//! `CLOUDLLM_*` environment variables, then command-line flags — each overriding the last.
//!
//! The agent token is not a config-file setting: it comes from `CLOUDLLM_TOKEN` (the
//! credential store replaces this later), so the file can be shared without leaking it.
//!
//! This file holds the settings, their defaults, and where they come from; `settings` holds
//! what `cloudllm config get/set` needs: the table of settings by name and the editing of the
//! config file in place.

mod settings;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use cloudllm_proto::{self as proto, Secret};
use cloudllm_tunnel::Liveness;
use serde::Deserialize;
use url::Url;

pub use settings::{SETTINGS, set_in_file};

/// Where Ollama listens by default.
pub const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11434";

/// Everything the daemon needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Base URL of the relay, e.g. `https://relay.example.com` or `http://127.0.0.1:8080`.
    pub relay_url: Option<Url>,
    /// Base URL of the local Ollama.
    pub ollama_url: Url,
    /// The agent token (from `CLOUDLLM_TOKEN` only).
    #[serde(skip)]
    pub token: Option<Secret>,
    /// This device's name as users see it (defaults to the host name).
    pub device_name: String,
    /// This device's id; a fresh one per daemon run when unset.
    pub device_id: Option<String>,
    /// Extra PEM file of CA certificates to trust for the relay (beside the system's).
    pub ca_file: Option<PathBuf>,
    /// Let remote callers manage models (`pull`, `push`, `delete`, `create`, `copy`, blobs).
    pub allow_model_management: bool,
    /// How often to ping the relay.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long the relay may stay silent after a ping before the tunnel is redialled.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// Longest wait between reconnect attempts.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// On shutdown, how long in-flight requests get to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The IPC socket (default: the user's runtime dir, or `/run/cloudllm/` for a system
    /// service).
    pub socket_path: Option<PathBuf>,
    /// Where credentials (without a keyring) and preferences live (default: the user's state
    /// dir, or `/var/lib/cloudllm` for a system service).
    pub state_dir: Option<PathBuf>,
    /// A group whose members may change this daemon's state over IPC, besides its own user and
    /// root (system service: `cloudllm`).
    pub operator_group: Option<String>,
    /// Where to keep credentials: `auto` (the OS keyring, else a file) or `file`.
    pub credential_store: StoreChoice,
    /// Run as a system service (set by `cloudllmd --system`, not by the file).
    #[serde(skip)]
    pub system: bool,
    /// How long an IPC connection may wait between requests before the daemon closes it
    /// (default [`crate::ipc::IDLE_TIMEOUT`]; streams such as `watch` are never idle). Not a
    /// file setting: tests shorten it.
    #[serde(skip)]
    pub ipc_idle_timeout: Option<Duration>,
    /// The file these settings came from, which `cloudllm config set` writes (default: the
    /// platform's config file).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// Where credentials are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreChoice {
    /// The OS keyring where one answers, else a 0600 file in the state dir.
    #[default]
    Auto,
    /// Always the file.
    File,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        let liveness = Liveness::default();
        DaemonConfig {
            relay_url: None,
            ollama_url: Url::parse(DEFAULT_OLLAMA_URL).expect("constant URL parses"),
            token: None,
            device_name: default_device_name(),
            device_id: None,
            ca_file: None,
            allow_model_management: false,
            ping_interval: liveness.ping_interval,
            ping_timeout: liveness.timeout,
            // 30 s: a relay outage costs at most half a minute after it ends.
            reconnect_max: Duration::from_secs(30),
            // 20 s: fits systemd's default 90 s stop timeout with room to spare.
            shutdown_grace: Duration::from_secs(20),
            socket_path: None,
            state_dir: None,
            operator_group: None,
            credential_store: StoreChoice::Auto,
            system: false,
            ipc_idle_timeout: None,
            file: None,
        }
    }
}

fn default_device_name() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    if proto::valid_device_field(&host) {
        host
    } else {
        "cloudllm-device".to_owned()
    }
}

impl DaemonConfig {
    /// The default config file: `cloudllmd.toml` in the platform's config directory
    /// (`~/.config/cloudllm/` on Linux), or `/etc/cloudllm/cloudllmd.toml` for a system service.
    pub fn default_path(system: bool) -> Option<PathBuf> {
        if system {
            return Some(PathBuf::from(SYSTEM_CONFIG_DIR).join("cloudllmd.toml"));
        }
        project_dirs().map(|dirs| dirs.config_dir().join("cloudllmd.toml"))
    }

    /// Where the IPC socket is: `socket_path`, else the default (see [`default_socket_path`]).
    /// An error, saying what to set, when there is no private place for a user daemon's socket.
    pub fn socket_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.socket_path {
            return Ok(path.clone());
        }
        default_socket_path(self.system).map_err(|e| {
            anyhow::anyhow!(
                "{e}. Set XDG_RUNTIME_DIR (or HOME) to a directory only you can write, or choose the \
                 socket with CLOUDLLM_SOCKET or `socket_path` in the config file (then pass the same \
                 path to `cloudllm --socket`), or run the system daemon (`cloudllmd --system`)"
            )
        })
    }

    /// Where state (credential file, preferences) lives.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(path) = &self.state_dir {
            return path.clone();
        }
        if self.system {
            return PathBuf::from(SYSTEM_STATE_DIR);
        }
        project_dirs()
            .map(|dirs| {
                dirs.state_dir()
                    .unwrap_or_else(|| dirs.data_local_dir())
                    .to_path_buf()
            })
            .unwrap_or_else(|| PathBuf::from(".cloudllm"))
    }

    /// Reads a config file. Unknown keys are an error, so a typo never silently does nothing.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading daemon config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing daemon config {}", path.display()))
    }

    /// Applies `CLOUDLLM_RELAY_URL`, `CLOUDLLM_OLLAMA_URL`, `CLOUDLLM_TOKEN`,
    /// `CLOUDLLM_DEVICE_NAME` and `CLOUDLLM_SOCKET` from `env` (a lookup, so tests need not touch the process env).
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        let set = |name: &str| env(name).filter(|v| !v.is_empty());
        if let Some(url) = set("CLOUDLLM_RELAY_URL") {
            self.relay_url = Some(parse_url("CLOUDLLM_RELAY_URL", &url)?);
        }
        if let Some(url) = set("CLOUDLLM_OLLAMA_URL") {
            self.ollama_url = parse_url("CLOUDLLM_OLLAMA_URL", &url)?;
        }
        if let Some(token) = set("CLOUDLLM_TOKEN") {
            self.token = Some(Secret::new(token.trim()));
        }
        if let Some(name) = set("CLOUDLLM_DEVICE_NAME") {
            self.device_name = name;
        }
        if let Some(path) = set("CLOUDLLM_SOCKET") {
            self.socket_path = Some(PathBuf::from(path));
        }
        Ok(())
    }

    /// Checks the settings, with an error that says which one to fix. No relay URL is fine:
    /// the daemon then waits for `cloudllm login --relay URL`.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(relay) = &self.relay_url
            && (!matches!(relay.scheme(), "http" | "https" | "ws" | "wss")
                || relay.host().is_none())
        {
            bail!("relay URL {relay} must be http://, https://, ws:// or wss:// with a host");
        }
        if !matches!(self.ollama_url.scheme(), "http") || self.ollama_url.host().is_none() {
            bail!(
                "Ollama URL {} must be http:// with a host (Ollama serves plain HTTP)",
                self.ollama_url
            );
        }
        if !proto::valid_device_field(&self.device_name) {
            bail!(
                "device name {:?} must be 1-{} printable ASCII characters (set CLOUDLLM_DEVICE_NAME or `device_name`)",
                self.device_name,
                proto::MAX_DEVICE_FIELD_BYTES
            );
        }
        if let Some(id) = &self.device_id
            && !proto::valid_device_field(id)
        {
            bail!(
                "device_id {id:?} must be 1-{} printable ASCII characters",
                proto::MAX_DEVICE_FIELD_BYTES
            );
        }
        if self.ping_interval.is_zero() || self.ping_timeout.is_zero() {
            bail!("ping_interval and ping_timeout must be above zero");
        }
        Ok(())
    }

    /// The tunnel liveness settings.
    pub fn liveness(&self) -> Liveness {
        Liveness {
            ping_interval: self.ping_interval,
            timeout: self.ping_timeout,
        }
    }
}

/// The system service's config directory.
pub const SYSTEM_CONFIG_DIR: &str = "/etc/cloudllm";
/// The system service's state directory (systemd `StateDirectory=cloudllm`).
pub const SYSTEM_STATE_DIR: &str = "/var/lib/cloudllm";
fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "cloudllm")
}

pub use cloudllm_proto::ipc::default_socket_path;

fn parse_url(name: &str, value: &str) -> anyhow::Result<Url> {
    Url::parse(value).with_context(|| {
        format!("{name}={value:?} is not a URL (expected e.g. http://127.0.0.1:8080)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn env_overrides_file() {
        let mut config: DaemonConfig =
            toml::from_str("relay_url = \"http://file:1\"\ndevice_name = \"box\"\n").unwrap();
        config.validate().unwrap();
        config
            .apply_env(env(&[
                ("CLOUDLLM_RELAY_URL", "https://relay.example.com"),
                ("CLOUDLLM_TOKEN", " tok\n"),
                ("CLOUDLLM_OLLAMA_URL", "http://127.0.0.1:9"),
            ]))
            .unwrap();
        assert_eq!(
            config.relay_url.as_ref().unwrap().host_str(),
            Some("relay.example.com")
        );
        assert_eq!(config.token.as_ref().unwrap().expose(), "tok");
        assert_eq!(config.ollama_url.port(), Some(9));
        assert_eq!(config.device_name, "box");
        config.validate().unwrap();
        let err = config
            .apply_env(env(&[("CLOUDLLM_RELAY_URL", "not a url")]))
            .unwrap_err();
        assert!(format!("{err:#}").contains("CLOUDLLM_RELAY_URL"));
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        let refusal = |config: &DaemonConfig| config.validate().unwrap_err().to_string();
        let mut config = DaemonConfig::default();
        config.validate().unwrap();
        config.relay_url = Some(Url::parse("ftp://x").unwrap());
        assert!(refusal(&config).contains("ftp://"));
        config.relay_url = Some(Url::parse("http://relay").unwrap());
        config.device_name = "bad\nname".into();
        assert!(refusal(&config).contains("device name"));
        assert!(
            toml::from_str::<DaemonConfig>("token = \"x\"").is_err(),
            "tokens never live in the file"
        );
    }
}
