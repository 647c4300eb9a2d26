//! Section 12 (`EVENTSTAGE_E2E_ONLY=table-cache`): a table larger than memory (issue 24 point 3).
//! A compacted topic of K rows (`EVENTSTAGE_E2E_TABLE_CACHE_KEYS`, default 10^7; 12-byte keys,
//! 100-byte values) is materialized with a local store and each row cache budget of
//! `EVENTSTAGE_E2E_TABLE_CACHE_MIB` (default `64`; 0: no cache, every row in memory):
//!
//! 1. by `eventstage table stats --store DIR [--cache B]` in a child process, the way an operator
//!    runs it: the time to read the topic, and the process's resident memory sampled every 250 ms
//!    (its peak, and its last sample before it exits);
//! 2. then in this process, reopening the same store (what a restarted application does): the time
//!    to its first `get`, then single `get`s of uniformly random keys, each timed (p50, p99, mean
//!    minus the timer's own cost), with the cache's hit ratio over them, and the growth of this
//!    process's resident memory from before the open to after the lookups.

use super::{create_topics, delete_topics, env_number, producer, progress, rss_mib, send, unique};
use anyhow::{anyhow, bail, Context, Result};
use eventstage::table::{Decoder, Table};
use rand::{Rng, SeedableRng};
use rdkafka::producer::Producer;
use std::hint::black_box;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) struct TableCacheRow {
    keys: u64,
    budget_mib: u64,
    read: Duration,
    peak_rss_mib: u64,
    end_rss_mib: u64,
    store_mib: u64,
    reopen: Duration,
    reopen_growth_mib: i64,
    lookups: usize,
    hit_ratio: f64,
    get_p50_us: f64,
    get_p99_us: f64,
    get_mean_us: f64,
}

fn key(i: u64) -> String {
    format!("row-{i:08}")
}

pub(crate) fn run(rt: &tokio::runtime::Runtime, brokers: &str) -> Result<Vec<TableCacheRow>> {
    let keys = env_number("EVENTSTAGE_E2E_TABLE_CACHE_KEYS", 10_000_000)?.max(1);
    let budgets = super::env_list("EVENTSTAGE_E2E_TABLE_CACHE_MIB", "64")?;
    let topic = unique("table-cache");
    create_topics(rt, brokers, &[&topic])?;
    progress(&format!("  producing {keys} rows"));
    let started = Instant::now();
    {
        let p = producer(brokers, 20)?;
        let value = [b'v'; 100];
        for i in 0..keys {
            send(&p, &topic, &key(i), &value)?;
        }
        p.flush(Duration::from_secs(600)).context("flush the rows")?;
    }
    progress(&format!("  produced in {:.1} s", started.elapsed().as_secs_f64()));
    let mut rows = Vec::new();
    for &budget_mib in &budgets {
        progress(&format!("  {keys} rows, row cache {budget_mib} MiB (0: none)"));
        rows.push(one(rt, brokers, &topic, keys, budget_mib)?);
    }
    delete_topics(rt, brokers, &[&topic]);
    Ok(rows)
}

fn one(rt: &tokio::runtime::Runtime, brokers: &str, topic: &str, keys: u64, budget_mib: u64) -> Result<TableCacheRow> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_eventstage"));
    cmd.args(["table", "stats", "--brokers", brokers, "--topic", topic, "--format", "json", "--quiet"])
        .arg("--store")
        .arg(&store)
        .args(["--timeout", "60s"]);
    if budget_mib > 0 {
        cmd.args(["--cache", &format!("{budget_mib}MiB")]);
    }
    let started = Instant::now();
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("start eventstage table")?;
    let pid = child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut peak, mut last) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = rss_mib(pid) {
                    (peak, last) = (peak.max(rss), rss);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            (peak, last)
        })
    };
    let out = child.wait_with_output()?;
    let read = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (peak_rss_mib, end_rss_mib) = sampler.join().map_err(|_| anyhow!("the sampler panicked"))?;
    if !out.status.success() {
        bail!("eventstage table stats exited with {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).context("the stats do not parse")?;
    if stats["keys"].as_u64() != Some(keys) {
        bail!("the table has {} keys, the topic {keys}", stats["keys"]);
    }
    let store_mib = crate::shared::dir_size(&store) >> 20;

    // Reopened in this process.
    let before = rss_mib(std::process::id()).unwrap_or(0) as i64;
    let opened = Instant::now();
    let mut builder = Table::builder(brokers, topic).keys(Decoder::utf8()).store(&store);
    if budget_mib > 0 {
        builder = builder.cache(budget_mib << 20);
    }
    let table = rt.block_on(builder.open())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let first = key(rng.random_range(0..keys));
    if table.get(first.as_str()).is_none() {
        bail!("the reopened table has no row {first}");
    }
    let reopen = opened.elapsed();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(600), table.caught_up()).await })
        .context("the reopened table did not catch up")??;
    let lookups: Vec<String> = (0..200_000).map(|_| key(rng.random_range(0..keys))).collect();
    let timer_ns = {
        let t = Instant::now();
        for _ in 0..100_000 {
            black_box(Instant::now().elapsed());
        }
        t.elapsed().as_nanos() as f64 / 100_000.0
    };
    let before_stats = table.stats();
    let mut single: Vec<u64> = Vec::with_capacity(lookups.len());
    for k in &lookups {
        let t = Instant::now();
        let row = black_box(table.get(k.as_str()));
        single.push(t.elapsed().as_nanos() as u64);
        if row.map(|v| v.len()) != Some(100) {
            bail!("row {k} is missing or wrong");
        }
    }
    let after_stats = table.stats();
    let reopen_growth_mib = rss_mib(std::process::id()).unwrap_or(0) as i64 - before;
    let hits = after_stats.cache_hits - before_stats.cache_hits;
    let mean = single.iter().sum::<u64>() as f64 / single.len() as f64 - timer_ns;
    single.sort_unstable();
    let pct = |q: f64| (single[((single.len() - 1) as f64 * q) as usize] as f64 - timer_ns).max(0.0) / 1000.0;
    rt.block_on(table.close())?;
    Ok(TableCacheRow {
        keys,
        budget_mib,
        read,
        peak_rss_mib,
        end_rss_mib,
        store_mib,
        reopen,
        reopen_growth_mib,
        lookups: lookups.len(),
        hit_ratio: if budget_mib > 0 { hits as f64 / lookups.len() as f64 } else { 1.0 },
        get_p50_us: pct(0.5),
        get_p99_us: pct(0.99),
        get_mean_us: mean.max(0.0) / 1000.0,
    })
}

pub(crate) fn print(rows: &[TableCacheRow]) {
    println!("12. a table larger than memory: `eventstage table stats --store` of K rows (12-byte keys, 100-byte values), by row cache budget");
    for r in rows {
        let budget = if r.budget_mib == 0 { "none".to_string() } else { format!("{} MiB", r.budget_mib) };
        println!(
            "  K = {}, cache {budget}: read in {:.1} s ({:.0} rows/s), RSS peak {} MiB, last {} MiB; store {} MiB on disk",
            r.keys,
            r.read.as_secs_f64(),
            r.keys as f64 / r.read.as_secs_f64(),
            r.peak_rss_mib,
            r.end_rss_mib,
            r.store_mib
        );
        println!(
            "    reopened: first get after {} ms; {} random gets: p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs, {:.1} % from the cache; RSS growth {} MiB",
            r.reopen.as_millis(),
            r.lookups,
            r.get_p50_us,
            r.get_p99_us,
            r.get_mean_us,
            r.hit_ratio * 100.0,
            r.reopen_growth_mib
        );
    }
}
