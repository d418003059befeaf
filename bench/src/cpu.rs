//! CPU time per component, to say where the time goes and not only how much there is.
//!
//! Every component runs on threads named after it (see [`stack`](crate::stack)), so Linux's
//! per-thread scheduler statistics (`/proc/self/task/*/schedstat`, nanoseconds on the CPU)
//! summed by thread name give each component's CPU time, as `top` would show for separate
//! processes. Elsewhere, or where `/proc` is not readable, there is simply no breakdown.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The components, by thread name, in the order they are printed.
pub const COMPONENTS: [&str; 4] = ["load", "backend", "relay", "daemon"];

/// CPU time each thread of this process has used so far.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Thread id → (thread name, CPU time).
    threads: HashMap<u32, (String, Duration)>,
}

impl Snapshot {
    /// Reads the current figures, or `None` where the platform does not offer them.
    pub fn take() -> Option<Snapshot> {
        let mut threads = HashMap::new();
        for entry in std::fs::read_dir("/proc/self/task").ok()? {
            let Ok(entry) = entry else { continue };
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // A thread may end between listing and reading: skip it.
            let Ok(name) = std::fs::read_to_string(entry.path().join("comm")) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            let Some(nanos) = stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            threads.insert(tid, (name.trim().to_owned(), Duration::from_nanos(nanos)));
        }
        (!threads.is_empty()).then_some(Snapshot { threads })
    }

    /// CPU time used by each component between `earlier` and this snapshot. Threads that
    /// ended in between are missed; the runtimes' worker threads never do.
    pub fn since(&self, earlier: &Snapshot) -> BTreeMap<String, Duration> {
        let mut used = BTreeMap::new();
        for (tid, (name, now)) in &self.threads {
            let before = earlier.threads.get(tid).map_or(Duration::ZERO, |(_, d)| *d);
            *used.entry(name.clone()).or_insert(Duration::ZERO) += now.saturating_sub(before);
        }
        used
    }
}

/// What the whole machine and this process have spent on the CPU so far, in clock ticks, to
/// tell how much of the machine other processes (or the hypervisor) took during a run.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// Ticks of every kind (idle included) over all cores.
    total: u64,
    /// Ticks some process or the hypervisor (steal) had the CPU.
    busy: u64,
    /// Ticks this process had the CPU.
    own: u64,
}

impl Machine {
    /// Reads `/proc/stat` and `/proc/self/stat`, or `None` where they are not there.
    pub fn take() -> Option<Machine> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
        let field = |i: usize| ticks.get(i).copied().unwrap_or(0);
        let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
        let total = busy + field(3) + field(4);
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces) in parentheses; utime and
        // stime are the 14th and 15th fields overall, the 12th and 13th after it.
        let after_name = own_stat.rsplit_once(')')?.1;
        let own_fields: Vec<&str> = after_name.split_whitespace().collect();
        let own =
            own_fields.get(11)?.parse::<u64>().ok()? + own_fields.get(12)?.parse::<u64>().ok()?;
        Some(Machine { total, busy, own })
    }

    /// Share (0 to 1) of the machine's CPU capacity that others used since `earlier`.
    pub fn others_since(&self, earlier: &Machine) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        let own = self.own.checked_sub(earlier.own)?;
        (total > 0).then(|| busy.saturating_sub(own) as f64 / total as f64)
    }

    /// Like [`others_since`](Self::others_since), not counting `also_ours` either: the CPU
    /// time of processes the benchmark started itself.
    pub fn others_since_excluding(&self, earlier: &Machine, also_ours: Duration) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        let own = self.own.checked_sub(earlier.own)?;
        // /proc/stat counts in USER_HZ (100 Hz) ticks.
        let ours = (also_ours.as_secs_f64() * 100.0).round() as u64;
        (total > 0).then(|| busy.saturating_sub(own + ours) as f64 / total as f64)
    }
}

/// CPU time used while `work` runs, by component, if the platform says.
pub async fn measure<T>(
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Option<BTreeMap<String, Duration>>)> {
    let before = Snapshot::take();
    let out = work.await?;
    let used = before.and_then(|before| Snapshot::take().map(|after| after.since(&before)));
    Ok((out, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_thread_shows_up_with_its_cpu_time() {
        let Some(before) = Snapshot::take() else {
            return; // no /proc here
        };
        let mut x: u64 = 0;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = Snapshot::take().unwrap();
        let total: Duration = after.since(&before).values().sum();
        assert!(total >= Duration::from_millis(10), "{total:?}");
    }
}
