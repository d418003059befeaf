//! Tells the service manager how the process is doing: systemd's `Type=notify` protocol
//! (`READY=1` once the process serves, `WATCHDOG=1` keep-alives, `STOPPING=1` when a graceful
//! stop begins), through the `sd-notify` crate.
//!
//! Without `$NOTIFY_SOCKET` (run by hand, by launchd, in a container, or on Windows) every call
//! here does nothing, so neither the relay nor the daemon needs a flag to know whether it runs
//! under systemd. The environment is left as it is, so every later notification finds the
//! socket too.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Tells the service manager that start-up is done: units ordered after this one may start
/// and use it.
pub fn ready() {
    send("READY=1", &[sd::NotifyState::Ready]);
}

/// Tells the service manager that a graceful stop has begun (work in flight is draining).
pub fn stopping() {
    send("STOPPING=1", &[sd::NotifyState::Stopping]);
}

/// The interval at which to send `WATCHDOG=1`: half of what the service manager asked for
/// (`WatchdogSec=`), so one late tick never trips it. `None` when no watchdog is enabled.
pub fn watchdog_interval() -> Option<Duration> {
    sd::watchdog_usec().map(|usec| Duration::from_micros(usec) / 2)
}

/// Sends `WATCHDOG=1` every [`watchdog_interval`] until `done` is cancelled; returns at once
/// when no watchdog is enabled. Run it on the runtime that does the work: a wedged runtime
/// stops the keep-alives, and systemd restarts the process.
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

/// The notifications of a process that has said it is ready, until [`Running::finish`].
#[derive(Debug)]
pub struct Running {
    finished: CancellationToken,
    watchdog: JoinHandle<()>,
    stopping: JoinHandle<()>,
}

/// Sends `READY=1` now, then keeps the service manager informed: `WATCHDOG=1` (when enabled)
/// until [`Running::finish`], and `STOPPING=1` as soon as `shutdown` is cancelled. Call it
/// once the process serves (its sockets listen); within a tokio runtime.
pub fn announce_ready(shutdown: &CancellationToken) -> Running {
    ready();
    let finished = CancellationToken::new();
    let watchdog = tokio::spawn(watchdog(finished.clone()));
    let stopping = {
        let (shutdown, finished) = (shutdown.clone(), finished.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => stopping(),
                () = finished.cancelled() => {}
            }
        })
    };
    Running {
        finished,
        watchdog,
        stopping,
    }
}

impl Running {
    /// Ends the keep-alives once the process's work is done and it is about to exit.
    pub async fn finish(self) {
        self.finished.cancel();
        let _ = tokio::join!(self.watchdog, self.stopping);
    }
}

fn send(what: &str, state: &[sd::NotifyState<'_>]) {
    if let Err(err) = sd::notify(state) {
        debug!(error = %err, what, "could not notify the service manager");
    }
}

/// The `sd-notify` crate on Unix; nothing elsewhere (Windows has its own service manager
/// protocol, in the daemon's `windows_service`).
#[cfg(unix)]
mod sd {
    pub use sd_notify::NotifyState;

    /// Sends `state`; `Ok` without doing anything when `$NOTIFY_SOCKET` is unset.
    pub fn notify(state: &[NotifyState<'_>]) -> std::io::Result<()> {
        sd_notify::notify(false, state)
    }

    /// `$WATCHDOG_USEC` when it is meant for this process (`$WATCHDOG_PID` names it).
    pub fn watchdog_usec() -> Option<u64> {
        let mut usec = 0;
        (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then_some(usec)
    }
}

#[cfg(not(unix))]
mod sd {
    /// The states sent on Unix (ignored on this platform).
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
