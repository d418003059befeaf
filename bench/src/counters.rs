//! What one process (or one named group of this process's threads) spent while a scenario ran,
//! read from Linux's `/proc`: CPU time, context switches, and read/write system calls. This is
//! how `compare` says where a request's cost sits (relay or daemon, proxy one or two) instead of
//! only how large it is.
//!
//! Every figure is summed over the threads in `/proc/PID/task/*`:
//!
//! - CPU: the first field of each thread's `schedstat` (nanoseconds on a CPU, the same
//!   accounting as `utime + stime` in `/proc/PID/stat`, which counts in 10 ms ticks: too coarse
//!   for a second of load). Where `schedstat` is missing, each thread's `utime + stime`.
//! - Context switches: `voluntary_ctxt_switches` (the thread waited: for a socket, a lock, a
//!   wake-up) and `nonvoluntary_ctxt_switches` (the scheduler took the CPU away) of each
//!   thread's `status`; the process-wide `/proc/PID/status` shows its first thread's only.
//! - `syscr` + `syscw` of each thread's `io`: calls of the `read` and `write` families
//!   (`read`, `readv`, `write`, `writev`, `sendfile` …). Rust's standard library reads sockets
//!   with `recvfrom` and writes one buffer with `sendto`, which are not in them, nor are
//!   `epoll_wait` or `futex`: for tokio programs this counts mostly `writev` (hyper's way of
//!   writing a head and a body at once) and the eventfd reads and writes of cross-thread
//!   wake-ups. [`perf`](crate::perf) counts every system call where it can.
//!
//! A "process" may be several: nginx's master and its workers ([`process_ids`]). Threads
//! that end between two snapshots take their counts with them; the components measured here
//! keep their threads for their whole life.

use std::collections::HashMap;
use std::path::Path;

/// Clock ticks per second of `utime`/`stime` (`USER_HZ`): 100 on every Linux architecture
/// that matters here.
const TICKS_PER_SECOND: u64 = 100;

/// What to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Processes, all their threads (see [`process_ids`] for a process and its children).
    Processes(Vec<u32>),
    /// The threads of this process named so (`load`, `backend`: see [`stack`](crate::stack)).
    Threads(String),
}

/// Counters of one thread, or sums of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Nanoseconds on a CPU.
    pub cpu_ns: u64,
    /// Voluntary context switches.
    pub voluntary: u64,
    /// Involuntary context switches.
    pub involuntary: u64,
    /// Read-family system calls (`syscr`).
    pub syscr: u64,
    /// Write-family system calls (`syscw`).
    pub syscw: u64,
}

impl Counters {
    fn add(&mut self, other: &Counters) {
        self.cpu_ns += other.cpu_ns;
        self.voluntary += other.voluntary;
        self.involuntary += other.involuntary;
        self.syscr += other.syscr;
        self.syscw += other.syscw;
    }

    fn saturating_sub(&self, earlier: &Counters) -> Counters {
        Counters {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
            syscr: self.syscr.saturating_sub(earlier.syscr),
            syscw: self.syscw.saturating_sub(earlier.syscw),
        }
    }
}

/// The counters of every thread of one [`Source`] at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Thread id → its counters.
    threads: HashMap<u32, Counters>,
}

impl Snapshot {
    /// Reads the threads of `source` now. Empty where `/proc` is not there (or the process
    /// is gone).
    pub fn take(source: &Source) -> Snapshot {
        let mut threads = HashMap::new();
        match source {
            Source::Processes(pids) => {
                for pid in pids {
                    read_threads(&format!("/proc/{pid}/task"), None, &mut threads);
                }
            }
            Source::Threads(name) => read_threads("/proc/self/task", Some(name), &mut threads),
        }
        Snapshot { threads }
    }

    /// Whether any thread was found.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// What the threads spent between `earlier` and this snapshot (threads started in
    /// between count from zero).
    pub fn since(&self, earlier: &Snapshot) -> Counters {
        let mut total = Counters::default();
        for (tid, now) in &self.threads {
            let before = earlier.threads.get(tid).copied().unwrap_or_default();
            total.add(&now.saturating_sub(&before));
        }
        total
    }
}

/// The thread ids of a process (or of this one, filtered by thread name), for tools that take
/// a thread list (`perf stat -t`).
pub fn thread_ids(source: &Source) -> Vec<u32> {
    let mut ids: Vec<u32> = Snapshot::take(source).threads.into_keys().collect();
    ids.sort_unstable();
    ids
}

/// A process and its direct children (nginx's master and its workers), read once: the children
/// are found by scanning every process in `/proc`, too slow to repeat around each measurement.
pub fn process_ids(pid: u32) -> Vec<u32> {
    std::iter::once(pid).chain(children(pid)).collect()
}

/// Reads every thread under `task_dir` (named `only`, if given) into `out`.
fn read_threads(task_dir: &str, only: Option<&str>, out: &mut HashMap<u32, Counters>) {
    let Ok(entries) = std::fs::read_dir(task_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        if let Some(name) = only {
            // A thread may end between listing and reading: then it is skipped.
            match std::fs::read_to_string(dir.join("comm")) {
                Ok(comm) if comm.trim_end() == name => {}
                _ => continue,
            }
        }
        if let Some(counters) = read_thread(&dir) {
            out.insert(tid, counters);
        }
    }
}

