//! The relay's configuration: a TOML file with defaults for everything, plus environment
//! overrides for the secret so it never has to sit in a file.
//!
//! Two ways to verify tokens can be configured, alone or together: the relay's own HS256
//! `secret` (self-hosted relays, Supabase's legacy JWT secret) and an identity provider's
//! published keys in `[jwks]` (RS256/ES256/EdDSA: Auth0, Keycloak, Supabase signing keys …).
//! `[login]` tells clients which provider to log in with; it is published, not used, here.
//!
//! This file holds the top-level settings, loading and the checks across them; `tiers` holds
//! the tier tables and the choice of a token's tier, `identity` the identity provider's tables
//! (`[jwks]`, `[login]`, the `[supabase]` preset).

mod cluster;
mod identity;
mod tiers;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cloudllm_proto::Secret;

use crate::auth::Scopes;
use cloudllm_tunnel::Liveness;
use serde::Deserialize;
use url::Url;

pub use cluster::{ClusterConfig, normalize_redis_url};
pub use identity::{JwksConfig, LoginConfig, SupabaseConfig};
pub use tiers::TierLimits;

/// Environment variable holding the HS256 signing secret.
pub const SECRET_ENV: &str = "CLOUDLLM_RELAY_SECRET";

/// Shortest accepted signing secret, in bytes: 32, the HMAC-SHA256 key size. A shorter secret
/// can be brute-forced from a single token.
pub const MIN_SECRET_BYTES: usize = 32;

