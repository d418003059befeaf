//! The relay's configuration: a TOML file with defaults for everything, plus environment
//! overrides for the secret so it never has to sit in a file.
//!
//! Two ways to verify tokens can be configured, alone or together: the relay's own HS256
//! `secret` (self-hosted relays, Supabase's legacy JWT secret) and an identity provider's
//! published keys in `[jwks]` (RS256/ES256/EdDSA: Auth0, Keycloak, Supabase signing keys …).
//! `[login]` tells clients which provider to log in with; it is published, not used, here.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use cloudllm_proto::Secret;
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
    /// How long a tunnel outlives the expiry (`exp`) of the agent token that opened it before
    /// the relay drains and closes it. The daemon refreshes its token and opens a new tunnel
    /// before expiry, so a tunnel reaching this is one whose daemon could not renew.
    #[serde(with = "humantime_serde")]
    pub token_grace: Duration,
    /// The audit log (JSON lines of tunnel, auth and request metadata): a file to append to,
    /// or `-` for standard output. Off when unset.
    pub audit_log: Option<String>,
    /// A web page for this relay's users (account, tokens, usage), published at
    /// `/.well-known/cloudllm`; the tray offers "Open web page" when it is set.
    pub web_url: Option<Url>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        let liveness = Liveness::default();
        RelayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            secret: None,
            jwks: None,
            login: None,
            max_body_bytes: 32 * 1024 * 1024,
            ping_interval: liveness.ping_interval,
            ping_timeout: liveness.timeout,
            // 25 s: below systemd's default 90 s stop timeout and Kubernetes' 30 s grace.
            shutdown_grace: Duration::from_secs(25),
            // 60 s: covers a daemon's refresh that raced the expiry and one retry of it, and
            // is short next to any access token's lifetime (minutes to hours).
            token_grace: Duration::from_secs(60),
            audit_log: None,
            web_url: None,
        }
    }
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
    /// both), and that `[jwks]` and `[login]` make sense.
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
        let config: RelayConfig = toml::from_str(
            "listen = \"0.0.0.0:9000\"\nping_interval = \"3s\"\nmax_body_bytes = 1024\n",
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.ping_interval, Duration::from_secs(3));
        assert_eq!(config.max_body_bytes, 1024);
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
}
