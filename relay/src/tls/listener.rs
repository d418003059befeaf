//! The TLS listener the HTTP server takes connections from.
//!
//! A background task accepts TCP connections, admits each through the caps on unauthenticated
//! connections ([`crate::connections`]) before any TLS work (a refused one is closed at once),
//! and runs each handshake in a task of its own under [`HANDSHAKE_TIMEOUT`], so a slow or
//! silent client never holds up anyone else's; finished connections pass on through a bounded
//! channel.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, debug_span, info_span};

use super::Tls;
use crate::connections::Gate;
use crate::server::{Accept, Incoming, accept_failed, tune_socket};

/// Longest a client may take to complete its TLS handshake: 10 s. A real client needs one or
/// two round trips (well under a second even across continents); the bound is what a
/// connection that never speaks may cost: one socket and one small task for this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once, at most: 1024. Beyond that, new connections wait (within
/// their handshake timeout) for one to finish; accepting never waits, so the caps on
/// unauthenticated connections always see new connections and can close idle ones to make
/// room. A reconnect storm of thousands of daemons still passes quickly (each handshake takes
/// milliseconds), while a flood of clients that never finish theirs holds bounded memory.
const MAX_HANDSHAKES: usize = 1024;

/// Finished handshakes waiting for the HTTP server to take them: 64. The server takes them in
/// a tight loop; this only smooths bursts.
const READY_QUEUE: usize = 64;

impl Tls {
    /// Serves TLS on `tcp`, admitting connections through `gate`: the returned listener yields
    /// connections whose handshake has completed. Accepting stops once the listener is dropped.
    pub(crate) fn listener(
        &self,
        tcp: TcpListener,
        keepalive: socket2::TcpKeepalive,
        gate: Arc<Gate>,
    ) -> TlsListener {
        let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(
            accept_loop(tcp, keepalive, self.acceptor.clone(), gate, ready_tx)
                .instrument(info_span!("tls_accept")),
        );
        TlsListener { ready }
    }
}

/// Accepts TCP connections and runs their handshakes, until the [`TlsListener`] is dropped.
async fn accept_loop(
    tcp: TcpListener,
    keepalive: socket2::TcpKeepalive,
    acceptor: TlsAcceptor,
    gate: Arc<Gate>,
    ready: mpsc::Sender<Incoming<TlsStream<TcpStream>>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, addr) = tokio::select! {
            _ = ready.closed() => break,
            accepted = tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            },
        };
        let Some(slot) = gate.admit(addr.ip()) else {
            debug!(%addr, "connection refused: too many unauthenticated connections");
            continue; // dropping `stream` closes it, before any TLS work
        };
        tune_socket(&stream, &keepalive);
        let acceptor = acceptor.clone();
        let handshakes = handshakes.clone();
        let ready = ready.clone();
        tokio::spawn(
            async move {
                let handshake = async {
                    // Never closed, so always a permit; held for the handshake only.
                    let permit = handshakes.acquire_owned().await;
                    let tls = acceptor.accept(stream).await;
                    drop(permit);
                    tls
                };
                let evicted = slot.clone();
                tokio::select! {
                    () = evicted.evicted() => {
                        debug!("closed during its TLS handshake to make room for newer connections");
                    }
                    handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match handshake {
                        Ok(Ok(tls)) => {
                            let incoming = Incoming { io: tls, peer: addr, slot };
                            // Fails only when the server has stopped accepting: the connection
                            // closes.
                            let _ = ready.send(incoming).await;
                        }
                        Ok(Err(err)) => debug!(error = %err, "TLS handshake failed"),
                        Err(_) => debug!(timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out"),
                    },
                }
            }
            .instrument(debug_span!("tls_handshake", %addr)),
        );
    }
    debug!("stopped accepting TLS connections");
}

/// Connections whose TLS handshake has completed, admitted by the gate.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<Incoming<TlsStream<TcpStream>>>,
}

impl Accept for TlsListener {
    type Io = TlsStream<TcpStream>;

    async fn accept(&mut self) -> Incoming<Self::Io> {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop ends only when this listener is dropped, so this is unreachable
            // in practice; waiting forever is what a listener with no more clients does.
            None => std::future::pending().await,
        }
    }
}
