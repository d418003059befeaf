//! Tokens already verified, so that a client sending the same token on every request pays for
//! its signature once a minute rather than on each request.
//!
//! Why this is safe: the token string is the credential. Verifying it is a pure function of its
//! bytes, the key and the clock; the same bytes checked with the same key give the same claims.
//! So the cache is keyed by the SHA-256 of the whole token (a token that differs in any byte,
//! e.g. the same claims with a forged signature, misses and is verified in full), holds only
//! tokens that passed every check, and still checks what depends on the clock on every use: an
//! entry lasts until the token's `exp` (with the same [`LEEWAY_SECS`](super::LEEWAY_SECS)),
//! and one whose `nbf` lies ahead again (a clock stepped back) misses; a miss is verified in
//! full, which says why a token is refused. What depends on the
//! key is checked too: an entry of a provider-signed token remembers the key that verified it
//! and counts only while the identity provider's key set still holds that very key (a
//! rotation or a refresh that drops it makes the entry miss); the relay's own secret lives as
//! long as the [`Keys`](super::Keys) holding this cache, so a new secret means a new, empty
//! cache. Entries also expire after [`TTL_SECS`] whatever their token says, and the cache holds
//! at most [`CAPACITY`] of them, so a flood of distinct valid tokens costs bounded memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Claims, LEEWAY_SECS};
use crate::jwks::JwksKey;

/// Longest a verified token is trusted without verifying it again: 60 s, so a change the cache
/// cannot see (a key revoked at the provider before the relay refreshes its key set) takes at
/// most a minute more to apply than without the cache.
pub const TTL_SECS: u64 = 60;

/// Most tokens remembered: 4,096 entries of a few hundred bytes each (≈2 MiB at worst), more
/// than the distinct tokens a relay sees within a minute in ordinary use.
pub const CAPACITY: usize = 4096;

/// SHA-256 of a whole token.
type TokenHash = [u8; 32];

/// One verified token.
struct Entry {
    /// The claims it verified to.
    claims: Claims,
    /// The provider key that verified it; `None` for the relay's own secret.
    key: Option<(String, Arc<JwksKey>)>,
    /// Until when (seconds since the epoch) the entry may be used: the sooner of the token's
    /// expiry with leeway and [`TTL_SECS`] after it was verified.
    until: u64,
}

/// The cache of verified tokens. See the module docs.
#[derive(Default)]
pub(super) struct VerifiedTokens {
    entries: Mutex<HashMap<TokenHash, Entry>>,
}

/// The cache key of a token.
pub(super) fn hash(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

impl VerifiedTokens {
    /// The claims of the token hashed to `hash` if it verified before and still holds at `now`
    /// (its entry not past `until`, its `nbf` not ahead), with `current_key(kid)` still the key
    /// that verified it; `None`: verify it in full.
    pub(super) fn lookup(
        &self,
        hash: &TokenHash,
        now: u64,
        current_key: impl FnOnce(&str) -> Option<Arc<JwksKey>>,
    ) -> Option<Claims> {
        let mut entries = crate::lock(&self.entries);
        let entry = entries.get(hash)?;
        let stale = now > entry.until
            || entry.key.as_ref().is_some_and(|(kid, key)| {
                !current_key(kid).is_some_and(|current| Arc::ptr_eq(&current, key))
            })
            || entry
                .claims
                .other
                .get("nbf")
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECS));
        if stale {
            entries.remove(hash);
            return None;
        }
        Some(entry.claims.clone())
    }

    /// Remembers a token that passed every check at `now`.
    pub(super) fn insert(
        &self,
        hash: TokenHash,
        claims: &Claims,
        key: Option<(String, Arc<JwksKey>)>,
        now: u64,
    ) {
        let until = claims
            .exp
            .saturating_add(LEEWAY_SECS)
            .min(now.saturating_add(TTL_SECS));
        let mut entries = crate::lock(&self.entries);
        if entries.len() >= CAPACITY && !entries.contains_key(&hash) {
            entries.retain(|_, entry| entry.until >= now);
            if entries.len() >= CAPACITY
                && let Some(victim) = entries.keys().next().copied()
            {
                entries.remove(&victim);
            }
        }
        entries.insert(
            hash,
            Entry {
                claims: claims.clone(),
                key,
                until,
            },
        );
    }

    /// How many tokens are remembered.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        crate::lock(&self.entries).len()
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::DecodingKey;

    use super::*;

    /// alice's client claims, expiring at `exp` (Unix seconds).
    fn claims_until(exp: u64) -> Claims {
        serde_json::from_value(serde_json::json!({"sub": "alice", "scope": "client", "exp": exp}))
            .expect("valid claims")
    }

    #[test]
    fn a_cached_token_misses_past_its_exp_and_past_the_ttl() {
        let verified = VerifiedTokens::default();
        let at = 1_000_000;
        let claims = claims_until(at + 10);
        let hash = hash("token");
        verified.insert(hash, &claims, None, at);
        let valid = |now| verified.lookup(&hash, now, |_| None).is_some();
        assert!(valid(at + 10 + LEEWAY_SECS), "within exp's leeway");
        assert!(!valid(at + 10 + LEEWAY_SECS + 1), "past exp and its leeway");

        // A long-lived token is verified again after the TTL.
        let claims = claims_until(at + 86_400);
        verified.insert(hash, &claims, None, at);
        let valid = |now| verified.lookup(&hash, now, |_| None).is_some();
        assert!(valid(at + TTL_SECS));
        assert!(!valid(at + TTL_SECS + 1));
    }

    #[test]
    fn a_cached_provider_token_misses_once_its_key_is_rotated_out() {
        let verified = VerifiedTokens::default();
        let at = 1_000_000;
        let claims = claims_until(at + 600);
        let key = |secret: &str| {
            Arc::new(JwksKey {
                decoding: DecodingKey::from_secret(secret.as_bytes()),
                algorithm: None,
            })
        };
        let (old, new) = (key("old"), key("new"));
        let hash = hash("token");
        let hit =
            |current: Option<Arc<JwksKey>>| verified.lookup(&hash, at, move |_| current).is_some();
        verified.insert(hash, &claims, Some(("k1".to_owned(), old.clone())), at);
        assert!(hit(Some(old.clone())), "the same key still holds");
        // The provider replaced the key under the same id: verify in full (the entry is dropped).
        assert!(!hit(Some(new)));
        verified.insert(hash, &claims, Some(("k1".to_owned(), old.clone())), at);
        // The key set no longer has it at all.
        assert!(!hit(None));
        assert_eq!(verified.len(), 0);
    }

    #[test]
    fn the_cache_holds_at_most_its_capacity() {
        let verified = VerifiedTokens::default();
        let at = 1_000_000;
        let claims = claims_until(at + 600);
        for i in 0..CAPACITY + 10 {
            verified.insert(hash(&i.to_string()), &claims, None, at);
        }
        assert_eq!(verified.len(), CAPACITY);
    }
}