/// Everything the relay needs to run.
///
/// ```toml
/// listen = "0.0.0.0:8080"
/// token_grace = "60s"
///
/// [tls]
/// cert = "/etc/letsencrypt/live/relay.example.com/fullchain.pem"
/// key = "/etc/letsencrypt/live/relay.example.com/privkey.pem"
///
/// [jwks]
/// url = "https://idp.example.com/jwks"
/// issuer = "https://idp.example.com"
/// audience = "cloudllm"
/// algorithms = ["RS256", "ES256", "EdDSA"]
///
/// [login]
/// issuer = "https://idp.example.com"
/// client_id = "cloudllmd"
/// scopes = ["openid", "offline_access", "agent"]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Address to listen on for users and daemons.
    pub listen: SocketAddr,
    /// HS256 secret that signs and verifies tokens. Prefer the `CLOUDLLM_RELAY_SECRET`
    /// environment variable over putting it here. Optional when `[jwks]` is set; then
    /// `cloudllm-relay token issue` cannot mint tokens.
    pub secret: Option<Secret>,
    /// `[jwks]`: also accept tokens signed by an identity provider's published keys.
    pub jwks: Option<JwksConfig>,
    /// `[login]`: the identity provider that `cloudllm login` should use, published at
    /// `/.well-known/cloudllm`. Without it, clients are told to log in with a token from the
    /// relay's operator.
    pub login: Option<LoginConfig>,
    /// `[supabase]`: accept a Supabase project's user tokens (fills in `[jwks]`).
    pub supabase: Option<SupabaseConfig>,
    /// Scopes a verified token gets when it carries no cloudllm scope (`agent`, `client`).
    /// Default none: such tokens are refused. `[supabase]` sets both, since Supabase tokens
    /// name no scopes.
    pub implicit_scopes: Option<Scopes>,
    /// Dotted path of the claim that names the user's tier: `tier` (the relay's own tokens),
    /// `app_metadata.tier` (Supabase: set by the server, not the user) …
    pub tier_claim: String,
    /// The tier of a token whose tier claim is absent or names no configured tier.
    pub default_tier: String,
    /// `[tiers.NAME]`: the limits of each tier. Built in: `free` and `premium`
    /// ([`TierLimits::free`], [`TierLimits::premium`]); a table here replaces a built-in tier
    /// of the same name or adds a new one.
    #[serde(deserialize_with = "tiers::tiers_over_builtins")]
    pub tiers: BTreeMap<String, TierLimits>,
    /// Failed authentications one client address may make per minute before it gets 429
    /// (brute-force protection). 0 turns the limit off.
    pub auth_failures_per_minute: u32,
    /// Addresses of reverse proxies in front of the relay. Only a connection from one of these
    /// may name the client's address in `X-Forwarded-For`; from anyone else the header is
    /// ignored (it could be forged to dodge the per-address limit).
    pub trusted_proxies: Vec<IpAddr>,
    /// Unauthenticated connections (accepted, but no request on them admitted yet: TLS
    /// handshakes, idle or slow clients, bad tokens) one client address may hold at once; an
    /// IPv6 client counts by its /64. When full, a new connection from that address closes the
    /// address's oldest unauthenticated one if that has had 2 s to authenticate, and is closed
    /// at once otherwise. Peers in `trusted_proxies` count only in the total.
    pub max_unauthenticated_connections_per_address: u32,
    /// Unauthenticated connections the relay holds at once, from everyone (the same rule when
    /// full). At most half the process's open-file limit: a larger value is lowered at startup,
    /// with a warning, so that pre-authentication traffic can never take every descriptor.
    pub max_unauthenticated_connections: u32,
    /// Serve `/metrics` on this address instead of the main one (keeps them off the public
    /// port). Unset: `/metrics` is on the main address.
    pub metrics_listen: Option<SocketAddr>,
    /// TCP keepalive on user connections: idle connections (a request waiting for its first
    /// token) are probed this often, so NAT and firewall state does not expire.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// How often the relay pings each tunnel.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long a tunnel may stay silent after a ping before it is closed as dead.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// How long a tunnel's HTTP/2 session stays open without requests. An idle tunnel holds
    /// only its WebSocket (a few KiB); the next request opens a new session at once.
    #[serde(with = "humantime_serde")]
    pub session_idle: Duration,
    /// On shutdown, how long in-flight streams get to finish before they are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long the relay waits for a client's request headers (also for the next request on
    /// an idle keep-alive connection) and for each next piece of a request body before it
    /// closes the connection: slow clients (slowloris) cannot hold connections open for long.
    #[serde(with = "humantime_serde")]
    pub client_read_timeout: Duration,
    /// How long a tunnel outlives the expiry (`exp`) of the agent token that opened it before
    /// the relay drains and closes it. The daemon refreshes its token and opens a new tunnel
    /// before expiry, so a tunnel reaching this is one whose daemon could not renew.
    #[serde(with = "humantime_serde")]
    pub token_grace: Duration,
    /// The audit log (JSON lines of tunnel, auth and request metadata): a file to append to,
    /// or `-` for standard output. Off when unset.
    pub audit_log: Option<String>,
    /// `[tls]`: serve HTTPS (and `wss://` to daemons) with this certificate. Without it the
    /// relay speaks plain HTTP, for a TLS-terminating reverse proxy in front.
    pub tls: Option<TlsConfig>,
    /// A web page for this relay's users (account, tokens, usage), published at
    /// `/.well-known/cloudllm`; the tray offers "Open web page" when it is set.
    pub web_url: Option<Url>,
    /// Origins of browser apps (chat UIs, extensions, notebooks) allowed to call `/api/*` and
    /// `/v1/*` from a page on another origin (CORS): exact origins like
    /// `"https://chat.example.com"`, or `"*"` for any. Default none. The relay's own web page at
    /// `/` needs no entry.
    pub allowed_origins: Vec<String>,
    /// `[web_login]`: sign-in on the relay's web page through the `[login]` provider, with a
    /// client registered for the page (authorization code + PKCE, redirect URI: the relay's
    /// own root URL, e.g. `https://relay.example.com/`). Without it the page offers only
    /// pasting a client token and `cloudllm open`.
    pub web_login: Option<WebLoginConfig>,
    /// `[cluster]`: run as one node of a cluster that shares Redis or Valkey (see
    /// [`ClusterConfig`]). Without it the relay runs alone and needs nothing else.
    pub cluster: Option<ClusterConfig>,
    /// Threads serving plain HTTP (one connection each, thread-per-core); 0, the default, is
    /// one per core. Ignored with `[tls]`, which is served on the main runtime.
    pub threads: usize,
}

/// `[web_login]`: the web page's own client at the `[login]` provider.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebLoginConfig {
    /// The public client id registered for the page (no secret: the page runs in browsers).
    pub client_id: String,
    /// Scopes the page asks for (default `["openid", "offline_access", "client"]`: a refresh
    /// token and the right to send requests, not to open a tunnel).
    #[serde(default = "default_web_scopes")]
    pub scopes: Vec<String>,
}

fn default_web_scopes() -> Vec<String> {
    ["openid", "offline_access", "client"]
        .map(String::from)
        .to_vec()
}

/// Most `threads` a relay runs: every one may hold a lane of each busy tunnel.
pub const MAX_THREADS: usize = cloudllm_proto::MAX_LANES;

