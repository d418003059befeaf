//! Who is calling: verification of the JWT bearer tokens every request and tunnel carries.
//!
//! What a token says (user, scopes, tier claim) is `claims`; minting the relay's own tokens is
//! `issue`. This module checks that a token is genuine and current.
//!
//! Two kinds of key verify tokens, chosen by the token's header `alg` among algorithms pinned
//! by the config, never by the token alone:
//! - `HS256`: the relay's own secret (its self-issued tokens, Supabase's legacy JWT secret).
//! - the `[jwks]` algorithms (RS256, ES256, EdDSA …): the identity provider's key named by the
//!   token's `kid`, plus the configured issuer and audience.
//!
//! Anything else — `alg: none`, an HS256 token when the relay has no secret, an HS256 token
//! "signed" with a provider's public key, an algorithm not configured — is refused.
//!
//! Every token, whatever its key, then passes the same checks: `exp` (required) and `nbf` (when
//! present) within [`LEEWAY_SECS`] of the relay's clock; no `crit` header (the relay implements
//! no JWS extension, and RFC 7515 §4.1.11 says a token that names one its reader does not
//! understand is invalid); and a `sub` that is 1 to [`MAX_SUBJECT_BYTES`] bytes without control
//! characters, because the user id is written into logs and the audit log.

mod cache;
mod claims;
mod issue;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use cloudllm_proto::Secret;
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};

use crate::jwks::{Jwks, JwksKey};
pub use claims::{ClaimRules, Claims, Identity, MAX_SUBJECT_BYTES, Scope, Scopes, valid_subject};
pub use issue::ISSUER;

/// Clock skew tolerated on `exp` and `nbf`, in seconds: 30 s covers ordinary NTP drift without
/// keeping expired tokens alive for long.
pub const LEEWAY_SECS: u64 = 30;

/// Longest token accepted, in bytes. Real tokens are a few hundred bytes (an identity
/// provider's, with its claims, one or two KiB); the cap bounds the work an attacker can make
/// the relay do per request.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

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
    /// The token's `nbf` lies in the future.
    #[error(
        "token not valid yet (its `nbf` is in the future): check the clock of the machine that made it"
    )]
    NotYetValid,
    /// The token's header names critical extensions (`crit`); the relay implements none.
    #[error(
        "invalid token: its header marks extensions as critical (`crit`), and this relay implements none"
    )]
    CriticalExtension,
    /// The token's `sub` cannot be a user id.
    #[error(
        "invalid token: its subject (`sub`) must be 1 to {max} bytes with no control characters",
        max = MAX_SUBJECT_BYTES
    )]
    BadSubject,
    /// The token is malformed, forged, or signed with another key.
    #[error("invalid token")]
    Invalid,
    /// A valid token with the wrong scope.
    #[error(
        "this is {} token; this endpoint needs {} token",
        with_article(.got),
        with_article(.need)
    )]
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

/// `agent` → "an agent", `client` → "a client".
fn with_article(word: &str) -> String {
    let vowel = word.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {word}", if vowel { "an" } else { "a" })
}

/// Whether verifying a token may fetch the identity provider's key set when the token names a
/// key the relay has not seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFetch {
    /// It may (rate-limited; see [`crate::jwks`]).
    Allowed,
    /// Cached keys only: for callers over their failure budget, whose made-up key ids should
    /// cost nothing.
    CachedOnly,
}

/// The checks every token passes, whatever its key: `exp` required, `exp` and `nbf` checked
/// with [`LEEWAY_SECS`] of leeway, `sub` required. The audience is the caller's to add (the
/// relay's own tokens carry none).
fn validation(alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation
}

/// The relay's own HS256 secret, for verifying and minting.
struct SecretKeys {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

/// Verifies tokens with the relay's secret and/or an identity provider's keys, and issues
/// tokens with the secret.
pub struct Keys {
    secret: Option<SecretKeys>,
    jwks: Option<Arc<Jwks>>,
    rules: ClaimRules,
    /// Tokens that verified, so that the next request with the same one skips the signature.
    verified: cache::VerifiedTokens,
}

impl Keys {
    /// Keys from the relay's secret alone.
    pub fn new(secret: &Secret) -> Self {
        Keys::verifying(Some(secret), None)
    }

    /// Keys from the relay's secret, an identity provider's key set, or both. With neither,
    /// every token is refused.
    pub fn verifying(secret: Option<&Secret>, jwks: Option<Arc<Jwks>>) -> Self {
        let secret = secret.map(|secret| {
            let bytes = secret.expose().as_bytes();
            SecretKeys {
                decoding: DecodingKey::from_secret(bytes),
                encoding: EncodingKey::from_secret(bytes),
                validation: validation(Algorithm::HS256),
            }
        });
        Keys {
            secret,
            jwks,
            rules: ClaimRules {
                tier_path: "tier".to_owned(),
                implicit_scopes: Scopes::default(),
            },
            verified: cache::VerifiedTokens::default(),
        }
    }

