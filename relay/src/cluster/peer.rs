//! Node-to-node forwarding: a request for a device held by another node goes there over
//! HTTP/2, signed with the cluster's shared secret, and streams back.
//!
//! The node that received the request has authenticated the user and applied the limits; it
//! sends the request on one stream of a pooled HTTP/2 connection to the holding node's peer
//! listener, naming the user and the device, with an HMAC-SHA256 over the node, the time, the
//! user, the device, the method, the path, the request id and a random nonce. The holding node
//! accepts only a request whose signature checks, whose time is within [`MAX_SKEW`] of its own
//! clock, and whose signature it has not seen before (a forged one, one replayed later, or one
//! captured on the wire and replayed within the window gets 401), and serves it from its tunnel
//! as it would its own. Seen signatures are kept until their time leaves the window
//! ([`Replays`]), at most [`MAX_SEEN`] of them. Bodies stream both ways under HTTP/2 flow control; a caller that hangs up resets the
//! stream, which the holding node passes on to the daemon.

use std::collections::{HashMap, HashSet, VecDeque};
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

use crate::AppState;
use crate::lock;

/// The node that sent a forwarded request.
pub const HEADER_PEER_NODE: &str = "x-cloudllm-peer-node";
/// The user a forwarded request is for, hex-encoded (a user id may hold any character).
pub const HEADER_PEER_USER: &str = "x-cloudllm-peer-user";
/// When the forwarded request was signed, in milliseconds since the Unix epoch.
pub const HEADER_PEER_TIME: &str = "x-cloudllm-peer-time";
/// The request's HMAC-SHA256, hex.
pub const HEADER_PEER_SIGNATURE: &str = "x-cloudllm-peer-signature";
/// A random value, hex, that makes every signed request unique even when two share the
/// millisecond, the path and a caller-chosen request id: a signature is accepted once.
pub const HEADER_PEER_NONCE: &str = "x-cloudllm-peer-nonce";

/// How far a forwarded request's time may be from the receiving node's clock: 30 s covers any
/// clock drift NTP leaves and a slow hop, and a captured request is refused after it.
pub const MAX_SKEW: Duration = Duration::from_secs(30);

/// Most signatures a node remembers to refuse replays. 262,144 covers about 4,300 forwarded
/// requests a second sustained over the 60 s a signature stays valid (30 s either side of the
/// node's clock), in about 25 MiB at worst. Only requests whose signature checks are
/// remembered, so only a holder of the shared secret can fill it; when full, new forwarded
/// requests are refused with 503 (fail closed: accepting one unremembered would allow its
/// replay) until the oldest leave the window.
pub const MAX_SEEN: usize = 262_144;

/// Bytes of randomness in a nonce: 128 bits never repeat by chance.
const NONCE_BYTES: usize = 16;

