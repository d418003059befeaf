//! What `compare` prints: one row per path (p50, p99, requests/s, one long stream, each
//! against direct), the targets cloudllm is held to against the two-hyper row with met or not
//! met, and where each path's cost sits, per request and per process. Also as JSON.

use std::fmt;

use crate::counters::Counters;
use crate::paths::Kind;
use crate::report::table;

/// cloudllm's requests/s must reach at least this share of the two hyper proxies'.
pub const RPS_TARGET: f64 = 1.0;

/// cloudllm's p50 may be at most this multiple of the two hyper proxies'.
pub const P50_TARGET: f64 = 1.2;

/// Under which load a cost was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Keep-alive connections sending requests back to back.
    Load,
    /// One connection, one request at a time.
    Sequential,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Load => "under load",
            Phase::Sequential => "sequential",
        }
    }
}

/// What one process (or the load generator's or backend's threads) spent per request.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessCost {
    /// The process (`relay`, `nginx 1 (front)` …).
    pub process: String,
    /// CPU µs.
    pub cpu_us: f64,
    /// Every system call (`perf`), where counted.
    pub syscalls: Option<f64>,
    /// `read`/`write`-family system calls (`syscr + syscw`).
    pub rw_calls: f64,
    /// Voluntary context switches.
    pub voluntary: f64,
    /// Involuntary context switches.
    pub involuntary: f64,
}

impl ProcessCost {
    /// The per-request figures from `spent` over `requests` (and `syscalls` over
    /// `syscall_requests`, counted in a pass of their own).
    pub fn per_request(
        process: &str,
        spent: &Counters,
        requests: f64,
        syscalls: Option<(u64, f64)>,
    ) -> ProcessCost {
        let per = |n: u64| {
            if requests > 0.0 {
                n as f64 / requests
            } else {
                f64::NAN
            }
        };
        ProcessCost {
            process: process.to_owned(),
            cpu_us: per(spent.cpu_ns) / 1e3,
            syscalls: syscalls
                .filter(|(_, requests)| *requests > 0.0)
                .map(|(calls, requests)| calls as f64 / requests),
            rw_calls: per(spent.syscr + spent.syscw),
            voluntary: per(spent.voluntary),
            involuntary: per(spent.involuntary),
        }
    }
}

/// One path's figures.
#[derive(Debug, Clone)]
pub struct PathFigures {
    /// Which path.
    pub kind: Kind,
    /// What ran, in a few words.
    pub about: String,
    /// Median p50 of sequential requests, µs.
    pub p50_us: f64,
    /// Median p99 of sequential requests, µs.
    pub p99_us: f64,
    /// Median requests/s over the keep-alive connections.
    pub rps: f64,
    /// Median time to the last byte of one unpaced stream, ms.
    pub stream_ms: f64,
    /// Per request, by process: under load, then sequential.
    pub costs: Vec<(Phase, Vec<ProcessCost>)>,
}

/// A target and whether it was met.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// What is asked, in words.
    pub target: String,
    /// What was measured, in words.
    pub measured: String,
    /// Whether it was met.
    pub met: bool,
}

/// Everything one `compare` run measured.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Cores the machine offers.
    pub cores: usize,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// How the run was shaped, one line per item.
    pub setup: Vec<String>,
    /// Share of the machine's CPU taken by processes the benchmark did not start.
    pub others: Option<f64>,
    /// The paths measured, in [`Kind`] order.
    pub paths: Vec<PathFigures>,
    /// Paths not measured, and why.
    pub skipped: Vec<(Kind, String)>,
    /// How system calls were counted.
    pub syscall_source: String,
    /// Anything else worth knowing (perf profiles written, perf not usable …).
    pub notes: Vec<String>,
    /// Connections of the load phase.
    pub connections: usize,
    /// Lines of the stream.
    pub stream_lines: usize,
}

impl Comparison {
    fn path(&self, kind: Kind) -> Option<&PathFigures> {
        self.paths.iter().find(|p| p.kind == kind)
    }

    /// cloudllm against the two hyper proxies: requests/s and p50. Empty when either row is
    /// missing.
    pub fn verdicts(&self) -> Vec<Verdict> {
        let (Some(hyper), Some(ours)) = (self.path(Kind::Hyper), self.path(Kind::Cloudllm)) else {
            return Vec::new();
        };
        let rps_floor = RPS_TARGET * hyper.rps;
        let p50_ceiling = P50_TARGET * hyper.p50_us;
        vec![
            Verdict {
                target: "requests/s ≥ the two hyper proxies'".into(),
                measured: format!(
                    "{} against {} ({:.2}×)",
                    thousands(ours.rps),
                    thousands(rps_floor),
                    ours.rps / hyper.rps
                ),
                met: ours.rps >= rps_floor,
            },
            Verdict {
                target: format!("p50 ≤ {P50_TARGET}× the two hyper proxies'"),
                measured: format!(
                    "{} against ≤ {} ({:.2}×)",
                    millis(ours.p50_us),
                    millis(p50_ceiling),
                    ours.p50_us / hyper.p50_us
                ),
                met: ours.p50_us <= p50_ceiling,
            },
        ]
    }

