//! The relay's configuration: a TOML file with defaults for everything, plus environment
//! overrides for the secret so it never has to sit in a file.
//!
//! Two ways to verify tokens can be configured, alone or together: the relay's own HS256
//! `secret` (self-hosted relays, Supabase's legacy JWT secret) and an identity provider's
//! published keys in `[jwks]` (RS256/ES256/EdDSA: Auth0, Keycloak, Supabase signing keys …).
//! `[login]` tells clients which provider to log in with; it is published, not used, here.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cloudllm_proto::Secret;

use crate::auth::{ClaimRules, Scopes};
use cloudllm_tunnel::Liveness;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use url::Url;

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
    #[serde(deserialize_with = "tiers_over_builtins")]
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
            tiers: builtin_tiers(),
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
        }
    }
}

/// The limits of one tier. Every field is required in a `[tiers.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierLimits {
    /// Requests a user may start per minute (a token bucket: this many at once, refilled
    /// evenly over the minute).
    pub requests_per_minute: u32,
    /// Requests a user may have in flight at once, over all devices.
    pub concurrent_requests: u32,
    /// Devices a user may have connected at once.
    pub devices: u32,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Longest a response may stream; then the relay ends it.
    #[serde(with = "humantime_serde")]
    pub max_stream: Duration,
}

impl TierLimits {
    /// `free`: one device, a person's interactive use.
    pub fn free() -> Self {
        TierLimits {
            requests_per_minute: 60,
            concurrent_requests: 4,
            devices: 1,
            // 8 MiB: a chat with an image or two.
            max_body_bytes: 8 * 1024 * 1024,
            max_stream: Duration::from_secs(30 * 60),
        }
    }

    /// `premium`: several devices, tools and agents.
    pub fn premium() -> Self {
        TierLimits {
            requests_per_minute: 600,
            concurrent_requests: 32,
            devices: 10,
            // 32 MiB: room for several images in a multimodal request.
            max_body_bytes: 32 * 1024 * 1024,
            max_stream: Duration::from_secs(4 * 3600),
        }
    }
}

fn builtin_tiers() -> BTreeMap<String, TierLimits> {
    BTreeMap::from([
        ("free".to_owned(), TierLimits::free()),
        ("premium".to_owned(), TierLimits::premium()),
    ])
}

/// `[tiers]` from the file, laid over the built-in tiers.
fn tiers_over_builtins<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, TierLimits>, D::Error> {
    let mut tiers = builtin_tiers();
    tiers.extend(BTreeMap::<String, TierLimits>::deserialize(deserializer)?);
    Ok(tiers)
}

/// `[supabase]`: a Supabase project as the identity provider.
///
/// Verifies the project's user access tokens with its published signing keys
/// (`{url}/auth/v1/.well-known/jwks.json`, issuer `{url}/auth/v1`, audience `authenticated`);
/// with the project's legacy JWT secret as `secret` (or `CLOUDLLM_RELAY_SECRET`), its HS256
/// tokens verify too. Supabase tokens carry no cloudllm scope, so every signed-in user may both
/// connect devices and send requests; the tier is read from `app_metadata.tier`, which only the
/// project's server side can set, unless `tier_claim` says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupabaseConfig {
    /// The project URL, e.g. `https://abcdefgh.supabase.co`.
    pub url: Url,
    /// Signature algorithms of the project's signing keys (default `["ES256", "RS256"]`).
    #[serde(default = "default_supabase_algorithms")]
    pub algorithms: Vec<Algorithm>,
}

fn default_supabase_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::ES256, Algorithm::RS256]
}

impl SupabaseConfig {
    /// The `[jwks]` table this preset stands for.
    pub fn jwks(&self) -> anyhow::Result<JwksConfig> {
        let base = self.url.as_str().trim_end_matches('/');
        Ok(JwksConfig {
            url: Url::parse(&format!("{base}/auth/v1/.well-known/jwks.json"))
                .context("[supabase] url")?,
            issuer: format!("{base}/auth/v1"),
            audience: "authenticated".to_owned(),
            algorithms: self.algorithms.clone(),
            refresh: default_jwks_refresh(),
            refetch_min: default_jwks_refetch_min(),
        })
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

/// `[jwks]`: verify tokens against the JSON Web Key Set an identity provider publishes.
///
/// A token whose header `alg` is one of `algorithms` is verified with the set's key named by
/// the token's `kid`, then must carry `iss` = `issuer` and `aud` containing `audience`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    /// The provider's key set (`jwks_uri` in its `/.well-known/openid-configuration`),
    /// `https://` (or `http://` for a provider on the same host).
    pub url: Url,
    /// The `iss` every token must carry, e.g. `https://idp.example.com`. A trailing `/` on
    /// either side is ignored.
    pub issuer: String,
    /// The `aud` every token must carry (the token's `aud` may be a string or an array).
    pub audience: String,
    /// Signature algorithms accepted with the provider's keys: pinned here, never taken from
    /// the token. Asymmetric only (`RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`,
    /// `ES256`, `ES384`, `EdDSA`). Default `["RS256"]`.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// How often the key set is fetched again when nothing else asks (default 10 min), so keys
    /// the provider withdrew stop verifying.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    pub refresh: Duration,
    /// Shortest time between two fetches of the key set (default 30 s). A token naming an
    /// unknown `kid` triggers a fetch (the provider may have rotated its keys); this bounds how
    /// often made-up `kid`s can make the relay call the provider.
    #[serde(default = "default_jwks_refetch_min", with = "humantime_serde")]
    pub refetch_min: Duration,
}

/// Limits used if the default tier were missing; `validate` refuses such a config, so this
/// only keeps `tier` total.
static FALLBACK_TIER: std::sync::LazyLock<TierLimits> = std::sync::LazyLock::new(TierLimits::free);

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256]
}

