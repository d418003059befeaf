//! Tells the service manager how the daemon is doing: systemd's `Type=notify` protocol
//! (`READY=1` once the IPC socket accepts connections, `WATCHDOG=1` keep-alives, `STOPPING=1`
//! when a graceful stop begins), through the `sd-notify` crate.
//!
//! Without `$NOTIFY_SOCKET` (run by hand, by launchd, or on Windows) every call here does
//! nothing, so the daemon needs no flag to know whether it runs under systemd.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Tells the service manager that start-up is done: the IPC socket listens, so clients that
/// systemd orders after this unit can connect at once.
pub fn ready() {
    send("READY=1", &[sd::NotifyState::Ready]);
}

/// Tells the service manager that a graceful stop has begun (in-flight requests are draining).
pub fn stopping() {
    send("STOPPING=1", &[sd::NotifyState::Stopping]);
}

/// The interval at which to send `WATCHDOG=1`: half of what the service manager asked for
/// (`WatchdogSec=`), so one late tick never trips it. `None` when no watchdog is enabled.
pub fn watchdog_interval() -> Option<Duration> {
    sd::watchdog_usec().map(|usec| Duration::from_micros(usec) / 2)
}

/// Sends `WATCHDOG=1` every [`watchdog_interval`] until `done` is cancelled; returns at once
/// when no watchdog is enabled. It runs on the daemon's runtime, so a wedged runtime stops the
/// keep-alives and systemd restarts the daemon.
pub async fn watchdog(done: CancellationToken) {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    info!(interval = ?interval, "service manager watchdog enabled");
    let mut ticks = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticks.tick() => send("WATCHDOG=1", &[sd::NotifyState::Watchdog]),
            () = done.cancelled() => return,
        }
    }
}

fn send(what: &str, state: &[sd::NotifyState<'_>]) {
    if let Err(err) = sd::notify(state) {
        debug!(error = %err, what, "could not notify the service manager");
    }
}

/// The `sd-notify` crate on Unix; nothing elsewhere (Windows has its own service manager
/// protocol, in `windows_service`).
#[cfg(unix)]
mod sd {
    pub use sd_notify::NotifyState;

    /// Sends `state`; `Ok` without doing anything when `$NOTIFY_SOCKET` is unset. The
    /// environment is left as it is, so every later notification finds the socket too.
    pub fn notify(state: &[NotifyState<'_>]) -> std::io::Result<()> {
        sd_notify::notify(false, state)
    }

    /// `$WATCHDOG_USEC` when it is meant for this process.
    pub fn watchdog_usec() -> Option<u64> {
        let mut usec = 0;
        (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then_some(usec)
    }
}

#[cfg(not(unix))]
mod sd {
    /// The states the daemon sends (ignored on this platform).
    pub enum NotifyState<'a> {
        Ready,
        Stopping,
        Watchdog,
        #[allow(dead_code)]
        Status(&'a str),
    }

    pub fn notify(_state: &[NotifyState<'_>]) -> std::io::Result<()> {
        Ok(())
    }

    pub fn watchdog_usec() -> Option<u64> {
        None
    }
}
