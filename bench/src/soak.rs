//! `cloudllm-bench soak`: a bounded run of mixed streaming traffic from several users and
//! devices, with clients that hang up mid-stream and daemons that restart, in which every
//! response is checked against the request and user that asked for it.
//!
//! Each device is a real daemon ([`daemons`](crate::daemons)) in front of its own fake backend,
//! whose echoed lines name the request id and the device's owner
//! ([`backend`](crate::backend)). Each user's workers send generate requests with their own
//! `x-request-id` to a random one of their devices, and sometimes close the connection after
//! a few lines. A restarter stops and starts one random daemon at a time.
//!
//! Every request ends as one of: completed (all lines, in order, the last `done`); cut by the
//! client (deliberately); cut by a restart (it failed while its device was restarting); or
//! lost (anything else). A line or response header naming another request or a device of
//! another user is misrouted. The run fails if anything was lost or misrouted. The relay's
//! memory is sampled throughout, to show that it does not grow.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::client::{self, Conn, STEP, Target};
use crate::daemons::{self, Daemon};
use crate::figures::{Figure, Figures, Goal};
use crate::relay_host::{self, RelayHost};
use crate::scratch::Scratch;
use crate::stack::{Handles, Runtimes};

/// Longest stream a soak request asks for, in lines.
const MAX_LINES: u64 = 40;

/// Longest pause between lines asked for: 10 ms, so streams last up to 0.4 s.
const MAX_DELAY_MS: u64 = 10;

/// How long the daemons get to register: 60 s on a busy machine.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a restarted daemon may take to be registered again.
const BACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Slack around a restart window: a request that failed this close to a restart counts as
/// cut by it (the relay learns of the tunnel's end a moment after the daemon stops).
const RESTART_SLACK: Duration = Duration::from_millis(500);

/// Memory samples kept in the printed series; the JSON gets them all.
const PRINTED_SAMPLES: usize = 20;

/// How the soak is shaped.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long traffic runs.
    pub duration: Duration,
    /// Users.
    pub users: usize,
    /// Devices (daemons) per user.
    pub devices_per_user: usize,
    /// Concurrent request loops per user.
    pub workers_per_user: usize,
    /// Share of requests the client cuts mid-stream (0..=1).
    pub disconnect_share: f64,
    /// Mean time between daemon restarts; zero: none.
    pub restart_every: Duration,
    /// How often the relay's memory is sampled.
    pub sample_every: Duration,
    /// The `cloudllm-relay` binary to run as its own process; `None`: the relay library in
    /// this process (then the memory sampled is the whole process's).
    pub relay_binary: Option<PathBuf>,
    /// The relay's `session_idle`: how long a device's HTTP/2 session outlives its last
    /// request. A few milliseconds make sessions close and open between a device's requests
    /// all the time.
    pub session_idle: Duration,
}

impl Options {
    /// A few minutes of 3 users × 2 devices × 4 workers, a restart every 15 s.
    pub fn new(duration: Duration) -> Self {
        Options {
            duration,
            users: 3,
            devices_per_user: 2,
            workers_per_user: 4,
            disconnect_share: 0.1,
            restart_every: Duration::from_secs(15),
            sample_every: Duration::from_secs(1).max(duration / 200),
            relay_binary: None,
            session_idle: relay_host::SESSION_IDLE,
        }
    }
}

/// What the soak counted.
#[derive(Debug, Default)]
pub struct Counts {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Streamed to the end and checked.
    pub completed: AtomicU64,
    /// Cut by the client on purpose.
    pub cut_by_client: AtomicU64,
    /// Failed while their device was restarting.
    pub cut_by_restart: AtomicU64,
    /// Failed for no deliberate reason.
    pub lost: AtomicU64,
    /// Answered with a line or header of another request or user.
    pub misrouted: AtomicU64,
    /// Daemon restarts done.
    pub restarts: AtomicU64,
}

impl Counts {
    fn snapshot(&self) -> Counts {
        let copy = |c: &AtomicU64| AtomicU64::new(get(c));
        Counts {
            requests: copy(&self.requests),
            completed: copy(&self.completed),
            cut_by_client: copy(&self.cut_by_client),
            cut_by_restart: copy(&self.cut_by_restart),
            lost: copy(&self.lost),
            misrouted: copy(&self.misrouted),
            restarts: copy(&self.restarts),
        }
    }

