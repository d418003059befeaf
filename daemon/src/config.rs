//! The daemon's configuration: `cloudllmd.toml` in the platform's config directory, then
//! `CLOUDLLM_*` environment variables, then command-line flags — each overriding the last.
//!
//! The agent token is not a config-file setting: it comes from `CLOUDLLM_TOKEN` (the
//! credential store replaces this later), so the file can be shared without leaking it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use cloudllm_proto::{self as proto, Secret};
use cloudllm_tunnel::Liveness;
use serde::Deserialize;
use url::Url;

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
    /// (`~/.config/cloudllm/` on Linux).
    pub fn default_path() -> Option<PathBuf> {
        directories::ProjectDirs::from("", "", "cloudllm")
            .map(|dirs| dirs.config_dir().join("cloudllmd.toml"))
    }

    /// Reads a config file. Unknown keys are an error, so a typo never silently does nothing.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading daemon config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing daemon config {}", path.display()))
    }

    /// Applies `CLOUDLLM_RELAY_URL`, `CLOUDLLM_OLLAMA_URL`, `CLOUDLLM_TOKEN` and
    /// `CLOUDLLM_DEVICE_NAME` from `env` (a lookup, so tests need not touch the process env).
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
        Ok(())
    }

    /// Checks that the daemon can run, with an error that says which setting to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        let Some(relay) = &self.relay_url else {
            bail!(
                "no relay URL: set CLOUDLLM_RELAY_URL (for example http://127.0.0.1:8080) or `relay_url` in {}",
                shown_path()
            );
        };
        if !matches!(relay.scheme(), "http" | "https" | "ws" | "wss") || relay.host().is_none() {
            bail!("relay URL {relay} must be http://, https://, ws:// or wss:// with a host");
        }
        if !matches!(self.ollama_url.scheme(), "http") || self.ollama_url.host().is_none() {
            bail!(
                "Ollama URL {} must be http:// with a host (Ollama serves plain HTTP)",
                self.ollama_url
            );
        }
        if self.token.is_none() {
            bail!(
                "no agent token: set CLOUDLLM_TOKEN (a self-hosted relay mints one with \
                 `cloudllm-relay token issue --scope agent --user YOU`)"
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

fn shown_path() -> String {
    DaemonConfig::default_path()
        .map_or_else(|| "cloudllmd.toml".to_owned(), |p| p.display().to_string())
}

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
    fn env_overrides_file_and_validation_names_the_setting() {
        let mut config: DaemonConfig =
            toml::from_str("relay_url = \"http://file:1\"\ndevice_name = \"box\"\n").unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("CLOUDLLM_TOKEN")
        );
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
        let mut config = DaemonConfig {
            token: Some(Secret::new("t")),
            ..DaemonConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("CLOUDLLM_RELAY_URL")
        );
        config.relay_url = Some(Url::parse("ftp://x").unwrap());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("ftp://")
        );
        config.relay_url = Some(Url::parse("http://relay").unwrap());
        config.device_name = "bad\nname".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("device name")
        );
        assert!(
            toml::from_str::<DaemonConfig>("token = \"x\"").is_err(),
            "tokens never live in the file"
        );
    }
}
