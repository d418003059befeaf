//! `cloudllm-bench compare`: cloudllm side by side with the references it is held to, measured
//! in one run on this machine: the load generator straight to the fake backend, through two
//! chained minimal hyper proxies, two chained nginx reverse proxies, rathole over WebSocket
//! (each where installed), and cloudllm's relay and daemon, every one of them real processes
//! ([`paths`](crate::paths)).
//!
//! Each path gets the same three scenarios: sequential requests on one connection (p50, p99:
//! like `wrk -c1`), requests/s over keep-alive connections sending back to back (like
//! `wrk -c64`), and one unpaced 2,000-line stream. Repetitions go round the paths in turn (a
//! different one first each time), so that drift in the machine's load hits all alike; each
//! figure is the median of its repetitions.
//!
//! Around every measurement, each process's counters are read from `/proc`
//! ([`counters`](crate::counters)), and in a pass of its own, with `perf` where it can, every
//! system call is counted ([`perf`](crate::perf)): the cost per request is located by process,
//! not guessed. The targets (cloudllm against the two hyper proxies) are printed with met or
//! not met ([`report`]).

pub mod report;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::counters::{self, Counters, Snapshot, Source};
use crate::paths::{self, Kind, Running, cloudllm, hyper_proxy, nginx, rathole};
use crate::perf::{self, Attach, Session};
use crate::scratch::Scratch;
use crate::{Rounds, backend, client, cpu, figures, load, median, progress, stack};
use report::{Comparison, PathFigures, Phase, ProcessCost};

/// Keep-alive connections of the load phase, as `wrk -c64`.
pub const CONNECTIONS: usize = 64;

/// Lines of the unpaced stream.
pub const STREAM_LINES: usize = 2_000;

/// Paths a run measures at most: direct, hyper, nginx, rathole, cloudllm.
const MAX_PATHS: u32 = 5;

/// The load generator's threads (see [`stack`]).
const LOAD_THREADS: &str = "load";

/// The fake backend's threads.
const BACKEND_THREADS: &str = "backend";

/// What `compare` runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Fewer requests and shorter phases: well under a minute of measuring.
    pub quick: bool,
    /// nginx to use (default: found on `PATH` or in `/usr/sbin`).
    pub nginx: Option<PathBuf>,
    /// rathole to use (default: found on `PATH` or in `~/.cargo/bin`).
    pub rathole: Option<PathBuf>,
    /// Do not count system calls with perf (only `/proc/PID/io`'s read/write calls).
    pub no_perf: bool,
    /// Also record a CPU profile of every process (`perf record -e cpu-clock`) under load,
    /// into this directory.
    pub perf_record: Option<PathBuf>,
    /// How long the load of perf's pass lasts (default: the plan's).
    pub perf_load: Option<Duration>,
    /// The relay writes its audit log (a JSON line per request), as an operator who keeps a
    /// record of every request runs it.
    pub audit_log: bool,
}

/// How many requests and repetitions each scenario gets.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rounds: Rounds,
    /// Sequential requests of the counting pass.
    count_requests: usize,
    /// Load of the counting pass.
    count_duration: Duration,
    /// Bound on the whole run.
    budget: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let rounds = Rounds::new(quick);
        Plan {
            // A quick run measures each path's latency once: the paths are many.
            rounds: Rounds {
                latency_reps: if quick { 1 } else { rounds.latency_reps },
                ..rounds
            },
            count_requests: if quick { 500 } else { 2_000 },
            count_duration: Duration::from_secs(if quick { 1 } else { 3 }),
            budget: Duration::from_secs(if quick { 240 } else { 900 }),
        }
    }

    fn describe(&self) -> Vec<String> {
        vec![
            format!(
                "fake backend and load generator in this process, each on its own {}-worker tokio runtime; \
                 every other component a process of its own",
                stack::WORKERS
            ),
            self.rounds.describe(CONNECTIONS, STREAM_LINES),
        ]
    }
}

