//! The connected devices, by user: which tunnels exist and which one serves a request.
//!
//! This is the relay's only state, and it lives exactly as long as the tunnels do. Isolation
//! between users is enforced here: a lookup only ever sees the devices of the user it names.
//!
//! Two counts bound what one user holds. Registered devices (distinct device ids) are bounded
//! by the tier's `devices` when a tunnel registers. Open tunnels — handshaking, registered, and
//! replaced ones still finishing their requests — are bounded by [`TunnelSlot`]s taken before
//! the WebSocket upgrade, so neither many ids nor one id dialled many times can hold more
//! connections than the tier allows. A tunnel with the same user and device id as a registered
//! one replaces it: the older one leaves the registry at once and its task closes it (see
//! [`Device::replaced`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use hyper::client::conn::http2::SendRequest;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest a request waits for its device's tunnel to open an HTTP/2 session: the session
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
    /// The HTTP/2 session open on the tunnel, if any. Holding it keeps the session open; the
    /// tunnel task puts it here and takes it away (see [`crate::tunnel`]).
    session: Mutex<Option<SendRequest<Body>>>,
    /// Wakes the tunnel task: a request is waiting for a session.
    wanted: Notify,
    /// Requests waiting for a session.
    waiting: AtomicUsize,
    /// Wakes the waiting requests: a session opened, or the tunnel is gone.
    opened: Notify,
    /// The tunnel is gone: no session will open again.
    gone: AtomicBool,
    /// A newer tunnel with the same user and device id took this one's place in the registry.
    replaced: CancellationToken,
    /// Requests in flight on this tunnel, for least-busy routing.
    in_flight: AtomicUsize,
    /// When a request last started or ended, in milliseconds since `born`.
    last_active: AtomicU64,
    born: Instant,
    /// The names of the models the device's Ollama has, as the daemon last reported them.
    models: Mutex<Vec<String>>,
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
            replaced: CancellationToken::new(),
            in_flight: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            born: Instant::now(),
            models: Mutex::default(),
        }
    }

    /// Replaces the device's model list.
    pub fn set_models(&self, models: Vec<String>) {
        *lock(&self.models) = models;
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

    /// A handle to send requests on this tunnel's HTTP/2 session, once one is open: the
    /// tunnel task opens one on demand.
    pub async fn sender(&self) -> Result<SendRequest<Body>, Offline> {
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
    fn open_sender(&self) -> Option<SendRequest<Body>> {
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
    pub fn open_session(&self, session: SendRequest<Body>) {
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
        self.opened.notify_waiters();
    }

    /// Waits until a newer tunnel with the same user and device id has replaced this one (for
    /// the tunnel task, which then closes this tunnel). Returns at once if that has happened.
    pub async fn replaced(&self) {
        self.replaced.cancelled().await;
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

/// Why no device could take a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The user has no connected device.
    #[error(
        "your device is offline: no cloudllm daemon is connected for your account. Start it on the machine that runs Ollama (`cloudllmd`), then try again"
    )]
    NoDevice,
    /// The user asked for a device by name or id that is not connected.
    #[error("device {0:?} is not connected; connected devices: {1}")]
    UnknownDevice(String, String),
    /// None of the user's devices has the model.
    #[error(
        "model {0:?} not found on any of your connected devices ({1}); pull it on one of them with `ollama pull {0}`"
    )]
    NoModel(String, String),
}

