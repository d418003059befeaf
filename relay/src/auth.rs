//! Who is calling: verification and issuing of the relay's JWT bearer tokens.
//!
//! Tokens are HS256 JWTs. `sub` names the user; `scope` says what the token may do: `agent`
//! tokens open a tunnel for a device, `client` tokens send API requests to that user's devices.
//! The algorithm is pinned to HS256 here, never taken from the token, so `alg: none` and
//! algorithm-confusion tokens fail verification.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudllm_proto::Secret;
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Issuer written into the tokens this relay mints.
pub const ISSUER: &str = "cloudllm-relay";

/// Clock skew tolerated on `exp`, in seconds: 30 s covers ordinary NTP drift without keeping
/// expired tokens alive for long.
const LEEWAY_SECS: u64 = 30;

/// Longest token accepted, in bytes. Real tokens are a few hundred bytes; the cap bounds the
/// work an attacker can make the relay do per request.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// May open a tunnel for one of the user's devices (the daemon's token).
    Agent,
    /// May send API requests to the user's devices (browsers, SDKs, scripts).
    Client,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Agent => "agent",
            Scope::Client => "client",
        }
    }
}

/// The claims of a cloudllm token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// What the token may do.
    pub scope: Scope,
    /// The user's tier (free, premium …); absent means the default tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
    /// Who minted the token.
    #[serde(default)]
    pub iss: String,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user (`sub`).
    pub user: String,
    /// The user's tier, if the token names one.
    pub tier: Option<String>,
    /// When the token expires, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Why a request was not authenticated. The `Display` text is shown to the caller: it says
/// what is wrong without echoing the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    /// The token has expired.
    #[error("token expired: get a new one")]
    Expired,
    /// The token is malformed, forged, or signed with another key.
    #[error("invalid token")]
    Invalid,
    /// A valid token with the wrong scope.
    #[error("this is a {got} token; this endpoint needs a {need} token")]
    WrongScope {
        /// The scope the endpoint needs.
        need: &'static str,
        /// The token's scope.
        got: &'static str,
    },
}

impl AuthError {
    /// The HTTP status for this failure: 401 when the caller is not known, 403 when the caller
    /// is known but may not do this.
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::WrongScope { .. } => http::StatusCode::FORBIDDEN,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// Verifies and issues tokens with one HS256 secret.
pub struct Keys {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl Keys {
    /// Keys from the relay's secret.
    pub fn new(secret: &Secret) -> Self {
        let bytes = secret.expose().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Keys {
            decoding: DecodingKey::from_secret(bytes),
            encoding: EncodingKey::from_secret(bytes),
            validation,
        }
    }

    /// Verifies the bearer token in `headers` and checks that it has scope `need`.
    pub fn authenticate(&self, headers: &HeaderMap, need: Scope) -> Result<Identity, AuthError> {
        let token = bearer_token(headers).ok_or(AuthError::Missing)?;
        let claims = self.verify(token)?;
        if claims.scope != need {
            return Err(AuthError::WrongScope {
                need: need.as_str(),
                got: claims.scope.as_str(),
            });
        }
        Ok(Identity {
            user: claims.sub,
            tier: claims.tier,
            expires_at: claims.exp,
        })
    }

    /// Verifies a token's signature, expiry and claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            })?;
        if data.claims.sub.is_empty() {
            return Err(AuthError::Invalid);
        }
        Ok(data.claims)
    }

    /// Mints a token for `user` with `scope`, valid for `ttl`.
    pub fn issue(
        &self,
        user: &str,
        scope: Scope,
        tier: Option<&str>,
        ttl: Duration,
    ) -> anyhow::Result<String> {
        anyhow::ensure!(!user.is_empty(), "the user id must not be empty");
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = Claims {
            sub: user.to_owned(),
            scope,
            tier: tier.map(str::to_owned),
            exp: now.saturating_add(ttl.as_secs()),
            iat: now,
            iss: ISSUER.to_owned(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }
}

/// The token of an `Authorization: Bearer …` header, if there is one.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(&Secret::new("a".repeat(32)))
    }

    fn headers(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    fn b64(data: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    }

    #[test]
    fn issued_tokens_verify_with_their_scope() {
        let keys = keys();
        let token = keys
            .issue(
                "alice",
                Scope::Client,
                Some("premium"),
                Duration::from_secs(60),
            )
            .unwrap();
        let id = keys.authenticate(&headers(&token), Scope::Client).unwrap();
        assert_eq!(id.user, "alice");
        assert_eq!(id.tier.as_deref(), Some("premium"));
        assert_eq!(
            keys.authenticate(&headers(&token), Scope::Agent),
            Err(AuthError::WrongScope {
                need: "agent",
                got: "client"
            })
        );
    }

    #[test]
    fn missing_forged_expired_and_unsigned_tokens_are_rejected() {
        let keys = keys();
        assert_eq!(
            keys.authenticate(&HeaderMap::new(), Scope::Client),
            Err(AuthError::Missing)
        );
        let other = Keys::new(&Secret::new("b".repeat(32)));
        let forged = other
            .issue("alice", Scope::Client, None, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            keys.authenticate(&headers(&forged), Scope::Client),
            Err(AuthError::Invalid)
        );

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expired = Claims {
            sub: "alice".into(),
            scope: Scope::Client,
            tier: None,
            exp: now - 2 * LEEWAY_SECS,
            iat: now - 3600,
            iss: ISSUER.into(),
        };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &keys.encoding).unwrap();
        assert_eq!(
            keys.authenticate(&headers(&expired), Scope::Client),
            Err(AuthError::Expired)
        );

        let claims = format!(r#"{{"sub":"alice","scope":"client","exp":{}}}"#, now + 600);
        let unsigned = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(claims.as_bytes())
        );
        assert_eq!(
            keys.authenticate(&headers(&unsigned), Scope::Client),
            Err(AuthError::Invalid)
        );

        for garbage in ["x", "a.b.c", "Bearer", &"A".repeat(MAX_TOKEN_BYTES + 1)] {
            assert_eq!(
                keys.authenticate(&headers(garbage), Scope::Client),
                Err(AuthError::Invalid)
            );
        }
    }

    #[test]
    fn only_bearer_scheme_counts() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            "Basic YWxpY2U6cHc=".parse().unwrap(),
        );
        assert_eq!(bearer_token(&h), None);
        h.insert(http::header::AUTHORIZATION, "bearer  tok ".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("tok"));
    }
}
