//! The stop signals as a process receives them: the first SIGTERM or SIGINT cancels the
//! shutdown token (and the process goes on draining), the second exits at once with 130.
//!
//! The process under test is this test binary itself, run again as a child with
//! `CLOUDLLM_LIFECYCLE_CHILD` set: signals go to a whole process, so the test must not send them
//! to the process that runs the other tests.

#![cfg(unix)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cloudllm_lifecycle::signal::{FORCED_EXIT_CODE, cancel_on_stop_signal};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

/// Set in the child's environment: run the signal handler instead of returning at once.
const CHILD_ENV: &str = "CLOUDLLM_LIFECYCLE_CHILD";

/// Bound on every wait in this test.
const STEP: Duration = Duration::from_secs(20);

/// The child: installs the handlers, says so, says when the token is cancelled, then drains
/// "forever" (longer than the parent waits) so only the second signal can end it quickly.
#[test]
fn child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let _handler = cancel_on_stop_signal(shutdown.clone(), "testing");
        say("listening");
        shutdown.cancelled().await;
        say("cancelled");
        tokio::time::sleep(STEP * 3).await;
        say("drained");
    });
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// The child process and its stdout lines.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start() -> Running {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running { child, lines }
    }

    /// Waits until the child prints `wanted`.
    fn expect(&self, wanted: &str) {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // libtest prints `test child ... ` without a newline before the first line.
                Ok(line) if line.ends_with(wanted) => return,
                Ok(_) => {}
                Err(err) => panic!("the child never said {wanted:?}: {err}"),
            }
        }
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the child's exit and returns its code.
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the child did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_first_signal_drains_and_a_second_one_exits_with_130() {
    for (first, second) in [
        (Signal::SIGTERM, Signal::SIGTERM),
        (Signal::SIGINT, Signal::SIGTERM),
        (Signal::SIGTERM, Signal::SIGINT),
    ] {
        let mut child = Running::start();
        child.expect("listening");
        child.signal(first);
        // The process is still there, draining: the token was cancelled, not the process killed.
        child.expect("cancelled");
        assert!(
            child.child.try_wait().unwrap().is_none(),
            "{first} ended the process"
        );
        child.signal(second);
        assert_eq!(
            child.exit_code(),
            Some(FORCED_EXIT_CODE),
            "{first} then {second}"
        );
    }
}
