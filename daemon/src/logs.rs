//! Recent log lines kept in memory for `cloudllm logs [-f]`, so users need neither journald
//! nor a log file to see what the daemon did.
//!
//! [`LogBuffer::global`] is what the daemon's tracing subscriber writes into (see
//! [`LogBuffer::layer`]); IPC clients read the last lines and follow new ones. The lines are
//! plain text: no terminal colour codes, whatever the daemon's standard error does.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::broadcast;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

/// Lines kept: 1,000 lines of ~200 bytes is ~200 KiB, hours of a quiet daemon's log.
pub const KEPT_LINES: usize = 1000;

/// Lines a slow follower may lag behind before it misses some (it is told how many).
const FOLLOW_BACKLOG: usize = 256;

/// Longest line kept, in bytes; longer lines are cut.
const MAX_LINE_BYTES: usize = 4096;

/// A ring buffer of log lines plus a broadcast of new ones.
#[derive(Debug)]
pub struct LogBuffer {
    lines: Mutex<VecDeque<String>>,
    new_lines: broadcast::Sender<String>,
}

impl LogBuffer {
    /// An empty buffer.
    pub fn new() -> Arc<LogBuffer> {
        Arc::new(LogBuffer {
            lines: Mutex::new(VecDeque::with_capacity(KEPT_LINES)),
            new_lines: broadcast::channel(FOLLOW_BACKLOG).0,
        })
    }

    /// The process-wide buffer the daemon's logger writes into.
    pub fn global() -> Arc<LogBuffer> {
        static GLOBAL: OnceLock<Arc<LogBuffer>> = OnceLock::new();
        GLOBAL.get_or_init(LogBuffer::new).clone()
    }

    /// Adds one line.
    pub fn push(&self, line: &str) {
        let mut line = line.trim_end();
        if line.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line = &line[..cut];
        }
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        // Once the buffer is full, the oldest line's allocation holds the new one: a line a
        // request costs no allocation here (issue 19).
        let mut kept = if lines.len() == KEPT_LINES {
            lines.pop_front().unwrap_or_default()
        } else {
            String::new()
        };
        kept.clear();
        kept.push_str(line);
        lines.push_back(kept);
        drop(lines);
        if self.new_lines.receiver_count() > 0 {
            let _ = self.new_lines.send(line.to_owned());
        }
    }

    /// The last `count` lines, oldest first.
    pub fn recent(&self, count: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .skip(lines.len().saturating_sub(count))
            .cloned()
            .collect()
    }

    /// New lines from now on.
    pub fn follow(&self) -> broadcast::Receiver<String> {
        self.new_lines.subscribe()
    }

    /// The tracing layer that writes plain lines into this buffer.
    pub fn layer<S>(self: &Arc<Self>) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .fmt_fields(PlainFields::default())
            .with_writer(self.make_writer())
    }

    /// A layer that writes each event once, as plain text, into this buffer and into `also`
    /// (the daemon's standard error when it has no colour).
    pub fn plain_layer<S, W>(
        self: &Arc<Self>,
        also: W,
    ) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
        W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    {
        use tracing_subscriber::fmt::writer::MakeWriterExt;
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .fmt_fields(PlainFields::default())
            .with_writer(also.and(self.make_writer()))
    }

    /// A writer for `tracing_subscriber::fmt().with_writer(...)`: each event becomes a line.
    pub fn make_writer(self: &Arc<Self>) -> impl Fn() -> LineWriter + Send + Sync + 'static {
        let buffer = self.clone();
        move || LineWriter {
            buffer: buffer.clone(),
            pending: Vec::new(),
        }
    }
}

/// Span fields formatted without colour, as a type of its own. tracing-subscriber formats a
/// span's fields once per field-formatter *type* and every layer with that type reuses the
/// text: with the default type on both layers, the buffer got the terminal layer's colour
/// codes in every span field.
#[derive(Debug, Default)]
pub struct PlainFields(DefaultFields);

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(
        &self,
        writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        self.0.format_fields(writer, fields)
    }
}

/// Collects one formatted event and stores it as lines when dropped.
pub struct LineWriter {
    buffer: Arc<LogBuffer>,
    pending: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        // The formatter writes UTF-8; anything else is shown with replacement characters.
        let text = match std::str::from_utf8(&self.pending) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(&self.pending),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            self.buffer.push(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_and_broadcasts_new_ones() {
        let buffer = LogBuffer::new();
        let mut follower = buffer.follow();
        for i in 0..KEPT_LINES + 5 {
            buffer.push(&format!("line {i}\n"));
        }
        let recent = buffer.recent(3);
        assert_eq!(
            recent,
            vec![
                format!("line {}", KEPT_LINES + 2),
                format!("line {}", KEPT_LINES + 3),
                format!("line {}", KEPT_LINES + 4)
            ]
        );
        assert_eq!(buffer.recent(usize::MAX).len(), KEPT_LINES);
        // The follower lagged past its backlog: it is told, then reads on.
        assert!(matches!(
            follower.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        assert!(follower.try_recv().unwrap().starts_with("line "));

        buffer.push(&"é".repeat(MAX_LINE_BYTES));
        assert!(buffer.recent(1)[0].len() <= MAX_LINE_BYTES);
    }

    #[test]
    fn the_writer_turns_events_into_lines() {
        let buffer = LogBuffer::new();
        let make = buffer.make_writer();
        {
            let mut writer = make();
            writer.write_all(b"first event\n").unwrap();
        }
        {
            let mut writer = make();
            writer.write_all(b"second ").unwrap();
            writer.write_all(b"event\n").unwrap();
        }
        assert_eq!(buffer.recent(10), vec!["first event", "second event"]);
    }

    #[test]
    fn span_fields_carry_no_colour_codes_beside_a_coloured_terminal_layer() {
        use tracing_subscriber::layer::SubscriberExt;
        let buffer = LogBuffer::new();
        let terminal = tracing_subscriber::fmt::layer()
            .with_ansi(true)
            .with_writer(std::io::sink);
        let subscriber = tracing_subscriber::registry()
            .with(terminal)
            .with(buffer.layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("tunnel", relay = "http://relay", attempt = 3);
            let _entered = span.enter();
            tracing::info!(answer = 42, "connected");
        });
        let lines = buffer.recent(10);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("tunnel{relay=\"http://relay\" attempt=3}"),
            "{lines:?}"
        );
        assert!(!lines[0].contains('\x1b'), "colour codes in {lines:?}");
    }
}
