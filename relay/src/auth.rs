//! Who is calling: verification and issuing of the relay's JWT bearer tokens.
//!
//! `sub` names the user; `scope` says what the token may do: `agent` tokens open a tunnel for a
//! device, `client` tokens send API requests to that user's devices. The relay's own tokens
//! carry one scope (`"scope": "agent"`); an identity provider's carry a space-separated list
//! (`"openid agent client"`) or an array, and a token has every scope its list names.
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

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudllm_proto::Secret;
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::jwks::Jwks;

/// Issuer written into the tokens this relay mints.
pub const ISSUER: &str = "cloudllm-relay";

/// Clock skew tolerated on `exp` and `nbf`, in seconds: 30 s covers ordinary NTP drift without
/// keeping expired tokens alive for long.
pub const LEEWAY_SECS: u64 = 30;

/// Longest user id (`sub`) accepted, in bytes: 256. Identity providers' subjects are UUIDs or
/// `provider|id` strings of a few dozen bytes (an e-mail address, at most 254); the bound keeps
/// every log line and audit record that names the user small.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// Longest token accepted, in bytes. Real tokens are a few hundred bytes (an identity
/// provider's, with its claims, one or two KiB); the cap bounds the work an attacker can make
/// the relay do per request.
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

/// The cloudllm scopes a token carries. On the wire it is the `scope` claim: a space-separated
/// string (OAuth 2.0's form, RFC 8693 §4.2) or an array of strings; scopes other than `agent`
/// and `client` (`openid`, `offline_access` …) are ignored. Serialized as the string form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes {
    agent: bool,
    client: bool,
}

impl Scopes {
    /// Both scopes: the token may open tunnels and send requests.
    pub const ALL: Scopes = Scopes {
        agent: true,
        client: true,
    };

    /// Whether `scope` is among these.
    pub fn has(self, scope: Scope) -> bool {
        match scope {
            Scope::Agent => self.agent,
            Scope::Client => self.client,
        }
    }

    /// Adds the scopes named in a space-separated list.
    fn add_words(&mut self, words: &str) {
        for word in words.split_ascii_whitespace() {
            match word {
                "agent" => self.agent = true,
                "client" => self.client = true,
                _ => {}
            }
        }
    }

    /// The space-separated form.
    fn words(self) -> &'static str {
        match (self.agent, self.client) {
            (true, true) => "agent client",
            (true, false) => "agent",
            (false, true) => "client",
            (false, false) => "",
        }
    }
}

impl From<Scope> for Scopes {
    fn from(scope: Scope) -> Self {
        let mut scopes = Scopes::default();
        scopes.add_words(scope.as_str());
        scopes
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.words())
    }
}

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Words(String),
            List(Vec<String>),
        }
        let mut scopes = Scopes::default();
        match Wire::deserialize(deserializer)? {
            Wire::Words(words) => scopes.add_words(&words),
            Wire::List(list) => list.iter().for_each(|words| scopes.add_words(words)),
        }
        Ok(scopes)
    }
}

/// The claims of a cloudllm token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// What the token may do. A token without `agent` or `client` here is no cloudllm token
    /// and fails verification.
    #[serde(default)]
    pub scope: Scopes,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
    /// Who minted the token.
    #[serde(default)]
    pub iss: String,
    /// Every other claim (`tier`, `app_metadata` …), for the tier claim path.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// The string at a dotted claim path (`tier`, `app_metadata.tier`), if there is one.
    pub fn string_at(&self, path: &str) -> Option<&str> {
        let mut parts = path.split('.');
        let mut value = self.other.get(parts.next()?)?;
        for part in parts {
            value = value.get(part)?;
        }
        value.as_str()
    }
}

