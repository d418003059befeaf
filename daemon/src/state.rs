//! The daemon's observable state: what `cloudllm status` shows and `watch` streams.
//!
//! One [`State`] per daemon. Components update their part of the [`Status`] through it; IPC
//! clients read snapshots or subscribe to changes. Request counters change on every request, so
//! they live in atomics and are folded into snapshots instead of waking every watcher.
//!
//! The connection state belongs to the current tunnel alone. While the daemon switches tunnels
//! (a new login, a renewed token), the old one keeps serving and may keep redialling a relay
//! that is gone; were it to write, `status` and the tray would show its "reconnecting" over the
//! new tunnel's "connected" for good. So a tunnel writes through a [`TunnelReport`], which
//! [`State::begin_tunnel`] hands out and which stops writing once a newer tunnel has begun or
//! the supervisor has ended them all ([`State::end_tunnels`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cloudllm_proto::ipc::{Connection, Ollama, Status};
use tokio::sync::watch;

/// The daemon's state. See the module docs.
#[derive(Debug)]
pub struct State {
    status: watch::Sender<Status>,
    in_flight: AtomicU64,
    total: AtomicU64,
    /// The tunnel allowed to write the connection state, and its round trip.
    tunnel: Mutex<CurrentTunnel>,
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
            tunnel: Mutex::new(CurrentTunnel::default()),
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
            let micros = self.current_tunnel().rtt_micros.load(Ordering::Relaxed);
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

    /// Makes a new tunnel the current one: from now on only the returned report writes the
    /// connection state and its round trip; the reports of earlier tunnels write nothing.
    pub fn begin_tunnel(self: &Arc<Self>) -> TunnelReport {
        let mut current = self.current_tunnel();
        *current = CurrentTunnel {
            generation: current.generation + 1,
            rtt_micros: Arc::new(AtomicU64::new(0)),
        };
        TunnelReport {
            state: self.clone(),
            generation: current.generation,
            rtt_micros: current.rtt_micros.clone(),
        }
    }

    /// Ends every tunnel's say (none is wanted now: logged out, disconnected …) and sets the
    /// connection state to `connection`.
    pub fn end_tunnels(&self, connection: Connection) {
        let mut current = self.current_tunnel();
        *current = CurrentTunnel {
            generation: current.generation + 1,
            rtt_micros: Arc::new(AtomicU64::new(0)),
        };
        self.set_connection(connection);
    }

    fn set_connection(&self, connection: Connection) {
        self.update(|status| status.connection = connection);
    }

    fn current_tunnel(&self) -> std::sync::MutexGuard<'_, CurrentTunnel> {
        self.tunnel.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request in flight until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }
}

/// Which tunnel may write the connection state.
#[derive(Debug, Default)]
struct CurrentTunnel {
    /// Counts the tunnels begun (and the times all were ended); a report whose number is not
    /// this one is stale.
    generation: u64,
    /// The current tunnel's round trip in microseconds, 0 until measured.
    rtt_micros: Arc<AtomicU64>,
}

/// One tunnel's say in the [`State`]: it writes the connection state and the round trip only
/// while its tunnel is the current one. See the module docs.
#[derive(Debug, Clone)]
pub struct TunnelReport {
    state: Arc<State>,
    generation: u64,
    rtt_micros: Arc<AtomicU64>,
}

impl TunnelReport {
    /// Sets the connection state, if this tunnel is still the current one.
    pub fn set_connection(&self, connection: Connection) {
        // Checked and written under the lock, so a newer tunnel cannot begin in between.
        let current = self.state.current_tunnel();
        if current.generation == self.generation {
            self.state.set_connection(connection);
        }
    }

    /// The cell the tunnel writes its measured round trip into (its own: a stale tunnel's
    /// measurements are never shown).
    pub fn rtt_cell(&self) -> Arc<AtomicU64> {
        self.rtt_micros.clone()
    }

    /// The daemon's state, for what every tunnel shares (models, request counters).
    pub fn state(&self) -> &Arc<State> {
        &self.state
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
        let tunnel = state.begin_tunnel();
        let mut watcher = state.subscribe();
        watcher.borrow_and_update();
        tunnel.set_connection(Connection::Connecting);
        assert!(watcher.has_changed().unwrap());
        watcher.borrow_and_update();
        tunnel.set_connection(Connection::Connecting);
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

        tunnel.set_connection(Connection::Connected {
            since: 1,
            rtt_ms: None,
        });
        tunnel.rtt_cell().store(1500, Ordering::Relaxed);
        assert_eq!(
            state.snapshot().connection,
            Connection::Connected {
                since: 1,
                rtt_ms: Some(2)
            }
        );
    }

    #[test]
    fn only_the_current_tunnel_writes_the_connection_state() {
        let state = State::new("box".into(), "file".into());
        let old = state.begin_tunnel();
        old.set_connection(Connection::Connected {
            since: 1,
            rtt_ms: None,
        });
        old.rtt_cell().store(9000, Ordering::Relaxed);
        let new = state.begin_tunnel();
        new.set_connection(Connection::Connected {
            since: 2,
            rtt_ms: None,
        });
        // The old tunnel, being switched out, fails to redial its relay: nobody hears of it.
        old.set_connection(Connection::Reconnecting {
            attempt: 1,
            next_try: 3,
            last_error: "connection refused".into(),
        });
        old.rtt_cell().store(7000, Ordering::Relaxed);
        assert_eq!(
            state.snapshot().connection,
            Connection::Connected {
                since: 2,
                rtt_ms: None
            },
            "neither the old tunnel's state nor its round trip shows"
        );
        // Once the supervisor has ended them all, no tunnel writes.
        state.end_tunnels(Connection::Disconnected);
        new.set_connection(Connection::Connecting);
        assert_eq!(state.snapshot().connection, Connection::Disconnected);
    }
}
