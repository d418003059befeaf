//! The relay's end of a tunnel: authenticate the daemon, upgrade to a WebSocket, run an
//! HTTP/2 client over it, fetch the daemon's hello, and keep the device registered for as long
//! as the tunnel lives.
//!
//! The token is checked before the upgrade, so a bad token gets a plain HTTP 401 and never a
//! WebSocket. A tunnel lives no longer than its agent token: once the token's `exp` plus
//! `token_grace` has passed, the device leaves the registry and the tunnel is drained. On relay
//! shutdown each tunnel is drained too: the daemon sends GOAWAY, lets in-flight streams finish
//! and reconnects (to the next relay, or with a fresh token) at once.

use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use cloudllm_proto::{self as proto, DeviceEvent, Hello};
use cloudllm_tunnel::WsIo;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::AppState;
use crate::audit::Event;
use crate::auth::{AuthError, Scope};
use crate::client_addr::client_ip;
use crate::limits::{Limit, Refusal};
use crate::registry::Device;

/// Time for the WebSocket upgrade and the HTTP/2 handshake plus hello: 10 s is generous on any
/// network and stops half-open tunnels from holding memory.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait armed for a token's expiry: no tunnel lives ten years, and the cap keeps the
/// deadline arithmetic far from overflow whatever `exp` a token carries.
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `GET /tunnel`: a daemon opens its tunnel.
pub async fn accept(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    let addr = client_ip(peer, req.headers(), &state.config.trusted_proxies);
    if let Some(refusal) = addr.and_then(|ip| state.limits.blocked(ip)) {
        return limited(&state, None, addr, &refusal);
    }
    let refuse = |err: AuthError| {
        warn!(reason = %err, "tunnel refused");
        state.metrics.auth_failed("tunnel");
        state.audit.record(Event::AuthFailure {
            reason: err.to_string(),
            route: "tunnel",
            addr,
        });
        if let Some(refusal) = addr.and_then(|ip| state.limits.auth_failed(ip)) {
            return limited(&state, None, addr, &refusal);
        }
        plain(err.status(), &err.to_string())
    };
    let identity = match state.keys.authenticate(req.headers(), Scope::Agent).await {
        Ok(identity) => identity,
        Err(err) => return refuse(err),
    };
    let (tier_name, tier) = state.config.tier(identity.tier.as_deref());
    let max_devices = tier.devices as usize;
    // A token still inside the verification leeway but past its tunnel grace would open a
    // tunnel only to have it closed at once.
    let Some(lifetime) = token_lifetime(identity.expires_at, state.config.token_grace) else {
        return refuse(AuthError::Expired);
    };
    let expiry = tokio::time::Instant::now() + lifetime;
    let (device_id, device_name) = match device_headers(req.headers()) {
        Ok(device) => device,
        Err(message) => return plain(StatusCode::BAD_REQUEST, &message),
    };
    let others = state.registry.others(&identity.user, &device_id);
    if others.len() >= max_devices {
        let refusal = device_limit(tier_name, max_devices, &others);
        return limited(&state, Some(&identity.user), addr, &refusal);
    }
    let accept_key = match websocket_key(req.headers()) {
        Ok(key) => key,
        Err(message) => return plain(StatusCode::BAD_REQUEST, message),
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return plain(StatusCode::BAD_REQUEST, "connection cannot be upgraded");
    };

    let span = info_span!("tunnel", user = %identity.user, device = %device_name);
    let task_state = state.clone();
    state.tasks.spawn(
        async move {
            let upgraded = match tokio::time::timeout(HANDSHAKE_TIMEOUT, on_upgrade).await {
                Ok(Ok(upgraded)) => upgraded,
                Ok(Err(err)) => return warn!(error = %err, "upgrade failed"),
                Err(_) => return warn!("upgrade timed out"),
            };
            let device = (identity.user, device_id, device_name);
            let io = TokioIo::new(upgraded);
            match run(task_state, io, device, max_devices, expiry, addr).await {
                Ok(()) => info!("tunnel closed"),
                Err(err) => info!(error = format!("{err:#}"), "tunnel closed"),
            }
        }
        .instrument(span),
    );

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept_key);
    response
}

/// Why the relay ends a tunnel that is still up.
#[derive(Debug, Clone, Copy)]
enum Drain {
    /// The relay is shutting down.
    Shutdown,
    /// The agent token's expiry plus `token_grace` has passed.
    TokenExpired,
}

