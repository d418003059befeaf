//! The paths a request can take from the load generator to the fake backend in `compare`,
//! each made of real processes started here: two chained minimal hyper proxies
//! ([`hyper_proxy`]), two chained nginx reverse proxies ([`nginx`]), rathole over WebSocket
//! ([`rathole`]) and cloudllm's relay and daemon ([`cloudllm`]). Being processes of their own,
//! each one's CPU time, system calls and context switches can be read apart
//! ([`counters`](crate::counters)).
//!
//! Every process gets its config and log in a private temporary directory, listens on
//! loopback only, runs at its own default log level (the products' per-request logging is part
//! of what they cost), and is stopped (SIGTERM, then SIGKILL) when the run ends or fails.

pub mod cloudllm;
pub mod hyper_proxy;
pub mod nginx;
pub mod rathole;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout};

use crate::client::Target;
use crate::scratch::Scratch;

/// How long a path gets to answer its first request: 20 s, generous for a busy machine
/// (rathole's client retries its control channel every second).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// Pause between readiness probes.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// Bound on one readiness probe (connect and one request).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Lines of a failed process's log quoted in the error.
const LOG_TAIL_LINES: usize = 15;

/// Bytes of a log read for its tail: its last 16 KiB.
const LOG_TAIL_BYTES: u64 = 16 * 1024;

/// The rows of the comparison, in the order printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The load generator straight to the backend.
    Direct,
    /// Two chained minimal hyper proxies.
    Hyper,
    /// Two chained nginx reverse proxies.
    Nginx,
    /// rathole over WebSocket.
    Rathole,
    /// cloudllm's relay and daemon.
    Cloudllm,
}

impl Kind {
    /// The row's name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct to the backend",
            Kind::Hyper => "two chained hyper proxies",
            Kind::Nginx => "two chained nginx reverse proxies",
            Kind::Rathole => "rathole over WebSocket",
            Kind::Cloudllm => "cloudllm (relay + daemon)",
        }
    }

    /// A short name for file names (`cloudllm`).
    pub fn slug(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Hyper => "hyper",
            Kind::Nginx => "nginx",
            Kind::Rathole => "rathole",
            Kind::Cloudllm => "cloudllm",
        }
    }
}

/// A path that is up, with the processes that make it.
pub struct Running {
    /// Which row it is.
    pub kind: Kind,
    /// Where the load generator sends requests.
    pub target: Target,
    /// Its processes, front first.
    pub processes: Vec<Process>,
    /// What the row runs, in a few words (versions, settings).
    pub about: String,
    /// Configs and logs; removed when the path is dropped.
    pub scratch: Option<Scratch>,
}

impl Running {
    /// Stops every process, front first.
    pub async fn stop(self) {
        for process in self.processes {
            process.stop().await;
        }
    }

    /// The path once [`wait_ready`](Self::wait_ready) has seen a request through it.
    pub async fn ready(mut self) -> anyhow::Result<Running> {
        self.wait_ready().await?;
        Ok(self)
    }

    /// Waits until a `GET /api/version` through the path succeeds; fails early, quoting the
    /// log, when one of its processes exits.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let probe = timeout(PROBE_TIMEOUT, async {
                self.target.connect().await?.version().await
            })
            .await;
            if matches!(probe, Ok(Ok(()))) {
                return Ok(());
            }
            for process in &mut self.processes {
                if let Some(status) = process.exited() {
                    bail!(
                        "{} exited ({status}) before {} answered; its log:\n{}",
                        process.label,
                        self.kind.name(),
                        process.log_tail()
                    );
                }
            }
            if Instant::now() >= deadline {
                let why = match probe {
                    Ok(Err(err)) => format!("{err:#}"),
                    _ => "the request timed out".to_owned(),
                };
                let logs: Vec<String> = self
                    .processes
                    .iter()
                    .map(|p| format!("{}:\n{}", p.label, p.log_tail()))
                    .collect();
                bail!(
                    "{} did not answer within {START_TIMEOUT:?} ({why}); logs:\n{}",
                    self.kind.name(),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }
}