    /// The results as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let direct = self.path(Kind::Direct);
        serde_json::json!({
            "cores": self.cores,
            "quick": self.quick,
            "setup": self.setup,
            "others_cpu_share": self.others,
            "syscalls_counted_by": self.syscall_source,
            "paths": self.paths.iter().map(|p| serde_json::json!({
                "path": p.kind.name(),
                "about": p.about,
                "p50_us": p.p50_us,
                "p99_us": p.p99_us,
                "requests_per_second": p.rps,
                "requests_per_second_vs_direct": direct.map(|d| p.rps / d.rps),
                "stream_ms": p.stream_ms,
                "stream_vs_direct": direct.map(|d| p.stream_ms / d.stream_ms),
                "per_request": p.costs.iter().map(|(phase, costs)| serde_json::json!({
                    "phase": phase.name(),
                    "processes": costs.iter().map(|c| serde_json::json!({
                        "process": c.process,
                        "cpu_us": c.cpu_us,
                        "syscalls": c.syscalls,
                        "read_write_syscalls": c.rw_calls,
                        "voluntary_context_switches": c.voluntary,
                        "involuntary_context_switches": c.involuntary,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(|(kind, why)| serde_json::json!({
                "path": kind.name(), "why": why,
            })).collect::<Vec<_>>(),
            "targets": self.verdicts().iter().map(|v| serde_json::json!({
                "target": v.target, "measured": v.measured, "met": v.met,
            })).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cores: {}{}",
            self.cores,
            if self.quick { " (--quick run)" } else { "" }
        )?;
        for line in &self.setup {
            writeln!(f, "setup: {line}")?;
        }
        for p in &self.paths {
            writeln!(f, "path: {}: {}", p.kind.name(), p.about)?;
        }
        crate::report::write_others(
            f,
            ("processes the benchmark did not start", ""),
            self.others,
        )?;
        writeln!(f)?;
        self.fmt_rows(f)?;
        for (kind, why) in &self.skipped {
            writeln!(f, "skipped: {}: {why}", kind.name())?;
        }
        writeln!(f)?;
        let verdicts = self.verdicts();
        if verdicts.is_empty() {
            writeln!(f, "targets: not judged (a row is missing)")?;
        } else {
            writeln!(
                f,
                "targets (cloudllm against the two hyper proxies, this run):"
            )?;
            for v in &verdicts {
                writeln!(
                    f,
                    "  {}: {} — {}",
                    v.target,
                    v.measured,
                    if v.met { "met" } else { "NOT met" }
                )?;
            }
        }
        if let (Some(nginx), Some(ours)) = (self.path(Kind::Nginx), self.path(Kind::Cloudllm)) {
            writeln!(
                f,
                "  next, the two nginx: requests/s {:.2}× theirs, p50 {:.2}× theirs",
                ours.rps / nginx.rps,
                ours.p50_us / nginx.p50_us
            )?;
        }
        writeln!(f)?;
        self.fmt_costs(f)?;
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

impl Comparison {
    fn fmt_rows(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let direct = self.path(Kind::Direct);
        let header: Vec<String> = [
            "path".to_owned(),
            "p50".to_owned(),
            "p99".to_owned(),
            format!("requests/s, {} conn.", self.connections),
            "×direct".to_owned(),
            format!("one {}-line stream", thousands(self.stream_lines as f64)),
            "×direct".to_owned(),
        ]
        .into();
        let ratio = |value: f64, of: Option<f64>| match of {
            Some(base) if base > 0.0 => format!("{:.2}", value / base),
            _ => "—".to_owned(),
        };
        let body: Vec<Vec<String>> = self
            .paths
            .iter()
            .map(|p| {
                vec![
                    p.kind.name().to_owned(),
                    millis(p.p50_us),
                    millis(p.p99_us),
                    thousands(p.rps),
                    ratio(p.rps, direct.map(|d| d.rps)),
                    format!("{:.2} ms", p.stream_ms),
                    ratio(p.stream_ms, direct.map(|d| d.stream_ms)),
                ]
            })
            .collect();
        table(
            f,
            &header,
            &body,
            &[true, false, false, false, false, false, false],
        )?;
        writeln!(
            f,
            "(p50/p99: sequential GET /api/version on one keep-alive connection, like `wrk -c1`; \
             requests/s like `wrk -c{}`; stream: time to its last byte, ×direct > 1 is slower)",
            self.connections
        )
    }

    fn fmt_costs(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Per request, by process (CPU from each thread's /proc/PID/task/*/schedstat; \
             context switches from task/*/status; r+w calls: syscr+syscw of task/*/io; \
             all syscalls: {}):",
            self.syscall_source
        )?;
        let header: Vec<String> = [
            "path",
            "process",
            "phase",
            "CPU µs",
            "syscalls",
            "r+w calls",
            "vol. cs",
            "invol. cs",
        ]
        .map(str::to_owned)
        .into();
        let mut body = Vec::new();
        for phase in [Phase::Load, Phase::Sequential] {
            for p in &self.paths {
                let Some((_, costs)) = p.costs.iter().find(|(ph, _)| *ph == phase) else {
                    continue;
                };
                for c in costs {
                    body.push(vec![
                        p.kind.name().to_owned(),
                        c.process.clone(),
                        phase.name().to_owned(),
                        format!("{:.1}", c.cpu_us),
                        c.syscalls.map_or("—".to_owned(), |n| format!("{n:.2}")),
                        format!("{:.2}", c.rw_calls),
                        format!("{:.2}", c.voluntary),
                        format!("{:.2}", c.involuntary),
                    ]);
                }
            }
        }
        table(
            f,
            &header,
            &body,
            &[true, true, true, false, false, false, false, false],
        )
    }
}

/// µs as milliseconds with three decimals (`0.108 ms`), as the issue's tables.
fn millis(micros: f64) -> String {
    format!("{:.3} ms", micros / 1e3)
}

/// A whole number with thousands separators (`41,700`).
fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "—".to_owned();
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(kind: Kind, p50_us: f64, rps: f64) -> PathFigures {
        PathFigures {
            kind,
            about: String::new(),
            p50_us,
            p99_us: p50_us * 2.0,
            rps,
            stream_ms: 2.0,
            costs: vec![(
                Phase::Load,
                vec![ProcessCost::per_request(
                    "relay",
                    &Counters {
                        cpu_ns: 53_000_000,
                        voluntary: 770,
                        involuntary: 10,
                        syscr: 1000,
                        syscw: 1000,
                    },
                    1000.0,
                    Some((9_000, 1000.0)),
                )],
            )],
        }
    }

    fn comparison(paths: Vec<PathFigures>) -> Comparison {
        Comparison {
            cores: 2,
            quick: true,
            setup: Vec::new(),
            others: None,
            paths,
            skipped: vec![(Kind::Rathole, "rathole not found".into())],
            syscall_source: "perf".into(),
            notes: Vec::new(),
            connections: 64,
            stream_lines: 2000,
        }
    }

    /// The figures of issue 19's first table: direct, two hyper proxies, cloudllm.
    fn issue_run() -> Comparison {
        comparison(vec![
            path(Kind::Direct, 31.0, 41_700.0),
            path(Kind::Hyper, 108.0, 20_900.0),
            path(Kind::Cloudllm, 306.0, 12_500.0),
        ])
    }

    #[test]
    fn targets_are_judged_against_the_two_hyper_proxies() {
        let run = issue_run();
        let verdicts = run.verdicts();
        assert_eq!(verdicts.len(), 2);
        assert!(!verdicts[0].met && !verdicts[1].met, "{verdicts:?}");
        assert_eq!(verdicts[0].measured, "12,500 against 20,900 (0.60×)");
        assert_eq!(verdicts[1].measured, "0.306 ms against ≤ 0.130 ms (2.83×)");

        // Exactly on the limits is met.
        let run = comparison(vec![
            path(Kind::Hyper, 100.0, 20_000.0),
            path(Kind::Cloudllm, 120.0, 20_000.0),
        ]);
        assert!(run.verdicts().iter().all(|v| v.met));

        // Without the reference row there is nothing to judge.
        assert!(
            comparison(vec![path(Kind::Cloudllm, 1.0, 1.0)])
                .verdicts()
                .is_empty()
        );
    }

    #[test]
    fn the_table_shows_every_row_its_ratios_and_its_costs() {
        let run = issue_run();
        let text = run.to_string();
        assert!(
            text.contains("| two chained hyper proxies | 0.108 ms |"),
            "{text}"
        );
        assert!(
            text.contains("|               20,900 |    0.50 |"),
            "{text}"
        );
        assert!(text.contains("skipped: rathole over WebSocket: rathole not found"));
        assert!(text.contains("— NOT met"), "{text}");
        // 53 ms of CPU, 9,000 syscalls, 2,000 r+w calls, 770 + 10 switches over 1,000 requests.
        assert!(
            text.contains(
                "| relay   | under load |   53.0 |     9.00 |      2.00 |    0.77 |      0.01 |"
            ),
            "{text}"
        );
        let json = run.to_json();
        assert_eq!(json["targets"][0]["met"], false);
        assert_eq!(
            json["paths"][2]["per_request"][0]["processes"][0]["cpu_us"],
            53.0
        );
        assert_eq!(json["skipped"][0]["path"], "rathole over WebSocket");
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(41_700.4), "41,700");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(f64::NAN), "—");
        assert_eq!(millis(108.0), "0.108 ms");
    }
}
