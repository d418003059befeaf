//! The daemon's observable state: what `cloudllm status` shows and `watch` streams.
//!
//! One [`State`] per daemon. Components update their part of the [`Status`] through it; IPC
//! clients read snapshots or subscribe to changes. Request counters change on every request, so
//! they live in atomics and are folded into snapshots instead of waking every watcher.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cloudllm_proto::ipc::{Connection, Ollama, Status};
use tokio::sync::watch;

/// The daemon's state. See the module docs.
#[derive(Debug)]
pub struct State {
    status: watch::Sender<Status>,
    in_flight: AtomicU64,
    total: AtomicU64,
    /// Round trip to the relay in microseconds, 0 until measured; shared with the tunnel.
    rtt_micros: Arc<AtomicU64>,
    /// The names of Ollama's models (empty while it is down), which the relay routes by.
    models: watch::Sender<Vec<String>>,
}

impl State {
    /// A fresh state for a daemon whose device is `device_name`.
    pub fn new(device_name: String, credential_store: String) -> Arc<State> {
        let (status, _) = watch::channel(Status {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            connection: Connection::LoggedOut,
            relay_url: None,
            user: None,
            tier: None,
            device_name,
            ollama: Ollama::Unknown,
            requests_in_flight: 0,
            requests_total: 0,
            credential_store,
        });
        Arc::new(State {
            status,
            in_flight: AtomicU64::new(0),
            total: AtomicU64::new(0),
            rtt_micros: Arc::new(AtomicU64::new(0)),
            models: watch::channel(Vec::new()).0,
        })
    }

    /// Records Ollama's model names; subscribers wake only if the list changed.
    pub fn set_models(&self, models: Vec<String>) {
        self.models.send_if_modified(|current| {
            let changed = *current != models;
            if changed {
                *current = models;
            }
            changed
        });
    }

    /// Ollama's model names, and changes to them (for the relay's events stream).
    pub fn models(&self) -> watch::Receiver<Vec<String>> {
        self.models.subscribe()
    }

    /// The current state, counters and round trip included.
    pub fn snapshot(&self) -> Status {
        let mut status = self.status.borrow().clone();
        self.fill_live(&mut status);
        status
    }

    /// Fills counters and round trip into a status taken from [`State::subscribe`].
    pub fn fill_live(&self, status: &mut Status) {
        status.requests_in_flight = self.in_flight.load(Ordering::Relaxed);
        status.requests_total = self.total.load(Ordering::Relaxed);
        if let Connection::Connected { rtt_ms, .. } = &mut status.connection {
            let micros = self.rtt_micros.load(Ordering::Relaxed);
            *rtt_ms = (micros > 0).then(|| micros.div_ceil(1000));
        }
    }

    /// Wakes on every change of the state (not of the counters).
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Changes the state; watchers wake only if something actually changed.
    pub fn update(&self, change: impl FnOnce(&mut Status)) {
        self.status.send_if_modified(|status| {
            let before = status.clone();
            change(status);
            *status != before
        });
    }

    /// Sets the tunnel's state.
    pub fn set_connection(&self, connection: Connection) {
        self.update(|status| status.connection = connection);
    }

    /// The cell the tunnel writes its measured round trip into.
    pub fn rtt_cell(&self) -> Arc<AtomicU64> {
        self.rtt_micros.clone()
    }

    /// Counts a request in flight until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }
}

/// One request in flight; see [`State::begin_request`].
#[derive(Debug)]
pub struct RequestGuard(Arc<State>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_wake_on_real_changes_and_counters_fold_into_snapshots() {
        let state = State::new("box".into(), "file".into());
        let mut watcher = state.subscribe();
        watcher.borrow_and_update();
        state.set_connection(Connection::Connecting);
        assert!(watcher.has_changed().unwrap());
        watcher.borrow_and_update();
        state.set_connection(Connection::Connecting);
        assert!(!watcher.has_changed().unwrap(), "no change, no wake-up");

        let guard = state.begin_request();
        let _second = state.begin_request();
        drop(guard);
        let snapshot = state.snapshot();
        assert_eq!(
            (snapshot.requests_in_flight, snapshot.requests_total),
            (1, 2)
        );
        assert!(
            !watcher.has_changed().unwrap(),
            "counters do not wake watchers"
        );

        state.set_connection(Connection::Connected {
            since: 1,
            rtt_ms: None,
        });
        state.rtt_cell().store(1500, Ordering::Relaxed);
        assert_eq!(
            state.snapshot().connection,
            Connection::Connected {
                since: 1,
                rtt_ms: Some(2)
            }
        );
    }
}
