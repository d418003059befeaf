//! What the daemon reads from a token without verifying it: the user and tier it shows in
//! `status`, the expiry it refreshes before, and the scope and expiry a login checks (see
//! `preflight`). Only the relay, which holds the keys, decides whether the token is genuine.

use base64::Engine;
use serde::Deserialize;

/// The claims the daemon reads; read from the token without verifying it (the relay verifies).
#[derive(Debug, Deserialize)]
pub(super) struct ShownClaims {
    /// The user.
    pub(super) sub: Option<String>,
    /// The user's tier, when the token names one at the top level.
    pub(super) tier: Option<String>,
    /// Expiry, Unix seconds.
    pub(super) exp: Option<u64>,
    /// What the token may do: a space-separated string or an array of them, as the relay
    /// reads it. Kept loose so that an odd value here never hides the other claims.
    #[serde(default)]
    scope: Option<serde_json::Value>,
}

impl ShownClaims {
    /// Whether the token's scope names `word` (`agent`, `client`).
    pub(super) fn has_scope(&self, word: &str) -> bool {
        let names = |text: &str| text.split_whitespace().any(|w| w == word);
        match &self.scope {
            Some(serde_json::Value::String(words)) => names(words),
            Some(serde_json::Value::Array(list)) => {
                list.iter().any(|item| item.as_str().is_some_and(names))
            }
            _ => false,
        }
    }
}

/// A JWT's claims (its middle part), unverified; `None` for anything that is not a JWT with a
/// JSON payload.
pub(super) fn unverified_claims(token: &str) -> Option<ShownClaims> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_read_from_a_jwt_and_garbage_gives_none() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"alice","tier":"premium","exp":5}"#);
        let claims = unverified_claims(&format!("h.{payload}.s")).unwrap();
        assert_eq!(claims.sub.as_deref(), Some("alice"));
        assert_eq!(claims.tier.as_deref(), Some("premium"));
        assert_eq!(claims.exp, Some(5));
        assert!(unverified_claims("opaque-token").is_none());
        assert!(unverified_claims("a.!!!.c").is_none());
        assert!(
            unverified_claims(&format!("h.{payload}.s.x.y")).is_none(),
            "five parts: an encrypted token, which the relay does not take"
        );
    }

    #[test]
    fn scopes_are_read_as_the_relay_reads_them() {
        let claims = |json: &str| {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
            unverified_claims(&format!("h.{payload}.s")).unwrap()
        };
        assert!(claims(r#"{"scope":"agent"}"#).has_scope("agent"));
        assert!(!claims(r#"{"scope":"client"}"#).has_scope("agent"));
        assert!(claims(r#"{"scope":"openid  agent client"}"#).has_scope("client"));
        assert!(claims(r#"{"scope":["openid","agent"]}"#).has_scope("agent"));
        assert!(!claims(r#"{"scope":["agents"]}"#).has_scope("agent"));
        let odd = claims(r#"{"sub":"alice","scope":7}"#);
        assert!(!odd.has_scope("agent"));
        assert_eq!(
            odd.sub.as_deref(),
            Some("alice"),
            "an odd scope hides nothing else"
        );
    }
}
