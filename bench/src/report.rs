//! The results: one row per metric with its direct and tunnelled figures, the ratio, the target
//! and whether it was met; printed as a table and, on request, written as JSON.

use std::collections::BTreeMap;
use std::fmt;

use crate::cpu::COMPONENTS;

/// What a metric is measured in, which also says how to print it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Microseconds.
    Micros,
    /// Milliseconds.
    Millis,
    /// Requests per second.
    PerSecond,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Micros => "µs",
            Unit::Millis => "ms",
            Unit::PerSecond => "req/s",
        }
    }

    fn show(self, value: f64) -> String {
        match self {
            Unit::Micros | Unit::PerSecond => format!("{value:.0} {}", self.name()),
            Unit::Millis => format!("{value:.2} {}", self.name()),
        }
    }
}

/// A metric's target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// None: the figure is informative.
    None,
    /// through ÷ direct must be at most this.
    RatioAtMost(f64),
    /// through ÷ direct must be at least this.
    RatioAtLeast(f64),
    /// The figure through cloudllm must be at most this (in the row's unit).
    AtMost(f64),
}

/// One metric.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub metric: String,
    /// Its unit.
    pub unit: Unit,
    /// Figure with the load generator talking to the backend directly.
    pub direct: f64,
    /// Figure through relay and daemon.
    pub through: f64,
    /// The target.
    pub goal: Goal,
}

impl Row {
    /// through ÷ direct.
    pub fn ratio(&self) -> f64 {
        self.through / self.direct
    }

    /// Whether the target was met; `None` without a target.
    pub fn met(&self) -> Option<bool> {
        match self.goal {
            Goal::None => None,
            Goal::RatioAtMost(max) => Some(self.ratio() <= max),
            Goal::RatioAtLeast(min) => Some(self.ratio() >= min),
            Goal::AtMost(max) => Some(self.through <= max),
        }
    }

    fn target_text(&self) -> String {
        match self.goal {
            Goal::None => "—".to_owned(),
            Goal::RatioAtMost(max) => format!("ratio ≤ {max:.2}×"),
            Goal::RatioAtLeast(min) => format!("ratio ≥ {min:.2}×"),
            Goal::AtMost(max) => format!("≤ {}", self.unit.show(max)),
        }
    }

    /// How far from its target a missed row is, in words.
    fn shortfall(&self) -> String {
        match self.goal {
            Goal::RatioAtMost(_) | Goal::RatioAtLeast(_) => format!(
                "{}: {:.2}× against {}",
                self.metric,
                self.ratio(),
                self.target_text().trim_start_matches("ratio ")
            ),
            Goal::AtMost(max) => format!(
                "{}: {} against ≤ {} (over by {})",
                self.metric,
                self.unit.show(self.through),
                self.unit.show(max),
                self.unit.show(self.through - max)
            ),
            Goal::None => String::new(),
        }
    }
}

/// Where the CPU time of one phase went: microseconds per unit of work, by component.
#[derive(Debug, Clone)]
pub struct Cost {
    /// The phase measured.
    pub phase: String,
    /// The unit of work (`request`, `line`).
    pub per: &'static str,
    /// Component → µs per unit, direct; `None` where the platform gives no figures.
    pub direct: Option<BTreeMap<String, f64>>,
    /// Component → µs per unit, through cloudllm.
    pub through: Option<BTreeMap<String, f64>>,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Cores the machine offers this process.
    pub cores: usize,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// The plan, in words.
    pub setup: String,
    /// Share of the machine's CPU that other processes (and the hypervisor) took during the
    /// run, where the platform says: well above zero, the figures are noisy.
    pub others: Option<f64>,
    /// The metrics.
    pub rows: Vec<Row>,
    /// Where the CPU time went, by phase.
    pub costs: Vec<Cost>,
}