/// A model name as Ollama compares it: without a tag it means `:latest`.
fn canonical_model(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains(':') {
        name.into()
    } else {
        format!("{name}:latest").into()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is one call: a panicking holder cannot leave a half-made change.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// All connected devices, grouped by user, and every user's open tunnels.
#[derive(Debug, Default)]
pub struct Registry {
    by_user: Mutex<HashMap<String, Vec<Arc<Device>>>>,
    /// Open tunnels per user, whatever their state; see [`TunnelSlot`].
    tunnels: Mutex<HashMap<String, usize>>,
}

impl Registry {
    /// Adds a device, unless its user already has `max_devices` other devices connected; then
    /// returns the names of those. A tunnel with the same user and device id replaces the older
    /// one (a daemon that reconnected before the relay noticed its old tunnel was dead, one that
    /// renewed its token, or someone else with the user's agent token and that id) and does
    /// not count against the limit: the older one is marked [`Device::replaced`] and returned,
    /// and its task closes it.
    pub fn insert(
        &self,
        device: Arc<Device>,
        max_devices: usize,
    ) -> Result<Option<Arc<Device>>, Vec<String>> {
        let mut by_user = self.lock();
        let devices = by_user.entry(device.user.clone()).or_default();
        let others: Vec<String> = devices
            .iter()
            .filter(|d| d.id != device.id)
            .map(|d| d.name.clone())
            .collect();
        if others.len() >= max_devices {
            if devices.is_empty() {
                by_user.remove(&device.user);
            }
            return Err(others);
        }
        let replaced = devices
            .iter()
            .position(|d| d.id == device.id)
            .map(|at| devices.remove(at));
        if let Some(old) = &replaced {
            // Under the lock: no request picks the old tunnel after this.
            old.replaced.cancel();
        }
        devices.push(device);
        Ok(replaced)
    }

    /// Counts one more open tunnel for `user` until the returned slot drops, unless `user`
    /// already has `max` open; then returns how many are. Taken before the WebSocket upgrade
    /// and held by the tunnel's task to its end, so a tunnel counts while it handshakes, while
    /// it is registered, and after it was replaced until it has closed.
    pub fn open_tunnel(self: &Arc<Self>, user: &str, max: usize) -> Result<TunnelSlot, usize> {
        let mut tunnels = self.lock_tunnels();
        let open = tunnels.get(user).copied().unwrap_or(0);
        if open >= max {
            return Err(open);
        }
        tunnels.insert(user.to_owned(), open + 1);
        Ok(TunnelSlot {
            registry: self.clone(),
            user: user.to_owned(),
        })
    }

    /// How many tunnels `user` has open (see [`Registry::open_tunnel`]).
    pub fn tunnels(&self, user: &str) -> usize {
        self.lock_tunnels().get(user).copied().unwrap_or(0)
    }

    /// How many tunnels are open, all users together.
    pub fn tunnels_total(&self) -> usize {
        self.lock_tunnels().values().sum()
    }

    /// The names of `user`'s connected devices other than the one with `device_id`.
    pub fn others(&self, user: &str, device_id: &str) -> Vec<String> {
        self.lock().get(user).map_or_else(Vec::new, |devices| {
            devices
                .iter()
                .filter(|d| d.id != device_id)
                .map(|d| d.name.clone())
                .collect()
        })
    }

    /// How many devices `user` has connected.
    pub fn count(&self, user: &str) -> usize {
        self.lock().get(user).map_or(0, Vec::len)
    }

    /// `user`'s connected devices.
    pub fn devices_of(&self, user: &str) -> Vec<Arc<Device>> {
        self.lock().get(user).cloned().unwrap_or_default()
    }

    /// Removes this exact tunnel, if it is still registered.
    pub fn remove(&self, device: &Device) {
        let mut by_user = self.lock();
        if let Some(devices) = by_user.get_mut(&device.user) {
            devices.retain(|d| d.tunnel_id != device.tunnel_id);
            if devices.is_empty() {
                by_user.remove(&device.user);
            }
        }
    }

    /// The device that should serve `user`'s next request: the one named by `wanted` (name or
    /// id); else the least busy of those that have `model`; else the least busy one.
    pub fn pick(
        &self,
        user: &str,
        wanted: Option<&str>,
        model: Option<&str>,
    ) -> Result<Arc<Device>, RouteError> {
        let by_user = self.lock();
        let devices = by_user.get(user).ok_or(RouteError::NoDevice)?;
        if let (None, Some(model)) = (wanted, model) {
            return devices
                .iter()
                .filter(|d| d.has_model(model))
                .min_by_key(|d| d.in_flight())
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
                    RouteError::NoModel(model.to_owned(), names.join(", "))
                });
        }
        match wanted {
            Some(wanted) => devices
                .iter()
                .find(|d| d.name == wanted || d.id == wanted)
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
                    RouteError::UnknownDevice(wanted.to_owned(), names.join(", "))
                }),
            None => devices
                .iter()
                .min_by_key(|d| d.in_flight())
                .cloned()
                .ok_or(RouteError::NoDevice),
        }
    }

    /// Every connected device.
    pub fn all(&self) -> Vec<Arc<Device>> {
        self.lock().values().flatten().cloned().collect()
    }

    /// How many devices are connected.
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Whether no device is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<Device>>>> {
        // The map stays consistent even if a holder panicked: every update is one call.
        self.by_user
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        lock(&self.tunnels)
    }
}

