//! The identity provider's tables: `[jwks]` (the keys that verify its tokens), `[login]` (the
//! provider clients log in with, published to them) and the `[supabase]` preset that fills in
//! both the keys and the claim rules for a Supabase project.

use std::time::Duration;

use anyhow::Context;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use url::Url;

use super::RelayConfig;
use crate::auth::{ClaimRules, Scopes};

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
    pub(super) fn validate(&self) -> anyhow::Result<()> {
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

impl RelayConfig {
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
}

#[cfg(test)]
mod tests {
    use cloudllm_proto::Secret;

    use super::*;
    use crate::config::SECRET_ENV;
    use crate::config::tests::parsed;

    const JWKS: &str = r#"
        token_grace = "5s"
        [jwks]
        url = "https://idp.example.com/jwks"
        issuer = "https://idp.example.com/"
        audience = "cloudllm"
    "#;

    #[test]
    fn jwks_alone_is_enough_to_serve_but_not_to_issue() {
        let config = parsed(JWKS);
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
        let config = parsed(&text);
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
            let config = parsed(&format!("{JWKS}{extra}"));
            let err = format!("{:#}", config.validate().unwrap_err());
            assert!(err.contains(needle) && err.contains("[jwks]"), "{err}");
        }
        let ftp = JWKS.replace("https://idp.example.com/jwks", "ftp://idp.example.com/jwks");
        let config = parsed(&ftp);
        assert!(config.validate().is_err());
    }

    #[test]
    fn login_defaults_its_scopes_and_checks_the_issuer() {
        let config =
            parsed("[login]\nissuer = \"https://idp.example.com\"\nclient_id = \"cloudllmd\"\n");
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
        let mut config = parsed("[supabase]\nurl = \"https://abcd.supabase.co/\"\n");
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
        let mut explicit = parsed(
            "tier_claim = \"plan\"\nimplicit_scopes = \"client\"\n[supabase]\nurl = \"https://abcd.supabase.co\"\n",
        );
        explicit.apply_presets().unwrap();
        assert_eq!(explicit.tier_claim, "plan");
        let scopes = explicit.implicit_scopes.unwrap();
        assert!(scopes.has(crate::Scope::Client) && !scopes.has(crate::Scope::Agent));
        let mut both = parsed(&format!(
            "{JWKS}\n[supabase]\nurl = \"https://abcd.supabase.co\"\n"
        ));
        let err = both.apply_presets().unwrap_err().to_string();
        assert!(
            err.contains("[supabase]") && err.contains("[jwks]"),
            "{err}"
        );
    }
}
