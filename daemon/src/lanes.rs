//! The daemon's end of a busy tunnel's lanes: one more connection to the relay per relay
//! thread the relay names, each served on a thread of its own.
//!
//! A tunnel is one connection served by one thread here and one on the relay; when a device
//! is busy, those two threads are the bottleneck while other cores wait. So the relay asks
//! (`Control::Lanes`, to daemons whose hello offers lanes) for a lane to each of its other
//! threads. Each lane is dialled like the tunnel, with the lane header naming the relay thread
//! and the tunnel's key, then serves sessions as the tunnel does, on its own thread with its
//! own single-threaded runtime and its own connections to Ollama: no request crosses threads
//! on either side. The relay closes a lane once the device is idle; a lane that fails is not
//! dialled again until the relay asks. Lanes belong to their tunnel: they drain when it
//! drains or its connection ends, finishing the requests they carry (see [`Lanes`]). Every
//! lane's request goes through the same [`Forwarder`] checks as the tunnel's.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use cloudllm_tunnel::Link;
use cloudllm_tunnel::server::{self, LanesAsked, Served};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, warn};

use crate::dial;
use crate::forward::Forwarder;
use crate::state::State;
use crate::tunnel::{RETIRE_DRAIN, Session};

/// The lanes of one tunnel connection. Dropping it drains them (see [`Lanes::drop`]).
pub struct Lanes {
    session: Session,
    tls: Arc<rustls::ClientConfig>,
    state: Arc<State>,
    /// The lanes running.
    running: Arc<Threads>,
    /// Cancelled when the tunnel drains: the lanes refuse new requests and close once those
    /// in flight have finished.
    drain: CancellationToken,
    /// Cancelled: the lanes end now, with whatever they carry ([`Lanes::cut`], or a while
    /// after the drop).
    cut: CancellationToken,
}

impl Lanes {
    /// No lanes yet, for a tunnel that drains when `drain` is cancelled.
    pub fn new(
        session: Session,
        tls: Arc<rustls::ClientConfig>,
        state: Arc<State>,
        drain: CancellationToken,
    ) -> Lanes {
        Lanes {
            session,
            tls,
            state,
            running: Arc::default(),
            drain,
            cut: CancellationToken::new(),
        }
    }

    /// Opens the lanes the relay asked for, except those running already.
    pub fn open(&self, asked: LanesAsked) {
        for shard in asked.shards {
            if self.drain.is_cancelled() || !lock(&self.running.shards).insert(shard) {
                continue;
            }
            let lane = Lane {
                session: self.session.clone(),
                tls: self.tls.clone(),
                state: self.state.clone(),
                header: format!("{shard}.{}", asked.key),
                drain: self.drain.clone(),
                cut: self.cut.clone(),
                running: Running {
                    threads: self.running.clone(),
                    shard,
                },
            };
            let spawned = std::thread::Builder::new()
                .name(format!("cloudllmd-lane-{shard}"))
                .spawn(move || lane.run());
            if let Err(err) = spawned {
                // Its `Running` went with the closure: the shard may be asked for again.
                warn!(error = %err, "cannot start a thread for a lane; the tunnel carries its requests");
            }
        }
    }

    /// Waits until no lane runs: once the tunnel drains, each ends after its requests in
    /// flight.
    pub async fn finished(&self) {
        loop {
            let ended = self.running.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if lock(&self.running.shards).is_empty() {
                return;
            }
            ended.await;
        }
    }

    /// Ends every lane now, with whatever it has in flight.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

impl Drop for Lanes {
    /// The tunnel's connection has ended: the lanes drain (as the relay's ends of them do),
    /// and are cut if still busy after [`RETIRE_DRAIN`].
    fn drop(&mut self) {
        self.drain.cancel();
        let cut = self.cut.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !lock(&self.running.shards).is_empty() => {
                runtime.spawn(async move {
                    tokio::time::sleep(RETIRE_DRAIN).await;
                    cut.cancel();
                });
            }
            _ => cut.cancel(),
        }
    }
}

/// One lane, before its thread runs it.
struct Lane {
    session: Session,
    tls: Arc<rustls::ClientConfig>,
    state: Arc<State>,
    /// The lane header's value: `SHARD.KEY`.
    header: String,
    drain: CancellationToken,
    cut: CancellationToken,
    running: Running,
}

impl Lane {
    /// Runs the lane on the calling thread until it ends.
    fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => return warn!(error = %err, "cannot start a runtime for a lane"),
        };
        let span = debug_span!("lane", shard = self.running.shard);
        let cut = self.cut.clone();
        runtime.block_on(async move {
            // In a task of its own: what `block_on` polls itself is woken through the
            // runtime's waker (three system calls per wake-up), a task on this thread is not.
            let serving = tokio::spawn(self.serve().instrument(span));
            let serving = tokio_util::task::AbortOnDropHandle::new(serving);
            tokio::select! {
                _ = serving => {}
                () = cut.cancelled() => debug!("tunnel ended: lane cut"),
            }
        });
    }

    /// Dials the lane and serves its sessions until the relay closes it or the tunnel drains.
    async fn serve(self) {
        let config = &self.session.config;
        let forwarder = match Forwarder::for_config(config, self.state.clone()) {
            Ok(forwarder) => Arc::new(forwarder),
            Err(err) => return warn!(error = %err, "lane not opened"),
        };
        let (device_id, token) = (&self.session.device_id, &self.session.token);
        let ws = match dial::dial(config, &self.tls, device_id, token, Some(&self.header)).await {
            Ok(ws) => ws,
            // The tunnel carries the requests of this relay thread meanwhile.
            Err(err) => return debug!(error = %err, "lane not opened"),
        };
        debug!("lane up");
        // Relays send nothing but sessions on a lane.
        let link = Link::new(ws, config.liveness(), Box::new(|_| {}));
        match server::serve(link, forwarder.service(), &self.drain).await {
            Served::Stopped(mut link) => link.close(CloseCode::Normal, "tunnel draining").await,
            Served::Closed(_) => debug!("lane closed by the relay"),
            Served::Failed(err) => {
                debug!(error = %server::with_causes(err.as_ref()), "lane failed")
            }
        }
    }
}

/// The lanes running, by relay thread.
#[derive(Default)]
struct Threads {
    shards: Mutex<HashSet<u32>>,
    /// Woken as each lane ends.
    ended: Notify,
}

/// Marks a relay thread's lane as running until dropped.
struct Running {
    threads: Arc<Threads>,
    shard: u32,
}

impl Drop for Running {
    fn drop(&mut self) {
        lock(&self.threads.shards).remove(&self.shard);
        self.threads.ended.notify_waiters();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
