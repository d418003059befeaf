//! A fleet of idle devices: thousands of real tunnels from one process.
//!
//! Running the whole daemon ten thousand times would measure ten thousand IPC sockets, state
//! directories and Ollama health checks; the relay sees none of that. A fleet device is the
//! daemon's tunnel and nothing else, built from the same parts: a WebSocket dialled with the
//! agent token and device headers ([`cloudllm_tunnel::ws_config`]), the hello, the relay's
//! sessions served with [`cloudllm_tunnel::server::serve`] and
//! [`cloudllm_tunnel::h2_server`], and the daemon's own reconnect policy
//! ([`cloudllm_daemon::backoff::Backoff`], full jitter): redial at once after a drain, after a
//! random delay otherwise. There is no Ollama behind it: it answers `/api/version` itself (so
//! the benchmark can put a request through every tunnel) and 404 to anything else; the
//! relay's cost of an idle tunnel and of a reconnect storm is the same either way.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cloudllm_daemon::backoff::Backoff;
use cloudllm_proto::{self as proto, Control, Hello};
use cloudllm_tunnel::mux::RecvBody;
use cloudllm_tunnel::server::{self, RelaySignals, Served};
use cloudllm_tunnel::{Link, Liveness};
use futures_util::SinkExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tokio_util::sync::CancellationToken;

/// Longest reconnect delay: 30 s, the daemon's default `reconnect_max`.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Time for TCP connect and the WebSocket upgrade together: 15 s, as the daemon allows.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// A tunnel up this long counts as good, so the next failure backs off from the start: 10 s,
/// as in the daemon.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Counters shared by every device of a fleet.
#[derive(Debug, Default)]
pub struct Stats {
    /// Devices the relay has registered and whose tunnel is still up.
    pub registered: AtomicU64,
    /// Dial attempts so far.
    pub dials: AtomicU64,
    /// Dials that failed without an answer from the relay (refused connection, timeout).
    pub unreachable: AtomicU64,
    /// Dials the relay answered with an HTTP error (a limit, overload, a bad token).
    pub refused: AtomicU64,
}

impl Stats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One device of the fleet.
#[derive(Clone)]
pub struct Device {
    /// The relay's address.
    pub relay: SocketAddr,
    /// The device owner's agent token.
    pub token: String,
    /// The device id (unique per device).
    pub id: String,
}

/// How one tunnel ended.
enum Ended {
    /// The relay asked us to drain: redial at once.
    Drained,
    /// It closed or failed after it was established.
    Closed,
    /// The fleet is stopping.
    Stopped,
}

