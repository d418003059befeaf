//! `cloudllm-bench`: measure a fake Ollama directly and through cloudllm, print the table;
//! `scale` and `soak` run the relay with many devices and under mixed, faulty traffic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod web;

#[derive(Parser)]
#[command(
    about = "Measures requests to a fake Ollama backend directly and through cloudllm's relay and daemon",
    after_help = "Missing a target is not an error: the exit status is 0 whenever the run completes \
                  (except `soak`, which fails when a request was lost or misrouted). \
                  Logs go to stderr; RUST_LOG defaults to `warn` so that logging does not skew the figures."
)]
struct Cli {
    /// A shorter run (well under a minute), with fewer requests and repetitions.
    #[arg(long, global = true)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE", global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// A relay cluster (two nodes, a real redis-server): time to first byte and a 2,000-line
    /// stream direct, through one node and through a hop; requests/s; presence ops and Redis
    /// memory per device; idle tunnels over three nodes against one (relay RSS per tunnel).
    Cluster {
        /// Idle tunnels spread over three relay processes, and then held by one; 0 skips it.
        #[arg(long, default_value_t = 10_000)]
        tunnels: usize,
    },
    /// Idle tunnels (relay memory per tunnel), a reconnect storm, many concurrent streams, time
    /// to first byte and cancellation, and optionally a real Ollama. Needs the release
    /// `cloudllm-relay` next to this binary.
    Scale {
        /// Idle tunnel counts to connect, each to a fresh relay process.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        tunnels: Vec<usize>,
        /// Devices connected when the relay is crashed and restarted; 0 skips the storm.
        #[arg(long, default_value_t = 1000)]
        storm: usize,
        /// After the idle tunnels' first memory reading, keep them connected this long and read
        /// again (`10m`, `1h`): their pings walk through the HTTP/2 read buffers; 0 skips it.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        idle_for: Duration,
        /// Concurrent streams, spread over --devices real daemons; 0 skips them.
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        /// Devices the streams are spread over.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Lines per stream.
        #[arg(long, default_value_t = 50)]
        lines: usize,
        /// Pause between a stream's lines, in milliseconds.
        #[arg(long, default_value_t = 100)]
        delay_ms: u64,
        /// Repetitions of the time-to-first-byte and cancel measurements; 0 skips them.
        #[arg(long, default_value_t = 100)]
        latency_reps: usize,
        /// A real Ollama to measure directly and through cloudllm (e.g. 127.0.0.1:11535 from
        /// `real-ollama start`).
        #[arg(long, value_name = "ADDR")]
        ollama: Option<SocketAddr>,
    },
    /// Mixed streaming traffic with client disconnects and daemon restarts; every response is
    /// checked. Exits 1 if any request was lost or misrouted.
    Soak {
        /// How long traffic runs (`30s`, `3m`, `2h`).
        #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Users.
        #[arg(long, default_value_t = 3)]
        users: usize,
        /// Devices (real daemons) per user.
        #[arg(long, default_value_t = 2)]
        devices: usize,
        /// Concurrent request loops per user.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Share of requests cut by the client mid-stream (0 to 1).
        #[arg(long, default_value_t = 0.1)]
        disconnects: f64,
        /// Mean time between daemon restarts (`0s`: none).
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        restart_every: Duration,
        /// The relay's `session_idle` (`2ms` makes sessions close and reopen between a
        /// device's requests all the time).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        session_idle: Duration,
        /// Run the relay in this process instead of as the `cloudllm-relay` binary (then the
        /// memory sampled is the whole process's).
        #[arg(long)]
        in_process: bool,
    },
    /// The web page in headless Chromium: first-load bytes, opening a 500-message conversation,
    /// main-thread time per streamed token. Needs Chromium and `npm ci --prefix web`.
    Web,
    /// cloudllm's relay and daemon (as processes) beside two hyper proxies, two nginx and
    /// rathole, one run: p50, requests/s, one long stream, and each process's CPU, system calls
    /// and context switches per request. Needs the release `cloudllm-relay`, `cloudllmd` and
    /// `cloudllm-bench-proxy` next to this binary.
    Compare {
        /// The nginx binary [default: found on PATH or in /usr/sbin; the row is skipped if none].
        #[arg(long, value_name = "PATH")]
        nginx: Option<PathBuf>,
        /// The rathole binary [default: found on PATH or in ~/.cargo/bin; skipped if none].
        #[arg(long, value_name = "PATH")]
        rathole: Option<PathBuf>,
        /// Do not count system calls with perf (while it counts, every system call is a little
        /// slower; it counts in a pass of its own).
        #[arg(long)]
        no_perf: bool,
        /// Also write a CPU profile of every process (`perf record -e cpu-clock`) into DIR, one
        /// for the sequential requests and one under load: DIR/PATH-PROCESS-PHASE.data.
        #[arg(long, value_name = "DIR")]
        perf_record: Option<PathBuf>,
        /// How long the load of perf's pass lasts (and about as long its sequential requests),
        /// e.g. `10s` for a profile with more samples [default: 3s; 1s with --quick].
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        perf_load: Option<Duration>,
        /// The relay writes its audit log (a JSON line per request) into a file: what keeping
        /// a record of every request costs.
        #[arg(long)]
        audit_log: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cloudllm_bench::log_to_stderr();
    cloudllm_bench::exit_code("cloudllm-bench", run(&cli))
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let (text, json, code) = match &cli.command {
        None => {
            let report = cloudllm_bench::run(&cloudllm_bench::Options { quick: cli.quick })?;
            (report.to_string(), report.to_json(), ExitCode::SUCCESS)
        }
        Some(Command::Scale {
            tunnels,
            storm,
            idle_for,
            streams,
            devices,
            lines,
            delay_ms,
            latency_reps,
            ollama,
        }) => {
            // --quick: a tenth of everything, enough to see that each scenario works.
            let shrink = |n: usize| if cli.quick { n.div_ceil(10) } else { n };
            let options = cloudllm_bench::ScaleOptions {
                idle: cloudllm_bench::scale::Options {
                    tunnels: tunnels.iter().map(|&n| shrink(n)).collect(),
                    storm: shrink(*storm),
                    idle_for: *idle_for,
                },
                streams: (*streams > 0).then(|| cloudllm_bench::streams::Options {
                    streams: shrink(*streams),
                    devices: shrink(*devices),
                    lines: if cli.quick { (*lines).min(10) } else { *lines },
                    delay: Duration::from_millis(*delay_ms),
                }),
                latency_reps: shrink(*latency_reps),
                ollama: *ollama,
            };
            let figures = cloudllm_bench::run_scale(&options)?;
            (figures.to_string(), figures.to_json(), ExitCode::SUCCESS)
        }
        Some(Command::Soak {
            duration,
            users,
            devices,
            workers,
            disconnects,
            restart_every,
            session_idle,
            in_process,
        }) => {
            let relay_binary = if *in_process {
                None
            } else {
                Some(cloudllm_bench::relay_host::relay_binary()?)
            };
            let options = cloudllm_bench::soak::Options {
                users: *users,
                devices_per_user: *devices,
                workers_per_user: *workers,
                disconnect_share: *disconnects,
                restart_every: *restart_every,
                session_idle: *session_idle,
                relay_binary,
                ..cloudllm_bench::soak::Options::new(*duration)
            };
            let outcome = cloudllm_bench::soak::run(&options)?;
            let mut text = outcome.figures.to_string();
            for failure in &outcome.failures {
                text.push_str(&format!("failure: {failure}\n"));
            }
            let mut json = outcome.figures.to_json();
            json["rss_kib"] = serde_json::json!(outcome.rss);
            json["failures"] = serde_json::json!(outcome.failures);
            let code = if outcome.passed() {
                ExitCode::SUCCESS
            } else {
                text.push_str("soak FAILED: requests were lost or misrouted\n");
                ExitCode::FAILURE
            };
            (text, json, code)
        }
        Some(Command::Cluster { tunnels }) => {
            let (text, json) = cloudllm_bench::cluster::run(cli.quick, *tunnels)?;
            (text, json, ExitCode::SUCCESS)
        }
        Some(Command::Web) => {
            let (text, json) = web::run()?;
            (text, json, ExitCode::SUCCESS)
        }
        Some(Command::Compare {
            nginx,
            rathole,
            no_perf,
            perf_record,
            perf_load,
            audit_log,
        }) => {
            let comparison = cloudllm_bench::compare::run(&cloudllm_bench::compare::Options {
                quick: cli.quick,
                nginx: nginx.clone(),
                rathole: rathole.clone(),
                no_perf: *no_perf,
                perf_record: perf_record.clone(),
                perf_load: *perf_load,
                audit_log: *audit_log,
            })?;
            (
                comparison.to_string(),
                comparison.to_json(),
                ExitCode::SUCCESS,
            )
        }
    };
    print!("{text}");
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&json)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(code)
}
