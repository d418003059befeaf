//! CPU time per component, to say where the time goes and not only how much there is.
//!
//! Every component runs on threads named after it (see [`stack`](crate::stack)), so Linux's
//! per-thread scheduler statistics summed by thread name give each component's CPU time, as
//! `top` would show for separate processes: [`counters`](crate::counters) reads them, as it
//! does for `compare`. Elsewhere, or where `/proc` is not readable, there is simply no
//! breakdown. [`Machine`] says how much of the machine other processes took meanwhile.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::counters::{Snapshot, Source};

/// The components, by thread name, in the order they are printed.
pub const COMPONENTS: [&str; 4] = ["load", "backend", "relay", "daemon"];

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
    let sources = COMPONENTS.map(|name| Source::Threads(name.to_owned()));
    let before = sources.each_ref().map(Snapshot::take);
    let out = work.await?;
    if before.iter().all(Snapshot::is_empty) {
        return Ok((out, None));
    }
    let used = COMPONENTS
        .iter()
        .zip(&sources)
        .zip(&before)
        .map(|((name, source), before)| {
            let spent = Snapshot::take(source).since(before);
            ((*name).to_owned(), Duration::from_nanos(spent.cpu_ns))
        })
        .collect();
    Ok((out, Some(used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_components_threads_show_up_with_their_cpu_time() {
        // A thread named as the load generator's.
        let spin = std::thread::Builder::new()
            .name(COMPONENTS[0].to_owned())
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(measure(async {
                    // Work, not time: a busy machine may give a spinning thread little CPU.
                    let mut x: u64 = 0;
                    for _ in 0..crate::counters::tests::SPIN {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                    Ok(x)
                }))
                .unwrap()
            })
            .unwrap();
        let (_, used) = spin.join().unwrap();
        let Some(used) = used else {
            return; // no /proc here
        };
        assert!(used[COMPONENTS[0]] >= Duration::from_millis(1), "{used:?}");
        assert_eq!(used.len(), COMPONENTS.len());
    }
}
