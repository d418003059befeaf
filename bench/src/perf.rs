//! Linux `perf`, where it is installed and allowed: counting every system call a process makes
//! (`perf stat -e raw_syscalls:sys_enter`, which `/proc/PID/io` cannot: it counts the `read`
//! and `write` families only), and, on request, sampling where a process spends its CPU
//! (`perf record -e cpu-clock`, a software event that works in VMs without hardware counters).
//!
//! Counting system calls through a tracepoint slows every system call a little, so `compare`
//! counts them in a pass of its own, never while it measures latency or throughput.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};
use tokio::time::timeout;

/// The tracepoint hit on every system call's entry.
const SYSCALL_EVENT: &str = "raw_syscalls:sys_enter";

/// Sampling frequency of `perf record`: 999 Hz, an odd rate so samples do not line up with
/// the kernel's 1,000 Hz tick or a periodic task.
const RECORD_HZ: &str = "999";

/// How long perf gets to attach to its targets before the measured work starts: it prints
/// nothing when it is attached, so this is a pause, generous for a busy machine.
pub const ATTACH_PAUSE: Duration = Duration::from_millis(500);

/// How long perf may take to write its results after SIGINT.
const FINISH_LIMIT: Duration = Duration::from_secs(30);

/// What perf attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    /// Whole processes (`-p`).
    Processes(Vec<u32>),
    /// Threads (`-t`).
    Threads(Vec<u32>),
}

impl Attach {
    fn args(&self) -> [String; 2] {
        let (flag, ids) = match self {
            Attach::Processes(ids) => ("-p", ids),
            Attach::Threads(ids) => ("-t", ids),
        };
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        [flag.to_owned(), list.join(",")]
    }

    fn is_empty(&self) -> bool {
        match self {
            Attach::Processes(ids) | Attach::Threads(ids) => ids.is_empty(),
        }
    }
}

/// Whether `perf` can count system calls here: installed, and allowed to use tracepoints
/// (root, or `kernel.perf_event_paranoid` ≤ -1).
pub async fn can_count_syscalls() -> bool {
    let run = Command::new("perf")
        .args(["stat", "-x,", "-e", SYSCALL_EVENT, "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    match timeout(FINISH_LIMIT, run).await {
        Ok(Ok(output)) => {
            output.status.success()
                && syscall_count(&String::from_utf8_lossy(&output.stderr)).is_some_and(|n| n > 0)
        }
        _ => false,
    }
}

/// A running `perf stat` or `perf record`.
pub struct Session {
    child: Child,
    output: PathBuf,
}

impl Session {
    /// Starts counting the system calls of `attach`, writing to `output`.
    pub fn count_syscalls(attach: &Attach, output: &Path) -> anyhow::Result<Session> {
        anyhow::ensure!(!attach.is_empty(), "nothing to attach perf to");
        let mut command = Command::new("perf");
        command
            .args(["stat", "-x,", "-e", SYSCALL_EVENT, "-o"])
            .arg(output)
            .args(attach.args());
        Self::start(command, output)
    }

    /// Starts sampling where `attach` spends its CPU (`perf record -e cpu-clock`), into
    /// `output`.
    pub fn record(attach: &Attach, output: &Path) -> anyhow::Result<Session> {
        anyhow::ensure!(!attach.is_empty(), "nothing to attach perf to");
        let mut command = Command::new("perf");
        command
            .args(["record", "-q", "-e", "cpu-clock", "-F", RECORD_HZ, "-o"])
            .arg(output)
            .args(attach.args());
        Self::start(command, output)
    }

    fn start(mut command: Command, output: &Path) -> anyhow::Result<Session> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting perf")?;
        Ok(Session {
            child,
            output: output.to_owned(),
        })
    }

    /// Stops perf (SIGINT, as Ctrl-C: it then writes its results) and waits for it.
    pub async fn finish(mut self) -> anyhow::Result<PathBuf> {
        interrupt(self.child.id());
        match timeout(FINISH_LIMIT, self.child.wait()).await {
            Ok(status) => {
                status.context("waiting for perf")?;
            }
            Err(_) => {
                let _ = self.child.kill().await;
                anyhow::bail!("perf did not finish within {FINISH_LIMIT:?} of SIGINT");
            }
        }
        Ok(self.output)
    }

    /// Stops counting and returns the system calls counted.
    pub async fn finish_count(self) -> anyhow::Result<u64> {
        let path = self.finish().await?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading perf's output {}", path.display()))?;
        syscall_count(&text).with_context(|| {
            format!(
                "perf counted nothing: {}",
                text.lines().last().unwrap_or("").escape_debug()
            )
        })
    }
}

#[cfg(unix)]
fn interrupt(pid: Option<u32>) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    // A positive pid: perf itself, never a group.
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|&p| p > 0) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
    }
}

#[cfg(not(unix))]
fn interrupt(_pid: Option<u32>) {}

/// The count of the system-call event in `perf stat -x,` output: lines of
/// `count,unit,event,…`; comments start with `#`; `<not counted>` and `<not supported>` are
/// not counts.
pub fn syscall_count(text: &str) -> Option<u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split(',');
            let count = fields.next()?.trim();
            let event = fields.nth(1)?.trim();
            (event == SYSCALL_EVENT || event.starts_with(&format!("{SYSCALL_EVENT}:")))
                .then(|| count.parse::<u64>().ok())?
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_read_from_perf_stat_csv() {
        let text = "# started on Mon Jan  1 00:00:00 2026\n\n\
                    123456,,raw_syscalls:sys_enter,2003814207,100.00,,\n";
        assert_eq!(syscall_count(text), Some(123_456));
        // Older perf versions put the modifier after the event name.
        assert_eq!(
            syscall_count("42,,raw_syscalls:sys_enter:u,100,100.00,,\n"),
            Some(42)
        );
        assert_eq!(
            syscall_count("<not counted>,,raw_syscalls:sys_enter,0,0.00,,\n"),
            None
        );
        assert_eq!(
            syscall_count("<not supported>,,raw_syscalls:sys_enter,0,0.00,,\n"),
            None
        );
        assert_eq!(syscall_count("5,,cpu-clock,1,100.00,,\n"), None);
        assert_eq!(syscall_count(""), None);
    }

    #[test]
    fn attach_lists_become_perf_arguments() {
        assert_eq!(
            Attach::Processes(vec![10, 11]).args(),
            ["-p".to_owned(), "10,11".to_owned()]
        );
        assert_eq!(
            Attach::Threads(vec![7]).args(),
            ["-t".to_owned(), "7".to_owned()]
        );
        assert!(Attach::Threads(Vec::new()).is_empty());
    }
}