/// Runs the comparison and returns its figures. Builds its own runtimes: call it from a plain
/// thread, not from inside a runtime.
pub fn run(options: &Options) -> anyhow::Result<Comparison> {
    let mut plan = Plan::new(options.quick);
    if let Some(load) = options.perf_load {
        plan.count_duration = load;
        // As many sequential requests as take about that long (≈ 0.25 ms each through two
        // proxies), for a profile of that phase with as many samples.
        plan.count_requests = plan.count_requests.max((load.as_millis() * 4) as usize);
        // Each path's counting pass is that much longer.
        plan.budget += load * 2 * MAX_PATHS;
    }
    let load_before = figures::load_average();
    let backend_runtime = stack::runtime(BACKEND_THREADS)?;
    let load_runtime = stack::runtime(LOAD_THREADS)?;
    let backend = backend_runtime.handle().clone();
    let options = options.clone();
    // The measuring task runs on the load generator's workers; this thread only waits.
    let outcome = load_runtime.block_on(async move {
        let task = tokio::spawn(measure_all(plan, options, backend));
        tokio::time::timeout(plan.budget, task)
            .await
            .with_context(|| format!("the comparison did not finish within {:?}", plan.budget))?
            .context("the comparison task failed")?
    });
    load_runtime.shutdown_timeout(Duration::from_secs(1));
    backend_runtime.shutdown_timeout(Duration::from_secs(1));
    let mut comparison = outcome?;
    comparison.setup.splice(0..0, plan.describe());
    if let (Some(before), Some(after)) = (load_before, figures::load_average()) {
        comparison.setup.push(format!(
            "load average (1, 5, 15 min) before: {before}; after: {after}"
        ));
    }
    Ok(comparison)
}

/// Starts the backend and every path, measures, and stops them again.
async fn measure_all(
    plan: Plan,
    options: Options,
    backend_runtime: Handle,
) -> anyhow::Result<Comparison> {
    let backend_stop = CancellationToken::new();
    let backend = tokio::time::timeout(
        client::STEP,
        backend_runtime.spawn(backend::serve(backend_stop.clone())),
    )
    .await
    .context("fake backend start timed out")?
    .context("fake backend task")??;
    let _stop_backend = backend_stop.drop_guard();

    eprintln!("cloudllm-bench: starting the paths…");
    let mut skipped = Vec::new();
    let mut running = vec![Running {
        kind: Kind::Direct,
        target: client::Target::direct(backend)?,
        processes: Vec::new(),
        about: "load generator → fake backend".into(),
        scratch: None,
    }];
    let proxy = paths::sibling_binary("cloudllm-bench-proxy", "cloudllm-bench")?;
    running.push(
        hyper_proxy::start_pair(&proxy, backend)
            .await
            .context("starting the two hyper proxies")?,
    );
    match paths::find_tool("nginx", options.nginx.as_deref(), &nginx::extra_dirs()) {
        None => skipped.push((
            Kind::Nginx,
            "nginx not found on PATH or in /usr/sbin (install it, or pass --nginx PATH)".into(),
        )),
        Some(path) => match nginx::start_pair(&path, backend).await {
            Ok(nginx) => running.push(nginx),
            Err(err) => skipped.push((Kind::Nginx, format!("{err:#}"))),
        },
    }
    match paths::find_tool("rathole", options.rathole.as_deref(), &rathole::extra_dirs()) {
        None => skipped.push((
            Kind::Rathole,
            "rathole not found on PATH or in ~/.cargo/bin (`cargo install rathole`, or pass --rathole PATH)"
                .into(),
        )),
        Some(path) => match rathole::start(&path, backend).await {
            Ok(rathole) => running.push(rathole),
            Err(err) => skipped.push((Kind::Rathole, format!("{err:#}"))),
        },
    }
    let relay = paths::sibling_binary("cloudllm-relay", "cloudllm-relay")?;
    let daemon = paths::sibling_binary("cloudllmd", "cloudllm-daemon")?;
    running.push(
        cloudllm::start(&relay, &daemon, backend, options.audit_log)
            .await
            .context("starting cloudllm's relay and daemon")?,
    );

    let outcome = measure(&plan, &options, &running).await;
    for path in running {
        path.stop().await;
    }
    let (paths, others, syscall_source, notes) = outcome?;
    Ok(Comparison {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        quick: options.quick,
        setup: Vec::new(),
        others,
        paths,
        skipped,
        syscall_source,
        notes,
        connections: CONNECTIONS,
        stream_lines: STREAM_LINES,
    })
}

