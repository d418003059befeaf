//! Caps on connections that have not authenticated yet, enforced at accept time.
//!
//! Every accepted connection holds a file descriptor (and a task, and buffers) from the moment
//! it is accepted, long before any token is read. Without a cap, anyone who can reach the port
//! can hold all of the relay's descriptors with idle connections, each for up to
//! `client_read_timeout`, and every legitimate request then fails.
//!
//! So a connection is *unauthenticated* from its accept until a request on it is admitted (its
//! token verified and its tier's limits let it through), and unauthenticated connections count
//! against two caps: per client address (`max_unauthenticated_connections_per_address`; an IPv6
//! client counts by its /64, the block one subscriber is usually given) and in all
//! (`max_unauthenticated_connections`). A connection whose request was admitted stops counting
//! for the rest of its life, so a client with many keep-alive connections is bounded by its
//! tier, not here; a tunnel stops counting when its WebSocket upgrade completes (which only
//! happens after its agent token verified). Connections from `trusted_proxies` count in all but
//! not per address: a reverse proxy carries many clients.
//!
//! When a cap is full, the oldest unauthenticated connection under it is closed to make room,
//! provided it has had [`EVICT_AFTER`] to authenticate; otherwise the new connection is closed
//! at once, before any TLS or HTTP work. Either way the count is kept in the metrics. So idle
//! connections cannot lock anybody out: whoever holds them loses them to the next newcomer, and
//! only a flood of new connections faster than the caps allow for in [`EVICT_AFTER`] keeps
//! new clients out, each refusal costing the relay an accept and a close.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::warn;

use crate::lock;
use crate::metrics::Metrics;

/// How long a new connection may take to authenticate before a newcomer may push it out of a
/// full cap: 2 s. A real client sends its first request within a round trip or two of the
/// accept (a TLS handshake and a request head: well under a second even across continents and
/// on mobile links); a connection still unauthenticated after that is idle, slow, or hostile.
pub const EVICT_AFTER: Duration = Duration::from_secs(2);

/// What an unauthenticated connection is counted under: its address, or for IPv6 its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(Ipv4Addr),
    V6Prefix(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match crate::client_addr::canonical(ip) {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => Source::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

/// Which cap closed a connection, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// The client address's (or IPv6 /64's) cap.
    Address,
    /// The cap on all unauthenticated connections.
    Total,
}

impl Cap {
    /// The cap's name in the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Cap::Address => "address",
            Cap::Total => "total",
        }
    }
}

/// One unauthenticated connection, as the gate sees it.
struct Waiting {
    /// Counted under this source too (`None`: a trusted proxy, counted in all only).
    source: Option<Source>,
    since: Instant,
    evict: CancellationToken,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Every unauthenticated connection by id; ids grow with time, so the first is the oldest.
    waiting: BTreeMap<u64, Waiting>,
    /// The ids of each source's unauthenticated connections; sources with none are absent.
    by_source: HashMap<Source, BTreeSet<u64>>,
}

impl State {
    /// Removes connection `id` from the counts; whether it was still counted.
    fn remove(&mut self, id: u64) -> Option<Waiting> {
        let waiting = self.waiting.remove(&id)?;
        if let Some(source) = waiting.source
            && let Some(ids) = self.by_source.get_mut(&source)
        {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(waiting)
    }
}

/// The caps on unauthenticated connections. See the module docs.
pub struct Gate {
    per_address: usize,
    total: usize,
    /// Reverse proxies: counted in all, not per address.
    trusted: Vec<IpAddr>,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

impl Gate {
    /// A gate allowing `per_address` unauthenticated connections per client address (peers in
    /// `trusted` excepted) and `total` in all. Zero counts as one.
    pub fn new(
        per_address: u32,
        total: u32,
        trusted: Vec<IpAddr>,
        metrics: Arc<Metrics>,
    ) -> Arc<Gate> {
        Arc::new(Gate {
            per_address: per_address.max(1) as usize,
            total: total.max(1) as usize,
            trusted: trusted
                .into_iter()
                .map(crate::client_addr::canonical)
                .collect(),
            state: Mutex::default(),
            metrics,
        })
    }

    /// Admits a connection just accepted from `peer`, or refuses it (the caller closes it at
    /// once). Admitting into a full cap closes that cap's oldest unauthenticated connection if
    /// it is older than [`EVICT_AFTER`].
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Arc<Slot>> {
        let ip = crate::client_addr::canonical(peer);
        let source = (!self.trusted.contains(&ip)).then(|| Source::of(ip));
        let now = Instant::now();
        let mut state = lock(&self.state);
        if let Some(source) = source {
            let oldest = state
                .by_source
                .get(&source)
                .filter(|ids| ids.len() >= self.per_address)
                .and_then(|ids| ids.first().copied());
            if let Some(oldest) = oldest {
                self.make_room(&mut state, oldest, now, Cap::Address)?;
            }
        }
        if state.waiting.len() >= self.total
            && let Some(oldest) = state.waiting.keys().next().copied()
        {
            self.make_room(&mut state, oldest, now, Cap::Total)?;
        }
        let id = state.next_id;
        state.next_id += 1;
        let evict = CancellationToken::new();
        state.waiting.insert(
            id,
            Waiting {
                source,
                since: now,
                evict: evict.clone(),
            },
        );
        if let Some(source) = source {
            state.by_source.entry(source).or_default().insert(id);
        }
        self.metrics.unauthenticated.set(state.waiting.len() as i64);
        Some(Arc::new(Slot {
            gate: self.clone(),
            id,
            evict,
            done: AtomicBool::new(false),
        }))
    }

