//! The relay's end of a tunnel: authenticate the daemon, upgrade to a WebSocket, run an
//! HTTP/2 client over it, fetch the daemon's hello, and keep the device registered for as long
//! as the tunnel lives.
//!
//! The token is checked before the upgrade, so a bad token gets a plain HTTP 401 and never a
//! WebSocket. On relay shutdown each tunnel is asked to drain: the daemon sends GOAWAY, lets
//! in-flight streams finish and reconnects (to the next relay) at once.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use cloudllm_proto::{self as proto, Hello};
use cloudllm_tunnel::WsIo;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{Instrument, info, info_span, warn};

use crate::AppState;
use crate::auth::Scope;
use crate::registry::Device;

/// Time for the WebSocket upgrade and the HTTP/2 handshake plus hello: 10 s is generous on any
/// network and stops half-open tunnels from holding memory.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /tunnel`: a daemon opens its tunnel.
pub async fn accept(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let identity = match state.keys.authenticate(req.headers(), Scope::Agent) {
        Ok(identity) => identity,
        Err(err) => {
            warn!(reason = %err, "tunnel refused");
            return plain(err.status(), &err.to_string());
        }
    };
    let (device_id, device_name) = match device_headers(req.headers()) {
        Ok(device) => device,
        Err(message) => return plain(StatusCode::BAD_REQUEST, &message),
    };
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
            match run(task_state, TokioIo::new(upgraded), device).await {
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

/// Runs one upgraded tunnel until it closes or the relay drains it.
async fn run(
    state: Arc<AppState>,
    io: TokioIo<hyper::upgrade::Upgraded>,
    (user, id, name): (String, String, String),
) -> anyhow::Result<()> {
    let liveness = state.config.liveness();
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(cloudllm_tunnel::ws_config()))
        .await;
    let io = TokioIo::new(WsIo::new(ws, liveness));
    let (mut sender, connection) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        cloudllm_tunnel::h2_client(liveness).handshake::<_, Body>(io),
    )
    .await
    .context("HTTP/2 handshake timed out")?
    .context("HTTP/2 handshake")?;
    let mut connection = tokio::spawn(connection);

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
    state.registry.insert(device.clone());
    info!(daemon_version = %hello.daemon_version, "tunnel up");

    let ended = tokio::select! {
        ended = &mut connection => Some(ended),
        () = state.shutdown.cancelled() => None,
    };
    state.registry.remove(&device);
    let ended = match ended {
        Some(ended) => ended,
        None => {
            // Draining: no new requests reach this device; ask the daemon to finish and go.
            let drain = http::Request::post(format!("http://tunnel{}", proto::CONTROL_DRAIN))
                .body(Body::empty())
                .map(|req| device.sender().send_request(req));
            if let Ok(drain) = drain
                && let Err(err) = drain.await
            {
                warn!(error = %err, "drain request failed");
            }
            drop(device);
            match tokio::time::timeout(state.config.shutdown_grace, &mut connection).await {
                Ok(ended) => ended,
                Err(_) => {
                    connection.abort();
                    anyhow::bail!("tunnel still busy after the shutdown grace period: cut")
                }
            }
        }
    };
    ended.context("tunnel task")?.context("tunnel connection")
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
