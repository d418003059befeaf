//! What the tests of the relay binary share: running `cloudllm-relay` with its log on a pipe,
//! reading that log line by line until the relay says where it listens, and scratch
//! directories for the configs the tests write.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// The relay binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cloudllm-relay");

/// `command` set to log at info level, without colour, to a pipe the test reads (see
/// [`lines_of`]).
pub fn with_piped_log(command: &mut Command) -> &mut Command {
    command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
}

/// Passes each line of `stream` to the returned channel, from a thread of its own. The thread
/// keeps draining the stream after the receiver is gone, so the process never blocks on a
/// full pipe.
pub fn lines_of(stream: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Reads the relay's `log` until it says "relay listening"; gives the address it names and
/// the lines before. Panics, showing those lines, if that takes longer than `within`.
pub fn wait_listening(log: &Receiver<String>, within: Duration) -> (String, Vec<String>) {
    let deadline = Instant::now() + within;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = log
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the relay never said where it listens: {before:#?}"));
        if line.contains("relay listening")
            && let Some((_, rest)) = line.split_once("addr=")
        {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            return (addr.to_owned(), before);
        }
        before.push(line);
    }
}

/// A private directory for one test's files (configs, state), removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh directory named after this process and a counter, so tests never share one.
    pub fn new() -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("cloudllm-relay-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to the file `name` in the directory; gives its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("writing a scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