/// One path under measurement: what to count, and what was counted so far.
struct Measured<'a> {
    path: &'a Running,
    /// (label, what to read) per process; the load generator and backend first.
    components: Vec<(String, Source)>,
    latencies: Vec<load::Latency>,
    rates: Vec<f64>,
    streams: Vec<Duration>,
    /// Per phase: counters summed over repetitions (one per component) and requests.
    spent: [(Vec<Counters>, f64); 2],
    /// Per phase and component: system calls counted by perf, and the requests of that pass.
    syscalls: [Vec<Option<(u64, f64)>>; 2],
}

impl<'a> Measured<'a> {
    fn new(path: &'a Running) -> Measured<'a> {
        let mut components = vec![
            (
                "load generator".to_owned(),
                Source::Threads(LOAD_THREADS.into()),
            ),
            (
                "fake backend".to_owned(),
                Source::Threads(BACKEND_THREADS.into()),
            ),
        ];
        for process in &path.processes {
            if let Some(pid) = process.pid() {
                components.push((
                    process.label.clone(),
                    Source::Processes(counters::process_ids(pid)),
                ));
            }
        }
        let n = components.len();
        Measured {
            path,
            components,
            latencies: Vec::new(),
            rates: Vec::new(),
            streams: Vec::new(),
            spent: [
                (vec![Counters::default(); n], 0.0),
                (vec![Counters::default(); n], 0.0),
            ],
            syscalls: [vec![None; n], vec![None; n]],
        }
    }

    /// Runs `work` (which serves `requests(&output)` requests), adding what every component
    /// spent meanwhile to `phase`.
    async fn observe<T>(
        &mut self,
        phase: Phase,
        work: impl Future<Output = anyhow::Result<T>>,
        requests: impl Fn(&T) -> f64,
    ) -> anyhow::Result<T> {
        let before: Vec<Snapshot> = self
            .components
            .iter()
            .map(|(_, s)| Snapshot::take(s))
            .collect();
        let out = work.await?;
        let (sums, units) = &mut self.spent[phase_index(phase)];
        for ((sum, (_, source)), before) in sums.iter_mut().zip(&self.components).zip(&before) {
            let spent = Snapshot::take(source).since(before);
            *sum = add(sum, &spent);
        }
        *units += requests(&out);
        Ok(out)
    }

    fn figures(&self) -> PathFigures {
        let micros = |pick: fn(&load::Latency) -> Duration| {
            median(
                self.latencies
                    .iter()
                    .map(|l| pick(l).as_secs_f64() * 1e6)
                    .collect(),
            )
        };
        let costs = [Phase::Load, Phase::Sequential]
            .into_iter()
            .map(|phase| {
                let i = phase_index(phase);
                let (sums, requests) = &self.spent[i];
                let costs = self
                    .components
                    .iter()
                    .zip(sums)
                    .zip(&self.syscalls[i])
                    .map(|(((label, _), spent), calls)| {
                        ProcessCost::per_request(label, spent, *requests, *calls)
                    })
                    .collect();
                (phase, costs)
            })
            .collect();
        PathFigures {
            kind: self.path.kind,
            about: self.path.about.clone(),
            p50_us: micros(|l| l.p50),
            p99_us: micros(|l| l.p99),
            rps: median(self.rates.clone()),
            stream_ms: median(self.streams.iter().map(|d| d.as_secs_f64() * 1e3).collect()),
            costs,
        }
    }
}

fn phase_index(phase: Phase) -> usize {
    match phase {
        Phase::Load => 0,
        Phase::Sequential => 1,
    }
}

fn add(a: &Counters, b: &Counters) -> Counters {
    Counters {
        cpu_ns: a.cpu_ns + b.cpu_ns,
        voluntary: a.voluntary + b.voluntary,
        involuntary: a.involuntary + b.involuntary,
        syscr: a.syscr + b.syscr,
        syscw: a.syscw + b.syscw,
    }
}

/// What [`measure`] returns: the paths' figures, the others' CPU share, how system calls were
/// counted, and notes.
type Measurements = (Vec<PathFigures>, Option<f64>, String, Vec<String>);

async fn measure(
    plan: &Plan,
    options: &Options,
    running: &[Running],
) -> anyhow::Result<Measurements> {
    for path in running {
        path.target
            .connect()
            .await?
            .version()
            .await
            .with_context(|| format!("first request through {}", path.kind.name()))?;
    }
    let mut measured: Vec<Measured> = running.iter().map(Measured::new).collect();
    let children_before = children_cpu(&measured);
    let machine_before = cpu::Machine::take();

    progress("sequential latency");
    let (warmup, requests) = (plan.rounds.latency_warmup, plan.rounds.latency_requests);
    observe_rounds(
        &mut measured,
        (
            plan.rounds.latency_reps,
            Phase::Sequential,
            "sequential requests",
        ),
        |target| load::sequential(target, warmup, requests),
        |_| (warmup + requests) as f64,
        |m, latency| m.latencies.push(latency),
    )
    .await?;

    progress("requests/s");
    let duration = plan.rounds.load_duration;
    observe_rounds(
        &mut measured,
        (plan.rounds.load_reps, Phase::Load, "load"),
        |target| load::throughput(target, CONNECTIONS, duration),
        |rps| rps * duration.as_secs_f64(),
        |m, rps| m.rates.push(rps),
    )
    .await?;

    progress("one long stream");
    for rep in 0..plan.rounds.stream_reps {
        for m in rotated(&mut measured, rep) {
            let took = load::one_stream(m.path.target.clone(), STREAM_LINES)
                .await
                .with_context(|| format!("a stream through {}", m.path.kind.name()))?;
            m.streams.push(took);
        }
    }

    let others = machine_before.and_then(|before| {
        let ours = children_cpu(&measured).saturating_sub(children_before);
        cpu::Machine::take()?.others_since_excluding(&before, ours)
    });

    let mut notes = Vec::new();
    let syscall_source = if options.no_perf {
        "not counted (--no-perf)".to_owned()
    } else if perf::can_count_syscalls().await {
        progress("system calls (perf)");
        let scratch = Scratch::create("compare-perf")?;
        for m in &mut measured {
            if let Err(err) =
                count_syscalls(plan, m, &scratch.0, options.perf_record.as_deref()).await
            {
                notes.push(format!(
                    "counting the system calls of {} failed: {err:#}",
                    m.path.kind.name()
                ));
            }
        }
        if let Some(dir) = &options.perf_record {
            notes.push(format!(
                "CPU profiles under load: {}/*.data (`perf report -i FILE --no-children --sort dso,symbol`)",
                dir.display()
            ));
        }
        format!(
            "perf's raw_syscalls:sys_enter, in a pass of its own ({} sequential requests, then {:?} of load)",
            plan.count_requests, plan.count_duration
        )
    } else {
        if options.perf_record.is_some() {
            notes.push(
                "no CPU profiles: perf is missing or not allowed (run as root or lower \
                 kernel.perf_event_paranoid)"
                    .into(),
            );
        }
        "not counted: perf is missing or not allowed here".to_owned()
    };

    Ok((
        measured.iter().map(Measured::figures).collect(),
        others,
        syscall_source,
        notes,
    ))
}

/// `reps` rounds of `phase` (called `what` in errors) over every path in turn: `work` on the
/// path's target, observed ([`Measured::observe`]) as serving `requests` of its outcome, which
/// `keep` then files.
async fn observe_rounds<T, Fut>(
    measured: &mut [Measured<'_>],
    (reps, phase, what): (usize, Phase, &str),
    work: impl Fn(client::Target) -> Fut,
    requests: impl Fn(&T) -> f64,
    keep: impl Fn(&mut Measured<'_>, T),
) -> anyhow::Result<()>
where
    Fut: Future<Output = anyhow::Result<T>>,
{
    for rep in 0..reps {
        for m in rotated(measured, rep) {
            let out = m
                .observe(phase, work(m.path.target.clone()), &requests)
                .await
                .with_context(|| format!("{what} through {}", m.path.kind.name()))?;
            keep(m, out);
        }
    }
    Ok(())
}

/// The paths in turn, starting with a different one each repetition.
fn rotated<'m, 'a>(
    measured: &'m mut [Measured<'a>],
    rep: usize,
) -> impl Iterator<Item = &'m mut Measured<'a>> {
    let n = measured.len().max(1);
    let (head, tail) = measured.split_at_mut(rep % n);
    tail.iter_mut().chain(head.iter_mut())
}

/// CPU time used so far by every process the benchmark started (not its own threads).
fn children_cpu(measured: &[Measured]) -> Duration {
    let nanos: u64 = measured
        .iter()
        .flat_map(|m| &m.components)
        .filter(|(_, source)| matches!(source, Source::Processes(_)))
        .map(|(_, source)| Snapshot::take(source).since(&Snapshot::default()).cpu_ns)
        .sum();
    Duration::from_nanos(nanos)
}

/// The counting pass for one path: sequential requests, then load, each with a `perf stat`
/// per component (and, under load, a `perf record` per component when asked).
async fn count_syscalls(
    plan: &Plan,
    m: &mut Measured<'_>,
    dir: &Path,
    record: Option<&Path>,
) -> anyhow::Result<()> {
    let attach: Vec<Attach> = m
        .components
        .iter()
        .map(|(_, source)| match source {
            Source::Processes(pids) => Attach::Processes(pids.clone()),
            Source::Threads(_) => Attach::Threads(counters::thread_ids(source)),
        })
        .collect();
    let path_slug = m.path.kind.slug();

    for phase in [Phase::Sequential, Phase::Load] {
        let mut sessions = Vec::new();
        let mut recordings = Vec::new();
        for (i, attach) in attach.iter().enumerate() {
            let out = dir.join(format!("{path_slug}-{i}-{phase:?}.csv"));
            sessions.push(Session::count_syscalls(attach, &out)?);
            if let Some(record) = record {
                std::fs::create_dir_all(record)
                    .with_context(|| format!("creating {}", record.display()))?;
                let label = &m.components[i].0;
                let phase = match phase {
                    Phase::Sequential => "sequential",
                    Phase::Load => "load",
                };
                let out = record.join(format!("{path_slug}-{}-{phase}.data", slug(label)));
                recordings.push(Session::record(attach, &out)?);
            }
        }
        tokio::time::sleep(perf::ATTACH_PAUSE).await;
        let target = m.path.target.clone();
        let requests = match phase {
            Phase::Sequential => {
                load::sequential(target, 0, plan.count_requests).await?;
                plan.count_requests as f64
            }
            Phase::Load => {
                let rps = load::throughput(target, CONNECTIONS, plan.count_duration).await?;
                rps * plan.count_duration.as_secs_f64()
            }
        };
        for recording in recordings {
            if let Err(err) = recording.finish().await {
                warn!(error = format!("{err:#}"), "perf record");
            }
        }
        for (i, session) in sessions.into_iter().enumerate() {
            let calls = session.finish_count().await?;
            m.syscalls[phase_index(phase)][i] = Some((calls, requests));
        }
    }
    Ok(())
}

/// `label` for a file name: ASCII letters and digits, words joined by single dashes
/// (`hyper proxy 1 (front)` → `hyper-proxy-1-front`).
fn slug(label: &str) -> String {
    label
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_names_are_plain() {
        assert_eq!(slug("hyper proxy 1 (front)"), "hyper-proxy-1-front");
        assert_eq!(slug("relay"), "relay");
        assert_eq!(slug("../x"), "x");
    }
}
