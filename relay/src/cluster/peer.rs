//! Node-to-node forwarding: a request for a device held by another node goes there over
//! HTTP/2, signed with the cluster's shared secret, and streams back.
//!
//! The node that received the request has authenticated the user and applied the limits; it
//! sends the request on one stream of a pooled HTTP/2 connection to the holding node's peer
//! listener, naming the user and the device, with an HMAC-SHA256 over the node, the time, the
//! user, the device, the method, the path and the request id. The holding node accepts only a
//! request whose signature checks and whose time is within [`MAX_SKEW`] of its own clock (a
//! forged one, or one replayed later, gets 401), and serves it from its tunnel as it would its
//! own. Bodies stream both ways under HTTP/2 flow control; a caller that hangs up resets the
//! stream, which the holding node passes on to the daemon.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::response::Response;
use cloudllm_proto as proto;
use http::{HeaderMap, HeaderValue, StatusCode};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;
use ring::hmac;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::lock;
use crate::AppState;

/// The node that sent a forwarded request.
pub const HEADER_PEER_NODE: &str = "x-cloudllm-peer-node";
/// The user a forwarded request is for, hex-encoded (a user id may hold any character).
pub const HEADER_PEER_USER: &str = "x-cloudllm-peer-user";
/// When the forwarded request was signed, in milliseconds since the Unix epoch.
pub const HEADER_PEER_TIME: &str = "x-cloudllm-peer-time";
/// The request's HMAC-SHA256, hex.
pub const HEADER_PEER_SIGNATURE: &str = "x-cloudllm-peer-signature";

/// How far a forwarded request's time may be from the receiving node's clock: 30 s covers any
/// clock drift NTP leaves and a slow hop, and a captured request is refused after it.
pub const MAX_SKEW: Duration = Duration::from_secs(30);

/// Time to open a connection to another node: peers are on the same network.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What is signed, in order, one per line.
fn message(
    time: &str,
    node: &str,
    user_hex: &str,
    device: &str,
    method: &str,
    path: &str,
    request_id: &str,
) -> String {
    format!(
        "cloudllm-peer-v1\n{time}\n{node}\n{user_hex}\n{device}\n{method}\n{path}\n{request_id}"
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// The signing key and the pooled connections to the other nodes.
pub struct Peers {
    key: hmac::Key,
    node: String,
    /// One HTTP/2 connection per peer address, opened on first use, again when it has closed.
    pool: Mutex<HashMap<String, SendRequest<Body>>>,
}

/// Why a forwarded request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    /// A header is missing or malformed.
    #[error("not a signed node-to-node request")]
    Unsigned,
    /// The time is too far from ours.
    #[error("the node-to-node request is too old or from the future")]
    Stale,
    /// The signature does not check.
    #[error("the node-to-node signature does not check")]
    Forged,
}

/// Who a verified forwarded request is for.
#[derive(Debug, PartialEq, Eq)]
pub struct Forwarded {
    /// The sending node.
    pub node: String,
    /// The user.
    pub user: String,
}

impl Peers {
    /// Keys from the shared `secret`, for node `node`.
    pub fn new(secret: &[u8], node: String) -> Peers {
        Peers {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            node,
            pool: Mutex::default(),
        }
    }

    /// Adds the node-to-node headers to a request for `user`'s device `device` at `time`
    /// (milliseconds since the epoch).
    pub fn sign(
        &self,
        headers: &mut HeaderMap,
        (method, path): (&str, &str),
        user: &str,
        device: &str,
        time: u128,
    ) {
        let user_hex = hex(user.as_bytes());
        let time = time.to_string();
        let request_id = headers
            .get(proto::HEADER_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let tag = hmac::sign(
            &self.key,
            message(
                &time,
                &self.node,
                &user_hex,
                device,
                method,
                path,
                &request_id,
            )
            .as_bytes(),
        );
        for (name, value) in [
            (HEADER_PEER_NODE, self.node.clone()),
            (HEADER_PEER_USER, user_hex),
            (HEADER_PEER_TIME, time),
            (HEADER_PEER_SIGNATURE, hex(tag.as_ref())),
            (proto::HEADER_DEVICE, device.to_owned()),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    }

    /// Checks a forwarded request's headers against its method and path at `now` (ms).
    pub fn verify(
        &self,
        headers: &HeaderMap,
        (method, path): (&str, &str),
        now: u128,
    ) -> Result<Forwarded, PeerRefusal> {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or(PeerRefusal::Unsigned)
        };
        let node = get(HEADER_PEER_NODE)?;
        let user_hex = get(HEADER_PEER_USER)?;
        let time = get(HEADER_PEER_TIME)?;
        let device = get(proto::HEADER_DEVICE)?;
        let signature = unhex(get(HEADER_PEER_SIGNATURE)?).ok_or(PeerRefusal::Unsigned)?;
        let request_id = headers
            .get(proto::HEADER_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let signed_at: u128 = time.parse().map_err(|_| PeerRefusal::Unsigned)?;
        let message = message(time, node, user_hex, device, method, path, request_id);
        hmac::verify(&self.key, message.as_bytes(), &signature).map_err(|_| PeerRefusal::Forged)?;
        if now.abs_diff(signed_at) > MAX_SKEW.as_millis() {
            return Err(PeerRefusal::Stale);
        }
        let user = unhex(user_hex)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or(PeerRefusal::Unsigned)?;
        Ok(Forwarded {
            node: node.to_owned(),
            user,
        })
    }

    /// A handle on the HTTP/2 connection to the node at `addr`, opening one if needed.
    async fn connection(
        &self,
        addr: &str,
        liveness: cloudllm_tunnel::Liveness,
    ) -> anyhow::Result<SendRequest<Body>> {
        if let Some(sender) = lock(&self.pool)
            .get(addr)
            .filter(|s| !s.is_closed())
            .cloned()
        {
            return Ok(sender);
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to node {addr} timed out"))??;
        stream.set_nodelay(true)?;
        let (sender, connection) = cloudllm_tunnel::h2_client(liveness)
            .handshake::<_, Body>(TokioIo::new(stream))
            .await?;
        let peer = addr.to_owned();
        tokio::spawn(
            async move {
                if let Err(err) = connection.await {
                    debug!(error = %err, "connection to a node ended");
                }
            }
            .instrument(info_span!("peer", addr = %peer)),
        );
        lock(&self.pool).insert(addr.to_owned(), sender.clone());
        Ok(sender)
    }

    /// Sends `request` (its URI a path) for `user`'s device `device` to the node at `addr`.
    pub(crate) async fn send(
        &self,
        addr: &str,
        liveness: cloudllm_tunnel::Liveness,
        user: &str,
        device: &str,
        mut request: http::Request<Body>,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let method = request.method().to_string();
        *request.uri_mut() = format!("http://{addr}{path}").parse()?;
        *request.version_mut() = http::Version::HTTP_2;
        self.sign(
            request.headers_mut(),
            (&method, &path),
            user,
            device,
            now_millis(),
        );
        let mut sender = self.connection(addr, liveness).await?;
        sender.ready().await?;
        Ok(sender.send_request(request).await?)
    }
}

/// Serves the other nodes on `listener` until `shutdown`: each connection is HTTP/2, each
/// request a forwarded one ([`crate::proxy::serve_forwarded`]).
pub(crate) async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "peer listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let stop = shutdown.clone();
        let grace = state.config.shutdown_grace;
        tokio::spawn(
            async move { serve_connection(state, stream, stop, grace).await }
                .instrument(info_span!("peer", %addr)),
        );
    }
}

async fn serve_connection(
    state: Arc<AppState>,
    stream: tokio::net::TcpStream,
    stop: CancellationToken,
    grace: Duration,
) {
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let state = service_state.clone();
        async move { Ok::<Response, std::convert::Infallible>(handle(state, req).await) }
    });
    let connection = cloudllm_tunnel::h2_server(state.config.liveness())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        ended = connection.as_mut() => {
            if let Err(err) = ended {
                debug!(error = %err, "peer connection ended");
            }
            return;
        }
        () = stop.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    let _ = tokio::time::timeout(grace, connection).await;
}

