//! The stage runtime on a sled journal with and without a state cache (issue 24, point 2: "a key's
//! state is read from its snapshot and tail on first use, not all at open; a restart no longer
//! reads every key").
//!
//! Each configuration runs in a process of its own (this binary again, with
//! `EVENTSTAGE_RUNTIME_CHILD`), so that its resident set and peak are its own. Phases, all through
//! `StageHandle::ask` from 512 tasks, durable replies (after fsync):
//! 1. open K accounts (every key new);
//! 2. N deposits to uniformly random accounts (with a cache, nearly every one misses);
//! 3. N deposits to a hot 1 % of the accounts;
//! 4. shut down, reopen, and time the first reply (a deposit to a random account).
//!
//! Every reply is checked: each task owns the accounts `k % 512 == task`, and its model counts
//! their deposits (4 bytes per account, in the measured process: 4 MiB at 10^6).
//!
//! `cargo bench --bench runtime_cache`; `EVENTSTAGE_RUNTIME_KEYS` (default 10^6),
//! `EVENTSTAGE_RUNTIME_COMMANDS` (default 10^6 per deposit phase), `EVENTSTAGE_RUNTIME_CACHE_MB`
//! (default 64; the cached run's budget), `EVENTSTAGE_RUNTIME_SLED_MB` (sled's page cache in both
//! runs, default 64), `EVENTSTAGE_RUNTIME_ONLY` (`all` or `cache`). Memory is whole-process RSS
//! from `/proc/self/status` (Linux) after each phase; the peak is the kernel's high-water mark so
//! far.

mod shared;

use eventstage::journal::SledStore;
use eventstage::stages::bank::{Bank, BankCommand};
use eventstage::{RuntimeConfig, StageHandle, StageRuntime};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD: &str = "EVENTSTAGE_RUNTIME_CHILD";
const TASKS: usize = 512;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let keys = env_number("EVENTSTAGE_RUNTIME_KEYS", 1_000_000) as usize;
    let commands = env_number("EVENTSTAGE_RUNTIME_COMMANDS", 1_000_000) as usize;
    let cache_mb = env_number("EVENTSTAGE_RUNTIME_CACHE_MB", 64);
    let sled_mb = env_number("EVENTSTAGE_RUNTIME_SLED_MB", 64);
    if let Ok(config) = std::env::var(CHILD) {
        let cache = (config == "cache").then_some(cache_mb << 20);
        shared::tokio_runtime().block_on(run(cache, keys, commands, sled_mb << 20));
        return;
    }
    println!("stage runtime on sled: {keys} accounts, {commands} deposits per phase, sled page cache {sled_mb} MiB, each configuration in a process of its own");
    println!("| state | opens/s | uniform deposits/s | hot 1 % deposits/s | RSS after (MiB) | peak (MiB) | reopen (ms) | first reply (ms) | cache hits / misses / evictions |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("EVENTSTAGE_RUNTIME_ONLY").ok();
    for config in ["all", "cache"].into_iter().filter(|c| only.as_deref().is_none_or(|o| o == *c)) {
        let out = Command::new(std::env::current_exe().expect("this binary's path"))
            .env(CHILD, config)
            .output()
            .expect("run a configuration's process");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            panic!("the {config} run failed: {}", out.status);
        }
    }
}

/// Resident memory and its peak so far, in MiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        let kb = status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("0").trim().trim_end_matches("kB");
        kb.trim().parse::<u64>().unwrap_or(0) / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn key(k: usize) -> String {
    format!("acct-{k:08}")
}

/// Sends each task's commands (`pick(task, i)` gives the i-th account number of the task's own
/// accounts, `None` when done), checks every reply against the task's model, and returns the
/// commands per second.
async fn phase(
    handle: &StageHandle<Bank>,
    models: &mut [Vec<u32>],
    pick: impl Fn(usize, usize) -> Option<(usize, BankCommand)> + Send + Sync + 'static,
) -> f64 {
    let pick = Arc::new(pick);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut sent = 0;
    for (t, model) in models.iter_mut().enumerate() {
        let (handle, pick, mut model) = (handle.clone(), pick.clone(), std::mem::take(model));
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while let Some((slot, command)) = pick(t, i) {
                let reply = handle.ask(key(slot * TASKS + t), command).await.expect("the runtime answers");
                let count = &mut model[slot];
                if matches!(command, BankCommand::Deposit(_)) {
                    *count += 1;
                }
                assert_eq!(reply, Ok(u64::from(*count)), "account {} after {} deposits", slot * TASKS + t, *count);
                i += 1;
            }
            (model, i)
        }));
    }
    for (t, task) in tasks.into_iter().enumerate() {
        let (model, n) = task.await.expect("a client task");
        models[t] = model;
        sent += n;
    }
    sent as f64 / started.elapsed().as_secs_f64()
}

/// A deterministic pseudo-random number for `(task, i)` (splitmix64).
fn mix(task: usize, i: usize) -> u64 {
    let mut z = ((task as u64) << 32 ^ i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn run(cache: Option<u64>, keys: usize, commands: usize, sled_cache: u64) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let open = || async {
        let store = SledStore::builder(dir.path()).cache_capacity(sled_cache).open().expect("open the store");
        let journal = store.journal("bank").expect("the journal");
        let mut config = RuntimeConfig::default();
        if let Some(bytes) = cache {
            config = config.state_cache(bytes);
        }
        StageRuntime::open(Bank, journal, config).await.expect("open the runtime")
    };
    let per_task = keys / TASKS;
    let mut models: Vec<Vec<u32>> = (0..TASKS).map(|_| vec![0; per_task]).collect();
    let stage = open().await;
    let h = stage.handle();
    let opens = phase(&h, &mut models, move |_, i| (i < per_task).then_some((i, BankCommand::Open))).await;
    let per_task_commands = commands / TASKS;
    let uniform = phase(&h, &mut models, move |t, i| {
        (i < per_task_commands).then(|| (mix(t, i) as usize % per_task, BankCommand::Deposit(1)))
    })
    .await;
    let hot = (per_task / 100).max(1);
    let hot_rate = phase(&h, &mut models, move |t, i| {
        (i < per_task_commands).then(|| (mix(t, (1 << 40) + i) as usize % hot, BankCommand::Deposit(1)))
    })
    .await;
    let (rss, peak) = memory();
    let stats = h.cache_stats();
    drop(h);
    stage.shutdown().await.expect("shut down");

    let reopening = Instant::now();
    let stage = open().await;
    let reopen = reopening.elapsed();
    let (slot, t) = (per_task / 2, 7);
    let expected = u64::from(models[t][slot]) + 1;
    let reply = stage.handle().ask(key(slot * TASKS + t), BankCommand::Deposit(1)).await.expect("the first reply");
    let first = reopening.elapsed();
    assert_eq!(reply, Ok(expected), "the first reply after the restart");
    stage.shutdown().await.expect("shut down");

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let state = match cache {
        Some(bytes) => format!("{} MiB state cache", bytes >> 20),
        None => "every key in memory".into(),
    };
    let counters = stats.map_or_else(|| "-".into(), |s| format!("{} / {} / {}", s.hits, s.misses, s.evictions));
    println!(
        "| {state} | {opens:.0} | {uniform:.0} | {hot_rate:.0} | {rss} | {peak} | {:.0} | {:.0} | {counters} |",
        ms(reopen),
        ms(first)
    );
}