/// How claims beyond signature and expiry are read, from the relay's config.
#[derive(Debug, Clone, Default)]
pub struct ClaimRules {
    /// Dotted path of the claim naming the user's tier (`tier`, `app_metadata.tier`).
    pub tier_path: String,
    /// Scopes a verified token has when it names no cloudllm scope. Empty by default: such a
    /// token is some other application's and is refused. An identity provider whose tokens
    /// carry no scopes (Supabase) sets both.
    pub implicit_scopes: Scopes,
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

/// Whether `sub` can name a user in logs and limits: not empty, at most [`MAX_SUBJECT_BYTES`],
/// and free of characters that would break or disguise a log line: control characters
/// (newlines above all), Unicode line and paragraph separators, and bidirectional overrides
/// (which make a line display in another order than it is written).
pub fn valid_subject(sub: &str) -> bool {
    !sub.is_empty()
        && sub.len() <= MAX_SUBJECT_BYTES
        && !sub.chars().any(|c| {
            c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        })
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

    /// [`Keys::verify`], fetching the identity provider's keys only if `fetch` allows.
    pub async fn verify_with(&self, token: &str, fetch: KeyFetch) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid);
        }
        // Only the algorithm and key id are read from the unverified header, and only to pick
        // among keys and algorithms the configuration already allows; `crit` is read to refuse.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        if header.crit.is_some() {
            return Err(AuthError::CriticalExtension);
        }
        let claims = match (header.alg, &self.secret, &self.jwks) {
            (Algorithm::HS256, Some(secret), _) => {
                decode(token, &secret.decoding, &secret.validation)?
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
                claims
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
        Ok(claims)
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JwksConfig;

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

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn scopes(json: &str) -> Scopes {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn scope_lists_name_every_scope_they_contain() {
        assert!(scopes(r#""agent""#).has(Scope::Agent));
        assert!(!scopes(r#""agent""#).has(Scope::Client));
        let both = scopes(r#""openid agent  client offline_access""#);
        assert!(both.has(Scope::Agent) && both.has(Scope::Client));
        let oidc = scopes(r#""openid agent""#);
        assert!(oidc.has(Scope::Agent) && !oidc.has(Scope::Client));
        let array = scopes(r#"["openid", "client"]"#);
        assert!(array.has(Scope::Client) && !array.has(Scope::Agent));
        // Words, not substrings.
        let near = scopes(r#""agents clientele agent:read""#);
        assert_eq!(near, Scopes::default());
        assert_eq!(scopes(r#""""#), Scopes::default());
        assert!(serde_json::from_str::<Scopes>("42").is_err());

        // Issued tokens keep the single-word form.
        assert_eq!(
            serde_json::to_string(&Scopes::from(Scope::Agent)).unwrap(),
            r#""agent""#
        );
        assert_eq!(
            serde_json::to_string(&Scopes::from(Scope::Client)).unwrap(),
            r#""client""#
        );
        assert_eq!(serde_json::to_string(&both).unwrap(), r#""agent client""#);
    }

    #[tokio::test]
    async fn issued_tokens_verify_with_their_scope() {
        let keys = keys();
        let token = keys
            .issue(
                "alice",
                Scope::Client,
                Some("premium"),
                Duration::from_secs(60),
            )
            .unwrap();
        let id = keys
            .authenticate(&headers(&token), Scope::Client)
            .await
            .unwrap();
        assert_eq!(id.user, "alice");
        assert_eq!(id.tier.as_deref(), Some("premium"));
        assert_eq!(
            keys.authenticate(&headers(&token), Scope::Agent).await,
            Err(AuthError::WrongScope {
                need: "agent",
                got: "client"
            })
        );
    }

    #[tokio::test]
    async fn multi_scope_tokens_and_tokens_without_a_cloudllm_scope() {
        let keys = keys();
        let secret = &keys.secret.as_ref().unwrap().encoding;
        let sign = |scope: serde_json::Value| {
            let mut claims = serde_json::json!({"sub": "alice", "exp": now() + 600});
            if !scope.is_null() {
                claims["scope"] = scope;
            }
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, secret).unwrap()
        };
        let both = sign("openid agent client".into());
        for need in [Scope::Agent, Scope::Client] {
            assert!(keys.authenticate(&headers(&both), need).await.is_ok());
        }
        let array = sign(serde_json::json!(["agent"]));
        assert!(
            keys.authenticate(&headers(&array), Scope::Agent)
                .await
                .is_ok()
        );
        let client_only = sign("openid client".into());
        let err = keys
            .authenticate(&headers(&client_only), Scope::Agent)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            AuthError::WrongScope {
                need: "agent",
                got: "client"
            }
        );
        assert_eq!(err.status(), http::StatusCode::FORBIDDEN);
        assert_eq!(
            err.to_string(),
            "this is a client token; this endpoint needs an agent token"
        );
        for none in [
            sign("openid".into()),
            sign("admin".into()),
            sign(serde_json::Value::Null),
        ] {
            let err = keys
                .authenticate(&headers(&none), Scope::Agent)
                .await
                .unwrap_err();
            assert_eq!(err, AuthError::Invalid);
            assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        }
    }

    #[tokio::test]
    async fn missing_forged_expired_and_unsigned_tokens_are_rejected() {
        let keys = keys();
        assert_eq!(
            keys.authenticate(&HeaderMap::new(), Scope::Client).await,
            Err(AuthError::Missing)
        );
        let other = Keys::new(&Secret::new("b".repeat(32)));
        let forged = other
            .issue("alice", Scope::Client, None, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            keys.authenticate(&headers(&forged), Scope::Client).await,
            Err(AuthError::Invalid)
        );

        let now = now();
        let expired = Claims {
            sub: "alice".into(),
            scope: Scope::Client.into(),
            exp: now - 2 * LEEWAY_SECS,
            iat: now - 3600,
            iss: ISSUER.into(),
            other: Default::default(),
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &expired,
            &keys.secret.as_ref().unwrap().encoding,
        )
        .unwrap();
        assert_eq!(
            keys.authenticate(&headers(&expired), Scope::Client).await,
            Err(AuthError::Expired)
        );

        let claims = format!(r#"{{"sub":"alice","scope":"client","exp":{}}}"#, now + 600);
        let unsigned = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(claims.as_bytes())
        );
        assert_eq!(
            keys.authenticate(&headers(&unsigned), Scope::Client).await,
            Err(AuthError::Invalid)
        );

        for garbage in ["x", "a.b.c", "Bearer", &"A".repeat(MAX_TOKEN_BYTES + 1)] {
            assert_eq!(
                keys.authenticate(&headers(garbage), Scope::Client).await,
                Err(AuthError::Invalid)
            );
        }
    }

    /// Signs `claims` with the test secret under `header`.
    fn sign_hs256(header: serde_json::Value, claims: serde_json::Value) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = EncodingKey::from_secret("a".repeat(32).as_bytes());
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{message}.{signature}")
    }

    #[tokio::test]
    async fn nbf_is_checked_on_hs256_tokens_with_the_same_leeway_as_exp() {
        let keys = keys();
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
        let claims = |nbf: u64| serde_json::json!({"sub": "alice", "scope": "client", "exp": now() + 3600, "nbf": nbf});
        let later = sign_hs256(header.clone(), claims(now() + 600));
        let err = keys.verify(&later).await.unwrap_err();
        assert_eq!(err, AuthError::NotYetValid);
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        assert!(err.to_string().contains("nbf"), "{err}");
        // Within the leeway, a clock a little ahead is forgiven; so is any past nbf.
        let skewed = sign_hs256(header.clone(), claims(now() + LEEWAY_SECS / 2));
        assert!(keys.verify(&skewed).await.is_ok());
        let past = sign_hs256(header.clone(), claims(now() - 60));
        assert!(keys.verify(&past).await.is_ok());
        // A nbf that is not a number is no valid token either.
        let garbled = sign_hs256(
            header,
            serde_json::json!({"sub": "alice", "scope": "client", "exp": now() + 3600, "nbf": "soon"}),
        );
        assert_eq!(keys.verify(&garbled).await.unwrap_err(), AuthError::Invalid);
    }

    #[tokio::test]
    async fn tokens_with_critical_header_extensions_are_refused() {
        let keys = keys();
        let claims = serde_json::json!({"sub": "alice", "scope": "client", "exp": now() + 3600});
        let plain = sign_hs256(serde_json::json!({"alg": "HS256"}), claims.clone());
        assert!(keys.verify(&plain).await.is_ok());
        for crit in [
            serde_json::json!({"alg": "HS256", "crit": ["exp-policy"], "exp-policy": 1}),
            serde_json::json!({"alg": "HS256", "crit": ["b64"], "b64": false}),
            serde_json::json!({"alg": "HS256", "crit": []}),
        ] {
            let token = sign_hs256(crit.clone(), claims.clone());
            let err = keys.verify(&token).await.unwrap_err();
            assert_eq!(err, AuthError::CriticalExtension, "{crit}");
            assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        }
        // Not even a list: not a token.
        let token = sign_hs256(serde_json::json!({"alg": "HS256", "crit": "b64"}), claims);
        assert_eq!(keys.verify(&token).await.unwrap_err(), AuthError::Invalid);
    }

    #[tokio::test]
    async fn subjects_that_would_break_a_log_line_are_refused() {
        let keys = keys();
        let header = serde_json::json!({"alg": "HS256"});
        let with_sub = |sub: &str| {
            sign_hs256(
                header.clone(),
                serde_json::json!({"sub": sub, "scope": "client", "exp": now() + 3600}),
            )
        };
        let longest = "u".repeat(MAX_SUBJECT_BYTES);
        for good in [
            "alice",
            "auth0|5f7c8ec7c33c6c004bbafe82",
            "ünïcödé user",
            &longest,
        ] {
            assert_eq!(keys.verify(&with_sub(good)).await.unwrap().sub, good);
        }
        let too_long = "u".repeat(MAX_SUBJECT_BYTES + 1);
        for bad in [
            "alice\nINFO forged line",
            "alice\r",
            "tab\there",
            "nul\0",
            "esc\u{1b}[31m",
            "del\u{7f}",
            "c1\u{85}",
            "line\u{2028}sep",
            "bidi\u{202e}txt.exe",
            "",
            &too_long,
        ] {
            let err = keys.verify(&with_sub(bad)).await.unwrap_err();
            assert_eq!(err, AuthError::BadSubject, "{bad:?}");
            assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
            assert!(err.to_string().contains("`sub`"), "{err}");
        }
        // Nor can the relay mint one.
        let err = keys
            .issue("alice\nbob", Scope::Client, None, Duration::from_secs(60))
            .unwrap_err();
        assert!(err.to_string().contains("control characters"), "{err}");
    }

    #[tokio::test]
    async fn cached_only_verification_never_calls_the_identity_provider() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // A "provider" that counts the connections made to it and answers none.
        let provider = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", provider.local_addr().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = provider.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        let jwks = Jwks::new(&JwksConfig {
            url: url.parse().unwrap(),
            issuer: "https://idp.example.com".into(),
            audience: "cloudllm".into(),
            algorithms: vec![Algorithm::RS256],
            refresh: Duration::from_secs(600),
            refetch_min: Duration::from_millis(1),
        })
        .unwrap();
        let keys = Keys::verifying(None, Some(jwks));
        let claims = format!(r#"{{"sub":"alice","scope":"agent","exp":{}}}"#, now() + 600);
        let token = format!(
            "{}.{}.c2ln",
            b64(br#"{"alg":"RS256","kid":"made-up"}"#),
            b64(claims.as_bytes())
        );
        assert_eq!(
            keys.verify_with(&token, KeyFetch::CachedOnly)
                .await
                .unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no fetch for cached-only");
        assert_eq!(
            keys.verify_with(&token, KeyFetch::Allowed)
                .await
                .unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "an unknown kid fetches once"
        );
    }

    #[tokio::test]
    async fn algorithms_the_config_does_not_pin_are_refused() {
        // A key set at an address where nothing listens: whatever the token says, no key.
        let config = JwksConfig {
            url: "http://127.0.0.1:9/jwks".parse().unwrap(),
            issuer: "https://idp.example.com".into(),
            audience: "cloudllm".into(),
            algorithms: vec![Algorithm::RS256],
            refresh: Duration::from_secs(600),
            refetch_min: Duration::from_secs(600),
        };
        let jwks = Jwks::new(&config).unwrap();
        let hs = keys();
        let self_issued = hs
            .issue("alice", Scope::Agent, None, Duration::from_secs(60))
            .unwrap();

        // Without a secret, HS256 is not an option at all, even with a known-looking kid.
        let jwks_only = Keys::verifying(None, Some(jwks.clone()));
        assert_eq!(
            jwks_only.verify(&self_issued).await.unwrap_err(),
            AuthError::Invalid
        );
        assert!(
            jwks_only
                .issue("alice", Scope::Agent, None, Duration::from_secs(60))
                .is_err()
        );

        // With both, self-issued tokens keep working.
        let both = Keys::verifying(Some(&Secret::new("a".repeat(32))), Some(jwks));
        assert_eq!(both.verify(&self_issued).await.unwrap().sub, "alice");

        let claims = format!(
            r#"{{"sub":"alice","scope":"agent","exp":{},"iss":"https://idp.example.com","aud":"cloudllm"}}"#,
            now() + 600
        );
        for header in [
            r#"{"alg":"none","kid":"k"}"#,
            r#"{"alg":"ES256","kid":"k"}"#,
            r#"{"alg":"HS512","kid":"k"}"#,
            r#"{"alg":"RS256"}"#,
            r#"{"alg":"RS256","kid":"k"}"#,
        ] {
            let token = format!("{}.{}.c2ln", b64(header.as_bytes()), b64(claims.as_bytes()));
            assert_eq!(
                both.verify(&token).await.unwrap_err(),
                AuthError::Invalid,
                "{header}"
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

    #[tokio::test]
    async fn the_tier_comes_from_the_configured_claim_path_and_scopes_may_be_implicit() {
        let secret = Secret::new("a".repeat(32));
        let now = now();
        let encoding = EncodingKey::from_secret(secret.expose().as_bytes());
        // A provider's token: no cloudllm scope, the tier nested in app_metadata.
        let provider_token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({
                "sub": "alice", "exp": now + 60, "role": "authenticated",
                "app_metadata": {"tier": "premium"}, "user_metadata": {"tier": "hacked"}
            }),
            &encoding,
        )
        .unwrap();
        // Without implicit scopes such a token is some other application's.
        assert_eq!(
            Keys::new(&secret)
                .authenticate(&headers(&provider_token), Scope::Client)
                .await,
            Err(AuthError::Invalid)
        );
        let keys = Keys::new(&secret).with_rules(ClaimRules {
            tier_path: "app_metadata.tier".into(),
            implicit_scopes: Scopes::ALL,
        });
        for need in [Scope::Agent, Scope::Client] {
            let id = keys
                .authenticate(&headers(&provider_token), need)
                .await
                .unwrap();
            assert_eq!(id.tier.as_deref(), Some("premium"));
        }
        // A token that names its scopes keeps them: implicit scopes only fill a gap.
        let client_only = keys
            .issue("bob", Scope::Client, None, Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            keys.authenticate(&headers(&client_only), Scope::Agent)
                .await,
            Err(AuthError::WrongScope { .. })
        ));
        // A path that leads nowhere, or to a non-string, means no tier.
        let claims = keys.verify(&provider_token).await.unwrap();
        assert_eq!(claims.string_at("app_metadata"), None);
        assert_eq!(claims.string_at("app_metadata.tier.x"), None);
        assert_eq!(claims.string_at("nothing.here"), None);
    }
}