    /// Reads a counter.
    pub fn value(counter: &AtomicU64) -> u64 {
        get(counter)
    }
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The soak's result.
#[derive(Debug)]
pub struct Outcome {
    /// The figures, for printing.
    pub figures: Figures,
    /// The counts.
    pub counts: Counts,
    /// Relay memory samples: (seconds since traffic started, KiB).
    pub rss: Vec<(f64, u64)>,
    /// The first lost or misrouted requests, for the operator.
    pub failures: Vec<String>,
    /// HTTP/2 sessions the relay opened on the devices' tunnels.
    pub sessions: u64,
}

impl Outcome {
    /// Whether nothing was lost or misrouted.
    pub fn passed(&self) -> bool {
        get(&self.counts.lost) == 0 && get(&self.counts.misrouted) == 0
    }
}

/// Runs the soak. Builds its own runtimes: call it from a plain thread.
pub fn run(options: &Options) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        options.users > 0 && options.devices_per_user > 0 && options.workers_per_user > 0,
        "users, devices per user and workers per user must be at least 1"
    );
    let _ = crate::raise_file_limit();
    let runtimes = Runtimes::new()?;
    let handles = runtimes.handles();
    let options = options.clone();
    let budget = options.duration + REGISTER_TIMEOUT + STEP * 6;
    let outcome = runtimes.load.block_on(async move {
        let task = tokio::spawn(soak(options, handles));
        timeout(budget, task)
            .await
            .with_context(|| format!("the soak did not finish within {budget:?}"))?
            .context("the soak task failed")?
    });
    runtimes.shutdown();
    outcome
}

/// One device: its daemon and the windows in which it was restarting.
struct Device {
    daemon: tokio::sync::Mutex<Daemon>,
    restarts: Mutex<Vec<(Instant, Option<Instant>)>>,
}

impl Device {
    /// Whether a restart window (with slack) overlaps `from..=to`.
    fn restarting_during(&self, from: Instant, to: Instant) -> bool {
        let Ok(windows) = self.restarts.lock() else {
            return false;
        };
        windows.iter().any(|(start, end)| {
            let end = end.map_or(to, |e| e + RESTART_SLACK);
            *start <= to + RESTART_SLACK && end >= from
        })
    }
}

