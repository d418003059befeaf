//! Accepting connections and serving HTTP/1.1 on them.
//!
//! A listener ([`PlainListener`], or TLS's, which finishes handshakes first) yields connections
//! already admitted by the caps on unauthenticated connections ([`crate::connections`]);
//! [`Http::serve`] runs hyper's HTTP/1.1 server on each, with WebSocket upgrades for `/tunnel`,
//! a bound on slow request heads, and a graceful end on shutdown; [`Http::serve_sharded`] does the
//! same for plain TCP with each connection on the shard of its user ([`crate::shards`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures_util::future::Either;
use http::Request;
use hyper::body::Incoming as IncomingBody;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;
use tracing::{debug, warn};

use crate::connections::{Gate, Slot};
use crate::registry::Registry;
use crate::shards::Shards;

/// A connection the gate admitted.
pub(crate) struct Incoming<Io> {
    /// The connection (after the TLS handshake, with `[tls]`).
    pub io: Io,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Its place under the caps.
    pub slot: Arc<Slot>,
}

/// Where the HTTP server takes its connections from: plain TCP or TLS, both through the gate.
pub(crate) trait Accept: Send + 'static {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next admitted connection.
    fn accept(&mut self) -> impl Future<Output = Incoming<Self::Io>> + Send;
}

/// Plain TCP connections, through the gate.
pub(crate) struct PlainListener {
    tcp: TcpListener,
    keepalive: socket2::TcpKeepalive,
    gate: Arc<Gate>,
}

impl PlainListener {
    /// Accepts on `tcp`, admitting through `gate`.
    pub(crate) fn new(
        tcp: TcpListener,
        keepalive: socket2::TcpKeepalive,
        gate: Arc<Gate>,
    ) -> PlainListener {
        PlainListener {
            tcp,
            keepalive,
            gate,
        }
    }
}

impl Accept for PlainListener {
    type Io = TcpStream;

    async fn accept(&mut self) -> Incoming<TcpStream> {
        loop {
            let (io, peer) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            };
            let Some(slot) = self.gate.admit(peer.ip()) else {
                debug!(%peer, "connection refused: too many unauthenticated connections");
                continue; // dropping `io` closes it
            };
            tune_socket(&io, &self.keepalive);
            return Incoming { io, peer, slot };
        }
    }
}

