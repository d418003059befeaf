//! The connected devices, by user: which tunnels exist and which one serves a request.
//!
//! This is the relay's only state, and it lives exactly as long as the tunnels do. Isolation
//! between users is enforced here: a lookup only ever sees the devices of the user it names.
//! Each device's own state — its session and lanes, requests in flight, models — is `device`.
//!
//! Two counts bound what one user holds. Registered devices (distinct device ids) are bounded
//! by the tier's `devices` when a tunnel registers. Open tunnels — handshaking, registered, and
//! replaced ones still finishing their requests — are bounded by [`TunnelSlot`]s taken before
//! the WebSocket upgrade, so neither many ids nor one id dialled many times can hold more
//! connections than the tier allows. A tunnel with the same user and device id as a registered
//! one replaces it: the older one leaves the registry at once and its task closes it (see
//! [`Device::replaced`]).

mod device;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub(crate) use device::canonical_model;
pub use device::{Device, InFlight, Offline};

use crate::cluster::Change;

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

/// All connected devices, grouped by user, and every user's open tunnels.
#[derive(Debug, Default)]
pub struct Registry {
    by_user: Mutex<HashMap<String, Vec<Arc<Device>>>>,
    /// Open tunnels per user, whatever their state; see [`TunnelSlot`].
    tunnels: Mutex<HashMap<String, usize>>,
    /// In a cluster, hears when a registered tunnel ends or its models change (see
    /// [`Registry::observe`]).
    observer: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Change>>,
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
            old.mark_replaced();
            self.notify(Change::Down(old.tunnel_id));
        }
        if let Some(observer) = self.observer.get() {
            device.observe(observer.clone());
        }
        devices.push(device);
        Ok(replaced)
    }

    /// Tells `observer` when a registered tunnel ends and when a registered device's models
    /// change (the cluster's presence task). Set once, before any tunnel registers.
    pub fn observe(&self, observer: tokio::sync::mpsc::UnboundedSender<Change>) {
        let _ = self.observer.set(observer);
    }

    fn notify(&self, change: Change) {
        if let Some(observer) = self.observer.get() {
            let _ = observer.send(change);
        }
    }

    /// Whether this exact tunnel is registered.
    pub fn holds(&self, device: &Device) -> bool {
        self.lock()
            .get(&device.user)
            .is_some_and(|devices| devices.iter().any(|d| d.tunnel_id == device.tunnel_id))
    }

    /// Removes this exact tunnel and marks it replaced: its task closes it as it closes a
    /// tunnel replaced by a newer one of the same device (here: one on another node), and its
    /// daemon does not dial again by itself.
    pub fn replace(&self, device: &Device) {
        let mut by_user = self.lock();
        if let Some(devices) = by_user.get_mut(&device.user) {
            devices.retain(|d| d.tunnel_id != device.tunnel_id);
            if devices.is_empty() {
                by_user.remove(&device.user);
            }
        }
        device.mark_replaced();
    }

    /// Closes every tunnel of `user` (see [`Registry::replace`]); returns how many.
    pub fn drop_user(&self, user: &str) -> usize {
        let devices = self.lock().remove(user).unwrap_or_default();
        for device in &devices {
            device.mark_replaced();
            self.notify(Change::Down(device.tunnel_id));
        }
        devices.len()
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
            let before = devices.len();
            devices.retain(|d| d.tunnel_id != device.tunnel_id);
            if devices.len() < before {
                self.notify(Change::Down(device.tunnel_id));
            }
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

    /// Whether a device of `user` is asked for lanes (see [`Device::with_lanes`]).
    pub fn has_lanes(&self, user: &str) -> bool {
        self.lock()
            .get(user)
            .is_some_and(|devices| devices.iter().any(|d| d.has_lanes()))
    }

    /// The registered device of `user` with `id` whose lane key is `key`.
    pub fn lane_device(&self, user: &str, id: &str, key: &str) -> Option<Arc<Device>> {
        self.lock()
            .get(user)?
            .iter()
            .find(|d| d.id == id && d.lane_key().as_deref() == Some(key))
            .cloned()
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
        crate::lock(&self.by_user)
    }

    fn lock_tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        crate::lock(&self.tunnels)
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
    use std::time::Duration;

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
}