impl Default for RelayConfig {
    fn default() -> Self {
        let liveness = Liveness::default();
        RelayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            secret: None,
            jwks: None,
            login: None,
            supabase: None,
            implicit_scopes: None,
            tier_claim: "tier".to_owned(),
            default_tier: "free".to_owned(),
            tiers: tiers::builtin_tiers(),
            // 20 a minute: far more than a person mistyping, far too few to guess a secret.
            auth_failures_per_minute: 20,
            trusted_proxies: Vec::new(),
            // 128: far above what one client opens before its first request is answered (a
            // browser opens 6, an SDK's pool one per request in flight, and premium allows 32),
            // and a small share of any realistic descriptor budget.
            max_unauthenticated_connections_per_address: 128,
            // 4096: a reconnect storm of thousands of daemons after a restart passes in
            // seconds, and it is a sixteenth of the 65,536 descriptors the systemd unit gives
            // the relay, leaving the rest to tunnels and authenticated clients.
            max_unauthenticated_connections: 4096,
            metrics_listen: None,
            // 15 s: well inside the shortest common NAT and load-balancer idle timeouts (30 s).
            tcp_keepalive: Duration::from_secs(15),
            ping_interval: liveness.ping_interval,
            ping_timeout: liveness.timeout,
            // 30 s: a conversation's requests share one session; a tunnel idle for longer
            // gives its HTTP/2 state back.
            session_idle: Duration::from_secs(30),
            // 25 s: below systemd's default 90 s stop timeout and Kubernetes' 30 s grace.
            shutdown_grace: Duration::from_secs(25),
            // 30 s: hyper's own default for headers; a real client sends its headers and body
            // in a round trip or two, and 30 s is shorter than common keep-alive idle timeouts.
            client_read_timeout: Duration::from_secs(30),
            // 60 s: covers a daemon's refresh that raced the expiry and one retry of it, and
            // is short next to any access token's lifetime (minutes to hours).
            token_grace: Duration::from_secs(60),
            audit_log: None,
            tls: None,
            web_url: None,
            allowed_origins: Vec::new(),
            web_login: None,
            cluster: None,
            threads: 0,
        }
    }
}

/// `[tls]`: the relay terminates TLS itself with a certificate and key from PEM files, read
/// again on SIGHUP (so a renewed certificate needs no restart). Relative paths are relative to
/// the relay's working directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain: the relay's certificate first, then the intermediates
    /// (Let's Encrypt's `fullchain.pem`).
    pub cert: PathBuf,
    /// The certificate's private key: PKCS#8, RSA or EC, unencrypted (`privkey.pem`).
    pub key: PathBuf,
}