/// 10 min: a withdrawn key stops verifying within minutes, at one small request per relay.
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(10 * 60)
}

/// 30 s: a rotated key is picked up within half a minute, and no stream of forged `kid`s can
/// make the relay call the provider more than twice a minute.
fn default_jwks_refetch_min() -> Duration {
    Duration::from_secs(30)
}

/// `[login]`: the OpenID Connect provider users log in with, published to clients.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginConfig {
    /// The provider's issuer URL; clients discover it at
    /// `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    /// The public client id registered at the provider for cloudllm.
    pub client_id: String,
    /// Scopes clients request (default `["openid", "offline_access", "agent"]`: a refresh
    /// token and the right to open a tunnel).
    #[serde(default = "default_login_scopes")]
    pub scopes: Vec<String>,
}

fn default_login_scopes() -> Vec<String> {
    ["openid", "offline_access", "agent"]
        .map(String::from)
        .to_vec()
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

    /// Expands `[supabase]` into `[jwks]`, implicit scopes and the tier claim (explicit
    /// settings win where they make sense; `[jwks]` beside `[supabase]` is an error).
    pub fn apply_presets(&mut self) -> anyhow::Result<()> {
        let Some(supabase) = &self.supabase else {
            return Ok(());
        };
        let jwks = supabase.jwks()?;
        anyhow::ensure!(
            self.jwks.as_ref().is_none_or(|given| *given == jwks),
            "[supabase] and [jwks] both name an identity provider: keep one"
        );
        self.jwks = Some(jwks);
        self.implicit_scopes.get_or_insert(Scopes::ALL);
        if self.tier_claim == "tier" {
            self.tier_claim = "app_metadata.tier".to_owned();
        }
        Ok(())
    }

    /// How the relay reads claims.
    pub fn claim_rules(&self) -> ClaimRules {
        ClaimRules {
            tier_path: self.tier_claim.clone(),
            implicit_scopes: self.implicit_scopes.unwrap_or_default(),
        }
    }

    /// The limits for a token's tier claim: its tier when configured, else the default tier.
    pub fn tier(&self, claimed: Option<&str>) -> (&str, &TierLimits) {
        if let Some((name, limits)) = claimed.and_then(|c| self.tiers.get_key_value(c)) {
            return (name, limits);
        }
        let limits = self
            .tiers
            .get(&self.default_tier)
            .unwrap_or_else(|| &FALLBACK_TIER);
        (&self.default_tier, limits)
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
        Ok(())
    }
}

impl JwksConfig {
    /// Checks the URL scheme, that issuer and audience are set, and that `algorithms` is
    /// non-empty and asymmetric only.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.url.scheme(), "https" | "http"),
            "url must be https:// (or http://), not {}",
            self.url.scheme()
        );
        anyhow::ensure!(!self.issuer.trim().is_empty(), "issuer must not be empty");
        anyhow::ensure!(
            !self.audience.trim().is_empty(),
            "audience must not be empty"
        );
        anyhow::ensure!(
            !self.algorithms.is_empty(),
            "algorithms must name at least one algorithm"
        );
        // A JWKS publishes public keys: an HMAC algorithm here would let anyone who can read
        // the key set forge tokens. The relay's own HS256 tokens are verified with `secret`.
        if let Some(hmac) = self
            .algorithms
            .iter()
            .find(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        {
            anyhow::bail!(
                "algorithms may not contain {hmac:?}: keys from a JWKS are public; HS256 tokens are verified with `secret`"
            );
        }
        anyhow::ensure!(
            !self.refresh.is_zero() && !self.refetch_min.is_zero(),
            "refresh and refetch_min must be longer than zero"
        );
        Ok(())
    }
}

