//! Stopping on a signal. The first SIGTERM (what systemd, launchd, `docker stop` and `kill`
//! send) or SIGINT (Ctrl-C) cancels the process's shutdown token: it stops accepting work and
//! lets what is in flight finish within its grace period. A second one means the person (or
//! the service manager) will not wait: the process exits at once with [`FORCED_EXIT_CODE`].
//!
//! The handlers are installed when [`StopSignals::listen`] returns, not when a task first
//! polls them: a signal that arrives between "ready" and the task's first run is still a
//! graceful stop rather than the default action (death without draining).

use std::io;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// 130 = 128 + SIGINT: the code shells report for a program ended by Ctrl-C, which is what a
/// second signal during the drain amounts to.
pub const FORCED_EXIT_CODE: i32 = 130;

/// The stop signals of this platform, listened to from creation on: SIGTERM and SIGINT on
/// Unix, Ctrl-C on Windows.
#[derive(Debug)]
pub struct StopSignals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(windows)]
    ctrl_c: Option<tokio::signal::windows::CtrlC>,
}

impl StopSignals {
    /// Installs the handlers: from now on these signals no longer end the process by
    /// themselves. Must be called within a tokio runtime. A handler that cannot be installed
    /// is logged and left out (that signal then keeps its default action).
    pub fn listen() -> StopSignals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            StopSignals {
                terminate: installed("SIGTERM", signal(SignalKind::terminate())),
                interrupt: installed("SIGINT", signal(SignalKind::interrupt())),
            }
        }
        #[cfg(windows)]
        {
            StopSignals {
                ctrl_c: installed("Ctrl-C", tokio::signal::windows::ctrl_c()),
            }
        }
        #[cfg(not(any(unix, windows)))]
        {
            StopSignals {}
        }
    }

    /// Waits for the next stop signal. Never returns if no handler could be installed.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                Some(()) = next(&mut self.terminate) => {}
                Some(()) = next(&mut self.interrupt) => {}
                else => std::future::pending().await,
            }
        }
        #[cfg(windows)]
        {
            match &mut self.ctrl_c {
                Some(ctrl_c) if ctrl_c.recv().await.is_some() => {}
                _ => std::future::pending().await,
            }
        }
        #[cfg(not(any(unix, windows)))]
        {
            std::future::pending::<()>().await
        }
    }
}

/// The next signal of `signal`; `None` at once when it has no handler (or its stream ended).
#[cfg(unix)]
async fn next(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => None,
    }
}

/// The handler, or `None` with a warning that says which signal will not stop gracefully.
fn installed<T>(name: &str, handler: io::Result<T>) -> Option<T> {
    match handler {
        Ok(handler) => Some(handler),
        Err(err) => {
            warn!(signal = name, error = %err, "cannot handle this signal: it will end the process without draining");
            None
        }
    }
}

/// Installs the stop-signal handlers and spawns the task that answers them: on the first
/// signal it logs `shutting down: {draining} (a second signal exits at once)` and cancels
/// `shutdown`; on the second it exits the process with [`FORCED_EXIT_CODE`]. `draining` says
/// what the graceful stop waits for ("draining tunnels", "finishing in-flight requests").
///
/// Must be called within a tokio runtime; the handlers are in place when it returns.
pub fn cancel_on_stop_signal(
    shutdown: CancellationToken,
    draining: &'static str,
) -> JoinHandle<()> {
    let mut signals = StopSignals::listen();
    tokio::spawn(async move {
        signals.recv().await;
        info!("shutting down: {draining} (a second signal exits at once)");
        shutdown.cancel();
        signals.recv().await;
        std::process::exit(FORCED_EXIT_CODE);
    })
}
