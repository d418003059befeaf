//! The relay's end of a tunnel: admit the daemon, upgrade to a WebSocket, and hand the tunnel
//! to the task that runs it.
//!
//! The token is checked before the upgrade, so a bad token gets a plain HTTP 401 and never a
//! WebSocket; so are the device headers, the tier's device limit and the user's bound on open
//! tunnels, each refused with a status and a message that says what to do. The tunnel itself:
//! - [`hello`] reads and checks the daemon's hello (and escapes what reaches a log),
//! - [`running`] keeps the device registered for as long as the tunnel lives and runs a
//!   session over it whenever requests need one, until it closes or is drained,
//! - [`lane`] serves a busy tunnel's lanes: more connections of the same daemon, one per relay
//!   thread, each with a session of its own (the upgrade names its tunnel's key and thread).
//!
//! One device id has one tunnel: a newer tunnel with the same user and device id takes the
//! older one's place in the registry (see [`running`]). Every tunnel, whatever its state, holds
//! one of its user's [`TUNNELS_PER_DEVICE`] × `devices` slots from before the upgrade to its end.

mod hello;
mod lane;
mod running;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use cloudllm_proto as proto;
use cloudllm_tunnel::{Link, ReadAhead};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{Instrument, info, info_span, warn};

use crate::admission::Caller;
use crate::auth::{AuthError, Scope};
use crate::limits::{Limit, Refusal};
use crate::{AppState, Denied};
use hello::escaped;

/// Time for the WebSocket upgrade and for the hello: 10 s is generous on any
/// network and stops half-open tunnels from holding memory.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Open tunnels a user may hold per device the tier allows: each device's live tunnel plus one
/// replacing it (a daemon that renews its token opens the new tunnel before it lets the old one
/// go, and a daemon that lost its network redials before the relay notices the old tunnel is
/// dead). Handshaking tunnels and replaced ones still closing count too.
pub const TUNNELS_PER_DEVICE: usize = 2;

/// Longest wait armed for a token's expiry: no tunnel lives ten years, and the cap keeps the
/// deadline arithmetic far from overflow whatever `exp` a token carries.
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `GET /tunnel`: a daemon opens its tunnel.
pub async fn accept(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let addr = state.client_addr(&req);
    let deny = |denied: Denied| match denied {
        Denied::Limited(refusal) => limited(&state, None, addr, &refusal),
        Denied::Auth(err) => {
            warn!(reason = %escaped(&err.to_string()), "tunnel refused");
            plain(err.status(), &err.to_string())
        }
    };
    let Caller {
        identity,
        tier_name,
        tier,
    } = match state
        .admit(req.headers(), addr, Scope::Agent, "tunnel")
        .await
    {
        Ok(caller) => caller,
        Err(denied) => return deny(denied),
    };
    let max_devices = tier.devices as usize;
    // A token still inside the verification leeway but past its tunnel grace would open a
    // tunnel only to have it closed at once.
    let Some(lifetime) = token_lifetime(identity.expires_at, state.config.token_grace) else {
        return deny(state.auth_failed(addr, "tunnel", AuthError::Expired));
    };
    let expiry = tokio::time::Instant::now() + lifetime;
    let (device_id, device_name) = match device_headers(req.headers()) {
        Ok(device) => device,
        Err(message) => return plain(StatusCode::BAD_REQUEST, &message),
    };
    if let Some(lane) = req.headers().get(proto::HEADER_LANE) {
        let (device, shard) = match lane::find(&state, &identity.user, &device_id, lane) {
            Ok(found) => found,
            Err((status, message)) => return plain(status, &message),
        };
        let (accept_key, on_upgrade) = match websocket(&mut req) {
            Ok(websocket) => websocket,
            Err(message) => return plain(StatusCode::BAD_REQUEST, message),
        };
        let span = info_span!(
            "lane",
            user = %escaped(&identity.user),
            device = %escaped(&device.name),
            shard
        );
        let run = lane::run(state.clone(), device, shard, on_upgrade);
        state.tasks.spawn(run.instrument(span));
        return switching_protocols(accept_key);
    }
    let others = state.device_others(&identity.user, &device_id).await;
    if others.len() >= max_devices {
        let refusal = device_limit(tier_name, max_devices, &others);
        return limited(&state, Some(&identity.user), addr, &refusal);
    }
    let (accept_key, on_upgrade) = match websocket(&mut req) {
        Ok(websocket) => websocket,
        Err(message) => return plain(StatusCode::BAD_REQUEST, message),
    };
    // Counted from here to the task's end, whatever becomes of the tunnel.
    let max_tunnels = max_devices.saturating_mul(TUNNELS_PER_DEVICE);
    let slot = match state.registry.open_tunnel(&identity.user, max_tunnels) {
        Ok(slot) => (slot, state.metrics.tunnel_open()),
        Err(open) => {
            let refusal = tunnel_limit(tier_name, max_devices, open);
            return limited(&state, Some(&identity.user), addr, &refusal);
        }
    };

    let span = info_span!(
        "tunnel",
        user = %escaped(&identity.user),
        device = %escaped(&device_name)
    );
    let task_state = state.clone();
    state.tasks.spawn(
        async move {
            let _slot = slot;
            let upgraded = match tokio::time::timeout(HANDSHAKE_TIMEOUT, on_upgrade).await {
                Ok(Ok(upgraded)) => upgraded,
                Ok(Err(err)) => return warn!(error = %err, "upgrade failed"),
                Err(_) => return warn!("upgrade timed out"),
            };
            let device = (identity.user, device_id, device_name);
            let io = TokioIo::new(upgraded);
            match running::run(task_state, io, device, max_devices, expiry, addr).await {
                Ok(()) => info!("tunnel closed"),
                Err(err) => info!(error = %escaped(&format!("{err:#}")), "tunnel closed"),
            }
        }
        .instrument(span),
    );
    switching_protocols(accept_key)
}

