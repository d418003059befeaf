//! cloudllm-bench: what the relay and the daemon cost, measured in one run.
//!
//! The same requests go to a [fake Ollama backend](backend) twice: directly, and through a
//! relay and a daemon connected by the real tunnel (WebSocket + HTTP/2). Each component runs on
//! its own two-worker runtime, as separate processes would on one machine (see [`stack`]), and
//! the load generator is a bare hyper HTTP/1 client ([`client`]). Direct and tunnelled runs
//! alternate, and each figure is the median of a few repetitions.
//!
//! It is a benchmark, not a test: it prints figures and whether each target was met, and
//! missing a target is not an error.
//!
//! More runs have their own entry points: [`compare::run`] (cloudllm's relay and daemon as
//! processes, side by side with two hyper proxies, two nginx and rathole, the cost of a request
//! located by process), [`run_scale`] (thousands of idle tunnels, a reconnect storm, a thousand
//! concurrent streams, time to first byte and cancellation, and optionally a real Ollama) and
//! [`soak::run`] (mixed traffic with disconnects and daemon restarts, every response checked).

pub mod backend;
pub mod client;
pub mod cluster;
pub mod compare;
pub mod counters;
pub mod cpu;
pub mod daemons;
pub mod figures;
pub mod fleet;
pub mod latency;
pub mod load;
pub mod ollama;
pub mod paths;
pub mod perf;
pub mod relay_host;
pub mod report;
pub mod scale;
pub mod scratch;
pub mod soak;
pub mod stack;
pub mod streams;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::client::Target;
use crate::report::{Cost, Goal, Report, Row, Unit};
use crate::stack::{Handles, Runtimes, Stack};

/// Lines of one unpaced NDJSON stream.
const STREAM_LINES: usize = 2_000;

/// Streams run at once in the parallel scenario.
const PARALLEL_STREAMS: usize = 8;

/// Keep-alive connections of the throughput scenario.
const THROUGHPUT_CONNECTIONS: usize = 64;

/// Lines of the paced stream, and the pause the backend makes between them: 25 ms is about a
/// fast model's token rate.
const PACED_LINES: usize = 40;
const PACED_DELAY: Duration = Duration::from_millis(25);

/// What the paced stream's largest gap may exceed the backend's pause by.
const PACED_SLACK: Duration = Duration::from_millis(1);

/// How the run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Fewer requests and shorter phases: a run of well under a minute.
    pub quick: bool,
}

/// How many requests and repetitions the scenarios that both this benchmark and `compare`
/// run get: sequential latency, requests/s under load, one long stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rounds {
    pub(crate) latency_warmup: usize,
    pub(crate) latency_requests: usize,
    pub(crate) latency_reps: usize,
    pub(crate) load_duration: Duration,
    pub(crate) load_reps: usize,
    pub(crate) stream_reps: usize,
}

impl Rounds {
    /// The full run's rounds, or `quick`'s fewer and shorter ones (well under a minute).
    pub(crate) fn new(quick: bool) -> Rounds {
        if quick {
            Rounds {
                latency_warmup: 200,
                latency_requests: 1_000,
                latency_reps: 3,
                load_duration: Duration::from_secs(2),
                load_reps: 1,
                stream_reps: 3,
            }
        } else {
            Rounds {
                latency_warmup: 500,
                latency_requests: 3_000,
                latency_reps: 3,
                load_duration: Duration::from_secs(5),
                load_reps: 3,
                stream_reps: 5,
            }
        }
    }
}

impl Rounds {
    /// The rounds in words, for the report's setup line: `connections` under load, streams of
    /// `stream_lines` lines.
    pub(crate) fn describe(&self, connections: usize, stream_lines: usize) -> String {
        format!(
            "latency: {} sequential GET /api/version after {} warm-up, median of {}; \
             load: {connections} keep-alive connections for {:?}, median of {}; \
             stream: {stream_lines} lines of ~{} bytes, median of {}",
            self.latency_requests,
            self.latency_warmup,
            self.latency_reps,
            self.load_duration,
            self.load_reps,
            backend::LINE_BYTES,
            self.stream_reps,
        )
    }
}

