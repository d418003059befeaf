//! An identity provider's signing keys (its JSON Web Key Set): fetched, cached and refreshed,
//! so that verifying a token never waits on the network in the common case.
//!
//! The set is fetched in the background at startup (the relay starts even while the provider
//! is down, and says so in the log), again every `refresh`, and on demand when a token names a
//! key id the cache lacks, which is how a provider's key rotation reaches the relay. Fetches are
//! serialized and at most one starts per `refetch_min`, so a stream of tokens with made-up key
//! ids cannot turn the relay into a load generator against the provider. Each successful fetch
//! replaces the whole set: a key the provider withdrew stops verifying after the next fetch. A
//! failed fetch keeps the last good set.
//!
//! Every fetch is bounded: a connect and total timeout, a body size cap (read with the shared
//! bounded reader, so an endless body is cut off at the cap), a key count cap, and TLS through
//! rustls on the `ring` provider with the system's roots. Redirects are followed, a few and
//! never from `https://` to `http://` (see [`redirect_allowed`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use cloudllm_tunnel::body::read_limited;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

use crate::config::JwksConfig;

/// Time for one whole fetch of the key set, body included: 10 s is generous for a document of
/// a few KiB, and bounds how long a token with a new key id waits for it.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for the TCP and TLS connect alone, so an unreachable provider fails fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest key set read, in bytes: real ones are a few KiB (a 4096-bit RSA key is under 1 KiB
/// of JSON); 1 MiB leaves room for certificate chains (`x5c`) and stops an endless body.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Most keys kept from one set: providers publish two or three (current, next, previous); the
/// cap bounds the work of converting a hostile set.
const MAX_KEYS: usize = 100;

/// Redirects followed when fetching the set: a CDN may move it once or twice; more is a loop.
const MAX_REDIRECTS: usize = 3;

/// Whether the key-set fetch follows a redirect to `next`, having requested `previous` (the
/// configured URL first): at most [`MAX_REDIRECTS`], and never from `https://` to `http://`.
/// The set decides which tokens verify, so a set configured behind TLS must not be fetched
/// where anyone on the path could replace it. Following redirects at all is safe otherwise:
/// the fetch carries no credential, and what it brings back is checked like any key set.
fn redirect_allowed(previous: &[Url], next: &Url) -> Result<(), &'static str> {
    // The first URL is the configured one, not a redirect.
    if previous.len() > MAX_REDIRECTS {
        return Err("too many redirects");
    }
    if next.scheme() != "https" && previous.iter().any(|url| url.scheme() == "https") {
        return Err("a redirect from https:// to plain http:// is not followed");
    }
    Ok(())
}

/// A verification key from the set.
pub(crate) struct JwksKey {
    /// The key itself.
    pub(crate) decoding: DecodingKey,
    /// The algorithm the provider bound the key to (`alg` in the JWK), if it said.
    pub(crate) algorithm: Option<Algorithm>,
}

type KeyMap = HashMap<String, Arc<JwksKey>>;

/// The key set of one identity provider, plus what tokens from it must say.
pub struct Jwks {
    url: Url,
    /// The required `iss`, without a trailing `/`.
    pub(crate) issuer: String,
    /// The required `aud`.
    pub(crate) audience: String,
    /// Algorithms accepted with these keys.
    pub(crate) algorithms: Vec<Algorithm>,
    refresh: Duration,
    refetch_min: Duration,
    http: reqwest::Client,
    /// The keys by id. Replaced whole by each successful fetch.
    keys: RwLock<Arc<KeyMap>>,
    /// When the last fetch started. Held for the length of a fetch, so fetches never overlap
    /// and callers that queued behind one see its result instead of fetching again.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    /// A key set for `config`, empty until [`Jwks::run`] or a token fetches it. Refuses a
    /// config that [`JwksConfig::validate`] refuses (an HMAC algorithm above all).
    pub fn new(config: &JwksConfig) -> anyhow::Result<Arc<Jwks>> {
        config.validate().context("in [jwks]")?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::custom(
                |attempt| match redirect_allowed(attempt.previous(), attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(why) => attempt.error(why),
                },
            ))
            .user_agent(concat!("cloudllm-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client for [jwks]")?;
        Ok(Arc::new(Jwks {
            url: config.url.clone(),
            issuer: config.issuer.trim_end_matches('/').to_owned(),
            audience: config.audience.clone(),
            algorithms: config.algorithms.clone(),
            refresh: config.refresh,
            refetch_min: config.refetch_min,
            http,
            keys: RwLock::new(Arc::default()),
            last_fetch: tokio::sync::Mutex::new(None),
        }))
    }

