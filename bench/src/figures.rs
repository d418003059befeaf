//! The results of the scale and soak runs: one figure per line, with its target where it has
//! one, printed as a table and written as JSON. (The tunnel benchmark's direct-versus-through
//! table is [`report`](crate::report); these scenarios have one side only.)

use std::fmt;

/// A figure's target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// Informative only.
    None,
    /// At most this.
    AtMost(f64),
    /// At least this.
    AtLeast(f64),
}

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// The scenario it belongs to (`idle tunnels`, `reconnect storm` …).
    pub scenario: String,
    /// What was measured.
    pub metric: String,
    /// The value.
    pub value: f64,
    /// Its unit, as printed (`KiB`, `s`, `lines/s` …).
    pub unit: &'static str,
    /// The target.
    pub goal: Goal,
}

impl Figure {
    /// A figure without a target.
    pub fn info(scenario: &str, metric: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Figure {
            scenario: scenario.to_owned(),
            metric: metric.into(),
            value,
            unit,
            goal: Goal::None,
        }
    }

    /// The same figure with a target.
    pub fn goal(mut self, goal: Goal) -> Self {
        self.goal = goal;
        self
    }

    /// Whether the target was met; `None` without one.
    pub fn met(&self) -> Option<bool> {
        match self.goal {
            Goal::None => None,
            Goal::AtMost(max) => Some(self.value <= max),
            Goal::AtLeast(min) => Some(self.value >= min),
        }
    }

    fn show(&self, value: f64) -> String {
        // Whole numbers and large values without decimals; small fractions with two.
        if value.fract() == 0.0 || value.abs() >= 100.0 {
            format!("{value:.0} {}", self.unit)
        } else {
            format!("{value:.2} {}", self.unit)
        }
    }

    fn target_text(&self) -> String {
        match self.goal {
            Goal::None => "—".to_owned(),
            Goal::AtMost(max) => format!("≤ {}", self.show(max)),
            Goal::AtLeast(min) => format!("≥ {}", self.show(min)),
        }
    }
}

/// The figures of one run, with the conditions it ran under.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// What ran (one line per scenario).
    pub setup: Vec<String>,
    /// The machine's load average when the run started (`/proc/loadavg`), if known.
    pub load_before: Option<String>,
    /// The figures, in the order measured.
    pub figures: Vec<Figure>,
    /// Remarks: a scenario that could not run, and why.
    pub notes: Vec<String>,
}

impl Figures {
    /// An empty result, noting the machine's load now.
    pub fn new() -> Self {
        Figures {
            load_before: load_average(),
            ..Figures::default()
        }
    }

    /// The results as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "setup": self.setup,
            "load_average_before": self.load_before,
            "load_average_after": load_average(),
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "figures": self.figures.iter().map(|f| serde_json::json!({
                "scenario": f.scenario,
                "metric": f.metric,
                "value": f.value,
                "unit": f.unit,
                "target": match f.goal {
                    Goal::None => serde_json::Value::Null,
                    Goal::AtMost(max) => serde_json::json!({ "at_most": max }),
                    Goal::AtLeast(min) => serde_json::json!({ "at_least": min }),
                },
                "met": f.met(),
            })).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.setup {
            writeln!(f, "setup: {line}")?;
        }
        if let Some(load) = &self.load_before {
            writeln!(f, "load average before the run: {load}")?;
        }
        let header = ["scenario", "metric", "value", "target", "met"];
        let rows: Vec<[String; 5]> = self
            .figures
            .iter()
            .map(|fig| {
                [
                    fig.scenario.clone(),
                    fig.metric.clone(),
                    fig.show(fig.value),
                    fig.target_text(),
                    match fig.met() {
                        None => "—".to_owned(),
                        Some(true) => "yes".to_owned(),
                        Some(false) => "NO".to_owned(),
                    },
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: [&str; 5]| -> fmt::Result {
            for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
                let pad = width - cell.chars().count();
                if i == 2 {
                    write!(f, "{}{cell}  ", " ".repeat(pad))?;
                } else {
                    write!(f, "{cell}{}  ", " ".repeat(pad))?;
                }
            }
            writeln!(f)
        };
        line(f, header)?;
        for row in &rows {
            line(f, [&row[0], &row[1], &row[2], &row[3], &row[4]])?;
        }
        if let Some(load) = load_average() {
            writeln!(f, "load average after the run: {load}")?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// The first three fields of `/proc/loadavg` (1, 5 and 15 minutes).
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_judged_and_printed() {
        let mut figures = Figures::new();
        figures.figures.push(
            Figure::info("idle tunnels", "relay RSS per tunnel", 20.5, "KiB")
                .goal(Goal::AtMost(24.0)),
        );
        figures
            .figures
            .push(Figure::info("soak", "lost", 1.0, "requests").goal(Goal::AtMost(0.0)));
        assert_eq!(figures.figures[0].met(), Some(true));
        assert_eq!(figures.figures[1].met(), Some(false));
        let text = figures.to_string();
        assert!(text.contains("20.50 KiB"), "{text}");
        assert!(text.contains("NO"), "{text}");
        assert_eq!(figures.to_json()["figures"][1]["met"], false);
    }
}