/// How many requests and repetitions each scenario gets.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rounds: Rounds,
    parallel_reps: usize,
    paced_reps: usize,
    /// Bound on the whole run.
    budget: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let (parallel_reps, paced_reps, budget_secs) =
            if quick { (3, 1, 120) } else { (5, 3, 600) };
        Plan {
            rounds: Rounds::new(quick),
            parallel_reps,
            paced_reps,
            budget: Duration::from_secs(budget_secs),
        }
    }

    fn describe(&self) -> String {
        format!(
            "backend, relay and load generator each on its own {}-worker tokio runtime, the daemon on one thread as cloudllmd runs; {}; \
             {PARALLEL_STREAMS} such streams at once: median of {}; \
             paced: {PACED_LINES} lines {PACED_DELAY:?} apart, median of {}",
            stack::WORKERS,
            self.rounds.describe(THROUGHPUT_CONNECTIONS, STREAM_LINES),
            self.parallel_reps,
            self.paced_reps,
        )
    }
}

/// Runs the whole benchmark and returns its report. Builds its own runtimes: call it from a
/// plain thread, not from inside a runtime.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    let plan = Plan::new(options.quick);
    let runtimes = Runtimes::new()?;
    let handles = runtimes.handles();
    let machine_before = cpu::Machine::take();
    // The measuring task runs on the load generator's workers; this thread only waits.
    let outcome = runtimes.load.block_on(async move {
        let task = tokio::spawn(measure_all(plan, handles));
        tokio::time::timeout(plan.budget, task)
            .await
            .with_context(|| format!("the benchmark did not finish within {:?}", plan.budget))?
            .context("the benchmark task failed")?
    });
    let others = machine_before.and_then(|before| cpu::Machine::take()?.others_since(&before));
    runtimes.shutdown();
    let (rows, costs) = outcome?;
    Ok(Report {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        quick: options.quick,
        setup: plan.describe(),
        others,
        rows,
        costs,
    })
}

/// Starts backend, relay and daemon, measures, and stops them again.
async fn measure_all(plan: Plan, handles: Handles) -> anyhow::Result<(Vec<Row>, Vec<Cost>)> {
    let backend_shutdown = CancellationToken::new();
    let backend = tokio::time::timeout(
        client::STEP,
        handles
            .backend
            .spawn(backend::serve(backend_shutdown.clone())),
    )
    .await
    .context("fake backend start timed out")?
    .context("fake backend task")??;
    let stack = Stack::start(&handles, backend).await?;
    let direct = Target::direct(backend)?;
    let through = Target::through(stack.relay_addr, &stack.client_token)?;

    let rows = measure(&plan, &direct, &through).await;
    if let Err(err) = stack.stop().await {
        warn!(error = format!("{err:#}"), "stopping relay and daemon");
    }
    backend_shutdown.cancel();
    rows
}