async fn soak(options: Options, handles: Handles) -> anyhow::Result<Outcome> {
    let mut figures = Figures::new();
    let relay = match &options.relay_binary {
        Some(binary) => RelayHost::spawn(binary, options.session_idle).await?,
        None => RelayHost::in_process(&handles.relay, options.session_idle).await?,
    };
    let keys = relay_host::keys();
    let scratch = Scratch::create("soak")?;
    let backends_stop = CancellationToken::new();
    let mut devices: Vec<Vec<Arc<Device>>> = Vec::new();
    let mut targets: Vec<Vec<Target>> = Vec::new();
    for u in 0..options.users {
        let user = format!("soak-user-{u}");
        let client_token = relay_host::client_token(&keys, &user)?;
        let (mut own, mut own_targets) = (Vec::new(), Vec::new());
        for d in 0..options.devices_per_user {
            let name = format!("soak-u{u}-dev{d}");
            let backend = timeout(
                STEP,
                handles.backend.spawn(crate::backend::serve_with(
                    backends_stop.clone(),
                    crate::backend::Options {
                        label: format!("{user}/{name}"),
                        cancellations: None,
                    },
                )),
            )
            .await
            .context("fake backend start timed out")?
            .context("fake backend task")??;
            let spec = daemons::Spec {
                name: name.clone(),
                relay: relay.url(),
                backend,
                token: relay_host::agent_token(&keys, &user)?,
            };
            own.push(Arc::new(Device {
                daemon: tokio::sync::Mutex::new(Daemon::start(spec, &scratch.0, &handles.daemon)?),
                restarts: Mutex::new(Vec::new()),
            }));
            own_targets.push(Target::through(relay.addr, &client_token)?.with_device(&name)?);
        }
        devices.push(own);
        targets.push(own_targets);
    }
    let total = (options.users * options.devices_per_user) as u64;
    relay
        .wait_devices(total, Duration::from_millis(50), REGISTER_TIMEOUT)
        .await?;

    crate::progress(&format!("soak for {:?}", options.duration));
    let counts = Arc::new(Counts::default());
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let deadline = started + options.duration;
    let mut tasks = JoinSet::new();
    for (u, (own, own_targets)) in devices.iter().zip(&targets).enumerate() {
        for w in 0..options.workers_per_user {
            let worker = Worker {
                user: format!("soak-user-{u}"),
                prefix: format!("soak-u{u}-w{w}"),
                devices: own.clone(),
                targets: own_targets.clone(),
                disconnect_share: options.disconnect_share,
                counts: counts.clone(),
                failures: failures.clone(),
            };
            tasks.spawn(worker.run(deadline));
        }
    }
    let all: Vec<Arc<Device>> = devices.iter().flatten().cloned().collect();
    if !options.restart_every.is_zero() {
        let (all, counts, handle) = (all.clone(), counts.clone(), handles.daemon.clone());
        let (every, relay_metrics) = (options.restart_every, RelayHostRef(relay.addr));
        tasks.spawn(async move {
            restarter(all, every, deadline, total, relay_metrics, handle, counts).await
        });
    }
    let mut rss = Vec::new();
    while Instant::now() < deadline {
        if let Some(kib) = relay.rss_kib() {
            rss.push((started.elapsed().as_secs_f64(), kib));
        }
        tokio::time::sleep(options.sample_every.min(deadline - Instant::now())).await;
    }
    if let Some(kib) = relay.rss_kib() {
        rss.push((started.elapsed().as_secs_f64(), kib));
    }
    let mut errors = Vec::new();
    while let Some(joined) = timeout(STEP * 3, tasks.join_next())
        .await
        .context("soak tasks still running after the deadline")?
    {
        if let Err(err) = joined.context("soak task")? {
            errors.push(format!("{err:#}"));
        }
    }

    for device in &all {
        if let Err(err) = device.daemon.lock().await.stop().await {
            tracing::warn!(error = format!("{err:#}"), "stopping a daemon");
        }
    }
    backends_stop.cancel();
    let relay_only = relay.rss_is_relay_only();
    let sessions = relay.sessions_opened().await?;
    relay.stop().await?;
    anyhow::ensure!(
        errors.is_empty(),
        "soak tasks failed: {}",
        errors.join("; ")
    );

    let counts = counts.snapshot();
    let failures = failures.lock().map(|f| f.clone()).unwrap_or_default();
    describe(&options, &counts, &rss, relay_only, &mut figures);
    figures.figures.push(Figure::info(
        "soak",
        "HTTP/2 sessions the relay opened",
        sessions as f64,
        "sessions",
    ));
    Ok(Outcome {
        figures,
        counts,
        rss,
        failures,
        sessions,
    })
}

/// The relay's address, for the restarter to read `/metrics` without owning the relay.
#[derive(Clone, Copy)]
struct RelayHostRef(std::net::SocketAddr);

/// Stops and starts one random daemon about every `every` until `deadline`, waiting each time
/// until the relay has all `total` devices again.
async fn restarter(
    devices: Vec<Arc<Device>>,
    every: Duration,
    deadline: Instant,
    total: u64,
    relay: RelayHostRef,
    handle: tokio::runtime::Handle,
    counts: Arc<Counts>,
) -> anyhow::Result<()> {
    let mut rng = StdRng::from_os_rng();
    loop {
        // Uniform in [every/2, every·3/2): restarts at no fixed rhythm.
        let pause = every.mul_f64(rng.random_range(0.5..1.5));
        if Instant::now() + pause >= deadline {
            return Ok(());
        }
        tokio::time::sleep(pause).await;
        let device = &devices[rng.random_range(0..devices.len())];
        let start = Instant::now();
        if let Ok(mut windows) = device.restarts.lock() {
            windows.push((start, None));
        }
        {
            let mut daemon = device.daemon.lock().await;
            daemon.stop().await?;
            daemon.restart(&handle)?;
        }
        let back = wait_all(relay, total).await;
        if let Ok(mut windows) = device.restarts.lock()
            && let Some(last) = windows.last_mut()
        {
            last.1 = Some(Instant::now());
        }
        counts.restarts.fetch_add(1, Ordering::Relaxed);
        back?;
    }
}

