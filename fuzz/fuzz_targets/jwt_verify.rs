//! JWT verification (`Keys::verify`) on what an attacker controls: any string as a bearer
//! token, a valid token with bytes changed, and claims of any shape under a valid signature
//! (an identity provider's tokens carry claims the relay did not choose).
//!
//! Never panics; never accepts a string that is not a token this relay signed; never accepts a
//! changed token; accepts signed claims only with a user and a cloudllm scope.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use cloudllm_proto::Secret;
use cloudllm_relay::{Keys, Scope, Scopes};
use jsonwebtoken::{EncodingKey, Header};
use libfuzzer_sys::fuzz_target;

/// The relay secret of this target (any 32+ bytes).
const SECRET: &str = "fuzz-secret-fuzz-secret-fuzz-secret-0123";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys::new(&Secret::new(SECRET)))
}

/// A valid client token of this relay, valid for a day (longer than any fuzzing run).
fn valid_token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        keys()
            .issue(
                "alice",
                Scope::Client,
                Some("free"),
                Duration::from_secs(86_400),
            )
            .expect("a token")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    runtime().block_on(async {
        match mode % 3 {
            // Anything at all as the token.
            0 => {
                let token = String::from_utf8_lossy(rest);
                if token != valid_token() {
                    assert!(
                        keys().verify(&token).await.is_err(),
                        "accepted a token it never signed: {token:?}"
                    );
                }
            }
            // The valid token with bytes replaced: pairs of (position, new byte).
            1 => {
                let mut token = valid_token().as_bytes().to_vec();
                for edit in rest.chunks_exact(2) {
                    let at = usize::from(edit[0]) * token.len() / 256;
                    token[at] = edit[1];
                }
                let token = String::from_utf8_lossy(&token);
                assert!(
                    keys().verify(valid_token()).await.is_ok(),
                    "the valid token itself must verify"
                );
                if token != valid_token() {
                    assert!(
                        keys().verify(&token).await.is_err(),
                        "accepted a changed token: {token:?}"
                    );
                }
            }
            // Any JSON claims, correctly signed.
            _ => {
                let Ok(claims) = serde_json::from_slice::<serde_json::Value>(rest) else {
                    return;
                };
                let key = EncodingKey::from_secret(SECRET.as_bytes());
                let Ok(token) = jsonwebtoken::encode(&Header::default(), &claims, &key) else {
                    return;
                };
                if let Ok(claims) = keys().verify(&token).await {
                    assert!(!claims.sub.is_empty(), "accepted a token naming nobody");
                    assert_ne!(
                        claims.scope,
                        Scopes::default(),
                        "accepted a token without scope"
                    );
                }
            }
        }
    });
});