async fn measure(
    plan: &Plan,
    direct: &Target,
    through: &Target,
) -> anyhow::Result<(Vec<Row>, Vec<Cost>)> {
    // A first request each way, so a broken setup fails here with a clear message.
    direct
        .connect()
        .await?
        .version()
        .await
        .context("direct sanity request")?;
    through
        .connect()
        .await?
        .version()
        .await
        .context("sanity request through cloudllm")?;

    progress("sequential latency");
    let (warmup, requests) = (plan.rounds.latency_warmup, plan.rounds.latency_requests);
    let (d, t) = both(plan.rounds.latency_reps, direct, through, |target| {
        cpu::measure(load::sequential(target, warmup, requests))
    })
    .await?;
    let units = (warmup + requests) as f64;
    let sequential_cost = Cost {
        phase: "sequential latency".into(),
        per: "request",
        direct: per_unit(d.iter().map(|(_, cpu)| (units, cpu))),
        through: per_unit(t.iter().map(|(_, cpu)| (units, cpu))),
    };
    let (d, t): (Vec<load::Latency>, Vec<load::Latency>) = (
        d.into_iter().map(|(l, _)| l).collect(),
        t.into_iter().map(|(l, _)| l).collect(),
    );
    let micros = |latencies: &[load::Latency], pick: fn(&load::Latency) -> Duration| {
        median(
            latencies
                .iter()
                .map(|l| pick(l).as_secs_f64() * 1e6)
                .collect(),
        )
    };
    let p50 = Row {
        metric: "latency p50, sequential GET /api/version".into(),
        unit: Unit::Micros,
        direct: micros(&d, |l| l.p50),
        through: micros(&t, |l| l.p50),
        goal: Goal::RatioAtMost(1.5),
    };
    let p99 = Row {
        metric: "latency p99, sequential GET /api/version".into(),
        unit: Unit::Micros,
        direct: micros(&d, |l| l.p99),
        through: micros(&t, |l| l.p99),
        goal: Goal::None,
    };

    progress("throughput");
    let duration = plan.rounds.load_duration;
    let (d, t) = both(plan.rounds.load_reps, direct, through, |target| {
        cpu::measure(load::throughput(target, THROUGHPUT_CONNECTIONS, duration))
    })
    .await?;
    let secs = duration.as_secs_f64();
    let throughput_cost = Cost {
        phase: format!("throughput ({THROUGHPUT_CONNECTIONS} connections)"),
        per: "request",
        direct: per_unit(d.iter().map(|(rps, cpu)| (rps * secs, cpu))),
        through: per_unit(t.iter().map(|(rps, cpu)| (rps * secs, cpu))),
    };
    let rps = Row {
        metric: format!("requests/s, {THROUGHPUT_CONNECTIONS} keep-alive connections"),
        unit: Unit::PerSecond,
        direct: median(d.iter().map(|(rps, _)| *rps).collect()),
        through: median(t.iter().map(|(rps, _)| *rps).collect()),
        goal: Goal::RatioAtLeast(0.65),
    };

    progress("one stream");
    let (d, t) = both(plan.rounds.stream_reps, direct, through, |target| {
        load::one_stream(target, STREAM_LINES)
    })
    .await?;
    let stream = Row {
        metric: format!("1 stream of {STREAM_LINES} lines, time to last byte"),
        unit: Unit::Millis,
        direct: median_ms(&d),
        through: median_ms(&t),
        goal: Goal::RatioAtMost(1.0),
    };

    progress("parallel streams");
    let (d, t) = both(plan.parallel_reps, direct, through, |target| {
        cpu::measure(load::parallel_streams(
            target,
            PARALLEL_STREAMS,
            STREAM_LINES,
        ))
    })
    .await?;
    let units = (PARALLEL_STREAMS * STREAM_LINES) as f64;
    let stream_cost = Cost {
        phase: format!("{PARALLEL_STREAMS} streams at once"),
        per: "line",
        direct: per_unit(d.iter().map(|(_, cpu)| (units, cpu))),
        through: per_unit(t.iter().map(|(_, cpu)| (units, cpu))),
    };
    let (d, t): (Vec<Duration>, Vec<Duration>) = (
        d.into_iter().map(|(e, _)| e).collect(),
        t.into_iter().map(|(e, _)| e).collect(),
    );
    let parallel = Row {
        metric: format!("{PARALLEL_STREAMS} streams at once, until all done"),
        unit: Unit::Millis,
        direct: median_ms(&d),
        through: median_ms(&t),
        goal: Goal::RatioAtMost(1.3),
    };

    progress("paced stream");
    let (d, t) = both(plan.paced_reps, direct, through, |target| {
        load::paced_gap(target, PACED_LINES, PACED_DELAY)
    })
    .await?;
    let paced = Row {
        metric: format!(
            "paced stream ({PACED_LINES} lines, {} ms apart), max gap",
            PACED_DELAY.as_millis()
        ),
        unit: Unit::Millis,
        direct: median_ms(&d),
        through: median_ms(&t),
        goal: Goal::AtMost((PACED_DELAY + PACED_SLACK).as_secs_f64() * 1e3),
    };

    Ok((
        vec![p50, p99, rps, stream, parallel, paced],
        vec![sequential_cost, throughput_cost, stream_cost],
    ))
}

/// Runs `scenario` `reps` times against each target, alternating direct and through, and
/// returns the figures of each side.
async fn both<T, F, Fut>(
    reps: usize,
    direct: &Target,
    through: &Target,
    scenario: F,
) -> anyhow::Result<(Vec<T>, Vec<T>)>
where
    F: Fn(Target) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut d = Vec::with_capacity(reps);
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        d.push(scenario(direct.clone()).await.context("direct")?);
        t.push(
            scenario(through.clone())
                .await
                .context("through cloudllm")?,
        );
    }
    Ok((d, t))
}

