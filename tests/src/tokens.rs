//! Tokens made by hand for tests of what the relay accepts: any claims under any header, signed
//! with the test relay's secret, so that only the claims or the header make a token invalid.
//! Valid tokens come from [`crate::token`], which issues them the way the relay does.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::SECRET;

/// Now, in Unix seconds, as token claims count time.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Signs `claims` under `header` with the test relay's secret.
pub fn sign_with_header(header: &jsonwebtoken::Header, claims: &serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(header, claims, &key).expect("signing")
}

/// Signs `claims` with the test relay's secret under the relay's own algorithm (HS256).
pub fn sign(claims: &serde_json::Value) -> String {
    sign_with_header(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
    )
}
