//! Giving freed memory back to the operating system.
//!
//! An HTTP/2 session costs the relay about 35 KiB (hyper's and h2's buffers, tables and
//! tasks). When it closes, glibc's allocator keeps what it freed in its arenas, wedged between
//! the small allocations of the tunnels that stay, and hands it back to the system only when
//! asked (`malloc_trim`): without asking, the relay's resident memory would stay at its
//! high-water mark of open sessions for ever, although the memory is free. So once sessions or
//! tunnels have closed, the relay asks — at most once per [`TRIM_INTERVAL`], on a blocking
//! thread, because the call walks and locks every arena in turn. Elsewhere (musl, macOS,
//! Windows) there is nothing to ask and this does nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Longest freed memory waits to be given back: 10 s. Sessions close after `session_idle`
/// (30 s) anyway; a trim takes milliseconds, so even a relay whose sessions close all the time
/// spends a negligible share of a core on it.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Notes that memory was freed and gives it back now and then. See the module docs.
#[derive(Debug, Default)]
pub struct Trimmer {
    freed: AtomicBool,
}

impl Trimmer {
    /// Notes that a session or tunnel closed: the next round gives its memory back.
    pub fn freed(&self) {
        self.freed.store(true, Ordering::Relaxed);
    }

    /// Every [`TRIM_INTERVAL`], gives freed memory back if anything was freed since the last
    /// time; until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(TRIM_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if !self.freed.swap(false, Ordering::Relaxed) {
                continue;
            }
            let started = std::time::Instant::now();
            let released = tokio::task::spawn_blocking(give_back)
                .await
                .unwrap_or(false);
            debug!(released, took = ?started.elapsed(), "gave freed memory back");
        }
    }
}

/// Asks glibc to return the free pages of every arena to the system; whether any came back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "malloc_trim is a C function; the one FFI call of the relay"
)]
fn give_back() -> bool {
    // SAFETY: malloc_trim takes a plain size, touches only the allocator's own state under its
    // own locks, and is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Other allocators return free pages by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gives_back_only_after_something_was_freed() {
        let trimmer = Arc::new(Trimmer::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(trimmer.clone().run(shutdown.clone()));
        trimmer.freed();
        tokio::time::sleep(TRIM_INTERVAL + Duration::from_millis(1)).await;
        // The first round took the note (and gave back, on glibc).
        for _ in 0..100 {
            if !trimmer.freed.load(Ordering::Relaxed) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(!trimmer.freed.load(Ordering::Relaxed));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_pages_between_live_allocations_come_back() {
        // Sessions' large buffers between tunnels' small allocations, as in the relay.
        let mut kept = Vec::new();
        let mut freed = Vec::new();
        for i in 0..2000 {
            kept.push(vec![i as u8; 200]);
            freed.push(vec![i as u8; 16 * 1024]);
        }
        drop(freed);
        assert!(give_back(), "glibc returned no page");
        assert_eq!(kept.len(), 2000);
    }
}