/// Runs one upgraded tunnel until it closes, the relay drains it, or `expiry` passes.
async fn run(
    state: Arc<AppState>,
    io: TokioIo<hyper::upgrade::Upgraded>,
    (user, id, name): (String, String, String),
    max_devices: usize,
    expiry: tokio::time::Instant,
    addr: Option<IpAddr>,
) -> anyhow::Result<()> {
    // Boxed: the handshake's state (WebSocket and HTTP/2 setup, the hello) lives on the heap
    // while it runs and is freed after, so an idle tunnel's task keeps only what it waits on.
    let Opened {
        device,
        mut connection,
        daemon_version,
    } = Box::pin(open(&state, io, (user, id, name))).await?;
    // Checked again here: another tunnel of the same user may have come up meanwhile.
    if let Err(others) = state.registry.insert(device.clone(), max_devices) {
        state.metrics.limited(Limit::Devices);
        anyhow::bail!(
            "device limit reached while connecting ({} connected: {})",
            others.len(),
            others.join(", ")
        );
    }
    tokio::spawn(follow_events(Arc::downgrade(&device)).in_current_span());
    info!(%daemon_version, models = device.models().len(), "tunnel up");
    state.audit.record(Event::TunnelConnect {
        user: device.user.clone(),
        device: device.name.clone(),
        device_id: device.id.clone(),
        addr,
    });
    let mut audited = Disconnect {
        audit: state.audit.clone(),
        device: device.clone(),
        since: tokio::time::Instant::now(),
        reason: "closed",
    };

    let ended = tokio::select! {
        ended = &mut connection => Ok(ended),
        () = state.shutdown.cancelled() => Err(Drain::Shutdown),
        () = tokio::time::sleep_until(expiry) => Err(Drain::TokenExpired),
    };
    state.registry.remove(&device);
    let ended = match ended {
        Ok(ended) => ended,
        Err(reason) => {
            audited.reason = match reason {
                Drain::Shutdown => "relay shutdown",
                Drain::TokenExpired => "token expired",
            };
            if let Drain::TokenExpired = reason {
                info!(
                    grace = ?state.config.token_grace,
                    "agent token expired and the daemon did not replace the tunnel: closing it"
                );
            }
            // Boxed like the handshake: an idle tunnel's task does not carry its state.
            Box::pin(drain(device, &mut connection, state.config.shutdown_grace)).await?
        }
    };
    ended.context("tunnel task")?.context("tunnel connection")
}

/// Opens the tunnel on an upgraded connection: WebSocket, HTTP/2 handshake (the relay is the
/// client), the connection's own task, and the daemon's hello. Returns the device, not yet
/// registered.
async fn open(
    state: &AppState,
    io: TokioIo<hyper::upgrade::Upgraded>,
    (user, id, name): (String, String, String),
) -> anyhow::Result<Opened> {
    let liveness = state.config.liveness();
    let ws = WebSocketStream::from_raw_socket(
        io,
        Role::Server,
        Some(cloudllm_tunnel::ws_config(
            cloudllm_tunnel::RELAY_WS_READ_BUFFER,
        )),
    )
    .await;
    let io = TokioIo::new(WsIo::new(ws, liveness));
    let (mut sender, connection) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        cloudllm_tunnel::h2_client(liveness).handshake::<_, Body>(io),
    )
    .await
    .context("HTTP/2 handshake timed out")?
    .context("HTTP/2 handshake")?;
    let connection = tokio::spawn(connection);

    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, fetch_hello(&mut sender))
        .await
        .context("hello timed out")??;
    anyhow::ensure!(
        hello.protocol_version == proto::PROTOCOL_VERSION,
        "daemon speaks protocol {}, relay speaks {}",
        hello.protocol_version,
        proto::PROTOCOL_VERSION
    );
    let device = Arc::new(Device::new(user, id, name, sender));
    device.set_models(sane_models(hello.models));
    Ok(Opened {
        device,
        connection,
        daemon_version: hello.daemon_version,
    })
}

/// A tunnel that has said hello.
struct Opened {
    device: Arc<Device>,
    connection: Connection,
    daemon_version: String,
}

/// The task running a tunnel's HTTP/2 connection.
type Connection = tokio::task::JoinHandle<hyper::Result<()>>;

/// Records a tunnel's end in the audit log when dropped, however `run` returns.
struct Disconnect {
    audit: crate::audit::Audit,
    device: Arc<Device>,
    since: tokio::time::Instant,
    reason: &'static str,
}

impl Drop for Disconnect {
    fn drop(&mut self) {
        self.audit.record(Event::TunnelDisconnect {
            user: self.device.user.clone(),
            device: self.device.name.clone(),
            device_id: self.device.id.clone(),
            seconds: self.since.elapsed().as_secs(),
            reason: self.reason.to_owned(),
        });
    }
}