/// Keeps `device`'s tunnel up, redialling as the daemon does, until `stop` is cancelled.
pub async fn run(device: Device, stats: Arc<Stats>, stop: CancellationToken) {
    let mut backoff = Backoff::new(RECONNECT_MAX);
    let mut rng = StdRng::from_os_rng();
    loop {
        stats.dials.fetch_add(1, Ordering::Relaxed);
        let dialled = tokio::select! {
            dialled = timeout(DIAL_TIMEOUT, dial(&device)) => dialled,
            () = stop.cancelled() => return,
        };
        let delay = match dialled {
            Ok(Ok(ws)) => {
                let started = Instant::now();
                match serve(ws, &stats, &stop).await {
                    Ended::Stopped => return,
                    Ended::Drained => {
                        backoff.reset();
                        Duration::ZERO
                    }
                    Ended::Closed => {
                        if started.elapsed() >= STABLE_AFTER {
                            backoff.reset();
                        }
                        backoff.next_delay(&mut rng)
                    }
                }
            }
            Ok(Err(DialError::Refused)) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                backoff.next_delay(&mut rng)
            }
            Ok(Err(DialError::Network)) | Err(_) => {
                stats.unreachable.fetch_add(1, Ordering::Relaxed);
                backoff.next_delay(&mut rng)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Why a dial failed.
enum DialError {
    /// The relay answered with an HTTP error instead of a WebSocket.
    Refused,
    /// No connection or no upgrade.
    Network,
}

async fn dial(device: &Device) -> Result<WebSocketStream<TcpStream>, DialError> {
    let tcp = TcpStream::connect(device.relay)
        .await
        .map_err(|_| DialError::Network)?;
    let _ = tcp.set_nodelay(true);
    let request = tunnel_request(device).map_err(|_| DialError::Network)?;
    match tokio_tungstenite::client_async_with_config(
        request,
        tcp,
        Some(cloudllm_tunnel::ws_config(
            cloudllm_tunnel::DAEMON_WS_READ_BUFFER,
        )),
    )
    .await
    {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(_)) => Err(DialError::Refused),
        Err(_) => Err(DialError::Network),
    }
}

/// The upgrade request, with the headers the daemon sends.
fn tunnel_request(device: &Device) -> anyhow::Result<tungstenite::handshake::client::Request> {
    let url = format!("ws://{}{}", device.relay, proto::TUNNEL_PATH);
    let mut request = url.into_client_request().context("tunnel request")?;
    let headers = request.headers_mut();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", device.token))?,
    );
    headers.insert(
        proto::HEADER_PROTOCOL,
        HeaderValue::from_str(&proto::PROTOCOL_VERSION.to_string())?,
    );
    headers.insert(proto::HEADER_DEVICE_ID, HeaderValue::from_str(&device.id)?);
    headers.insert(
        proto::HEADER_DEVICE_NAME,
        HeaderValue::from_str(&device.id)?,
    );
    Ok(request)
}

/// Response body of a fleet device.
type FleetBody = BoxBody<Bytes, Infallible>;

/// Serves one tunnel until it ends: hello, then the relay's sessions.
async fn serve(
    mut ws: WebSocketStream<TcpStream>,
    stats: &Stats,
    stop: &CancellationToken,
) -> Ended {
    let hello = Control::Hello(Hello {
        protocol_version: proto::PROTOCOL_VERSION,
        // `valid_version`: letters, digits and `.+-_` only.
        daemon_version: concat!("bench-fleet-", env!("CARGO_PKG_VERSION")).to_owned(),
        models: Vec::new(),
        // The fleet measures one connection per device.
        lanes: false,
    });
    if ws
        .send(tungstenite::Message::Text(hello.to_text().into()))
        .await
        .is_err()
    {
        return Ended::Closed;
    }
    let signals = RelaySignals::default();
    let link = Link::new(ws, Liveness::default(), signals.handler());
    let service = service_fn(|req: Request<RecvBody>| {
        let response = answer(req.uri().path());
        async move { Ok::<_, Infallible>(response) }
    });
    let closing = CancellationToken::new();
    let served = server::serve(link, service, &closing);
    tokio::pin!(served);
    let mut registered = false;
    let ended = loop {
        tokio::select! {
            served = served.as_mut() => break match served {
                Served::Stopped(mut link) => {
                    link.close(CloseCode::Normal, "fleet device leaving").await;
                    if stop.is_cancelled() { Ended::Stopped } else { Ended::Drained }
                }
                _ => Ended::Closed,
            },
            () = signals.ready.cancelled(), if !registered => {
                registered = true;
                stats.registered.fetch_add(1, Ordering::Relaxed);
            }
            () = signals.drain.cancelled(), if !closing.is_cancelled() => closing.cancel(),
            () = stop.cancelled(), if !closing.is_cancelled() => closing.cancel(),
        }
    };
    if registered {
        stats.registered.fetch_sub(1, Ordering::Relaxed);
    }
    ended
}

/// A fleet device's answer: its version on `/api/version` (so a request can open a session
/// and check it came back), 404 on anything else.
fn answer(path: &str) -> Response<FleetBody> {
    let (status, body) = match path {
        "/api/version" => (
            StatusCode::OK,
            Bytes::from_static(br#"{"version":"bench-fleet"}"#),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(br#"{"error":"a fleet device serves only /api/version"}"#),
        ),
    };
    let mut response = Response::new(Full::new(body).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