/// The accept key and the upgrade of a request that asks for a WebSocket; else why not.
fn websocket(req: &mut Request) -> Result<(HeaderValue, hyper::upgrade::OnUpgrade), &'static str> {
    let accept_key = websocket_key(req.headers())?;
    let on_upgrade = req
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or("connection cannot be upgraded")?;
    Ok((accept_key, on_upgrade))
}

/// The answer that upgrades the connection to a WebSocket.
fn switching_protocols(accept_key: HeaderValue) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept_key);
    response
}

/// A tunnel's connection as its WebSocket reads it: small reads, large ones in a burst.
type TunnelIo = ReadAhead<TokioIo<hyper::upgrade::Upgraded>>;

/// The relay's end of a tunnel's WebSocket.
type TunnelLink = Link<TunnelIo>;

/// How long a tunnel opened now with a token expiring at `expires_at` (seconds since the Unix
/// epoch) may live: until the expiry plus `grace`. `None` if that moment has passed.
fn token_lifetime(expires_at: u64, grace: Duration) -> Option<Duration> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    let end = Duration::from_secs(expires_at).saturating_add(grace);
    let left = end.checked_sub(now).filter(|left| !left.is_zero())?;
    Some(left.min(MAX_TOKEN_WAIT))
}

/// The refusal of a device over its user's device limit.
fn device_limit(tier: &str, max: usize, others: &[String]) -> Refusal {
    Refusal {
        limit: Limit::Devices,
        // A minute: devices come and go on human time scales.
        retry_after: Duration::from_secs(60),
        message: format!(
            "device limit reached: the {tier} tier allows {max} connected device{} and {} {} connected ({}). \
             Disconnect one (`cloudllm disconnect` on it) or upgrade your plan",
            if max == 1 { "" } else { "s" },
            others.len(),
            if others.len() == 1 { "is" } else { "are" },
            others.join(", ")
        ),
    }
}

/// The refusal of a tunnel over its user's bound of open tunnels.
fn tunnel_limit(tier: &str, max_devices: usize, open: usize) -> Refusal {
    Refusal {
        limit: Limit::Devices,
        // An idle replaced tunnel closes within a second; a busy one within REPLACED_GRACE.
        retry_after: Duration::from_secs(10),
        message: format!(
            "too many tunnels: the {tier} tier allows {max_devices} connected device{} and {open} \
             tunnels of your account are open or opening (a replaced tunnel counts until its \
             requests have finished). Stop the daemons you do not use, or retry later",
            if max_devices == 1 { "" } else { "s" },
        ),
    }
}

/// Answers a tunnel request refused by a limit: 429 with `Retry-After`, counted and audited.
fn limited(
    state: &AppState,
    user: Option<&str>,
    addr: Option<IpAddr>,
    refusal: &Refusal,
) -> Response {
    warn!(limit = refusal.limit.as_str(), "tunnel refused by a limit");
    state.too_many(refusal, user, addr, "tunnel", plain)
}

/// The device id and name from the upgrade request's headers.
fn device_headers(headers: &HeaderMap) -> Result<(String, String), String> {
    let field = |name: &str| -> Result<String, String> {
        let value = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| proto::valid_device_field(v))
            .ok_or_else(|| format!("missing or invalid {name} header"))?;
        Ok(value.to_owned())
    };
    let version = headers
        .get(proto::HEADER_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    if version != Some(proto::PROTOCOL_VERSION) {
        return Err(format!(
            "unsupported tunnel protocol {version:?}: this relay speaks {}; upgrade cloudllmd",
            proto::PROTOCOL_VERSION
        ));
    }
    Ok((
        field(proto::HEADER_DEVICE_ID)?,
        field(proto::HEADER_DEVICE_NAME)?,
    ))
}

/// Checks the WebSocket upgrade headers (RFC 6455 §4.2.1) and returns the accept key.
fn websocket_key(headers: &HeaderMap) -> Result<HeaderValue, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err("this endpoint takes a WebSocket upgrade");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err("unsupported WebSocket version (need 13)");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("missing Sec-WebSocket-Key")?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|_| "bad Sec-WebSocket-Key")
}

fn plain(status: StatusCode, message: &str) -> Response {
    let mut response = (status, format!("{message}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn a_tunnel_lives_until_its_token_expiry_plus_grace() {
        let grace = Duration::from_secs(60);
        let left = token_lifetime(now() + 100, grace).unwrap();
        assert!(left > Duration::from_secs(158) && left <= Duration::from_secs(160));
        // Expired, but within the grace: a short life.
        let left = token_lifetime(now() - 30, grace).unwrap();
        assert!(left <= Duration::from_secs(30));
        // Past the grace: no tunnel at all.
        assert_eq!(token_lifetime(now() - 61, grace), None);
        assert_eq!(token_lifetime(now(), Duration::ZERO), None);
        // Absurd expiries neither overflow nor refuse.
        assert_eq!(token_lifetime(u64::MAX, grace), Some(MAX_TOKEN_WAIT));
    }
}