impl LoginConfig {
    fn validate(&self) -> anyhow::Result<()> {
        let issuer = Url::parse(&self.issuer)
            .with_context(|| format!("issuer {:?} is not a URL", self.issuer))?;
        anyhow::ensure!(
            matches!(issuer.scheme(), "https" | "http"),
            "issuer must be an https:// URL"
        );
        anyhow::ensure!(
            !self.client_id.trim().is_empty(),
            "client_id must not be empty"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_override_defaults_and_typos_are_errors() {
        let config: RelayConfig =
            toml::from_str("listen = \"0.0.0.0:9000\"\nping_interval = \"3s\"\n").unwrap();
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
        let config: RelayConfig = toml::from_str(
            "secret = \"0123456789abcdef0123456789abcdef\"\nmax_unauthenticated_connections = 100\n",
        )
        .unwrap();
        assert_eq!(config.max_unauthenticated_connections, 100);
        assert_eq!(config.max_unauthenticated_connections_per_address, 128);
        assert!(config.validate().is_ok());
        let zero: RelayConfig = toml::from_str(
            "secret = \"0123456789abcdef0123456789abcdef\"\nmax_unauthenticated_connections_per_address = 0\n",
        )
        .unwrap();
        let err = zero.validate().unwrap_err().to_string();
        assert!(
            err.contains("max_unauthenticated_connections_per_address"),
            "{err}"
        );
    }

    #[test]
    fn client_read_timeout_has_a_default_and_must_be_positive() {
        let mut config: RelayConfig =
            toml::from_str("secret = \"0123456789abcdef0123456789abcdef\"").unwrap();
        assert_eq!(config.client_read_timeout, Duration::from_secs(30));
        assert!(config.validate().is_ok());
        config = toml::from_str(
            "secret = \"0123456789abcdef0123456789abcdef\"\nclient_read_timeout = \"0s\"",
        )
        .unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("client_read_timeout"), "{err}");
    }

    const JWKS: &str = r#"
        token_grace = "5s"
        [jwks]
        url = "https://idp.example.com/jwks"
        issuer = "https://idp.example.com/"
        audience = "cloudllm"
    "#;

    #[test]
    fn jwks_alone_is_enough_to_serve_but_not_to_issue() {
        let config: RelayConfig = toml::from_str(JWKS).unwrap();
        let jwks = config.jwks.as_ref().unwrap();
        assert_eq!(jwks.algorithms, vec![Algorithm::RS256]);
        assert_eq!(jwks.refresh, Duration::from_secs(600));
        assert_eq!(jwks.refetch_min, Duration::from_secs(30));
        assert_eq!(config.token_grace, Duration::from_secs(5));
        assert!(config.validate().is_ok());
        let err = config.require_secret().unwrap_err().to_string();
        assert!(err.contains("[jwks]") && err.contains(SECRET_ENV), "{err}");

        // A short secret beside [jwks] is still refused.
        let mut short = config.clone();
        short.secret = Some(Secret::new("short"));
        assert!(short.validate().is_err());
    }

    #[test]
    fn jwks_options_parse_and_bad_ones_are_refused() {
        let text = format!(
            "{JWKS}algorithms = [\"RS256\", \"ES256\", \"EdDSA\"]\nrefresh = \"1m\"\nrefetch_min = \"100ms\"\n"
        );
        let config: RelayConfig = toml::from_str(&text).unwrap();
        let jwks = config.jwks.unwrap();
        assert_eq!(
            jwks.algorithms,
            vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
        );
        assert_eq!(jwks.refetch_min, Duration::from_millis(100));
        assert_eq!(jwks.refresh, Duration::from_secs(60));

        let typo = format!("{JWKS}audiences = [\"x\"]\n");
        let err = toml::from_str::<RelayConfig>(&typo).unwrap_err();
        assert!(err.to_string().contains("audiences"), "{err}");
        let none = format!("{JWKS}algorithms = [\"none\"]\n");
        assert!(toml::from_str::<RelayConfig>(&none).is_err());

        for (extra, needle) in [
            ("algorithms = [\"HS256\"]\n", "HS256"),
            ("algorithms = []\n", "at least one"),
            ("refetch_min = \"0s\"\n", "zero"),
        ] {
            let config: RelayConfig = toml::from_str(&format!("{JWKS}{extra}")).unwrap();
            let err = format!("{:#}", config.validate().unwrap_err());
            assert!(err.contains(needle) && err.contains("[jwks]"), "{err}");
        }
        let ftp = JWKS.replace("https://idp.example.com/jwks", "ftp://idp.example.com/jwks");
        let config: RelayConfig = toml::from_str(&ftp).unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn login_defaults_its_scopes_and_checks_the_issuer() {
        let config: RelayConfig = toml::from_str(
            "[login]\nissuer = \"https://idp.example.com\"\nclient_id = \"cloudllmd\"\n",
        )
        .unwrap();
        let login = config.login.unwrap();
        assert_eq!(login.scopes, ["openid", "offline_access", "agent"]);
        assert_eq!(login.issuer, "https://idp.example.com");

        let bad = LoginConfig {
            issuer: "not a url".into(),
            client_id: "x".into(),
            scopes: vec![],
        };
        assert!(bad.validate().is_err());
        let err = toml::from_str::<RelayConfig>("[login]\nissuer = \"https://i\"\n").unwrap_err();
        assert!(err.to_string().contains("client_id"), "{err}");
    }

    #[test]
    fn the_supabase_preset_fills_in_the_provider() {
        let mut config: RelayConfig =
            toml::from_str("[supabase]\nurl = \"https://abcd.supabase.co/\"\n").unwrap();
        config.apply_presets().unwrap();
        let jwks = config.jwks.clone().unwrap();
        assert_eq!(
            jwks.url.as_str(),
            "https://abcd.supabase.co/auth/v1/.well-known/jwks.json"
        );
        assert_eq!(jwks.issuer, "https://abcd.supabase.co/auth/v1");
        assert_eq!(jwks.audience, "authenticated");
        assert_eq!(jwks.algorithms, vec![Algorithm::ES256, Algorithm::RS256]);
        assert_eq!(config.implicit_scopes, Some(Scopes::ALL));
        assert_eq!(config.tier_claim, "app_metadata.tier");
        assert!(config.validate().is_ok());
        // Applying it again (load, then serve) changes nothing.
        let before = format!("{config:?}");
        config.apply_presets().unwrap();
        assert_eq!(format!("{config:?}"), before);

        // Explicit settings win; a second provider is an error.
        let mut explicit: RelayConfig = toml::from_str(
            "tier_claim = \"plan\"\nimplicit_scopes = \"client\"\n[supabase]\nurl = \"https://abcd.supabase.co\"\n",
        )
        .unwrap();
        explicit.apply_presets().unwrap();
        assert_eq!(explicit.tier_claim, "plan");
        let scopes = explicit.implicit_scopes.unwrap();
        assert!(scopes.has(crate::Scope::Client) && !scopes.has(crate::Scope::Agent));
        let mut both: RelayConfig = toml::from_str(&format!(
            "{JWKS}\n[supabase]\nurl = \"https://abcd.supabase.co\"\n"
        ))
        .unwrap();
        let err = both.apply_presets().unwrap_err().to_string();
        assert!(
            err.contains("[supabase]") && err.contains("[jwks]"),
            "{err}"
        );
    }

    #[test]
    fn tiers_extend_the_builtins_and_are_checked() {
        let mut config: RelayConfig = toml::from_str(
            "default_tier = \"team\"\n[tiers.team]\nrequests_per_minute = 100\nconcurrent_requests = 8\n\
             devices = 3\nmax_body_bytes = 1000\nmax_stream = \"1h\"\n",
        )
        .unwrap();
        config.secret = Some(Secret::new("x".repeat(MIN_SECRET_BYTES)));
        assert!(config.validate().is_ok());
        assert_eq!(
            config.tiers.keys().collect::<Vec<_>>(),
            ["free", "premium", "team"]
        );
        assert_eq!(config.tier(Some("premium")).0, "premium");
        assert_eq!(
            config.tier(Some("platinum")).0,
            "team",
            "unknown tiers get the default"
        );
        assert_eq!(config.tier(None).1.devices, 3);

        // A table must name every limit.
        let err =
            toml::from_str::<RelayConfig>("[tiers.x]\nrequests_per_minute = 1\n").unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
        let zero: RelayConfig = toml::from_str(
            "[tiers.free]\nrequests_per_minute = 0\nconcurrent_requests = 1\ndevices = 1\n\
             max_body_bytes = 1\nmax_stream = \"1s\"\n",
        )
        .unwrap();
        let mut zero = zero;
        zero.secret = Some(Secret::new("x".repeat(MIN_SECRET_BYTES)));
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("[tiers.free]"), "{err}");
        let mut missing = RelayConfig {
            default_tier: "gold".into(),
            secret: Some(Secret::new("x".repeat(MIN_SECRET_BYTES))),
            ..RelayConfig::default()
        };
        let err = missing.validate().unwrap_err().to_string();
        assert!(
            err.contains("gold") && err.contains("free, premium"),
            "{err}"
        );
        missing.default_tier = "free".into();
        missing.tier_claim = "app_metadata.".into();
        assert!(
            missing
                .validate()
                .unwrap_err()
                .to_string()
                .contains("tier_claim")
        );
    }
}
