//! Minting the relay's own tokens (`cloudllm-relay token issue`, `--dev`, the web page's
//! sign-in link): HS256 with the relay's secret, one scope, an optional tier.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, Header};

use super::{Claims, Keys, MAX_SUBJECT_BYTES, Scope, valid_subject};

/// Issuer written into the tokens this relay mints.
pub const ISSUER: &str = "cloudllm-relay";

impl Keys {
    /// Mints a token for `user` with `scope`, valid for `ttl`. Needs the relay's secret.
    pub fn issue(
        &self,
        user: &str,
        scope: Scope,
        tier: Option<&str>,
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let secret = self.secret.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "this relay has no signing secret (only [jwks]): it cannot mint tokens; they come from the identity provider"
            )
        })?;
        anyhow::ensure!(
            valid_subject(user),
            "the user id must be 1 to {MAX_SUBJECT_BYTES} bytes with no control characters"
        );
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let mut other = serde_json::Map::new();
        if let Some(tier) = tier {
            other.insert("tier".to_owned(), tier.into());
        }
        let claims = Claims {
            sub: user.to_owned(),
            scope: scope.into(),
            exp: now.saturating_add(ttl.as_secs()),
            iat: now,
            iss: ISSUER.to_owned(),
            other,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &secret.encoding,
        )?)
    }
}