/// One process of a path.
pub struct Process {
    /// What it is in the row (`relay`, `nginx 1 (front)` …).
    pub label: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `command` with its stdout and stderr into `log` (never onto the benchmark's
    /// table), without the caller's `CLOUDLLM_*` variables and `RUST_LOG` (every process runs
    /// at its own default log level).
    pub fn spawn(label: &str, command: &mut Command, log: &Path) -> anyhow::Result<Process> {
        Self::spawn_with(label, command, log, false)
    }

    /// Like [`spawn`](Self::spawn), with stdout piped to the benchmark ([`stdout`](Self::stdout)).
    pub fn spawn_piped(label: &str, command: &mut Command, log: &Path) -> anyhow::Result<Process> {
        Self::spawn_with(label, command, log, true)
    }

    fn spawn_with(
        label: &str,
        command: &mut Command,
        log: &Path,
        piped: bool,
    ) -> anyhow::Result<Process> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        if piped {
            command.stdout(Stdio::piped());
        } else {
            command.stdout(file.try_clone()?);
        }
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CLOUDLLM_") {
                command.env_remove(&name);
            }
        }
        let child = command
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {label} ({:?})", command.as_std().get_program()))?;
        Ok(Process {
            label: label.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// Its process id (`None` once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its stdout, once, if it was started with [`spawn_piped`](Self::spawn_piped).
    pub fn stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// How it ended, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of its log, control characters escaped.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// SIGTERM, then SIGKILL after [`STOP_LIMIT`].
    pub async fn stop(mut self) {
        if self.exited().is_some() {
            return;
        }
        terminate(self.child.id());
        if timeout(STOP_LIMIT, self.child.wait()).await.is_err() {
            tracing::warn!(process = %self.label, "did not stop within {STOP_LIMIT:?} of SIGTERM: killed");
            let _ = self.child.kill().await;
        }
    }
}

impl Drop for Process {
    /// A process still running when its path is dropped (a failed run) gets SIGTERM, not
    /// SIGKILL: nginx's master then stops its workers, which a killed master would leave
    /// behind. Tokio reaps it once it has exited.
    fn drop(&mut self) {
        if self.exited().is_none() {
            terminate(self.child.id());
        }
    }
}

#[cfg(unix)]
fn terminate(pid: Option<u32>) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    // A positive pid: this one process, never a group.
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|&p| p > 0) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

#[cfg(not(unix))]
fn terminate(_pid: Option<u32>) {
    // Without signals, `stop` kills the process after its wait.
}

/// The last [`LOG_TAIL_LINES`] lines of the file at `path`, control characters escaped (a log
/// may quote what a peer sent).
pub fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    tail.iter()
        .map(|line| format!("  {}", line.escape_debug()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A binary built with the benchmark (`cargo build --release` puts them side by side).
pub fn sibling_binary(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    let dir = exe
        .parent()
        .context("the benchmark binary has no directory")?;
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p {package} -p cloudllm-bench`",
            path.display()
        );
    }
    Ok(path)
}

/// Where the external tool `name` is: `explicit` if given, else the first of `PATH` and
/// `extra_dirs` that holds it.
pub fn find_tool(name: &str, explicit: Option<&Path>, extra_dirs: &[PathBuf]) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_owned());
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(extra_dirs.iter().cloned())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The first line `tool arg` prints (on stdout, else on stderr), trimmed: its version, for
/// the row's description. `None` if it does not run or prints nothing.
pub async fn version_line(tool: &Path, arg: &str) -> Option<String> {
    let output = Command::new(tool).arg(arg).output().await.ok()?;
    [&output.stdout, &output.stderr]
        .into_iter()
        .map(|bytes| String::from_utf8_lossy(bytes).trim().to_owned())
        .find(|text| !text.is_empty())
        .and_then(|text| text.lines().next().map(str::to_owned))
}

/// A free loopback port, for a server that cannot report the one it got: bound and released
/// again, so another process could take it in between (unlikely on a benchmark machine; the
/// server then fails to start and says so).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free loopback port")?;
    Ok(listener.local_addr()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_tail_is_short_and_escaped() {
        let scratch = Scratch::create("log-tail-test").unwrap();
        let log = scratch.0.join("x.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text + "evil \u{1b}[31m\n").unwrap();
        let tail = log_tail(&log);
        assert_eq!(tail.lines().count(), LOG_TAIL_LINES);
        assert!(tail.starts_with("  line 86"), "{tail}");
        assert!(tail.ends_with("evil \\u{1b}[31m"), "{tail}");
        assert!(log_tail(&scratch.0.join("missing")).contains("no log"));
    }

    #[test]
    fn tools_are_found_on_the_path_or_in_extra_dirs() {
        let scratch = Scratch::create("find-tool-test").unwrap();
        std::fs::write(scratch.0.join("some-tool"), "").unwrap();
        assert_eq!(
            find_tool("some-tool", None, std::slice::from_ref(&scratch.0)),
            Some(scratch.0.join("some-tool"))
        );
        assert_eq!(
            find_tool("no-such-tool-here", None, std::slice::from_ref(&scratch.0)),
            None
        );
        let explicit = Path::new("/opt/x/nginx");
        assert_eq!(
            find_tool("nginx", Some(explicit), &[]),
            Some(explicit.to_owned())
        );
    }
}