/// One open tunnel counted against its user's bound (see [`Registry::open_tunnel`]); dropping
/// it ends the count.
#[derive(Debug)]
pub struct TunnelSlot {
    registry: Arc<Registry>,
    user: String,
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        let mut tunnels = self.registry.lock_tunnels();
        if let Some(open) = tunnels.get_mut(&self.user) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                tunnels.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Arc<Device> {
        Arc::new(Device::new("u".into(), "id".into(), "name".into()))
    }

    #[tokio::test]
    async fn a_newer_tunnel_of_the_same_device_replaces_and_marks_the_older_one() {
        let registry = Registry::default();
        let first = device();
        assert!(registry.insert(first.clone(), 1).unwrap().is_none());
        // At the device limit, the same device id still gets in: it takes the old one's place.
        let second = device();
        let replaced = registry.insert(second.clone(), 1).unwrap().unwrap();
        assert_eq!(replaced.tunnel_id, first.tunnel_id);
        tokio::time::timeout(Duration::from_secs(1), first.replaced())
            .await
            .expect("the older tunnel hears it was replaced");
        assert!(!second.is_replaced());
        assert_eq!(registry.count("u"), 1);
        // The replaced tunnel's task unregistering itself leaves its successor in place.
        registry.remove(&first);
        assert_eq!(
            registry.pick("u", None, None).unwrap().tunnel_id,
            second.tunnel_id
        );
        // Another id is over the limit.
        let other = Arc::new(Device::new("u".into(), "id2".into(), "other".into()));
        assert_eq!(
            registry.insert(other, 1).unwrap_err(),
            vec!["name".to_owned()]
        );
    }

    #[test]
    fn open_tunnels_are_bounded_per_user_until_their_slots_drop() {
        let registry = Arc::new(Registry::default());
        let a = registry.open_tunnel("u", 2).unwrap();
        let b = registry.open_tunnel("u", 2).unwrap();
        assert_eq!(registry.open_tunnel("u", 2).unwrap_err(), 2);
        // Other users have bounds of their own.
        let other = registry.open_tunnel("v", 2).unwrap();
        assert_eq!(registry.tunnels_total(), 3);
        drop(a);
        assert_eq!(registry.tunnels("u"), 1);
        let c = registry.open_tunnel("u", 2).unwrap();
        drop((b, c, other));
        assert_eq!(registry.tunnels_total(), 0);
        assert!(registry.lock_tunnels().is_empty(), "no entry left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_asks_for_a_session_and_gets_it_or_hears_the_tunnel_is_gone() {
        let device = device();
        let waiting = tokio::spawn({
            let device = device.clone();
            async move { device.sender().await.map(|_| ()) }
        });
        // The tunnel task hears that a session is wanted.
        tokio::time::timeout(Duration::from_secs(1), device.session_wanted())
            .await
            .expect("the request asked for a session");
        device.set_gone();
        assert!(matches!(waiting.await.unwrap(), Err(Offline)));
        // Later requests do not wait at all.
        assert!(matches!(device.sender().await, Err(Offline)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_goes_away_while_waiting_stops_counting() {
        let device = device();
        let waiting = tokio::spawn({
            let device = device.clone();
            async move { device.sender().await.map(|_| ()) }
        });
        tokio::time::timeout(Duration::from_secs(1), device.session_wanted())
            .await
            .expect("the request asked for a session");
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
