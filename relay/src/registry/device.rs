//! One connected device: its tunnel's session (opened on demand), its lanes, its requests in
//! flight, its model list, and whether it is still the device's live tunnel.
//!
//! Requests and the tunnel task meet here. A request asks for a session and waits (at most
//! [`SESSION_WAIT`]) until the tunnel task has opened one, or hears that the tunnel is gone;
//! the tunnel task learns from here when a session is wanted, when the device has been idle
//! long enough to close it, and when a newer tunnel has replaced this one.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudllm_tunnel::mux::client::Client;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lock;

/// Longest a request waits for its device's tunnel to open a session: the session
/// starts without a round trip, so only a tunnel that is dying takes this long.
const SESSION_WAIT: Duration = Duration::from_secs(10);

/// One connected device: a live tunnel of one user.
#[derive(Debug)]
pub struct Device {
    /// The user whose agent token opened the tunnel.
    pub user: String,
    /// The daemon's stable device id.
    pub id: String,
    /// The daemon's device name.
    pub name: String,
    /// Unique per tunnel, so a replaced tunnel never unregisters its successor.
    pub tunnel_id: u64,
    /// The session open on the tunnel, if any. Holding it keeps the session open; the
    /// tunnel task puts it here and takes it away (see [`crate::tunnel`]).
    session: Mutex<Option<Client>>,
    /// Wakes the tunnel task: a request is waiting for a session.
    wanted: Notify,
    /// Requests waiting for a session.
    waiting: AtomicUsize,
    /// Wakes the waiting requests: a session opened, or the tunnel is gone.
    opened: Notify,
    /// The tunnel is gone: no session will open again.
    gone: AtomicBool,
    /// The tunnel's lanes, when the relay asks it for lanes (see `tunnel::lane`): boxed, so
    /// that the many idle tunnels without lanes carry a pointer only.
    lanes: Option<Box<Lanes>>,
    /// A newer tunnel with the same user and device id took this one's place in the registry.
    replaced: CancellationToken,
    /// Requests in flight on this tunnel, for least-busy routing.
    in_flight: AtomicUsize,
    /// When a request last started or ended, in milliseconds since `born`.
    last_active: AtomicU64,
    born: Instant,
    /// The names of the models the device's Ollama has, as the daemon last reported them.
    models: Mutex<Vec<String>>,
    /// In a cluster, told when the models change (set when the device registers).
    observer: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<crate::cluster::Change>>,
}

impl Device {
    /// A device whose tunnel has just said hello; no session is open yet.
    pub fn new(user: String, id: String, name: String) -> Self {
        static NEXT_TUNNEL: AtomicU64 = AtomicU64::new(1);
        Device {
            user,
            id,
            name,
            tunnel_id: NEXT_TUNNEL.fetch_add(1, Ordering::Relaxed),
            session: Mutex::new(None),
            wanted: Notify::new(),
            waiting: AtomicUsize::new(0),
            opened: Notify::new(),
            gone: AtomicBool::new(false),
            lanes: None,
            replaced: CancellationToken::new(),
            in_flight: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            born: Instant::now(),
            models: Mutex::default(),
            observer: std::sync::OnceLock::new(),
        }
    }

    /// The same device, asked for lanes when busy (its daemon offered them and the relay runs
    /// more than one shard).
    pub fn with_lanes(mut self) -> Self {
        let mut key = [0; 16];
        // Without randomness, no lanes: the tunnel alone serves the device.
        if getrandom::fill(&mut key).is_ok() {
            self.lanes = Some(Box::new(Lanes {
                key,
                sessions: Mutex::default(),
            }));
        }
        self
    }

    /// Whether the relay asks this tunnel for lanes.
    pub fn has_lanes(&self) -> bool {
        self.lanes.is_some()
    }