impl RelayConfig {
    /// Reads a config file. Unknown keys are an error, so a typo never silently does nothing.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading relay config {}", path.display()))?;
        let mut config: RelayConfig = toml::from_str(&text)
            .with_context(|| format!("parsing relay config {}", path.display()))?;
        config
            .apply_presets()
            .with_context(|| format!("in relay config {}", path.display()))?;
        Ok(config)
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
        let Some(secret) = self.secret.as_ref() else {
            if self.jwks.is_some() {
                anyhow::bail!(
                    "this relay has no signing secret, only `[jwks]`: its tokens come from the identity provider. \
                     To also mint tokens here, set {SECRET_ENV} (for example `export {SECRET_ENV}=$(openssl rand -hex 32)`)"
                );
            }
            anyhow::bail!(
                "no signing secret: set {SECRET_ENV} (for example `export {SECRET_ENV}=$(openssl rand -hex 32)`) \
                 or `secret` in the config file, or configure an identity provider's keys in a `[jwks]` table; \
                 or run `cloudllm-relay serve --dev` for a throwaway secret and ready-made tokens"
            );
        };
        anyhow::ensure!(
            secret.expose().len() >= MIN_SECRET_BYTES,
            "the signing secret is too short ({} bytes): use at least {MIN_SECRET_BYTES}, for example `openssl rand -hex 32`",
            secret.expose().len()
        );
        Ok(secret)
    }

    /// Checks what serde cannot: that tokens can be verified at all (a secret, `[jwks]`, or
    /// both), that `[jwks]` and `[login]` make sense, and that `[tls]` names a readable
    /// certificate and the key that belongs to it.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.secret.is_some() || self.jwks.is_none() {
            self.require_secret()?;
        }
        if let Some(jwks) = &self.jwks {
            jwks.validate().context("in [jwks]")?;
        }
        if let Some(login) = &self.login {
            login.validate().context("in [login]")?;
        }
        anyhow::ensure!(
            self.tiers.contains_key(&self.default_tier),
            "default_tier {:?} has no [tiers.{}] table (configured tiers: {})",
            self.default_tier,
            self.default_tier,
            self.tiers.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        anyhow::ensure!(
            !self.client_read_timeout.is_zero(),
            "client_read_timeout must be above zero"
        );
        anyhow::ensure!(
            self.max_unauthenticated_connections > 0
                && self.max_unauthenticated_connections_per_address > 0,
            "max_unauthenticated_connections and max_unauthenticated_connections_per_address must be above zero \
             (with zero, no client could ever connect)"
        );
        anyhow::ensure!(
            self.threads <= MAX_THREADS,
            "threads is {}: at most {MAX_THREADS} (0 means one per core)",
            self.threads
        );
        anyhow::ensure!(
            !self.session_idle.is_zero(),
            "session_idle must be above zero (it is how long a tunnel's HTTP/2 session outlives its last request, e.g. \"30s\")"
        );
        for (name, tier) in &self.tiers {
            anyhow::ensure!(
                tier.requests_per_minute > 0
                    && tier.concurrent_requests > 0
                    && tier.devices > 0
                    && tier.max_body_bytes > 0
                    && !tier.max_stream.is_zero(),
                "[tiers.{name}]: every limit must be above zero (to lock a tier out, do not issue it)"
            );
        }
        anyhow::ensure!(
            !self.tier_claim.is_empty() && self.tier_claim.split('.').all(|p| !p.is_empty()),
            "tier_claim {:?} is not a dotted claim path like `tier` or `app_metadata.tier`",
            self.tier_claim
        );
        if let Some(tls) = &self.tls {
            crate::tls::load(tls).context("in [tls]")?;
        }
        crate::cors::Cors::new(&self.allowed_origins)?;
        if let Some(web) = &self.web_login {
            anyhow::ensure!(
                self.login.is_some(),
                "[web_login] needs [login]: it names the provider's issuer"
            );
            anyhow::ensure!(
                !web.client_id.trim().is_empty(),
                "[web_login] client_id must not be empty"
            );
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` as a relay config file, which the test expects to parse.
    pub(super) fn parsed(text: &str) -> RelayConfig {
        toml::from_str(text).expect("the test's config parses")
    }

    #[test]
    fn file_values_override_defaults_and_typos_are_errors() {
        let config = parsed("listen = \"0.0.0.0:9000\"\nping_interval = \"3s\"\n");
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.ping_interval, Duration::from_secs(3));
        assert_eq!(config.ping_timeout, Liveness::default().timeout);
        assert_eq!(config.token_grace, Duration::from_secs(60));
        assert!(config.jwks.is_none() && config.login.is_none());
        let err = toml::from_str::<RelayConfig>("listne = \"0.0.0.0:1\"").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn missing_or_short_secret_says_how_to_fix_it() {
        let mut config = RelayConfig::default();
        let err = config.require_secret().unwrap_err().to_string();
        assert!(err.contains(SECRET_ENV) && err.contains("--dev"), "{err}");
        assert!(err.contains("[jwks]"), "{err}");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(SECRET_ENV) && err.contains("[jwks]"), "{err}");
        config.secret = Some(Secret::new("short"));
        let err = config.require_secret().unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        config.secret = Some(Secret::new("x".repeat(MIN_SECRET_BYTES)));
        assert!(config.require_secret().is_ok());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn connection_caps_have_defaults_and_must_be_positive() {
        let config = parsed(
            "secret = \"0123456789abcdef0123456789abcdef\"\nmax_unauthenticated_connections = 100\n",
        );
        assert_eq!(config.max_unauthenticated_connections, 100);
        assert_eq!(config.max_unauthenticated_connections_per_address, 128);
        assert!(config.validate().is_ok());
        let zero = parsed(
            "secret = \"0123456789abcdef0123456789abcdef\"\nmax_unauthenticated_connections_per_address = 0\n",
        );
        let err = zero.validate().unwrap_err().to_string();
        assert!(
            err.contains("max_unauthenticated_connections_per_address"),
            "{err}"
        );
    }

    #[test]
    fn client_read_timeout_has_a_default_and_must_be_positive() {
        let mut config = parsed("secret = \"0123456789abcdef0123456789abcdef\"");
        assert_eq!(config.client_read_timeout, Duration::from_secs(30));
        assert!(config.validate().is_ok());
        config =
            parsed("secret = \"0123456789abcdef0123456789abcdef\"\nclient_read_timeout = \"0s\"");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("client_read_timeout"), "{err}");
    }

    #[test]
    fn threads_default_to_one_per_core_and_are_bounded() {
        let mut config = parsed("secret = \"0123456789abcdef0123456789abcdef\"\nthreads = 256");
        assert_eq!(config.threads, MAX_THREADS);
        assert!(config.validate().is_ok());
        config.threads = MAX_THREADS + 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("threads is 257") && err.contains("at most 256"),
            "{err}"
        );
        assert_eq!(RelayConfig::default().threads, 0, "one per core");
    }
}