/// Asks the daemon to drain the tunnel (no new requests reach it: the device has already left
/// the registry), then gives in-flight streams until `grace` from now to finish before cutting
/// the tunnel.
async fn drain(
    device: Arc<Device>,
    connection: &mut Connection,
    grace: Duration,
) -> anyhow::Result<Result<hyper::Result<()>, tokio::task::JoinError>> {
    let deadline = tokio::time::Instant::now() + grace;
    let request = http::Request::post(format!("http://tunnel{}", proto::CONTROL_DRAIN))
        .body(Body::empty())
        .map(|req| device.sender().send_request(req));
    if let Ok(request) = request {
        match tokio::time::timeout_at(deadline, request).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => warn!(error = %err, "drain request failed"),
            Err(_) => warn!("drain request unanswered"),
        }
    }
    // The registry may hold the last other clone of the sender; dropping ours lets the
    // connection close once the daemon's streams are done.
    drop(device);
    match tokio::time::timeout_at(deadline, &mut *connection).await {
        Ok(ended) => Ok(ended),
        Err(_) => {
            connection.abort();
            anyhow::bail!("tunnel still busy after the grace period: cut")
        }
    }
}

/// How long a tunnel opened now with a token expiring at `expires_at` (seconds since the Unix
/// epoch) may live: until the expiry plus `grace`. `None` if that moment has passed.
fn token_lifetime(expires_at: u64, grace: Duration) -> Option<Duration> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    let end = Duration::from_secs(expires_at).saturating_add(grace);
    let left = end.checked_sub(now).filter(|left| !left.is_zero())?;
    Some(left.min(MAX_TOKEN_WAIT))
}

async fn fetch_hello(
    sender: &mut hyper::client::conn::http2::SendRequest<Body>,
) -> anyhow::Result<Hello> {
    let req =
        http::Request::get(format!("http://tunnel{}", proto::CONTROL_HELLO)).body(Body::empty())?;
    let response = sender.send_request(req).await.context("hello request")?;
    anyhow::ensure!(
        response.status().is_success(),
        "hello answered {}",
        response.status()
    );
    let body = Limited::new(response.into_body(), proto::MAX_HELLO_BYTES)
        .collect()
        .await
        .map_err(|err| anyhow::anyhow!("reading hello: {err}"))?
        .to_bytes();
    serde_json::from_slice(&body).context("parsing hello")
}

/// Keeps a device's model list current from the daemon's events stream, until the stream or
/// the device ends. A daemon that sends something unreadable or oversized loses the stream (its
/// last good model list stays), not the tunnel.
async fn follow_events(device: Weak<Device>) {
    let Some(mut sender) = device.upgrade().map(|d| d.sender()) else {
        return;
    };
    let Ok(request) =
        http::Request::get(format!("http://tunnel{}", proto::CONTROL_EVENTS)).body(Body::empty())
    else {
        return;
    };
    let response = match sender.send_request(request).await {
        Ok(response) if response.status().is_success() => response,
        Ok(response) => return debug!(status = %response.status(), "daemon has no events stream"),
        Err(err) => return debug!(error = %err, "events stream failed"),
    };
    drop(sender);
    let mut body = response.into_body();
    let mut pending = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line = pending.split_to(end + 1);
            let Some(device) = device.upgrade() else {
                return;
            };
            match serde_json::from_slice::<DeviceEvent>(&line) {
                Ok(DeviceEvent::Models { models }) => {
                    let models = sane_models(models);
                    debug!(models = models.len(), "device models changed");
                    device.set_models(models);
                }
                Err(err) => {
                    return warn!(error = %err, "unreadable device event: ignoring the daemon's events");
                }
            }
        }
        if pending.len() > proto::MAX_EVENT_BYTES {
            return warn!(
                "device event over {} bytes: ignoring the daemon's events",
                proto::MAX_EVENT_BYTES
            );
        }
    }
}

/// Model names a daemon reported, cut to what the relay keeps: at most
/// [`proto::MAX_MODELS`] printable names of up to 256 bytes.
fn sane_models(mut models: Vec<String>) -> Vec<String> {
    models.retain(|m| {
        !m.is_empty() && m.len() <= 256 && m.bytes().all(|b| (0x21..0x7f).contains(&b))
    });
    models.truncate(proto::MAX_MODELS);
    models
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

/// Answers a tunnel request refused by a limit: 429 with `Retry-After`, counted and audited.
fn limited(
    state: &AppState,
    user: Option<&str>,
    addr: Option<IpAddr>,
    refusal: &Refusal,
) -> Response {
    warn!(limit = refusal.limit.as_str(), "tunnel refused by a limit");
    state.record_refusal(user, addr, "tunnel", refusal);
    let mut response = plain(StatusCode::TOO_MANY_REQUESTS, &refusal.message);
    refusal.set_retry_after(response.headers_mut());
    response
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
