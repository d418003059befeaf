//! The connected devices, by user: which tunnels exist and which one serves a request.
//!
//! This is the relay's only state, and it lives exactly as long as the tunnels do. Isolation
//! between users is enforced here: a lookup only ever sees the devices of the user it names.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use hyper::client::conn::http2::SendRequest;

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
    /// The HTTP/2 client end of the tunnel. Holding it keeps the connection open.
    sender: SendRequest<Body>,
    /// Requests in flight on this tunnel, for least-busy routing.
    in_flight: AtomicUsize,
    /// The names of the models the device's Ollama has, as the daemon last reported them.
    models: Mutex<Vec<String>>,
}

impl Device {
    /// A device around the HTTP/2 client end of its tunnel.
    pub fn new(user: String, id: String, name: String, sender: SendRequest<Body>) -> Self {
        static NEXT_TUNNEL: AtomicU64 = AtomicU64::new(1);
        Device {
            user,
            id,
            name,
            tunnel_id: NEXT_TUNNEL.fetch_add(1, Ordering::Relaxed),
            sender,
            in_flight: AtomicUsize::new(0),
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

    /// A handle to send requests on this tunnel.
    pub fn sender(&self) -> SendRequest<Body> {
        self.sender.clone()
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
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
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

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

/// All connected devices, grouped by user.
#[derive(Debug, Default)]
pub struct Registry {
    by_user: Mutex<HashMap<String, Vec<Arc<Device>>>>,
}

impl Registry {
    /// Adds a device, unless its user already has `max_devices` other devices connected; then
    /// returns the names of those. A tunnel with the same user and device id replaces the older
    /// one (a daemon that reconnected before the relay noticed its old tunnel was dead, or
    /// one that renewed its token) and does not count against the limit.
    pub fn insert(&self, device: Arc<Device>, max_devices: usize) -> Result<(), Vec<String>> {
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
        devices.retain(|d| d.id != device.id);
        devices.push(device);
        Ok(())
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
}