/// After a failed `accept`: a connection that died before it was accepted is nobody's concern;
/// anything else (out of file descriptors, most likely) is logged, and accepting pauses for a
/// second rather than spinning.
pub(crate) async fn accept_failed(err: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    warn!(error = %err, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// HTTP/1.1 serving (with upgrades, for `/tunnel`): the router and the bounds every
/// connection gets. Unlike `axum::serve`, it bounds slow clients: a connection that has not
/// sent a whole request head within `read_timeout` (a slowloris, an idle keep-alive connection,
/// or one that never sends a byte) is closed; one that the caps on unauthenticated connections
/// close to make room is dropped at once; and on `stop`, each connection finishes the request
/// in flight, as `axum::serve`'s graceful shutdown does.
#[derive(Clone)]
pub(crate) struct Http {
    /// The relay's routes but the API's.
    pub app: Router,
    /// The API (`/api/…`, `/v1/…`), served without the router; `None`: the router serves
    /// every path.
    pub api: Option<crate::proxy::ApiEntry>,
    /// Longest wait for a request head.
    pub read_timeout: Duration,
    /// Cancelled when the relay stops accepting.
    pub stop: CancellationToken,
}

impl Http {
    /// Serves every connection of `listener` on the current runtime (TLS's; plain TCP uses
    /// [`Http::serve_sharded`]) until `stop`, then waits for them to finish.
    pub(crate) async fn serve<L: Accept>(self, listener: L) -> io::Result<()> {
        accept_until(listener, &self.stop.clone(), |incoming, connections| {
            connections.spawn(self.clone().connection(incoming));
        })
        .await
    }

    /// Serves plain TCP as [`Http::serve`] does, each connection on the shard of the user its
    /// first request names ([`crate::shards`]). Accepting and placing run here; from its
    /// first request on, a connection is the shard's alone.
    /// `registry` tells which users' devices have lanes (their connections go round the shards).
    pub(crate) async fn serve_sharded(
        self,
        listener: PlainListener,
        shards: Arc<Shards>,
        registry: Arc<Registry>,
    ) -> io::Result<()> {
        accept_until(listener, &self.stop.clone(), |incoming, connections| {
            let placing = self.clone().place(
                incoming,
                shards.clone(),
                registry.clone(),
                connections.clone(),
            );
            connections.spawn(placing);
        })
        .await
    }

    /// Moves a plain connection to the shard its first request names, and serves it there (in
    /// `connections`).
    async fn place(
        self,
        incoming: Incoming<TcpStream>,
        shards: Arc<Shards>,
        registry: Arc<Registry>,
        connections: TaskTracker,
    ) {
        let Incoming { io, peer, slot } = incoming;
        let mut head = vec![0; crate::shards::PEEK_BYTES];
        // The first bytes, left in the socket for hyper. A client silent for as long as hyper
        // would wait for a request head is closed as hyper would close it.
        let peeked = tokio::select! {
            peeked = tokio::time::timeout(self.read_timeout, io.peek(&mut head)) => peeked,
            () = slot.evicted() => return,
            () = self.stop.cancelled() => return,
        };
        let Ok(Ok(read @ 1..)) = peeked else {
            debug!(%peer, "connection closed before its first request");
            return;
        };
        let shard = shards
            .for_head(&head[..read], |user| registry.has_lanes(user))
            .clone();
        drop((shards, registry));
        // Off this runtime's reactor, onto the shard's (`from_std` there).
        let io = match io.into_std() {
            Ok(io) => io,
            Err(err) => return debug!(%peer, error = %err, "connection lost while placing it"),
        };
        connections.spawn_on(
            async move {
                match TcpStream::from_std(io) {
                    Ok(io) => self.connection(Incoming { io, peer, slot }).await,
                    Err(err) => debug!(%peer, error = %err, "connection lost while placing it"),
                }
            },
            &shard,
        );
    }

    /// Serves HTTP/1.1 on one admitted connection until it closes, or until `stop`.
    async fn connection<Io>(self, incoming: Incoming<Io>)
    where
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use hyper_util::rt::{TokioIo, TokioTimer};
        let Http {
            app,
            api,
            read_timeout,
            stop,
        } = self;
        let Incoming { io, peer, slot } = incoming;
        // The handlers read the peer address as `ConnectInfo`, as with axum's own server, and
        // mark the connection authenticated through its slot: both go into each request's
        // extensions here. (As router layers, added per connection, they re-wrapped every
        // route and boxed two more services into each request's path.)
        let request_slot = slot.clone();
        let service = hyper::service::service_fn(move |mut req: Request<IncomingBody>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            req.extensions_mut().insert(request_slot.clone());
            match &api {
                Some(api) if crate::proxy::is_api_path(req.uri().path()) => {
                    let api = api.clone();
                    let req = req.map(axum::body::Body::new);
                    Either::Left(async move { Ok(api.serve(req).await) })
                }
                // A router is always ready: no `poll_ready` before the call.
                _ => Either::Right(app.clone().call(req)),
            }
        });
        // HTTP/1.1 only (TLS offers no other protocol either): hyper-util's automatic version
        // detection would wait for the first bytes without any timeout.
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(read_timeout)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(connection);
        let served = tokio::select! {
            served = connection.as_mut() => served,
            () = slot.evicted() => {
                debug!(%peer, "unauthenticated connection closed to make room");
                return;
            }
            () = stop.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(err) = served {
            debug!(error = %err, %peer, "connection ended with an error");
        }
    }
}

/// Takes each admitted connection from `listener` to `serve` until `stop`; then waits for
/// the connections `serve` put in its tracker to end.
async fn accept_until<L: Accept>(
    mut listener: L,
    stop: &CancellationToken,
    mut serve: impl FnMut(Incoming<L::Io>, &TaskTracker),
) -> io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            incoming = listener.accept() => serve(incoming, &connections),
            () = stop.cancelled() => break,
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Socket options for every accepted connection, plain or TLS.
pub(crate) fn tune_socket(tcp: &tokio::net::TcpStream, keepalive: &socket2::TcpKeepalive) {
    // Without it, the last small write of each stream waits ~40 ms for Nagle.
    let _ = tcp.set_nodelay(true);
    // Probes keep NAT and firewall state alive while a request waits for its first token.
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(keepalive);
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use axum::routing::get;
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A token naming `sub` (unsigned: placement never verifies; the handler below never asks).
    fn token(sub: &str) -> String {
        let payload = format!(r#"{{"sub":"{sub}"}}"#);
        let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", encode(r#"{"alg":"HS256"}"#), encode(&payload))
    }

    /// The name of the thread that served one request on a fresh connection.
    async fn served_on(addr: SocketAddr, token: Option<&str>) -> String {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET /thread HTTP/1.1\r\nhost: relay\r\n{auth}connection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut response))
            .await
            .expect("an answer in time")
            .expect("read");
        let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    }

    #[tokio::test]
    async fn a_users_connections_are_all_served_on_one_shard_and_anonymous_ones_in_turn() {
        let shards = Arc::new(Shards::start(4).expect("shards"));
        let app = Router::new().route(
            "/thread",
            get(|| async { std::thread::current().name().unwrap_or("?").to_owned() }),
        );
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("address");
        let gate = Gate::new(64, 64, Vec::new(), Arc::default());
        let stop = CancellationToken::new();
        let http = Http {
            app,
            api: None,
            read_timeout: Duration::from_secs(10),
            stop: stop.clone(),
        };
        let listener = PlainListener::new(tcp, socket2::TcpKeepalive::new(), gate);
        let registry = Arc::new(Registry::default());
        let server = tokio::spawn(http.serve_sharded(listener, shards, registry));

        for user in ["alice", "bob", "carol"] {
            let mut threads = HashSet::new();
            for _ in 0..5 {
                threads.insert(served_on(addr, Some(&token(user))).await);
            }
            assert_eq!(threads.len(), 1, "{user}'s connections on {threads:?}");
            let thread = threads.into_iter().next().unwrap_or_default();
            assert!(
                thread.starts_with("relay-shard-"),
                "{user} served on {thread}"
            );
        }
        let mut anonymous = HashSet::new();
        for _ in 0..8 {
            anonymous.insert(served_on(addr, None).await);
        }
        assert_eq!(anonymous.len(), 4, "{anonymous:?}");

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops")
            .expect("server task")
            .expect("served");
    }
}