/// One forwarded request: verified, then served from the local tunnel.
async fn handle(state: Arc<AppState>, req: http::Request<hyper::body::Incoming>) -> Response {
    let Some(cluster) = state.cluster.clone() else {
        return refuse(StatusCode::NOT_FOUND, "not a cluster node");
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let verified =
        cluster
            .peers
            .verify(req.headers(), (req.method().as_str(), &path), now_millis());
    let forwarded = match verified {
        Ok(forwarded) => forwarded,
        Err(refusal) => {
            state.metrics.forwarded_refused.inc();
            warn!(reason = %refusal, "refused a node-to-node request");
            return refuse(StatusCode::UNAUTHORIZED, &refusal.to_string());
        }
    };
    state.metrics.forwarded_in.inc();
    let req = req.map(Body::new);
    crate::proxy::serve_forwarded(&state, &forwarded.user, &forwarded.node, req).await
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let mut response = Response::new(Body::from(format!("{message}\n")));
    *response.status_mut() = status;
    response
}

/// Binds the peer listener.
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("[cluster] listening on peer_listen {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fresh_request_signed_with_the_shared_secret_passes() {
        let a = Peers::new(b"0123456789abcdef0123456789abcdef", "a".into());
        let b = Peers::new(b"0123456789abcdef0123456789abcdef", "b".into());
        let now = now_millis();
        let mut headers = HeaderMap::new();
        headers.insert(proto::HEADER_REQUEST_ID, HeaderValue::from_static("r1"));
        a.sign(&mut headers, ("POST", "/api/chat"), "alice\nx", "dev", now);
        assert_eq!(
            b.verify(&headers, ("POST", "/api/chat"), now + 1000),
            Ok(Forwarded {
                node: "a".into(),
                user: "alice\nx".into()
            })
        );
        // Another path, user or request id than signed: forged.
        assert_eq!(
            b.verify(&headers, ("POST", "/api/generate"), now),
            Err(PeerRefusal::Forged)
        );
        let mut other = headers.clone();
        other.insert(HEADER_PEER_USER, HeaderValue::from_static("626f62"));
        assert_eq!(
            b.verify(&other, ("POST", "/api/chat"), now),
            Err(PeerRefusal::Forged)
        );
        let mut other = headers.clone();
        other.insert(proto::HEADER_REQUEST_ID, HeaderValue::from_static("r2"));
        assert_eq!(
            b.verify(&other, ("POST", "/api/chat"), now),
            Err(PeerRefusal::Forged)
        );
        // Replayed late, or signed in the future.
        let late = now + MAX_SKEW.as_millis() + 1;
        assert_eq!(
            b.verify(&headers, ("POST", "/api/chat"), late),
            Err(PeerRefusal::Stale)
        );
        // Another secret.
        let stranger = Peers::new(b"another-secret-another-secret-xx", "b".into());
        assert_eq!(
            stranger.verify(&headers, ("POST", "/api/chat"), now),
            Err(PeerRefusal::Forged)
        );
        // Nothing signed at all.
        assert_eq!(
            b.verify(&HeaderMap::new(), ("GET", "/"), now),
            Err(PeerRefusal::Unsigned)
        );
    }
}