/// CPU µs per unit by component, from (units done, CPU used) per repetition; `None` when a
/// repetition has no CPU figures.
fn per_unit<'a>(
    samples: impl Iterator<Item = (f64, &'a Option<BTreeMap<String, Duration>>)>,
) -> Option<BTreeMap<String, f64>> {
    let mut units = 0.0;
    let mut used: BTreeMap<String, f64> = BTreeMap::new();
    for (done, cpu) in samples {
        units += done;
        for (component, time) in cpu.as_ref()? {
            *used.entry(component.clone()).or_default() += time.as_secs_f64() * 1e6;
        }
    }
    (units > 0.0).then(|| {
        used.into_iter()
            .map(|(c, micros)| (c, micros / units))
            .collect()
    })
}

/// The median of `values` (the mean of the middle two for an even count; NaN for none).
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn median_ms(durations: &[Duration]) -> f64 {
    median(durations.iter().map(|d| d.as_secs_f64() * 1e3).collect())
}

/// Tells the operator (on stderr) which phase is running.
/// The start of every benchmark binary's `main`: logs to stderr, `warn` unless `RUST_LOG`
/// says otherwise (so that logging does not skew the figures).
pub fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The end of every benchmark binary's `main`: `outcome`'s exit code, or the error chain on
/// stderr after `program`'s name and failure.
pub fn exit_code(
    program: &str,
    outcome: anyhow::Result<std::process::ExitCode>,
) -> std::process::ExitCode {
    outcome.unwrap_or_else(|err| {
        eprintln!("{program}: {err:#}");
        std::process::ExitCode::FAILURE
    })
}

pub(crate) fn progress(phase: &str) {
    eprintln!("cloudllm-bench: measuring {phase}…");
}

/// What `cloudllm-bench scale` runs.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Idle tunnels and the reconnect storm.
    pub idle: scale::Options,
    /// Concurrent streams spread over devices; `None` skips them.
    pub streams: Option<streams::Options>,
    /// Time to first byte and cancellation, repetitions; 0 skips them.
    pub latency_reps: usize,
    /// A real Ollama to measure directly and through cloudllm, if any.
    pub ollama: Option<std::net::SocketAddr>,
}

/// Runs the scale scenarios and returns their figures. Builds its own runtimes: call it from a
/// plain thread, not from inside a runtime.
pub fn run_scale(options: &ScaleOptions) -> anyhow::Result<figures::Figures> {
    let mut figures = figures::Figures::new();
    if let Some(note) = raise_file_limit() {
        figures.notes.push(note);
    }
    let runtimes = Runtimes::new()?;
    let handles = runtimes.handles();
    let options = options.clone();
    let outcome = runtimes.load.block_on(async move {
        let task = tokio::spawn(async move {
            let mut figures = figures;
            if !options.idle.tunnels.is_empty() || options.idle.storm > 0 {
                let relay = relay_host::relay_binary()?;
                scale::idle_and_storm(&options.idle, &relay, &mut figures).await?;
            }
            if let Some(streams) = &options.streams {
                progress("concurrent streams");
                if let Err(err) = streams::run(streams, &handles, &mut figures).await {
                    figures
                        .notes
                        .push(format!("concurrent streams did not complete: {err:#}"));
                }
            }
            if options.latency_reps > 0 {
                progress("time to first byte and cancellation");
                if let Err(err) = latency::run(options.latency_reps, &handles, &mut figures).await {
                    figures
                        .notes
                        .push(format!("time to first byte / cancellation: {err:#}"));
                }
            }
            if let Some(ollama) = options.ollama {
                progress("real Ollama");
                if let Err(err) = ollama::run(ollama, &handles, &mut figures).await {
                    figures.notes.push(format!("real Ollama: {err:#}"));
                }
            }
            Ok::<_, anyhow::Error>(figures)
        });
        task.await.context("the scale task failed")?
    });
    runtimes.shutdown();
    outcome
}

/// Raises this process's open-file limit to its hard limit (thousands of tunnels need
/// thousands of sockets; a relay process started from here inherits it). Returns a note when
/// the limit stays low.
pub fn raise_file_limit() -> Option<String> {
    #[cfg(unix)]
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            return Some(format!(
                "could not raise the open-file limit from {soft} to {hard}"
            ));
        }
        let now = getrlimit(Resource::RLIMIT_NOFILE).ok()?.0;
        (now < 16_384).then(|| format!("open-file limit is {now}: large tunnel counts may fail"))
    }
    #[cfg(not(unix))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