    /// The key a lane of this tunnel presents (32 hex digits), if it has lanes.
    pub fn lane_key(&self) -> Option<String> {
        let lanes = self.lanes.as_ref()?;
        Some(lanes.key.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The shards of `0..shards` other than `own` that have no lane of this tunnel: empty
    /// unless it has lanes.
    pub fn lanes_missing(&self, shards: usize, own: usize) -> Vec<u32> {
        let Some(lanes) = &self.lanes else {
            return Vec::new();
        };
        let sessions = lock(&lanes.sessions);
        (0..shards)
            .filter(|&shard| {
                shard != own && !sessions.iter().any(|(s, c)| *s == shard && !c.is_closed())
            })
            .map(|shard| shard as u32)
            .collect()
    }

    /// Makes `lane` the session that requests served on `shard` use, unless a live lane has
    /// that shard already, the tunnel has no lanes or is gone; then returns false.
    pub fn attach_lane(&self, shard: usize, lane: Client) -> bool {
        let Some(lanes) = &self.lanes else {
            return false;
        };
        let mut sessions = lock(&lanes.sessions);
        sessions.retain(|(_, c)| !c.is_closed());
        if self.gone.load(Ordering::Acquire) || sessions.iter().any(|(s, _)| *s == shard) {
            return false;
        }
        sessions.push((shard, lane));
        true
    }

    /// Lets go of the lane on `shard`: no new request uses it, and it ends once the streams
    /// in flight end.
    pub fn detach_lane(&self, shard: usize) {
        if let Some(lanes) = &self.lanes {
            lock(&lanes.sessions).retain(|(s, _)| *s != shard);
        }
    }

    /// The lane of the shard the caller runs on, if there is a live one.
    fn lane_here(&self) -> Option<Client> {
        let lanes = self.lanes.as_ref()?;
        let shard = crate::shards::current()?;
        lock(&lanes.sessions)
            .iter()
            .find(|(s, c)| *s == shard && !c.is_closed())
            .map(|(_, c)| c.clone())
    }

    /// Tells `observer` whenever the models change from now on (for the registry).
    pub(super) fn observe(
        &self,
        observer: tokio::sync::mpsc::UnboundedSender<crate::cluster::Change>,
    ) {
        let _ = self.observer.set(observer);
    }

    /// Replaces the device's model list.
    pub fn set_models(&self, models: Vec<String>) {
        *lock(&self.models) = models;
        if let Some(observer) = self.observer.get() {
            let _ = observer.send(crate::cluster::Change::Models(self.tunnel_id));
        }
    }

    /// The device's model names.
    pub fn models(&self) -> Vec<String> {
        lock(&self.models).clone()
    }

    /// Whether the device has `model` (`llama3.2` and `llama3.2:latest` are one model, as in
    /// Ollama).
    pub fn has_model(&self, model: &str) -> bool {
        let wanted = canonical_model(model);
        lock(&self.models)
            .iter()
            .any(|m| canonical_model(m) == wanted)
    }

    /// A handle to send requests on this tunnel's session, once one is open: the
    /// tunnel task opens one on demand. On a shard with a lane of this tunnel, the lane's.
    pub async fn sender(&self) -> Result<Client, Offline> {
        if let Some(lane) = self.lane_here() {
            return Ok(lane);
        }
        // The common case, a session already open, takes one lock and no waiting list.
        if let Some(session) = self.open_sender() {
            return Ok(session);
        }
        let deadline = Instant::now() + SESSION_WAIT;
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            // Registered before the checks, so a session opened in between is not missed.
            opened.as_mut().enable();
            if self.gone.load(Ordering::Acquire) {
                return Err(Offline);
            }
            if let Some(session) = self.open_sender() {
                return Ok(session);
            }
            // Counted while waiting, also when the caller gives up and drops this future.
            let _waiting = Waiting::start(&self.waiting);
            self.wanted.notify_one();
            tokio::time::timeout_at(deadline, opened)
                .await
                .map_err(|_| Offline)?;
        }
    }

    /// The open session's handle, unless there is none or its connection has ended.
    fn open_sender(&self) -> Option<Client> {
        lock(&self.session)
            .as_ref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    /// Waits until a request needs a session (for the tunnel task).
    pub async fn session_wanted(&self) {
        loop {
            self.wanted.notified().await;
            // A request that raced with the last session's opening may have left a wake-up
            // behind: only a request still waiting counts.
            if self.waiting.load(Ordering::Acquire) > 0 {
                return;
            }
        }
    }

    /// Makes `session` the one requests use (for the tunnel task).
    pub fn open_session(&self, session: Client) {
        *lock(&self.session) = Some(session);
        self.opened.notify_waiters();
    }

    /// Whether a session is open for requests.
    pub fn has_session(&self) -> bool {
        lock(&self.session).is_some()
    }

    /// Lets go of the open session: it closes once the streams in flight end (for the tunnel
    /// task).
    pub fn close_session(&self) {
        lock(&self.session).take();
    }

    /// Marks the tunnel gone: waiting and later requests get [`Offline`] (for the tunnel
    /// task).
    pub fn set_gone(&self) {
        self.gone.store(true, Ordering::Release);
        self.close_session();
        if let Some(lanes) = &self.lanes {
            lock(&lanes.sessions).clear();
        }
        self.opened.notify_waiters();
    }

    /// Waits until the tunnel is gone or replaced: its lanes end then (for their tasks).
    pub async fn ended(&self) {
        let gone = async {
            loop {
                // `set_gone` wakes the waiters of `opened` (as does each session's opening).
                let opened = self.opened.notified();
                tokio::pin!(opened);
                opened.as_mut().enable();
                if self.gone.load(Ordering::Acquire) {
                    return;
                }
                opened.await;
            }
        };
        tokio::select! {
            () = gone => {}
            () = self.replaced.cancelled() => {}
        }
    }

    /// Waits until a newer tunnel with the same user and device id has replaced this one (for
    /// the tunnel task, which then closes this tunnel). Returns at once if that has happened.
    pub async fn replaced(&self) {
        self.replaced.cancelled().await;
    }

    /// Marks this tunnel replaced by a newer one with the same user and device id (for the
    /// registry, under its lock, so that no request picks this tunnel afterwards).
    pub(super) fn mark_replaced(&self) {
        self.replaced.cancel();
    }

    /// Whether a newer tunnel with the same user and device id has replaced this one.
    pub fn is_replaced(&self) -> bool {
        self.replaced.is_cancelled()
    }

    /// Waits until no request has been in flight for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.born + Duration::from_millis(self.last_active.load(Ordering::Acquire));
            let due = last + idle;
            if self.in_flight() == 0 && due <= Instant::now() {
                return;
            }
            let next = if self.in_flight() > 0 {
                Instant::now() + idle
            } else {
                due
            };
            tokio::time::sleep_until(next).await;
        }
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    fn touch(&self) {
        let millis = self.born.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        self.last_active.store(millis, Ordering::Release);
    }

    /// Requests in flight on this tunnel.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A tunnel's lanes (see [`Device::with_lanes`]).
#[derive(Debug)]
struct Lanes {
    /// Names the tunnel to its lanes' upgrades.
    key: [u8; 16],
    /// The lanes' sessions, by the shard each runs on.
    sessions: Mutex<Vec<(usize, Client)>>,
}

/// Marks one request in flight on a device; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<Device>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request waiting for a session, counted in [`Device::waiting`] until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn start(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The device's tunnel closed before a session could carry the request.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the device's tunnel closed")]
pub struct Offline;

/// A model name as Ollama compares it: without a tag it means `:latest`.
pub(crate) fn canonical_model(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains(':') {
        name.into()
    } else {
        format!("{name}:latest").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Arc<Device> {
        Arc::new(Device::new("u".into(), "id".into(), "name".into()))
    }

    /// A request waiting on `device` for a session, once the tunnel task has heard that a
    /// session is wanted.
    async fn waiting_request(device: &Arc<Device>) -> tokio::task::JoinHandle<Result<(), Offline>> {
        let waiting = tokio::spawn({
            let device = device.clone();
            async move { device.sender().await.map(|_| ()) }
        });
        tokio::time::timeout(Duration::from_secs(1), device.session_wanted())
            .await
            .expect("the request asked for a session");
        waiting
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_asks_for_a_session_and_gets_it_or_hears_the_tunnel_is_gone() {
        let device = device();
        let waiting = waiting_request(&device).await;
        device.set_gone();
        assert!(matches!(waiting.await.unwrap(), Err(Offline)));
        // Later requests do not wait at all.
        assert!(matches!(device.sender().await, Err(Offline)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_goes_away_while_waiting_stops_counting() {
        let device = device();
        let waiting = waiting_request(&device).await;
        assert_eq!(device.waiting.load(Ordering::Acquire), 1);
        // The caller hangs up: its request future is dropped mid-wait.
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(device.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_no_session_answers_gives_up_after_the_wait() {
        let device = device();
        let started = Instant::now();
        assert!(matches!(device.sender().await, Err(Offline)));
        assert_eq!(started.elapsed(), SESSION_WAIT);
        // Nobody waits any more: a stale wake-up does not count as wanting a session.
        let wanted = tokio::time::timeout(Duration::from_secs(1), device.session_wanted()).await;
        assert!(wanted.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn lanes_hear_when_their_tunnel_is_gone_or_replaced() {
        use futures_util::FutureExt;
        let gone = device();
        let ended = tokio::spawn({
            let device = gone.clone();
            async move { device.ended().await }
        });
        assert!(gone.ended().now_or_never().is_none(), "ended while live");
        // A session opening wakes the waiters too: not an end.
        gone.opened.notify_waiters();
        assert!(gone.ended().now_or_never().is_none(), "ended by a session");
        gone.set_gone();
        tokio::time::timeout(Duration::from_secs(1), ended)
            .await
            .expect("the lane heard the tunnel is gone")
            .unwrap();
        let replaced = device();
        replaced.mark_replaced();
        assert!(replaced.ended().now_or_never().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_request_in_flight_for_the_whole_period() {
        let device = device();
        let idle = Duration::from_secs(30);
        let request = device.begin_request();
        tokio::time::sleep(Duration::from_secs(100)).await;
        // A long request keeps the device busy however long it runs.
        let still = tokio::time::timeout(Duration::from_secs(60), device.idle_for(idle)).await;
        assert!(still.is_err(), "idle while a request was in flight");
        drop(request);
        let ended = Instant::now();
        device.idle_for(idle).await;
        let waited = ended.elapsed();
        assert!(
            waited >= idle && waited <= idle + Duration::from_secs(1),
            "{waited:?}"
        );
    }
}