impl Report {
    /// (targets met, targets in all).
    pub fn score(&self) -> (usize, usize) {
        let judged: Vec<bool> = self.rows.iter().filter_map(Row::met).collect();
        (judged.iter().filter(|&&met| met).count(), judged.len())
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let (met, targets) = self.score();
        serde_json::json!({
            "cores": self.cores,
            "quick": self.quick,
            "setup": self.setup,
            "others_cpu_share": self.others,
            "targets_met": met,
            "targets": targets,
            "rows": self.rows.iter().map(|row| serde_json::json!({
                "metric": row.metric,
                "unit": row.unit.name(),
                "direct": row.direct,
                "through_cloudllm": row.through,
                "ratio": row.ratio(),
                "target": row.target_text(),
                "met": row.met(),
            })).collect::<Vec<_>>(),
            "cpu_micros_per_unit": self.costs.iter().map(|cost| serde_json::json!({
                "phase": cost.phase,
                "per": cost.per,
                "direct": cost.direct,
                "through_cloudllm": cost.through,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Share of the machine's CPU above which a run's figures are called disturbed: 5 %.
const DISTURBED_SHARE: f64 = 0.05;

/// The line that says how much of the machine's CPU `others` (a share, 0 to 1) took
/// meanwhile, said as "`who` used N% of the machine's CPU`when`", with a warning when that
/// disturbs the figures. Nothing where it is not known.
pub(crate) fn write_others(
    f: &mut fmt::Formatter<'_>,
    (who, when): (&str, &str),
    others: Option<f64>,
) -> fmt::Result {
    let Some(others) = others else {
        return Ok(());
    };
    let warning = if others > DISTURBED_SHARE {
        " — the figures are disturbed; rerun on a quiet machine"
    } else {
        ""
    };
    writeln!(
        f,
        "{who} used {:.0}% of the machine's CPU{when}{warning}",
        others * 100.0
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cores: {}", self.cores)?;
        writeln!(f, "setup: {}", self.setup)?;
        write_others(f, ("other processes", " during the run"), self.others)?;
        writeln!(f)?;
        let header: Vec<String> = [
            "metric",
            "direct",
            "through cloudllm",
            "ratio",
            "target",
            "met?",
        ]
        .map(str::to_owned)
        .into();
        let body: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| {
                vec![
                    row.metric.clone(),
                    row.unit.show(row.direct),
                    row.unit.show(row.through),
                    format!("{:.2}×", row.ratio()),
                    row.target_text(),
                    match row.met() {
                        None => "—".to_owned(),
                        Some(true) => "yes".to_owned(),
                        Some(false) => "NO".to_owned(),
                    },
                ]
            })
            .collect();
        table(f, &header, &body, &[true, false, false, false, true, true])?;
        writeln!(f)?;
        let (met, targets) = self.score();
        let missed: Vec<String> = self
            .rows
            .iter()
            .filter(|row| row.met() == Some(false))
            .map(Row::shortfall)
            .collect();
        writeln!(f, "targets met: {met} of {targets}")?;
        for shortfall in &missed {
            writeln!(f, "  missed: {shortfall}")?;
        }
        self.fmt_costs(f)
    }
}

impl Report {
    /// The CPU breakdown, when the platform gave one.
    fn fmt_costs(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self
            .costs
            .iter()
            .all(|c| c.direct.is_none() && c.through.is_none())
        {
            return Ok(());
        }
        writeln!(f)?;
        writeln!(
            f,
            "CPU time per unit of work, µs, by component (from each thread's schedstat):"
        )?;
        let mut header = vec!["phase".to_owned(), "per".to_owned(), "side".to_owned()];
        header.extend(COMPONENTS.iter().map(|c| (*c).to_owned()));
        header.push("total".to_owned());
        let mut body = Vec::new();
        for cost in &self.costs {
            for (side, figures) in [
                ("direct", &cost.direct),
                ("through cloudllm", &cost.through),
            ] {
                let Some(figures) = figures else { continue };
                let mut cells = vec![cost.phase.clone(), cost.per.to_owned(), side.to_owned()];
                let mut total = 0.0;
                for component in COMPONENTS {
                    let micros = figures.get(component).copied().unwrap_or(0.0);
                    total += micros;
                    cells.push(format!("{micros:.2}"));
                }
                cells.push(format!("{total:.2}"));
                body.push(cells);
            }
        }
        let text_columns: Vec<bool> = (0..header.len()).map(|i| i < 3).collect();
        table(f, &header, &body, &text_columns)
    }
}

/// A Markdown-style table: `text_columns` are left-aligned, the others (figures) right-aligned.
pub(crate) fn table(
    f: &mut fmt::Formatter<'_>,
    header: &[String],
    body: &[Vec<String>],
    text_columns: &[bool],
) -> fmt::Result {
    let mut widths = vec![0usize; header.len()];
    for cells in std::iter::once(header).chain(body.iter().map(Vec::as_slice)) {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| -> fmt::Result {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(text_columns)
            .map(|((cell, &width), &text)| {
                if text {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        writeln!(f, "| {} |", padded.join(" | "))
    };
    line(f, header)?;
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    writeln!(f, "|-{}-|", rule.join("-|-"))?;
    for cells in body {
        line(f, cells)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_are_judged_on_the_right_figure() {
        let row = |goal, direct, through| Row {
            metric: "m".into(),
            unit: Unit::Millis,
            direct,
            through,
            goal,
        };
        assert_eq!(row(Goal::RatioAtMost(1.5), 10.0, 15.0).met(), Some(true));
        assert_eq!(row(Goal::RatioAtMost(1.5), 10.0, 15.1).met(), Some(false));
        assert_eq!(
            row(Goal::RatioAtLeast(0.65), 100.0, 60.0).met(),
            Some(false)
        );
        assert_eq!(row(Goal::AtMost(26.0), 25.0, 25.9).met(), Some(true));
        assert_eq!(row(Goal::None, 1.0, 2.0).met(), None);
        let report = Report {
            cores: 2,
            quick: true,
            setup: String::new(),
            others: None,
            rows: vec![
                row(Goal::RatioAtMost(1.0), 10.0, 12.0),
                row(Goal::None, 1.0, 1.0),
            ],
            costs: Vec::new(),
        };
        assert_eq!(report.score(), (0, 1));
        let text = report.to_string();
        assert!(text.contains("| NO "), "{text}");
        assert!(
            text.contains("targets met: 0 of 1\n  missed: m: 1.20× against ≤ 1.00×\n"),
            "{text}"
        );
    }
}