    /// Closes connection `oldest` if it has had its time, or refuses the newcomer (`None`).
    fn make_room(&self, state: &mut State, oldest: u64, now: Instant, cap: Cap) -> Option<()> {
        let old_enough = state
            .waiting
            .get(&oldest)
            .is_some_and(|waiting| now.duration_since(waiting.since) >= EVICT_AFTER);
        if !old_enough {
            self.metrics.connection_refused(cap);
            return None;
        }
        if let Some(waiting) = state.remove(oldest) {
            waiting.evict.cancel();
        }
        self.metrics.connection_evicted(cap);
        Some(())
    }

    fn release(&self, id: u64) {
        let mut state = lock(&self.state);
        if state.remove(id).is_some() {
            self.metrics.unauthenticated.set(state.waiting.len() as i64);
        }
    }

    /// Unauthenticated connections now.
    pub fn unauthenticated(&self) -> usize {
        lock(&self.state).waiting.len()
    }
}

/// One connection's place under the caps, from its accept until a request on it is admitted
/// or it closes. Handlers find it among the request's extensions.
pub struct Slot {
    gate: Arc<Gate>,
    id: u64,
    evict: CancellationToken,
    done: AtomicBool,
}

impl Slot {
    /// A request on this connection was admitted: it no longer counts against the caps.
    pub fn authenticated(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.gate.release(self.id);
        }
    }

    /// Completes when the gate closed this connection to make room for a newer one.
    pub fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.evict.cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.authenticated();
    }
}

/// Marks the connection that carried the request with `extensions` as authenticated, once a
/// request on it has been admitted. Requests that did not come through the gate (none in the
/// relay; tests) have no slot.
pub(crate) fn admitted(extensions: &http::Extensions) {
    if let Some(slot) = extensions.get::<Arc<Slot>>() {
        slot.authenticated();
    }
}

/// The cap on unauthenticated connections in all: `configured`, lowered to half the process's
/// open-file limit if that is smaller (with a warning saying how to raise the limit), so that
/// connections that never authenticate can never take every descriptor.
pub(crate) fn unauthenticated_cap(configured: u32) -> u32 {
    let Some(open_files) = open_files_limit() else {
        return configured;
    };
    let ceiling = u32::try_from(open_files / 2).unwrap_or(u32::MAX).max(1);
    if configured <= ceiling {
        return configured;
    }
    warn!(
        max_unauthenticated_connections = configured,
        open_files,
        lowered_to = ceiling,
        "max_unauthenticated_connections is above half the open-file limit: lowered; raise the limit \
         (LimitNOFILE= in the systemd unit, `ulimit -n`, or the container's nofile) to keep it"
    );
    ceiling
}

/// The process's soft limit on open files, where it can be read (Linux: `/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files(&limits)
}

/// The soft "Max open files" value of a `/proc/PID/limits` text; `None` when unlimited.
fn parse_open_files(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(per_address: u32, total: u32, trusted: &[&str]) -> (Arc<Gate>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let trusted = trusted.iter().map(|ip| ip.parse().unwrap()).collect();
        (
            Gate::new(per_address, total, trusted, metrics.clone()),
            metrics,
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_address_refuses_newcomers_then_evicts_its_oldest() {
        let (gate, metrics) = gate(2, 100, &[]);
        let a = ip("198.51.100.7");
        let first = gate.admit(a).unwrap();
        let second = gate.admit(a).unwrap();
        // Young connections are not pushed out: the newcomer is refused.
        assert!(gate.admit(a).is_none());
        // Another address, and the mapped form of another address, are not affected.
        let other = gate.admit(ip("198.51.100.8")).unwrap();
        let _mapped = gate.admit(ip("::ffff:198.51.100.9")).unwrap();
        assert_eq!(gate.unauthenticated(), 4);

        // Once they have had their time, a newcomer closes the oldest.
        tokio::time::advance(EVICT_AFTER).await;
        let third = gate.admit(a).unwrap();
        tokio::time::timeout(Duration::from_secs(1), first.evicted())
            .await
            .expect("the oldest was closed");
        assert!(!second.evict.is_cancelled() && !other.evict.is_cancelled());
        assert_eq!(gate.unauthenticated(), 4);

        // An authenticated connection leaves room and is never evicted.
        second.authenticated();
        let fourth = gate.admit(a).unwrap();
        assert!(!second.evict.is_cancelled());
        drop((third, fourth, first));
        let text = metrics.encode(0);
        for line in [
            "cloudllm_connections_refused_total{cap=\"address\"} 1",
            "cloudllm_connections_evicted_total{cap=\"address\"} 1",
            "cloudllm_unauthenticated_connections 2",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_counts_by_slash_64_and_proxies_only_in_all() {
        let (gate, _) = gate(1, 3, &["10.0.0.2"]);
        let _a = gate.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(gate.admit(ip("2001:db8:1:2::ffff")).is_none(), "same /64");
        let _b = gate.admit(ip("2001:db8:1:3::1")).unwrap();
        // The proxy is not capped per address, only in all.
        let proxy = gate.admit(ip("10.0.0.2")).unwrap();
        assert!(
            gate.admit(ip("10.0.0.2")).is_none(),
            "the total cap is full"
        );
        tokio::time::advance(EVICT_AFTER).await;
        // Full in all: the oldest anywhere makes room.
        let _c = gate.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(gate.unauthenticated(), 3);
        drop(proxy);
        assert_eq!(gate.unauthenticated(), 2);
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files(text), Some(1024));
        assert_eq!(
            parse_open_files(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
        assert_eq!(parse_open_files(""), None);
        if cfg!(target_os = "linux") {
            assert!(open_files_limit().is_some_and(|n| n > 0));
        }
    }
}