/// Waits until the relay at `relay` reports `total` devices.
async fn wait_all(relay: RelayHostRef, total: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + BACK_TIMEOUT;
    loop {
        if relay_host::devices_at(relay.0).await.unwrap_or(0) >= total {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "a restarted daemon was not back within {BACK_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One user's request loop.
struct Worker {
    user: String,
    prefix: String,
    devices: Vec<Arc<Device>>,
    targets: Vec<Target>,
    disconnect_share: f64,
    counts: Arc<Counts>,
    failures: Arc<Mutex<Vec<String>>>,
}

/// How one request ended, before restarts are taken into account.
enum Ended {
    Completed,
    CutByClient,
    Failed(String),
    Misrouted(String),
}

/// First failures kept for the report.
const KEPT_FAILURES: usize = 20;

impl Worker {
    async fn run(self, deadline: Instant) -> anyhow::Result<()> {
        let mut rng = StdRng::from_os_rng();
        let mut conns: Vec<Option<Conn>> = self.targets.iter().map(|_| None).collect();
        let mut n: u64 = 0;
        while Instant::now() < deadline {
            n += 1;
            let d = rng.random_range(0..self.targets.len());
            let id = format!("{}-{n}", self.prefix);
            let lines = rng.random_range(2..=MAX_LINES);
            let delay = rng.random_range(0..=MAX_DELAY_MS);
            let cut_after = (rng.random_bool(self.disconnect_share.clamp(0.0, 1.0)))
                .then(|| rng.random_range(1..lines));
            self.counts.requests.fetch_add(1, Ordering::Relaxed);
            let begun = Instant::now();
            let ended = self
                .one(&mut conns[d], d, &id, lines, delay, cut_after)
                .await;
            let keep = matches!(ended, Ended::Completed);
            if !keep {
                conns[d] = None;
            }
            match ended {
                Ended::Completed => self.counts.completed.fetch_add(1, Ordering::Relaxed),
                Ended::CutByClient => self.counts.cut_by_client.fetch_add(1, Ordering::Relaxed),
                Ended::Misrouted(why) => {
                    self.note(format!("misrouted {id}: {why}"));
                    self.counts.misrouted.fetch_add(1, Ordering::Relaxed)
                }
                Ended::Failed(why) => {
                    if self.devices[d].restarting_during(begun, Instant::now()) {
                        self.counts.cut_by_restart.fetch_add(1, Ordering::Relaxed)
                    } else {
                        self.note(format!("lost {id}: {why}"));
                        self.counts.lost.fetch_add(1, Ordering::Relaxed)
                    }
                }
            };
        }
        Ok(())
    }

    fn note(&self, failure: String) {
        if let Ok(mut failures) = self.failures.lock()
            && failures.len() < KEPT_FAILURES
        {
            failures.push(failure);
        }
    }

    /// Sends one request on the device's connection (opening one if needed) and checks it.
    async fn one(
        &self,
        conn: &mut Option<Conn>,
        d: usize,
        id: &str,
        lines: u64,
        delay: u64,
        cut_after: Option<u64>,
    ) -> Ended {
        if conn.is_none() {
            match self.targets[d].connect().await {
                Ok(c) => *conn = Some(c),
                Err(err) => return Ended::Failed(format!("{err:#}")),
            }
        }
        let Some(c) = conn.as_mut() else {
            return Ended::Failed("no connection".into());
        };
        let body = serde_json::json!({
            "model": "bench",
            "prompt": id,
            "stream": true,
            "echo": true,
            "lines": lines,
            "delay_ms": delay,
        });
        let response = match c.start("/api/generate", &body, Some(id)).await {
            Ok(response) => response,
            Err(err) => return Ended::Failed(format!("{err:#}")),
        };
        let echoed = response
            .headers()
            .get(cloudllm_proto::HEADER_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if echoed != id {
            return Ended::Misrouted(format!("response x-request-id {echoed:?}"));
        }
        let mut check = LineCheck {
            id,
            owner: format!("{}/", self.user),
            pending: Vec::new(),
            seen: 0,
            done: false,
            misrouted: None,
            cut_after,
        };
        let read = client::read_lines(response, STEP, |chunk| check.chunk(chunk)).await;
        if let Some(why) = check.misrouted {
            return Ended::Misrouted(why);
        }
        match read {
            Err(_) if check.cut_after.is_some_and(|k| check.seen >= k) => Ended::CutByClient,
            Err(err) => Ended::Failed(format!("after {} lines: {err:#}", check.seen)),
            Ok(_) if check.seen == lines && check.done && check.pending.is_empty() => {
                Ended::Completed
            }
            Ok(_) => Ended::Failed(format!(
                "stream ended after {} of {lines} lines (done: {})",
                check.seen, check.done
            )),
        }
    }
}

/// Checks the lines of one echoing stream as they arrive.
struct LineCheck<'a> {
    id: &'a str,
    /// `user/`: the prefix of every `served_by` of this user's devices.
    owner: String,
    /// A line's start that has not seen its newline yet.
    pending: Vec<u8>,
    seen: u64,
    done: bool,
    misrouted: Option<String>,
    /// Hang up after this many lines.
    cut_after: Option<u64>,
}

impl LineCheck<'_> {
    fn chunk(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        self.pending.extend_from_slice(chunk);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let value: serde_json::Value = serde_json::from_slice(&line)
                .map_err(|err| anyhow::anyhow!("line {} is not JSON: {err}", self.seen))?;
            if value["request_id"] != self.id {
                self.misrouted = Some(format!("line of request {}", value["request_id"]));
                anyhow::bail!("misrouted");
            }
            let served_by = value["served_by"].as_str().unwrap_or_default();
            if !served_by.starts_with(&self.owner) {
                self.misrouted = Some(format!("line served by {served_by:?}"));
                anyhow::bail!("misrouted");
            }
            let index = value["response"]
                .as_str()
                .and_then(|r| r.parse::<u64>().ok());
            if index != Some(self.seen) {
                anyhow::bail!("line {} out of order: {}", self.seen, value["response"]);
            }
            self.seen += 1;
            self.done = value["done"] == true;
            if self.cut_after.is_some_and(|k| self.seen >= k) {
                // Dropping the body closes the connection mid-stream: a client hanging up.
                anyhow::bail!("client hangs up");
            }
        }
        Ok(())
    }
}

fn describe(
    options: &Options,
    counts: &Counts,
    rss: &[(f64, u64)],
    relay_only: bool,
    figures: &mut Figures,
) {
    let scenario = "soak";
    let count = |c: &AtomicU64| get(c) as f64;
    figures.figures.extend([
        Figure::info(scenario, "requests", count(&counts.requests), "requests"),
        Figure::info(
            scenario,
            "completed and checked",
            count(&counts.completed),
            "requests",
        ),
        Figure::info(
            scenario,
            "cut by the client (deliberate)",
            count(&counts.cut_by_client),
            "requests",
        ),
        Figure::info(
            scenario,
            "cut by a daemon restart",
            count(&counts.cut_by_restart),
            "requests",
        ),
        Figure::info(scenario, "lost", count(&counts.lost), "requests").goal(Goal::AtMost(0.0)),
        Figure::info(scenario, "misrouted", count(&counts.misrouted), "requests")
            .goal(Goal::AtMost(0.0)),
        Figure::info(
            scenario,
            "daemon restarts",
            count(&counts.restarts),
            "restarts",
        ),
    ]);
    let whose = if relay_only {
        "relay"
    } else {
        "whole process (in-process relay)"
    };
    if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
        let peak = rss.iter().map(|(_, k)| *k).max().unwrap_or(0);
        // The first quarter is warm-up (allocator arenas and pools filling); growth is the
        // last quarter's mean over the second quarter's.
        let quarter = rss.len().div_ceil(4);
        let mean = |s: &[(f64, u64)]| {
            s.iter().map(|(_, k)| *k as f64).sum::<f64>() / s.len().max(1) as f64
        };
        let second = &rss[quarter.min(rss.len() - 1)..(2 * quarter).min(rss.len())];
        let growth = mean(&rss[rss.len() - quarter..]) - mean(second);
        figures.figures.extend([
            Figure::info(
                scenario,
                format!("{whose} RSS at start"),
                first.1 as f64 / 1024.0,
                "MiB",
            ),
            Figure::info(
                scenario,
                format!("{whose} RSS peak"),
                peak as f64 / 1024.0,
                "MiB",
            ),
            Figure::info(
                scenario,
                format!("{whose} RSS at end"),
                last.1 as f64 / 1024.0,
                "MiB",
            ),
            Figure::info(
                scenario,
                format!("{whose} RSS growth after warm-up (last quarter − second quarter, means)"),
                growth / 1024.0,
                "MiB",
            ),
        ]);
        let step = rss.len().div_ceil(PRINTED_SAMPLES).max(1);
        let series: Vec<String> = rss
            .iter()
            .step_by(step)
            .map(|(t, k)| format!("{t:.0}s={:.1}", *k as f64 / 1024.0))
            .collect();
        figures
            .notes
            .push(format!("{whose} RSS over time (MiB): {}", series.join(" ")));
    }
    figures.setup.push(format!(
        "soak: {:?} of {} users × {} devices (real daemons, each with its own fake backend) × {} \
         workers per user; {:.0}% of requests cut by the client mid-stream; a random daemon \
         restarted about every {:?}; relay session_idle {:?}; relay {}",
        options.duration,
        options.users,
        options.devices_per_user,
        options.workers_per_user,
        options.disconnect_share * 100.0,
        options.restart_every,
        options.session_idle,
        if relay_only { "process" } else { "in-process" },
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &str, cut_after: Option<u64>) -> LineCheck<'_> {
        LineCheck {
            id,
            owner: "soak-user-0/".into(),
            pending: Vec::new(),
            seen: 0,
            done: false,
            misrouted: None,
            cut_after,
        }
    }

    fn line(id: &str, served_by: &str, i: u64, done: bool) -> String {
        let value = serde_json::json!({
            "response": i.to_string(),
            "done": done,
            "request_id": id,
            "served_by": served_by,
        });
        format!("{value}\n")
    }

    #[test]
    fn lines_split_across_chunks_are_checked_in_order() {
        let mut c = check("r1", None);
        let text =
            line("r1", "soak-user-0/dev0", 0, false) + &line("r1", "soak-user-0/dev0", 1, true);
        let (a, b) = text.split_at(30);
        c.chunk(a.as_bytes()).unwrap();
        c.chunk(b.as_bytes()).unwrap();
        assert_eq!((c.seen, c.done, c.misrouted.is_none()), (2, true, true));
        let mut c = check("r1", None);
        assert!(
            c.chunk(line("r1", "soak-user-0/dev0", 1, false).as_bytes())
                .is_err()
        );
        assert!(
            c.misrouted.is_none(),
            "a gap is a broken stream, not a misroute"
        );
    }

    #[test]
    fn another_request_or_another_users_device_is_misrouted() {
        let mut c = check("r1", None);
        assert!(
            c.chunk(line("r2", "soak-user-0/dev0", 0, false).as_bytes())
                .is_err()
        );
        assert!(c.misrouted.is_some());
        // `soak-user-00/…` starts like `soak-user-0` but is another user.
        let mut c = check("r1", None);
        assert!(
            c.chunk(line("r1", "soak-user-00/dev0", 0, false).as_bytes())
                .is_err()
        );
        assert!(c.misrouted.is_some());
    }

    #[test]
    fn the_client_hangs_up_after_the_chosen_line() {
        let mut c = check("r1", Some(2));
        c.chunk(line("r1", "soak-user-0/dev0", 0, false).as_bytes())
            .unwrap();
        assert!(
            c.chunk(line("r1", "soak-user-0/dev0", 1, false).as_bytes())
                .is_err()
        );
        assert_eq!((c.seen, c.misrouted.is_none()), (2, true));
    }

    #[test]
    fn restart_windows_cover_failures_near_them_only() {
        let device = Device {
            daemon: tokio::sync::Mutex::new(Daemon::for_test()),
            restarts: Mutex::new(Vec::new()),
        };
        let secs = Duration::from_secs;
        let now = Instant::now();
        let start = now + secs(10);
        device
            .restarts
            .lock()
            .unwrap()
            .push((start, Some(start + secs(1))));
        assert!(!device.restarting_during(now, now + secs(5)));
        assert!(device.restarting_during(now, start + Duration::from_millis(100)));
        assert!(device.restarting_during(start + secs(1), start + secs(2)));
        assert!(!device.restarting_during(start + secs(3), start + secs(4)));
    }
}