/// Time to open a connection to another node: peers are on the same network.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What is signed, in order, one per line: time, node, user (hex), device, method, path,
/// request id, nonce.
fn message(fields: [&str; 8]) -> String {
    format!("cloudllm-peer-v2\n{}", fields.join("\n"))
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

/// The signatures of forwarded requests already served, until their time leaves the window:
/// a request captured on the wire and sent again within [`MAX_SKEW`] is refused.
#[derive(Default)]
struct Replays {
    /// Signatures remembered.
    seen: HashSet<Vec<u8>>,
    /// The same, in the order they arrived, with when each may be forgotten (ms since the
    /// epoch). Signed times arrive nearly in order; one that expires earlier than an entry
    /// before it is forgotten a little late, which only keeps it longer than needed.
    order: VecDeque<(u128, Vec<u8>)>,
}

impl Replays {
    /// Remembers `signature`, valid until `expires`, unless it was seen before.
    fn first_use(&mut self, signature: &[u8], expires: u128, now: u128) -> Result<(), PeerRefusal> {
        while self.order.front().is_some_and(|(at, _)| *at < now) {
            if let Some((_, old)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        if self.seen.contains(signature) {
            return Err(PeerRefusal::Replayed);
        }
        if self.seen.len() >= MAX_SEEN {
            return Err(PeerRefusal::Saturated);
        }
        self.seen.insert(signature.to_vec());
        self.order.push_back((expires, signature.to_vec()));
        Ok(())
    }
}

/// The signing key and the pooled connections to the other nodes.
pub struct Peers {
    key: hmac::Key,
    node: String,
    /// Signatures already accepted, to refuse replays.
    replays: Mutex<Replays>,
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
    /// The same signed request was already served: a replay.
    #[error("the node-to-node request was already used once")]
    Replayed,
    /// Too many signatures to remember: refused rather than open to replay.
    #[error("too many node-to-node requests to check for replays: try again shortly")]
    Saturated,
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
            replays: Mutex::default(),
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
        let mut nonce = [0u8; NONCE_BYTES];
        // Without randomness the nonce is zeros: the request is then accepted once per
        // millisecond and request id, still never replayable.
        let _ = getrandom::fill(&mut nonce);
        let nonce = hex(&nonce);
        let tag = hmac::sign(
            &self.key,
            message([
                &time,
                &self.node,
                &user_hex,
                device,
                method,
                path,
                &request_id,
                &nonce,
            ])
            .as_bytes(),
        );
        for (name, value) in [
            (HEADER_PEER_NODE, self.node.clone()),
            (HEADER_PEER_USER, user_hex),
            (HEADER_PEER_TIME, time),
            (HEADER_PEER_NONCE, nonce),
            (HEADER_PEER_SIGNATURE, hex(tag.as_ref())),
            (proto::HEADER_DEVICE, device.to_owned()),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    }

    /// Checks a forwarded request's headers against its method and path at `now` (ms), and
    /// that this signed request has not been accepted before.
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
        let nonce = get(HEADER_PEER_NONCE)?;
        let signature = unhex(get(HEADER_PEER_SIGNATURE)?).ok_or(PeerRefusal::Unsigned)?;
        let request_id = headers
            .get(proto::HEADER_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let signed_at: u128 = time.parse().map_err(|_| PeerRefusal::Unsigned)?;
        let message = message([
            time, node, user_hex, device, method, path, request_id, nonce,
        ]);
        hmac::verify(&self.key, message.as_bytes(), &signature).map_err(|_| PeerRefusal::Forged)?;
        if now.abs_diff(signed_at) > MAX_SKEW.as_millis() {
            return Err(PeerRefusal::Stale);
        }
        let user = unhex(user_hex)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or(PeerRefusal::Unsigned)?;
        lock(&self.replays).first_use(&signature, signed_at + MAX_SKEW.as_millis(), now)?;
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
            let status = if refusal == PeerRefusal::Saturated {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::UNAUTHORIZED
            };
            return refuse(status, &refusal.to_string());
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
        // The same signed request again, within the window: a replay.
        assert_eq!(
            b.verify(&headers, ("POST", "/api/chat"), now + 2000),
            Err(PeerRefusal::Replayed)
        );
        // Signed again, even at the same millisecond: a new nonce, accepted.
        let mut again = HeaderMap::new();
        again.insert(proto::HEADER_REQUEST_ID, HeaderValue::from_static("r1"));
        a.sign(&mut again, ("POST", "/api/chat"), "alice\nx", "dev", now);
        assert!(b.verify(&again, ("POST", "/api/chat"), now + 1000).is_ok());
        // Another nonce than signed: forged.
        let mut other = headers.clone();
        other.insert(HEADER_PEER_NONCE, HeaderValue::from_static("00"));
        assert_eq!(
            b.verify(&other, ("POST", "/api/chat"), now),
            Err(PeerRefusal::Forged)
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

    #[test]
    fn seen_signatures_are_forgotten_after_the_window_and_bounded() {
        let mut replays = Replays::default();
        assert_eq!(replays.first_use(b"s1", 1_000, 0), Ok(()));
        assert_eq!(
            replays.first_use(b"s1", 1_000, 999),
            Err(PeerRefusal::Replayed)
        );
        // Past its expiry it is forgotten (verify refuses it as stale by then anyway).
        assert_eq!(replays.first_use(b"s2", 5_000, 1_001), Ok(()));
        assert!(!replays.seen.contains(b"s1".as_slice()));
        assert_eq!(replays.seen.len(), replays.order.len());
        // Full: new signatures are refused until the oldest expire.
        let mut full = Replays::default();
        for i in 0..MAX_SEEN {
            full.first_use(&i.to_le_bytes(), 10_000, 0).unwrap();
        }
        assert_eq!(
            full.first_use(b"new", 10_000, 1),
            Err(PeerRefusal::Saturated)
        );
        assert_eq!(full.first_use(b"new", 20_000, 10_001), Ok(()));
        assert_eq!(full.seen.len(), 1);
    }
}
