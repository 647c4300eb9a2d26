//! CPU accounting from /proc.

use super::*;

/// utime + stime of a /proc `stat` file, in seconds.
pub(crate) fn stat_cpu(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// CPU seconds of this process's threads whose `comm` is `name`.
pub(crate) fn thread_cpu(name: &str) -> Option<f64> {
    tasks_cpu("self", |comm| comm == name)
}

/// CPU seconds of the threads of process `pid` (`self` for this one) whose `comm` matches
/// (None: no such thread, or no /proc).
pub(crate) fn tasks_cpu(pid: &str, matches: impl Fn(&str) -> bool) -> Option<f64> {
    let mut total = None;
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if matches(comm.trim_end()) {
            *total.get_or_insert(0.0) += stat_cpu(&dir.join("stat").to_string_lossy()).unwrap_or(0.0);
        }
    }
    total
}

/// CPU seconds used so far by each thread name of this process (threads of one name summed).
pub(crate) fn threads() -> BTreeMap<String, f64> {
    threads_of("self")
}

/// CPU seconds used so far by each thread name of process `pid` (threads of one name summed).
pub(crate) fn threads_of(pid: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for e in dir.flatten() {
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim_end().to_string();
        *out.entry(comm).or_default() += stat_cpu(&dir.join("stat").to_string_lossy()).unwrap_or(0.0);
    }
    out
}

/// Whether `EVENTSTAGE_E2E_THREADS` asks for the CPU of each thread.
pub(crate) fn per_thread() -> bool {
    std::env::var_os("EVENTSTAGE_E2E_THREADS").is_some()
}

/// Prints the cores each thread name used between two [`threads`] snapshots taken `secs` apart,
/// and the CPU microseconds per record.
pub(crate) fn print_threads(
    what: &str,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    secs: f64,
    n: u64,
) {
    let used = used(before, after);
    let total: f64 = used.iter().map(|(_, v)| v).sum();
    eprintln!("[e2e] threads of {what}: {:.1} µs CPU per record in this process", total * 1e6 / n as f64);
    for (name, cpu) in used.iter().take(12) {
        eprintln!("[e2e]     {name:<18} {:.2} cores  {:.2} µs/record", cpu / secs, cpu * 1e6 / n as f64);
    }
}

/// The CPU seconds each thread name used between two [`threads`] snapshots, busiest first (names
/// that used none left out).
pub(crate) fn used(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let mut used: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    used
}

/// CPU seconds used so far by this process, by one of its threads, and by the broker.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub(crate) process: Option<f64>,
    pub(crate) worker: Option<f64>,
    pub(crate) broker: Option<f64>,
}

impl Cpu {
    pub(crate) fn now(broker: &Broker, worker: &str) -> Self {
        Self { process: stat_cpu("/proc/self/stat"), worker: thread_cpu(worker), broker: broker.cpu() }
    }

    /// Cores used between `self` and `later` over `secs`.
    pub(crate) fn cores(&self, later: &Self, secs: f64) -> Self {
        let d = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / secs);
        Self {
            process: d(self.process, later.process),
            worker: d(self.worker, later.worker),
            broker: d(self.broker, later.broker),
        }
    }
}