    /// Keeps the set fresh until `shutdown`: fetches it now, then every `refresh` (every
    /// `refetch_min` while the provider cannot be reached).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let ok = {
                let mut last = self.last_fetch.lock().await;
                *last = Some(Instant::now());
                self.fetch().await
            };
            let pause = if ok { self.refresh } else { self.refetch_min };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        debug!("key set refresh stopped");
    }

    /// The key named `kid`; when the set lacks it, fetches the set again first unless a fetch
    /// started less than `refetch_min` ago.
    pub(crate) async fn key(&self, kid: &str) -> Option<Arc<JwksKey>> {
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        {
            let mut last = self.last_fetch.lock().await;
            if last.is_none_or(|at| at.elapsed() >= self.refetch_min) {
                *last = Some(Instant::now());
                debug!("token names an unknown key: fetching the key set again");
                self.fetch().await;
            }
        }
        self.cached(kid)
    }

    /// How many keys the set holds now.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    /// Whether the set holds no key (not fetched yet, or the provider publishes none).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key named `kid` if the cached set has it; never fetches.
    pub(crate) fn cached(&self, kid: &str) -> Option<Arc<JwksKey>> {
        self.current().get(kid).cloned()
    }

    fn current(&self) -> Arc<KeyMap> {
        // A reader or writer that panicked cannot leave the map half-written: it is swapped whole.
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Fetches the set and replaces the cache with it; on failure logs and keeps the old keys.
    /// Whether it succeeded.
    async fn fetch(&self) -> bool {
        match self.download().await {
            Ok(keys) => {
                let count = keys.len();
                if count == 0 {
                    warn!(url = %self.url, "the identity provider's key set has no usable signing key");
                }
                let previous = std::mem::replace(
                    &mut *self
                        .keys
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                    Arc::new(keys),
                );
                let current = self.current();
                let changed = previous.len() != current.len()
                    || current.keys().any(|kid| !previous.contains_key(kid));
                if changed {
                    // Key ids are public (every token carries one): fine to log.
                    let mut kids: Vec<&str> = current.keys().map(String::as_str).collect();
                    kids.sort_unstable();
                    info!(url = %self.url, keys = ?kids, "identity provider keys updated");
                } else {
                    debug!(url = %self.url, keys = count, "identity provider keys unchanged");
                }
                true
            }
            Err(err) => {
                warn!(
                    url = %self.url,
                    error = format!("{err:#}"),
                    kept = self.len(),
                    "could not fetch the identity provider's keys; tokens signed with unknown keys are refused until a fetch succeeds"
                );
                false
            }
        }
    }

    async fn download(&self) -> anyhow::Result<KeyMap> {
        let response = self
            .http
            .get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .context("requesting the key set")?;
        anyhow::ensure!(
            response.status().is_success(),
            "the key set URL answered {}",
            response.status()
        );
        let body = read_limited(reqwest::Body::from(response), MAX_JWKS_BYTES)
            .await
            .context("reading the key set")?;
        parse_key_set(&body)
    }
}

/// The raw set: each key is parsed on its own, so one key of a kind this relay does not know
/// (an encryption key, a new key type) does not hide the others.
#[derive(Deserialize)]
struct RawKeySet {
    keys: Vec<serde_json::Value>,
}

/// The usable signing keys of a JWKS document, by key id.
fn parse_key_set(body: &[u8]) -> anyhow::Result<KeyMap> {
    let set: RawKeySet = serde_json::from_slice(body).context("the key set is not a JWKS")?;
    let mut keys = KeyMap::new();
    for raw in set.keys.into_iter().take(MAX_KEYS) {
        let jwk: Jwk = match serde_json::from_value(raw) {
            Ok(jwk) => jwk,
            Err(err) => {
                debug!(error = %err, "skipping a key that does not parse");
                continue;
            }
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            debug!("skipping a key without a key id");
            continue;
        };
        if let Some(key) = usable_key(&jwk) {
            keys.insert(kid, Arc::new(key));
        } else {
            debug!(kid, "skipping a key that cannot verify signatures");
        }
    }
    Ok(keys)
}

/// A JWK as a verification key, unless it is not for signatures: an encryption key, a
/// symmetric (`oct`) key (a published secret verifies nothing), or an unknown key type.
fn usable_key(jwk: &Jwk) -> Option<JwksKey> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    if matches!(
        jwk.algorithm,
        AlgorithmParameters::OctetKey(_) | AlgorithmParameters::Other(_)
    ) {
        return None;
    }
    let algorithm = match jwk.common.key_algorithm {
        Some(alg) => Some(Algorithm::try_from(alg).ok()?),
        None => None,
    };
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    Some(JwksKey {
        decoding,
        algorithm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_signing_keys_with_ids_are_kept() {
        let body = serde_json::json!({
            "keys": [
                // An Ed25519 key (RFC 8037's example).
                {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "EdDSA",
                 "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
                {"kty": "OKP", "crv": "Ed25519",
                 "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
                {"kty": "OKP", "crv": "Ed25519", "kid": "enc", "use": "enc",
                 "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
                {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
                {"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},
                {"kty": "future", "kid": "new"},
                "not even an object",
            ]
        });
        let keys = parse_key_set(body.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["ed"]);
        assert_eq!(keys["ed"].algorithm, Some(Algorithm::EdDSA));

        assert!(parse_key_set(b"{\"keys\": 1}").is_err());
        assert!(parse_key_set(b"<html>").is_err());
        let many: Vec<_> = (0..MAX_KEYS + 10)
            .map(|i| {
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": i.to_string(),
                "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
            })
            .collect();
        let body = serde_json::json!({ "keys": many });
        assert_eq!(
            parse_key_set(body.to_string().as_bytes()).unwrap().len(),
            MAX_KEYS
        );
    }

    #[test]
    fn redirects_are_few_and_never_leave_tls() {
        let allowed = |previous: &[&str], next: &str| {
            let previous: Vec<Url> = previous.iter().map(|u| Url::parse(u).unwrap()).collect();
            redirect_allowed(&previous, &Url::parse(next).unwrap()).is_ok()
        };
        let (https, http) = ("https://id.example/jwks", "http://127.0.0.1:8080/jwks");
        assert!(allowed(&[https], "https://cdn.example/jwks"));
        assert!(allowed(&[http], "http://127.0.0.1:9/jwks"));
        assert!(allowed(&[http], https));
        assert!(!allowed(&[https], http));
        assert!(!allowed(&[http, https], http));
        assert!(allowed(&[https; MAX_REDIRECTS], https));
        assert!(!allowed(&[https; MAX_REDIRECTS + 1], https));
    }
}
