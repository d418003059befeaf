//! A TCP proxy for fault injection: forwards bytes both ways until told to stall, then holds
//! every connection open while moving nothing — a network path that silently died, with no FIN
//! and no RST. Used to check that both tunnel ends notice a dead peer within their bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// A running stall proxy.
pub struct StallProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    stalled: Arc<(AtomicBool, Notify)>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StallProxy {
    /// Starts a proxy on `127.0.0.1:0` to `target`.
    pub async fn start(target: SocketAddr) -> StallProxy {
        StallProxy::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Starts a proxy on `listen` to `target`: a proxy started again on the address of one that
    /// was dropped stands for a backend that was killed and restarted. Dropping a proxy closes
    /// its listener and every connection it carries.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> StallProxy {
        let listener = TcpListener::bind(listen).await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let stalled = Arc::new((AtomicBool::new(false), Notify::new()));
        let flag = stalled.clone();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                connections.spawn(pump(ri, wo, flag.clone()));
                connections.spawn(pump(ro, wi, flag.clone()));
            }
        });
        StallProxy {
            addr,
            stalled,
            accepted,
            task,
        }
    }

    /// How many connections it has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops moving bytes (connections stay open) or resumes.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.0.store(stalled, Ordering::SeqCst);
        self.stalled.1.notify_waiters();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<(AtomicBool, Notify)>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while stalled.0.load(Ordering::SeqCst) {
            let wake = stalled.1.notified();
            if !stalled.0.load(Ordering::SeqCst) {
                break;
            }
            wake.await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a stall are held back, as a dead path would.
        while stalled.0.load(Ordering::SeqCst) {
            let wake = stalled.1.notified();
            if !stalled.0.load(Ordering::SeqCst) {
                break;
            }
            wake.await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
