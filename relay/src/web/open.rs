//! The one-time codes behind `cloudllm open`: `POST /cloudllm/open` with an agent token mints a
//! code, `POST /cloudllm/open/exchange` trades it once for a short-lived client token. In memory
//! only (a code lives a minute); with `[cluster]` also in Redis, so that any node takes it, once
//! (`cluster::open_codes`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::extract::{Request, State};
use axum::response::Response;
use cloudllm_proto as proto;
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{caller, denied, error, json, signed_in};
use crate::auth::Scope;
use crate::{AppState, Denied};

/// How long a one-time code from `cloudllm open` stays valid: the browser opens within a
/// second or two on the same machine; 60 s covers a slow first start of the browser.
pub const OPEN_CODE_TTL: Duration = Duration::from_secs(60);
/// Lifetime of the client token a one-time code buys: a working day. It cannot be refreshed;
/// `cloudllm open` again gives a new one. Short, so a token left in a browser dies soon.
pub const OPEN_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Live codes one user may hold: a person opens the page a few times a minute at most; more
/// would only fill the relay's memory.
const MAX_CODES_PER_USER: usize = 8;
/// Live codes in all, over every user: bounds the table's memory (≈100 bytes each).
const MAX_CODES: usize = 10_000;
/// Length of a one-time code, in random bytes: 256 bits cannot be guessed within its TTL.
const CODE_BYTES: usize = 32;
/// Largest exchange request body: `{"code": "<64 hex>"}` and some room.
const MAX_EXCHANGE_BODY: usize = 1024;

/// The one-time codes of `cloudllm open`, in memory only (they live a minute).
///
/// Why this is safe: the daemon mints a code with its agent token (a credential that already
/// names the user) and opens `RELAY/#open=CODE`. The code is in the URL's fragment, which the
/// browser never sends to any server, so it reaches no access log and no `Referer`; the page
/// removes it from the address bar and history at once. It is 256 random bits, valid for
/// [`OPEN_CODE_TTL`], good for one exchange, and it buys only a client token (no tunnel)
/// that expires after [`OPEN_TOKEN_TTL`]. Wrong codes count against the address's failure
/// budget like bad tokens. No long-lived secret ever travels in a URL.
#[derive(Debug, Default)]
pub struct OpenCodes {
    codes: Mutex<HashMap<String, Pending>>,
}

#[derive(Debug)]
struct Pending {
    user: String,
    tier: Option<String>,
    expires: Instant,
}

/// Why a code was not minted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MintError {
    /// The user holds [`MAX_CODES_PER_USER`] live codes.
    #[error("too many sign-in codes at once: wait a minute and try again")]
    PerUser,
    /// The table holds [`MAX_CODES`].
    #[error("the relay is handing out too many sign-in codes right now: try again in a minute")]
    Full,
}

impl OpenCodes {
    /// A new code for `user` (with their `tier`), valid for [`OPEN_CODE_TTL`] from `now`.
    pub fn mint(&self, user: &str, tier: Option<&str>, now: Instant) -> Result<String, MintError> {
        let mut codes = crate::lock(&self.codes);
        codes.retain(|_, pending| pending.expires > now);
        if codes.len() >= MAX_CODES {
            return Err(MintError::Full);
        }
        if codes.values().filter(|p| p.user == user).count() >= MAX_CODES_PER_USER {
            return Err(MintError::PerUser);
        }
        let mut bytes = [0u8; CODE_BYTES];
        getrandom::fill(&mut bytes).map_err(|_| MintError::Full)?;
        let code: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        codes.insert(
            code.clone(),
            Pending {
                user: user.to_owned(),
                tier: tier.map(str::to_owned),
                expires: now + OPEN_CODE_TTL,
            },
        );
        Ok(code)
    }

    /// Takes `code` if it is live: the user and tier it was minted for. A code works once.
    pub fn take(&self, code: &str, now: Instant) -> Option<(String, Option<String>)> {
        let mut codes = crate::lock(&self.codes);
        let pending = codes.remove(code)?;
        (pending.expires > now).then_some((pending.user, pending.tier))
    }
}

/// The answer of `POST /cloudllm/open` (the daemon reads the same type).
pub type Minted = proto::OpenWebCode;

