//! Where the relay's and the daemon's log lines go: standard error, in batches.
//!
//! tracing's formatter writes each line with one `write_all` on the writer it is given; on
//! standard error, which Rust does not buffer, that is one `write(2)` per line. The relay logs
//! one line per request, so that was one system call (and, under journald, one wake-up of
//! journald) per request. [`BatchedStderr`] gathers lines in memory and writes them in one go:
//! [`FLUSH_DELAY`] after the first line of a batch, at once when a batch reaches
//! [`MAX_BATCH`], at once for warnings and errors (they may come just before the process
//! dies), and when the process ends ([`FlushGuard`], and before a panic's message).
//!
//! A line is never lost while the process lives, nor reordered: one lock guards the buffer,
//! and whoever empties it writes what it took before anyone else can take more. What a crash
//! that skips the panic hook (SIGKILL, an abort) can lose is the info and debug lines of the
//! last [`FLUSH_DELAY`].

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Longest an info or debug line waits before it is written: 100 ms, quick enough for anyone
/// watching a log (`journalctl -f`, `cloudllm logs -f`) and long enough that a loaded relay
/// writes hundreds of lines with one system call.
pub const FLUSH_DELAY: Duration = Duration::from_millis(100);

/// Largest batch held before it is written at once: 64 KiB, a pipe's whole buffer on Linux.
pub const MAX_BATCH: usize = 64 * 1024;

/// A [`MakeWriter`] for tracing's formatter that batches lines on their way to standard error.
/// See the module docs.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
}

struct Shared {
    batch: Mutex<Vec<u8>>,
    /// Signalled when a line lands in an empty batch: the flusher starts its delay.
    started: Condvar,
}

impl BatchedStderr {
    /// A writer and the guard that writes what is left when dropped (keep it until the end of
    /// `main`). Starts the thread that writes each batch after [`FLUSH_DELAY`].
    pub fn new() -> (BatchedStderr, FlushGuard) {
        let shared = Arc::new(Shared {
            batch: Mutex::new(Vec::new()),
            started: Condvar::new(),
        });
        let flusher = shared.clone();
        // Without the thread lines still go out: at MAX_BATCH, with warnings, and at exit.
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || flusher.flush_after_delay());
        let writer = BatchedStderr { shared };
        let on_panic = writer.shared.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            on_panic.flush();
            previous(info);
        }));
        (writer.clone(), FlushGuard(writer))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock leaves whole lines at worst: keep using the buffer.
        self.batch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes out the batch. Done under the lock, so batches reach stderr in order.
    fn flush(&self) {
        let mut batch = self.lock();
        write_out(&mut batch);
    }

    fn flush_after_delay(&self) {
        let mut batch = self.lock();
        loop {
            while batch.is_empty() {
                batch = self.started.wait(batch).unwrap_or_else(|p| p.into_inner());
            }
            drop(batch);
            std::thread::sleep(FLUSH_DELAY);
            batch = self.lock();
            write_out(&mut batch);
        }
    }
}

fn write_out(batch: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    // Nowhere to report a failure to write the log: the lines are dropped, as `eprintln!`
    // would panic instead.
    let _ = io::stderr().lock().write_all(batch);
    batch.clear();
}

/// Writes the rest of the batch when dropped.
pub struct FlushGuard(BatchedStderr);

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.0.shared.flush();
    }
}

/// One line on its way into the batch.
pub struct LineWriter<'a> {
    shared: &'a Shared,
    /// Written out at once: a warning or an error.
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut batch = self.shared.lock();
        let was_empty = batch.is_empty();
        batch.extend_from_slice(bytes);
        if self.urgent || batch.len() >= MAX_BATCH {
            write_out(&mut batch);
        } else if was_empty {
            self.shared.started.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            shared: &self.shared,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            shared: &self.shared,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer without the flusher thread: what is in the batch stays there until a test
    /// looks.
    fn unflushed() -> BatchedStderr {
        BatchedStderr {
            shared: Arc::new(Shared {
                batch: Mutex::new(Vec::new()),
                started: Condvar::new(),
            }),
        }
    }

    #[test]
    fn info_lines_wait_in_the_batch_and_a_warning_takes_them_out() {
        let writer = unflushed();
        let shared = writer.shared.clone();
        let held = || String::from_utf8(shared.lock().clone()).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("request one");
            tracing::info!("request two");
            let batch = held();
            assert!(
                batch.contains("request one") && batch.contains("request two"),
                "{batch:?}"
            );
            tracing::warn!("tunnel lost");
            assert_eq!(
                held(),
                "",
                "a warning writes the batch out, itself included"
            );
        });
    }

    /// A writer without the flusher thread holding the info line `line` in its batch.
    fn holding(line: &[u8]) -> BatchedStderr {
        let writer = unflushed();
        let mut info = LineWriter {
            shared: &writer.shared,
            urgent: false,
        };
        info.write_all(line).unwrap();
        assert_eq!(writer.shared.lock().as_slice(), line);
        writer
    }

    #[test]
    fn a_full_batch_is_written_out_at_once() {
        let writer = holding(b"short\n");
        let big = vec![b'x'; MAX_BATCH];
        let mut info = LineWriter {
            shared: &writer.shared,
            urgent: false,
        };
        info.write_all(&big).unwrap();
        assert!(writer.shared.lock().is_empty(), "written out at the cap");
    }

    #[test]
    fn the_guard_writes_what_is_left() {
        let writer = holding(b"last words\n");
        drop(FlushGuard(writer.clone()));
        assert!(writer.shared.lock().is_empty());
    }
}
