//! What the daemon reads from a token without verifying it: the user and tier it shows in
//! `status`, and the expiry it refreshes before. Only the relay, which holds the keys, decides
//! whether the token is genuine.

use base64::Engine;
use serde::Deserialize;

/// The claims the daemon shows; read from the token without verifying it (the relay verifies).
#[derive(Debug, Deserialize)]
pub(super) struct ShownClaims {
    pub(super) sub: Option<String>,
    pub(super) tier: Option<String>,
    pub(super) exp: Option<u64>,
}

pub(super) fn unverified_claims(token: &str) -> Option<ShownClaims> {
    let payload = token.split('.').nth(1)?;
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
    }
}