/// One thread's counters from its `/proc/PID/task/TID` directory.
fn read_thread(dir: &Path) -> Option<Counters> {
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
    let cpu_ns = read("schedstat")
        .and_then(|text| schedstat_ns(&text))
        .or_else(|| read("stat").and_then(|text| stat_cpu_ns(&text)))?;
    let (voluntary, involuntary) = read("status")
        .map(|text| context_switches(&text))
        .unwrap_or_default();
    let (syscr, syscw) = read("io").map(|text| io_calls(&text)).unwrap_or_default();
    Some(Counters {
        cpu_ns,
        voluntary,
        involuntary,
        syscr,
        syscw,
    })
}

/// The direct children of `pid`, from every process's `stat` (its fourth field is the
/// parent's id).
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| stat_field(&stat, 4))
                == Some(u64::from(pid))
        })
        .collect()
}

/// Nanoseconds on a CPU: the first field of a `schedstat` file.
pub fn schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `utime + stime` of a `stat` file, in nanoseconds.
pub fn stat_cpu_ns(text: &str) -> Option<u64> {
    let ticks = stat_field(text, 14)? + stat_field(text, 15)?;
    Some(ticks * (1_000_000_000 / TICKS_PER_SECOND))
}

/// Field `n` (counted from 1, as in `proc(5)`) of a `stat` line, numeric fields only. The
/// command name (field 2) is in parentheses and may hold spaces or parentheses itself, so
/// fields are counted from its last `)`.
pub fn stat_field(text: &str, n: usize) -> Option<u64> {
    let after_name = text.rsplit_once(')')?.1;
    // Field 3 is the first after the name.
    after_name
        .split_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
}

/// (voluntary, involuntary) context switches of a `status` file.
pub fn context_switches(text: &str) -> (u64, u64) {
    (
        named_number(text, "voluntary_ctxt_switches:").unwrap_or(0),
        named_number(text, "nonvoluntary_ctxt_switches:").unwrap_or(0),
    )
}

/// (`syscr`, `syscw`) of an `io` file.
pub fn io_calls(text: &str) -> (u64, u64) {
    (
        named_number(text, "syscr:").unwrap_or(0),
        named_number(text, "syscw:").unwrap_or(0),
    )
}

/// The number after `key` on the line that starts with it.
fn named_number(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn parses_the_proc_files() {
        assert_eq!(schedstat_ns("123456789 5000 42\n"), Some(123_456_789));
        assert_eq!(schedstat_ns(""), None);

        // A command name with a space and a parenthesis, as `(tokio (w) 1)`.
        let stat = "4242 (tokio (w) 1) S 4200 4242 4242 0 -1 4194560 900 0 0 0 \
                    37 12 0 0 20 0 3 0 1000 100000 500 18446744073709551615";
        assert_eq!(stat_field(stat, 4), Some(4200));
        assert_eq!(stat_field(stat, 14), Some(37));
        assert_eq!(stat_field(stat, 15), Some(12));
        assert_eq!(stat_cpu_ns(stat), Some(490_000_000));
        assert_eq!(stat_field("no name here", 4), None);
        assert_eq!(stat_field(stat, 2), None);

        let status = "Name:\tcloudllm-relay\nState:\tS (sleeping)\nThreads:\t3\n\
                      voluntary_ctxt_switches:\t1500\nnonvoluntary_ctxt_switches:\t27\n";
        assert_eq!(context_switches(status), (1500, 27));
        // `voluntary_` must not match inside `nonvoluntary_`: lines are matched from their
        // start.
        assert_eq!(context_switches("nonvoluntary_ctxt_switches:\t5\n"), (0, 5));

        let io = "rchar: 5000\nwchar: 6000\nsyscr: 11\nsyscw: 22\nread_bytes: 0\n";
        assert_eq!(io_calls(io), (11, 22));
        assert_eq!(io_calls(""), (0, 0));
    }

    #[test]
    fn differences_count_new_threads_from_zero() {
        let thread = |cpu_ns, voluntary| Counters {
            cpu_ns,
            voluntary,
            involuntary: 1,
            syscr: 2,
            syscw: 3,
        };
        let before = Snapshot {
            threads: HashMap::from([(1, thread(100, 10)), (2, thread(50, 5))]),
        };
        let after = Snapshot {
            threads: HashMap::from([(1, thread(300, 14)), (3, thread(40, 2))]),
        };
        let spent = after.since(&before);
        // Thread 1: +200 ns, +4; thread 3 (new): 40 ns, 2; thread 2 ended: lost.
        assert_eq!(spent.cpu_ns, 240);
        assert_eq!(spent.voluntary, 6);
        assert_eq!(spent.involuntary, 1);
        assert_eq!((spent.syscr, spent.syscw), (2, 3));
    }

    /// Iterations of a busy loop: tens of milliseconds of CPU in a test build, far above the
    /// 1 ms the tests ask to see.
    pub(crate) const SPIN: u64 = 20_000_000;

    #[test]
    fn this_process_and_its_named_threads_are_found() {
        if !Path::new("/proc/self/task").is_dir() {
            return; // not Linux
        }
        let pid = std::process::id();
        let before = Snapshot::take(&Source::Processes(process_ids(pid)));
        assert!(!before.is_empty());
        let worker = std::thread::Builder::new()
            .name("counted".into())
            .spawn(|| {
                // A fixed amount of work, not of time: on a busy machine a thread that spins
                // for 30 ms may get a fraction of that on a CPU.
                let mut x: u64 = 0;
                for _ in 0..SPIN {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                let named = Snapshot::take(&Source::Threads("counted".into()));
                assert_eq!(named.threads.len(), 1);
                named
            })
            .unwrap();
        let named = worker.join().unwrap();
        assert!(
            named.since(&Snapshot::default()).cpu_ns >= 1_000_000,
            "{named:?}"
        );
        assert!(Snapshot::take(&Source::Threads("no-such-thread".into())).is_empty());
    }
}
