//! The relay under test for the scale and soak scenarios: the release `cloudllm-relay serve`
//! binary in a process of its own (so that its memory is its own and can be read from
//! `/proc/PID/status`), or, where no binary is at hand (tests), the relay library on a runtime
//! of this process.
//!
//! Either way the benchmark watches it from outside, as an operator would: `/metrics`
//! (`cloudllm_devices_connected`) says how many devices are registered.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use cloudllm_proto::Secret;
use cloudllm_relay::config::TierLimits;
use cloudllm_relay::{Keys, RelayConfig, Scope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::scratch::Scratch;

/// Signing secret of the benchmark relay (32+ bytes, as the relay requires).
const SECRET: &str = "cloudllm-bench-scale-secret-0123456789abcdef";

/// The tier every benchmark token names: limits set out of reach of the load, but checked on
/// every request as in production.
pub const TIER: &str = "bench";

/// How long tokens are valid: far longer than any run (soaks included, up to a day).
const TOKEN_TTL: Duration = Duration::from_secs(48 * 3600);

/// How long the relay gets to start listening: 20 s, generous for a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on one `/metrics` request: 10 s, far above any healthy answer on loopback.
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest `/metrics` answer read: 1 MiB, far above the relay's few dozen series.
const MAX_METRICS_BYTES: u64 = 1024 * 1024;

/// Shutdown grace given to the relay: short, the benchmark stops it only when idle.
const SHUTDOWN_GRACE: &str = "1s";

/// The benchmark relay's usual `session_idle`: 5 s, so that the scale run sees sessions close
/// without waiting the default 30 s.
pub const SESSION_IDLE: Duration = Duration::from_secs(5);

/// The tier's device limit: above the largest fleet the benchmark connects for one user.
const MAX_DEVICES: u32 = 1_000_000;

/// How long a relay may take to exit after SIGTERM: 10 s, far above its 1 s shutdown grace.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// How the relay is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// SIGKILL: a crash; every tunnel just closes.
    Crash,
    /// SIGTERM: the relay asks every daemon to drain, and they redial at once.
    Graceful,
}

/// Mints the benchmark's tokens with the relay's secret.
pub fn keys() -> Keys {
    Keys::new(&Secret::new(SECRET))
}

/// An agent token (for a device's tunnel) of `user`.
pub fn agent_token(keys: &Keys, user: &str) -> anyhow::Result<String> {
    keys.issue(user, Scope::Agent, Some(TIER), TOKEN_TTL)
}

/// A client token (for API requests) of `user`.
pub fn client_token(keys: &Keys, user: &str) -> anyhow::Result<String> {
    keys.issue(user, Scope::Client, Some(TIER), TOKEN_TTL)
}

/// The benchmark tier's limits.
fn tier() -> TierLimits {
    TierLimits {
        requests_per_minute: u32::MAX,
        concurrent_requests: u32::MAX,
        devices: MAX_DEVICES,
        max_body_bytes: 1024 * 1024,
        max_stream: Duration::from_secs(24 * 3600),
    }
}

/// The relay's caps on connections not yet authenticated, out of the way: every connection
/// of the benchmark (thousands of tunnels in a storm, 64 load connections) comes from
/// 127.0.0.1 at once, and the caps are there for hostile peers, not to shape the figures.
const CONNECTION_CAP: u32 = 1_000_000;

/// The relay's config file for `addr`.
pub(crate) fn config_toml(addr: SocketAddr, session_idle: Duration) -> String {
    let tier = tier();
    format!(
        "listen = \"{addr}\"\n\
         secret = \"{SECRET}\"\n\
         auth_failures_per_minute = 0\n\
         max_unauthenticated_connections_per_address = {CONNECTION_CAP}\n\
         max_unauthenticated_connections = {CONNECTION_CAP}\n\
         shutdown_grace = \"{SHUTDOWN_GRACE}\"\n\
         session_idle = \"{}ms\"\n\
         \n\
         [tiers.{TIER}]\n\
         requests_per_minute = {}\n\
         concurrent_requests = {}\n\
         devices = {}\n\
         max_body_bytes = {}\n\
         max_stream = \"{}s\"\n",
        session_idle.as_millis(),
        tier.requests_per_minute,
        tier.concurrent_requests,
        tier.devices,
        tier.max_body_bytes,
        tier.max_stream.as_secs(),
    )
}

/// The `cloudllm-relay` binary next to the running benchmark (both come from the same
/// `cargo build --release`).
pub fn relay_binary() -> anyhow::Result<PathBuf> {
    crate::paths::sibling_binary("cloudllm-relay", "cloudllm-relay")
}

/// Where the relay runs.
enum Host {
    /// `cloudllm-relay serve` in its own process, with its config file (which holds the
    /// benchmark's secret) and log in a private directory removed on drop.
    Process {
        binary: PathBuf,
        child: Child,
        scratch: Scratch,
    },
    /// The relay library on a runtime of this process.
    InProcess {
        shutdown: CancellationToken,
        done: JoinHandle<anyhow::Result<()>>,
    },
}

