//! A WebSocket-aware proxy for fault injection: it accepts the daemon's tunnel upgrade, opens
//! its own tunnel to the relay with the same headers, passes data and control messages (binary
//! and text) both ways, and on
//! command closes the daemon's WebSocket with a chosen close code — as a load balancer or
//! reverse proxy in front of the relay does when it restarts or gives up on a connection.
//!
//! Pings are answered on each leg by tungstenite itself, so both ends' liveness checks see a
//! live peer while the proxy forwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{ClientRequestBuilder, Message};

/// The reason the proxy puts in its close frames.
pub const CLOSE_REASON: &str = "closed by the test proxy";

/// Request headers of the daemon's upgrade that the proxy passes on to the relay (the rest
/// belong to the WebSocket handshake of each leg).
const PASSED_HEADERS: [&str; 5] = [
    "authorization",
    "user-agent",
    cloudllm_proto::HEADER_PROTOCOL,
    cloudllm_proto::HEADER_DEVICE_ID,
    cloudllm_proto::HEADER_DEVICE_NAME,
];

/// A running close proxy.
pub struct CloseProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    close: broadcast::Sender<u16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CloseProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CloseProxy {
    /// Starts a proxy on `127.0.0.1:0` to the relay at `relay`.
    pub async fn start(relay: SocketAddr) -> CloseProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let (close, _) = broadcast::channel(16);
        let commands = close.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                connections.spawn(relay_one(inbound, relay, commands.subscribe()));
            }
        });
        CloseProxy {
            addr,
            accepted,
            close,
            task,
        }
    }

    /// How many tunnels it has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every tunnel open now with close code `code`.
    pub fn close_with(&self, code: u16) {
        let _ = self.close.send(code);
    }
}

/// Carries one tunnel until either side ends it or a close command comes.
async fn relay_one(inbound: TcpStream, relay: SocketAddr, mut close: broadcast::Receiver<u16>) {
    let _ = inbound.set_nodelay(true);
    let mut headers = Vec::new();
    // The error type is tungstenite's (an HTTP response), not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        for name in PASSED_HEADERS {
            if let Some(value) = request.headers().get(name).and_then(|v| v.to_str().ok()) {
                headers.push((name.to_owned(), value.to_owned()));
            }
        }
        Ok(response)
    };
    let Ok(mut daemon) = tokio_tungstenite::accept_hdr_async(inbound, callback).await else {
        return;
    };
    let Ok(outbound) = TcpStream::connect(relay).await else {
        return;
    };
    let _ = outbound.set_nodelay(true);
    let uri = format!("ws://{relay}{}", cloudllm_proto::TUNNEL_PATH)
        .parse()
        .expect("tunnel URI");
    let request = headers
        .into_iter()
        .fold(ClientRequestBuilder::new(uri), |request, (name, value)| {
            request.with_header(name, value)
        });
    let Ok((mut upstream, _)) = tokio_tungstenite::client_async(request, outbound).await else {
        return;
    };
    loop {
        tokio::select! {
            message = daemon.next() => match message {
                Some(Ok(message @ (Message::Binary(_) | Message::Text(_)))) => {
                    if upstream.send(message).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
            message = upstream.next() => match message {
                Some(Ok(message @ (Message::Binary(_) | Message::Text(_)))) => {
                    if daemon.send(message).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
            code = close.recv() => {
                let Ok(code) = code else { return };
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: CLOSE_REASON.into(),
                };
                let _ = daemon.close(Some(frame)).await;
                // Let the daemon's answer to the close arrive, then drop both legs.
                let _ = tokio::time::timeout(crate::STEP, async {
                    while let Some(Ok(_)) = daemon.next().await {}
                })
                .await;
                return;
            }
        }
    }
}
