//! `[cluster]`: the settings that make this relay one node of a cluster sharing Redis or Valkey.
//!
//! Without the table the relay runs alone, exactly as before: nothing here is read. With it, the
//! relay records the devices it holds in Redis/Valkey, reaches the other nodes over an
//! authenticated node-to-node listener, and shares its users' limits with them (see
//! [`crate::cluster`]). Everything the operator can get wrong is checked at startup and said in
//! the config's own words: which key, what was given, what is accepted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

/// Shortest accepted node-to-node secret, in bytes: 32, the HMAC-SHA256 key size.
pub const MIN_CLUSTER_SECRET_BYTES: usize = 32;

/// Longest node name: it is part of every presence record and log line.
const MAX_NODE_NAME: usize = 64;

/// `[cluster]`: this relay is one node of a cluster.
///
/// ```toml
/// [cluster]
/// redis_url = "rediss://:password@redis.internal:6380/0"
/// node = "relay-1"
/// peer_listen = "10.0.0.11:7443"
/// secret_file = "/etc/cloudllm/cluster.secret"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The Redis or Valkey server: `redis://` or `valkey://` (plain), `rediss://` or
    /// `valkeys://` (TLS), with an optional `user:password@` and `/db`.
    pub redis_url: String,
    /// This node's name, unique in the cluster: letters, digits, `.`, `-`, `_`.
    pub node: String,
    /// Where this node listens for the other nodes (HTTP/2, every request signed with the
    /// shared secret). Keep it on a private network.
    pub peer_listen: SocketAddr,
    /// The `host:port` other nodes reach `peer_listen` on, when it differs (a wildcard
    /// `peer_listen`, NAT, a container's published port). Default: `peer_listen` itself.
    #[serde(default)]
    pub advertise: Option<String>,
    /// A file holding the secret every node shares (at least 32 bytes, e.g.
    /// `openssl rand -hex 32`); it signs node-to-node requests.
    pub secret_file: PathBuf,
    /// With `rediss://`: a PEM file of the CA that signed the Redis server's certificate, when
    /// it is a private one. Default: the public web roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long a node's presence records outlive its last refresh: how long the devices of a
    /// node that died without cleaning up still show. Refreshed every third of it.
    #[serde(default = "default_presence_ttl", with = "humantime_serde")]
    pub presence_ttl: Duration,
}

/// 30 s: a dead node's devices disappear within half a minute even if they never reconnect,
/// and three refreshes fit in it, so one slow Redis round trip never drops a live device.
fn default_presence_ttl() -> Duration {
    Duration::from_secs(30)
}

impl ClusterConfig {
    /// The Redis URL with the `valkey` aliases mapped to the schemes the client knows, checked.
    pub fn redis_url(&self) -> anyhow::Result<String> {
        normalize_redis_url(&self.redis_url)
    }

    /// Reads the shared secret from `secret_file` (surrounding whitespace dropped).
    pub fn read_secret(&self) -> anyhow::Result<Vec<u8>> {
        read_secret(&self.secret_file)
    }

    /// The PEM of `ca_file`, if set.
    pub fn read_ca(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(path) = &self.ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(
            String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----"),
            "{} holds no PEM certificate",
            path.display()
        );
        Ok(Some(pem))
    }