/// `POST /cloudllm/open` with an agent token (the daemon's): a one-time sign-in code for the
/// page, for `cloudllm open`.
pub(super) async fn mint(
    State(state): State<Arc<AppState>>,
    Extension(codes): Extension<Arc<OpenCodes>>,
    mut req: Request,
) -> Response {
    let identity = match signed_in(&state, &mut req, Scope::Agent).await {
        Ok(identity) => identity,
        Err(refused) => return refused,
    };
    if state.config.secret.is_none() {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "this relay has no signing secret (only [jwks]), so it cannot sign you in from a code: sign in on the page with your identity provider",
        );
    }
    match codes.mint(&identity.user, identity.tier.as_deref(), Instant::now()) {
        Ok(code) => {
            if let Some(cluster) = &state.cluster {
                let tier = identity.tier.as_deref();
                cluster
                    .put_open_code(&code, &identity.user, tier, OPEN_CODE_TTL)
                    .await;
            }
            json(&Minted {
                path: proto::Secret::new(format!("/#open={code}")),
                code: proto::Secret::new(code),
                expires_in: OPEN_CODE_TTL.as_secs(),
            })
        }
        Err(err) => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, &err.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            response
        }
    }
}

/// The body of `POST /cloudllm/open/exchange`.
#[derive(Debug, Deserialize)]
struct ExchangeRequest {
    code: String,
}

/// The answer of `POST /cloudllm/open/exchange`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Exchanged {
    /// A client token for the code's user.
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// `POST /cloudllm/open/exchange` `{"code": "..."}`: trades a live one-time code, once, for a
/// short-lived client token. A wrong code counts as a failed sign-in of the caller's address.
pub(super) async fn exchange(
    State(state): State<Arc<AppState>>,
    Extension(codes): Extension<Arc<OpenCodes>>,
    req: Request,
) -> Response {
    let addr = caller(&state, &req);
    if let Some(refusal) = addr.and_then(|ip| state.limits.blocked(ip)) {
        return denied(&state, addr, Denied::Limited(refusal));
    }
    let body = match axum::body::to_bytes(req.into_body(), MAX_EXCHANGE_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is too large",
            );
        }
    };
    let Ok(ExchangeRequest { code }) = serde_json::from_slice(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"code\": \"...\"}: the code from the page's address",
        );
    };
    // With `[cluster]` Redis decides, so that a code works on any node and once over all of
    // them; this node's own table answers alone without a cluster or while Redis is away.
    let here = codes.take(&code, Instant::now());
    let taken = match &state.cluster {
        Some(cluster) => cluster.take_open_code(&code).await.unwrap_or(here),
        None => here,
    };
    let Some((user, tier)) = taken else {
        return match state.auth_failed(addr, "api", crate::auth::AuthError::Invalid) {
            Denied::Limited(refusal) => denied(&state, addr, Denied::Limited(refusal)),
            Denied::Auth(_) => error(
                StatusCode::UNAUTHORIZED,
                "this sign-in link has expired or was already used: run `cloudllm open` again",
            ),
        };
    };
    match state
        .keys
        .issue(&user, Scope::Client, tier.as_deref(), OPEN_TOKEN_TTL)
    {
        Ok(token) => json(&Exchanged {
            token,
            expires_in: OPEN_TOKEN_TTL.as_secs(),
        }),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the relay could not sign a token",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_work_once_and_expire() {
        let codes = OpenCodes::default();
        let now = Instant::now();
        let code = codes.mint("alice", Some("free"), now).unwrap();
        assert_eq!(code.len(), CODE_BYTES * 2);
        assert_eq!(
            codes.take(&code, now),
            Some(("alice".to_owned(), Some("free".to_owned())))
        );
        assert_eq!(codes.take(&code, now), None, "a code works once");
        let late = codes.mint("alice", None, now).unwrap();
        assert_eq!(codes.take(&late, now + OPEN_CODE_TTL), None, "expired");
        assert_eq!(codes.take("", now), None);
    }

    #[test]
    fn one_user_cannot_fill_the_table() {
        let codes = OpenCodes::default();
        let now = Instant::now();
        for _ in 0..MAX_CODES_PER_USER {
            codes.mint("alice", None, now).unwrap();
        }
        assert_eq!(codes.mint("alice", None, now), Err(MintError::PerUser));
        assert!(codes.mint("bob", None, now).is_ok());
        // Expired codes make room again.
        assert!(codes.mint("alice", None, now + OPEN_CODE_TTL).is_ok());
    }
}