/// A running relay.
pub struct RelayHost {
    /// Where daemons and users reach it.
    pub addr: SocketAddr,
    host: Host,
}

impl RelayHost {
    /// Starts `binary serve` on a free loopback port and waits until it answers.
    pub async fn spawn(binary: &Path, session_idle: Duration) -> anyhow::Result<RelayHost> {
        Self::spawn_with(binary, session_idle, "").await
    }

    /// [`RelayHost::spawn`] with `extra` appended to the config file (e.g. a `[cluster]`
    /// table, for `cloudllm-bench cluster`).
    pub async fn spawn_with(
        binary: &Path,
        session_idle: Duration,
        extra: &str,
    ) -> anyhow::Result<RelayHost> {
        let scratch = Scratch::create("relay")?;
        // Any free port: bound and released again at once; the relay binds it a moment later.
        let addr = std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?;
        let config = scratch.0.join("relay.toml");
        std::fs::write(&config, config_toml(addr, session_idle) + extra)
            .with_context(|| format!("writing {}", config.display()))?;
        let child = start_process(binary, &scratch.0)?;
        let relay = RelayHost {
            addr,
            host: Host::Process {
                binary: binary.to_owned(),
                child,
                scratch,
            },
        };
        relay.wait_ready().await?;
        Ok(relay)
    }