    /// The address the other nodes dial, given the address `peer_listen` is bound to.
    pub fn advertised(&self, bound: SocketAddr) -> anyhow::Result<String> {
        match &self.advertise {
            Some(advertise) => Ok(advertise.clone()),
            None if bound.ip().is_unspecified() => anyhow::bail!(
                "[cluster] peer_listen {} listens on every interface: set `advertise` to the \
                 host:port the other nodes reach this node on",
                self.peer_listen
            ),
            None => Ok(bound.to_string()),
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.redis_url()?;
        anyhow::ensure!(
            !self.node.is_empty()
                && self.node.len() <= MAX_NODE_NAME
                && self
                    .node
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "[cluster] node {:?} is not a node name: use 1 to {MAX_NODE_NAME} letters, digits, `.`, `-` or `_` \
             (e.g. \"relay-1\"), different on every node",
            self.node
        );
        if let Some(advertise) = &self.advertise {
            let port = advertise
                .rsplit_once(':')
                .and_then(|(host, port)| (!host.is_empty()).then_some(port))
                .and_then(|port| port.parse::<u16>().ok());
            anyhow::ensure!(
                port.is_some_and(|p| p != 0),
                "[cluster] advertise {advertise:?} is not host:port (e.g. \"10.0.0.11:7443\")"
            );
        }
        anyhow::ensure!(
            self.presence_ttl >= Duration::from_secs(3),
            "[cluster] presence_ttl {:?} is too short: use at least 3s (30s is the default)",
            self.presence_ttl
        );
        self.read_secret()?;
        if let Some(ca) = &self.ca_file {
            anyhow::ensure!(
                self.redis_url()?.starts_with("rediss://"),
                "[cluster] ca_file is for TLS: use a rediss:// or valkeys:// redis_url, or remove ca_file"
            );
            self.read_ca()
                .with_context(|| format!("[cluster] ca_file {}", ca.display()))?;
        }
        Ok(())
    }
}

/// Maps `valkey://` to `redis://` and `valkeys://` to `rediss://`, and refuses anything that is
/// not one of the four.
pub fn normalize_redis_url(url: &str) -> anyhow::Result<String> {
    let parsed = url::Url::parse(url).map_err(|err| {
        anyhow::anyhow!(
            "[cluster] redis_url is not a URL ({err}): use e.g. \"redis://redis.internal:6379\""
        )
    })?;
    let scheme = match parsed.scheme() {
        "redis" | "valkey" => "redis",
        "rediss" | "valkeys" => "rediss",
        other => anyhow::bail!(
            "[cluster] redis_url has the scheme {other:?}: use redis:// or valkey:// (plain), \
             rediss:// or valkeys:// (TLS)"
        ),
    };
    anyhow::ensure!(
        parsed.host_str().is_some_and(|h| !h.is_empty()),
        "[cluster] redis_url names no host: use e.g. \"redis://redis.internal:6379\""
    );
    let rest = &url[parsed.scheme().len()..];
    Ok(format!("{scheme}{rest}"))
}

fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read(path).with_context(|| {
        format!(
            "[cluster] reading secret_file {}: create it with the same content on every node \
             (e.g. `openssl rand -hex 32 > {}` and copy it)",
            path.display(),
            path.display()
        )
    })?;
    let secret = text.trim_ascii().to_vec();
    anyhow::ensure!(
        secret.len() >= MIN_CLUSTER_SECRET_BYTES,
        "[cluster] the secret in {} is too short ({} bytes): use at least {MIN_CLUSTER_SECRET_BYTES}, \
         e.g. `openssl rand -hex 32`",
        path.display(),
        secret.len()
    );
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> ClusterConfig {
        let path =
            std::env::temp_dir().join(format!("cloudllm-cluster-secret-{}", std::process::id()));
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        ClusterConfig {
            redis_url: url.to_owned(),
            node: "relay-1".to_owned(),
            peer_listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            secret_file: path,
            ca_file: None,
            presence_ttl: default_presence_ttl(),
        }
    }

    #[test]
    fn valkey_schemes_are_aliases_and_others_are_refused() {
        assert_eq!(
            normalize_redis_url("valkey://:pw@h:6379/2").unwrap(),
            "redis://:pw@h:6379/2"
        );
        assert_eq!(normalize_redis_url("valkeys://h").unwrap(), "rediss://h");
        assert_eq!(normalize_redis_url("rediss://h:1").unwrap(), "rediss://h:1");
        let err = normalize_redis_url("http://h").unwrap_err().to_string();
        assert!(
            err.contains("redis_url") && err.contains("valkeys://"),
            "{err}"
        );
        let err = normalize_redis_url("redis.internal:6379")
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis_url"), "{err}");
        assert!(config("redis://127.0.0.1:6379").validate().is_ok());
    }

    #[test]
    fn bad_names_addresses_and_secrets_are_explained() {
        let mut bad = config("redis://h");
        bad.node = "relay 1".into();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("[cluster] node"), "{err}");
        let mut bad = config("redis://h");
        bad.advertise = Some("10.0.0.1".into());
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("advertise"), "{err}");
        let mut bad = config("redis://h");
        bad.secret_file = "/nonexistent/cluster.secret".into();
        let err = format!("{:#}", bad.validate().unwrap_err());
        assert!(
            err.contains("secret_file") && err.contains("openssl"),
            "{err}"
        );
        let short =
            std::env::temp_dir().join(format!("cloudllm-cluster-short-{}", std::process::id()));
        std::fs::write(&short, "short").unwrap();
        bad.secret_file = short;
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        let wildcard = ClusterConfig {
            peer_listen: "0.0.0.0:7443".parse().unwrap(),
            ..config("redis://h")
        };
        let err = wildcard
            .advertised("0.0.0.0:7443".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("advertise"), "{err}");
    }
}
