//! The relay's configuration: a TOML file with defaults for everything, plus environment
//! overrides for the secret so it never has to sit in a file.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use cloudllm_proto::Secret;
use cloudllm_tunnel::Liveness;
use serde::Deserialize;

/// Environment variable holding the HS256 signing secret.
pub const SECRET_ENV: &str = "CLOUDLLM_RELAY_SECRET";

/// Shortest accepted signing secret, in bytes: 32, the HMAC-SHA256 key size. A shorter secret
/// can be brute-forced from a single token.
pub const MIN_SECRET_BYTES: usize = 32;

/// Everything the relay needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Address to listen on for users and daemons.
    pub listen: SocketAddr,
    /// HS256 secret that signs and verifies tokens. Prefer the `CLOUDLLM_RELAY_SECRET`
    /// environment variable over putting it here.
    pub secret: Option<Secret>,
    /// Largest request body a user may send, in bytes (32 MiB: room for a few images in a
    /// multimodal chat request).
    pub max_body_bytes: u64,
    /// How often the relay pings each tunnel.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long a tunnel may stay silent after a ping before it is closed as dead.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// On shutdown, how long in-flight streams get to finish before they are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        let liveness = Liveness::default();
        RelayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            secret: None,
            max_body_bytes: 32 * 1024 * 1024,
            ping_interval: liveness.ping_interval,
            ping_timeout: liveness.timeout,
            // 25 s: below systemd's default 90 s stop timeout and Kubernetes' 30 s grace.
            shutdown_grace: Duration::from_secs(25),
        }
    }
}

impl RelayConfig {
    /// Reads a config file. Unknown keys are an error, so a typo never silently does nothing.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading relay config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing relay config {}", path.display()))
    }

    /// Applies the environment: `CLOUDLLM_RELAY_SECRET` overrides the file's secret.
    pub fn apply_env(&mut self) {
        if let Ok(secret) = std::env::var(SECRET_ENV)
            && !secret.is_empty()
        {
            self.secret = Some(Secret::new(secret));
        }
    }

    /// The tunnel liveness settings.
    pub fn liveness(&self) -> Liveness {
        Liveness {
            ping_interval: self.ping_interval,
            timeout: self.ping_timeout,
        }
    }

    /// The signing secret, or an error that tells the operator how to set one.
    pub fn require_secret(&self) -> anyhow::Result<&Secret> {
        let secret = self.secret.as_ref().with_context(|| {
            format!(
                "no signing secret: set {SECRET_ENV} (for example `export {SECRET_ENV}=$(openssl rand -hex 32)`) \
                 or `secret` in the config file; or run `cloudllm-relay serve --dev` for a throwaway secret and ready-made tokens"
            )
        })?;
        anyhow::ensure!(
            secret.expose().len() >= MIN_SECRET_BYTES,
            "the signing secret is too short ({} bytes): use at least {MIN_SECRET_BYTES}, for example `openssl rand -hex 32`",
            secret.expose().len()
        );
        Ok(secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_override_defaults_and_typos_are_errors() {
        let config: RelayConfig = toml::from_str(
            "listen = \"0.0.0.0:9000\"\nping_interval = \"3s\"\nmax_body_bytes = 1024\n",
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.ping_interval, Duration::from_secs(3));
        assert_eq!(config.max_body_bytes, 1024);
        assert_eq!(config.ping_timeout, Liveness::default().timeout);
        let err = toml::from_str::<RelayConfig>("listne = \"0.0.0.0:1\"").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn missing_or_short_secret_says_how_to_fix_it() {
        let mut config = RelayConfig::default();
        let err = config.require_secret().unwrap_err().to_string();
        assert!(err.contains(SECRET_ENV) && err.contains("--dev"), "{err}");
        config.secret = Some(Secret::new("short"));
        let err = config.require_secret().unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        config.secret = Some(Secret::new("x".repeat(MIN_SECRET_BYTES)));
        assert!(config.require_secret().is_ok());
    }
}