    /// Starts the relay library on the runtime of `handle`, on a free loopback port.
    pub async fn in_process(handle: &Handle, session_idle: Duration) -> anyhow::Result<RelayHost> {
        let mut config = RelayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: Some(Secret::new(SECRET)),
            auth_failures_per_minute: 0,
            max_unauthenticated_connections_per_address: CONNECTION_CAP,
            max_unauthenticated_connections: CONNECTION_CAP,
            shutdown_grace: Duration::from_secs(1),
            session_idle,
            ..RelayConfig::default()
        };
        config.tiers.insert(TIER.to_owned(), tier());
        let shutdown = CancellationToken::new();
        let relay = timeout(
            START_TIMEOUT,
            handle.spawn(cloudllm_relay::serve(config, shutdown.clone())),
        )
        .await
        .context("relay start timed out")?
        .context("relay start task")?
        .context("starting the relay")?;
        Ok(RelayHost {
            addr: relay.addr,
            host: Host::InProcess {
                shutdown,
                done: relay.done,
            },
        })
    }

    /// The base URL daemons dial.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The relay process's resident memory in KiB (`VmRSS`); for an in-process relay, the
    /// whole benchmark process's. `None` where `/proc` is not available.
    pub fn rss_kib(&self) -> Option<u64> {
        let path = match &self.host {
            Host::Process { child, .. } => format!("/proc/{}/status", child.id()),
            Host::InProcess { .. } => "/proc/self/status".to_owned(),
        };
        vm_rss_kib(&std::fs::read_to_string(path).ok()?)
    }

    /// CPU time the relay process has used so far (user + system, from `/proc/PID/stat` in
    /// the kernel's 100 Hz `USER_HZ` ticks); `None` for an in-process relay or without `/proc`.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let Host::Process { child, .. } = &self.host else {
            return None;
        };
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).ok()?;
        // Fields after the parenthesised command name, which may itself hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }

    /// Whether [`rss_kib`](Self::rss_kib) is the relay's own memory (a separate process).
    pub fn rss_is_relay_only(&self) -> bool {
        matches!(self.host, Host::Process { .. })
    }

    /// `cloudllm_devices_connected` from the relay's `/metrics`.
    pub async fn devices_connected(&self) -> anyhow::Result<u64> {
        devices_at(self.addr).await
    }

    /// `cloudllm_tunnel_sessions_open` from the relay's `/metrics`: tunnels with an HTTP/2
    /// session open.
    pub async fn sessions_open(&self) -> anyhow::Result<u64> {
        metric_at(self.addr, "cloudllm_tunnel_sessions_open").await
    }

    /// `cloudllm_tunnel_sessions_total` from the relay's `/metrics`: HTTP/2 sessions opened.
    pub async fn sessions_opened(&self) -> anyhow::Result<u64> {
        metric_at(self.addr, "cloudllm_tunnel_sessions_total").await
    }

    /// `GET path` on the relay as a user with `token`, for the device `device`: the body, if
    /// the status is 200.
    pub async fn get_as(&self, token: &str, device: &str, path: &str) -> anyhow::Result<String> {
        let auth = format!("Bearer {token}");
        let headers = [
            ("authorization", auth.as_str()),
            (cloudllm_proto::HEADER_DEVICE, device),
        ];
        timeout(METRICS_TIMEOUT, get(self.addr, path, &headers))
            .await
            .context("request timed out")?
    }

    /// Waits until `/metrics` reports at least `count` devices, polling every `every`; fails
    /// after `limit`. Returns when that was first seen.
    pub async fn wait_devices(
        &self,
        count: u64,
        every: Duration,
        limit: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            // A relay that is still starting refuses connections: not an error yet.
            let seen = self.devices_connected().await.unwrap_or(0);
            if seen >= count {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                bail!("{seen} of {count} devices registered after {limit:?}");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Stops the relay process as `how` says and starts it again on the same port. Returns
    /// when the new process answers.
    pub async fn restart(&mut self, how: Restart) -> anyhow::Result<()> {
        let Host::Process {
            binary,
            child,
            scratch,
        } = &mut self.host
        else {
            bail!("only a relay process can be restarted");
        };
        match how {
            Restart::Crash => {
                child.kill().context("killing the relay")?;
                child.wait().context("reaping the relay")?;
            }
            Restart::Graceful => {
                terminate(child);
                // The relay drains its tunnels within its 1 s shutdown grace.
                let deadline = Instant::now() + STOP_LIMIT;
                while child.try_wait()?.is_none() {
                    if Instant::now() >= deadline {
                        child.kill()?;
                        child.wait()?;
                        bail!("the relay did not stop within {STOP_LIMIT:?} of SIGTERM");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        *child = start_process(binary, &scratch.0)?;
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if timeout(METRICS_TIMEOUT, get(self.addr, "/healthz", &[]))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = match &self.host {
                    Host::Process { scratch, .. } => {
                        format!(" (its log: {})", scratch.0.join("relay.log").display())
                    }
                    Host::InProcess { .. } => String::new(),
                };
                bail!(
                    "the relay did not answer on {} within {START_TIMEOUT:?}{log}",
                    self.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the relay (SIGTERM for a process, then SIGKILL if it lingers).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        match &mut self.host {
            Host::Process { child, .. } => {
                terminate(child);
                let deadline = Instant::now() + STOP_LIMIT;
                while child.try_wait()?.is_none() {
                    if Instant::now() >= deadline {
                        let _ = child.kill();
                        child.wait()?;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Host::InProcess { shutdown, done } => {
                shutdown.cancel();
                timeout(Duration::from_secs(10), done)
                    .await
                    .context("relay shutdown timed out")?
                    .context("relay task")??;
            }
        }
        Ok(())
    }
}

impl Drop for RelayHost {
    fn drop(&mut self) {
        if let Host::Process { child, .. } = &mut self.host
            && matches!(child.try_wait(), Ok(None))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the relay with the config file `relay.toml` in `dir`.
fn start_process(binary: &Path, dir: &Path) -> anyhow::Result<Child> {
    let config = dir.join("relay.toml");
    let log = std::fs::File::create(dir.join("relay.log"))?;
    Command::new(binary)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        // Thousands of tunnels: one info line each would cost more than the tunnels.
        .env("RUST_LOG", "warn")
        .env_remove("CLOUDLLM_RELAY_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

#[cfg(unix)]
fn terminate(child: &Child) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

#[cfg(not(unix))]
fn terminate(_child: &Child) {
    // Without signals, `stop` falls back to killing the process after its wait.
}

/// `cloudllm_devices_connected` from the `/metrics` of the relay at `addr`.
pub async fn devices_at(addr: SocketAddr) -> anyhow::Result<u64> {
    metric_at(addr, "cloudllm_devices_connected").await
}

/// The unlabelled metric `name` from the `/metrics` of the relay at `addr`.
async fn metric_at(addr: SocketAddr, name: &str) -> anyhow::Result<u64> {
    let text = timeout(METRICS_TIMEOUT, get(addr, "/metrics", &[]))
        .await
        .context("/metrics timed out")??;
    gauge(&text, name).with_context(|| format!("/metrics has no {name}"))
}

/// `VmRSS` in KiB from a `/proc/PID/status` text.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The value of an unlabelled gauge or counter in Prometheus text.
fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
}

/// A bare HTTP/1.0 GET on loopback with `headers`: the body, if the status is 200.
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut tcp = TcpStream::connect(addr).await?;
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tcp.take(MAX_METRICS_BYTES).read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        bail!("GET {path}: HTTP {status}");
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_and_gauges() {
        let status = "Name:\tcloudllm-relay\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(vm_rss_kib(status), Some(12345));
        assert_eq!(vm_rss_kib("Name: x\n"), None);
        let metrics = "# HELP cloudllm_devices_connected Devices.\n\
                       # TYPE cloudllm_devices_connected gauge\n\
                       cloudllm_devices_connected 1000\n\
                       cloudllm_devices_connected_total 3\n";
        assert_eq!(gauge(metrics, "cloudllm_devices_connected"), Some(1000));
        assert_eq!(gauge(metrics, "cloudllm_missing"), None);
    }

    #[test]
    fn the_config_file_is_one_the_relay_accepts() {
        let text = config_toml(SocketAddr::from(([127, 0, 0, 1], 9)), SESSION_IDLE);
        let config: RelayConfig = toml_like(&text);
        assert_eq!(config.auth_failures_per_minute, 0);
        assert_eq!(config.max_unauthenticated_connections, CONNECTION_CAP);
        assert_eq!(config.tiers.get(TIER), Some(&tier()));
    }

    fn toml_like(text: &str) -> RelayConfig {
        let dir = std::env::temp_dir().join(format!("cloudllm-bench-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(&path, text).unwrap();
        let config = RelayConfig::load(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        config
    }
}