    /// These keys, reading claims by `rules`.
    pub fn with_rules(mut self, rules: ClaimRules) -> Self {
        self.rules = rules;
        self
    }

    /// Verifies the bearer token in `headers` and checks that it has scope `need`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        need: Scope,
    ) -> Result<Identity, AuthError> {
        self.authenticate_with(headers, need, KeyFetch::Allowed)
            .await
    }

    /// [`Keys::authenticate`], fetching the identity provider's keys only if `fetch` allows.
    pub async fn authenticate_with(
        &self,
        headers: &HeaderMap,
        need: Scope,
        fetch: KeyFetch,
    ) -> Result<Identity, AuthError> {
        let token = bearer_token(headers).ok_or(AuthError::Missing)?;
        let claims = self.verify_with(token, fetch).await?;
        if !claims.scope.has(need) {
            return Err(AuthError::WrongScope {
                need: need.as_str(),
                got: claims.scope.words(),
            });
        }
        Ok(Identity {
            tier: claims.string_at(&self.rules.tier_path).map(str::to_owned),
            user: claims.sub,
            expires_at: claims.exp,
        })
    }

    /// Verifies a token's signature, expiry and claims with the key its pinned algorithm
    /// selects. May fetch the identity provider's key set once when the token names a key the
    /// relay has not seen (rate-limited; see [`crate::jwks`]).
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_with(token, KeyFetch::Allowed).await
    }

    /// [`Keys::verify`], fetching the identity provider's keys only if `fetch` allows. A token
    /// that verified in the last minute is taken from the cache (see [`cache`] for why that is
    /// safe), within its `exp` and `nbf`.
    pub async fn verify_with(&self, token: &str, fetch: KeyFetch) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid);
        }
        let now = unix_now();
        let hash = cache::hash(token);
        let current_key = |kid: &str| self.jwks.as_ref().and_then(|jwks| jwks.cached(kid));
        if let Some(claims) = self.verified.lookup(&hash, now, current_key) {
            return Ok(claims);
        }
        let (claims, key) = self.verify_uncached(token, fetch).await?;
        self.verified.insert(hash, &claims, key, now);
        Ok(claims)
    }

    /// Verifies a token in full: its claims, and the provider key that verified it (`None` for
    /// the relay's secret).
    async fn verify_uncached(
        &self,
        token: &str,
        fetch: KeyFetch,
    ) -> Result<(Claims, Option<(String, Arc<JwksKey>)>), AuthError> {
        // Only the algorithm and key id are read from the unverified header, and only to pick
        // among keys and algorithms the configuration already allows; `crit` is read to refuse.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        if header.crit.is_some() {
            return Err(AuthError::CriticalExtension);
        }
        let (claims, used) = match (header.alg, &self.secret, &self.jwks) {
            (Algorithm::HS256, Some(secret), _) => {
                (decode(token, &secret.decoding, &secret.validation)?, None)
            }
            (alg, _, Some(jwks)) if jwks.algorithms.contains(&alg) => {
                let kid = header.kid.as_deref().ok_or(AuthError::Invalid)?;
                let key = match fetch {
                    KeyFetch::Allowed => jwks.key(kid).await,
                    KeyFetch::CachedOnly => jwks.cached(kid),
                };
                let key = key.ok_or(AuthError::Invalid)?;
                if key.algorithm.is_some_and(|bound| bound != alg) {
                    return Err(AuthError::Invalid);
                }
                let mut validation = validation(alg);
                validation.validate_aud = true;
                validation.set_audience(&[&jwks.audience]);
                validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
                let claims = decode(token, &key.decoding, &validation)?;
                // Compared here rather than by the library, to forgive a trailing `/`.
                if claims.iss.trim_end_matches('/') != jwks.issuer {
                    return Err(AuthError::Invalid);
                }
                (claims, Some((kid.to_owned(), key)))
            }
            _ => return Err(AuthError::Invalid),
        };
        // Without a subject it names nobody; without a cloudllm scope it is some other
        // application's token (an ID token, an API token from the same provider) unless the
        // configuration grants scopes to every token of its provider.
        let mut claims = claims;
        if claims.scope == Scopes::default() {
            claims.scope = self.rules.implicit_scopes;
        }
        if !valid_subject(&claims.sub) {
            return Err(AuthError::BadSubject);
        }
        if claims.scope == Scopes::default() {
            return Err(AuthError::Invalid);
        }
        Ok((claims, used))
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it, which no token outlives).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn decode(token: &str, key: &DecodingKey, validation: &Validation) -> Result<Claims, AuthError> {
    jsonwebtoken::decode::<Claims>(token, key, validation)
        .map(|data| data.claims)
        .map_err(|err| match err.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            _ => AuthError::Invalid,
        })
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
