//! Section 5 of the end-to-end benchmark: a compacted topic of N keys (`EVENTSTAGE_E2E_TABLE_KEYS`,
//! default 10^6; 100-byte values) materialized as a [`Table`], against a bare read_committed
//! consumer reading the same topic to its end (the ratio is the target: >= 0.7); the same with a
//! local sled store (checkpoint included), and reopening that store (rows loaded, nothing left to
//! read); then `get` on the in-memory table: mean over N random lookups (throughput, one thread)
//! and p50/p99 of single lookups timed one by one (minus the timer's own cost), and the memory per
//! key: the process's RSS growth for a table of N keys minus that for a table of N/10 keys (opened
//! just before it), over the 0.9 N keys between (the target's measure; fixed costs such as the
//! consumer's buffers and threads cancel out), and the growth for N keys over N.

use super::{bare_read, create_topics, delete_topics, median, producer, progress, send, unique, Broker, PARTITIONS};
use anyhow::{bail, Context, Result};
use eventstage::table::{Decoder, Table};
use rand::{Rng, SeedableRng};
use rdkafka::producer::Producer;
use std::hint::black_box;
use std::time::{Duration, Instant};

const ROUNDS: usize = 3;

pub(crate) struct TableReport {
    keys: u64,
    produce: Duration,
    bare: Duration,
    memory: Duration,
    stored: Duration,
    durable: Duration,
    reopened: Duration,
    rss_per_key: Option<f64>,
    rss_per_key_from_empty: Option<f64>,
    get_mean_ns: f64,
    get_p50_ns: f64,
    get_p99_ns: f64,
    timer_ns: f64,
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

fn key(i: u64) -> String {
    format!("key-{i:07}")
}

async fn materialize(
    brokers: &str,
    topic: &str,
    store: Option<&std::path::Path>,
    keys: u64,
) -> Result<(Duration, Table<String, Vec<u8>>)> {
    let started = Instant::now();
    let mut builder = Table::builder(brokers, topic).keys(Decoder::utf8());
    // `EVENTSTAGE_E2E_TABLE_CONSUMER=key=value,key=value`: librdkafka properties for the table's
    // consumer, for tuning experiments (the bare consumer keeps librdkafka's defaults).
    let props = std::env::var("EVENTSTAGE_E2E_TABLE_CONSUMER").unwrap_or_default();
    for (k, v) in props.split(',').filter_map(|kv| kv.split_once('=')) {
        builder = builder.consumer_property(k, v);
    }
    if let Some(dir) = store {
        builder = builder.store(dir);
    }
    let table = builder.open().await?;
    tokio::time::timeout(Duration::from_secs(300), table.caught_up())
        .await
        .context("the table did not catch up in 300 s")??;
    let took = started.elapsed();
    if table.len() as u64 != keys {
        bail!("the table has {} keys, the topic {keys}", table.len());
    }
    Ok((took, table))
}

pub(crate) fn run(rt: &tokio::runtime::Runtime, broker: &Broker, keys: u64) -> Result<TableReport> {
    let b = broker.brokers.as_str();
    let topic = unique("table");
    create_topics(rt, b, &[&topic])?;
    let started = Instant::now();
    let p = producer(b, 5)?;
    let value = [b'v'; 100];
    for i in 0..keys {
        send(&p, &topic, &key(i), &value)?;
    }
    p.flush(Duration::from_secs(120)).context("flush the table topic")?;
    let produce = started.elapsed();
    let all: Vec<i32> = (0..PARTITIONS).collect();
    // The table of N/10 keys that the memory per key is measured against.
    let small_keys = keys / 10;
    let small_topic = unique("table-tenth");
    create_topics(rt, b, &[&small_topic])?;
    for i in 0..small_keys {
        send(&p, &small_topic, &key(i), &value)?;
    }
    p.flush(Duration::from_secs(120)).context("flush the small table topic")?;

    let (mut bare, mut memory) = (Vec::new(), Vec::new());
    let mut table = None;
    let (mut rss_per_key, mut rss_per_key_from_empty) = (None, None);
    for round in 0..ROUNDS {
        progress(&format!("    table round {}: bare consumer, then the table", round + 1));
        let t = Instant::now();
        let read = bare_read(b, &topic, &all)?;
        bare.push(t.elapsed());
        if read != keys {
            bail!("the bare consumer read {read} records of {keys}");
        }
        // The first round only: later rounds reuse memory the allocator kept from earlier ones.
        let small = if round == 0 && small_keys > 0 {
            let before = rss_bytes();
            let (_, t) = rt.block_on(materialize(b, &small_topic, None, small_keys))?;
            let rows = t.clone();
            rt.block_on(t.close())?;
            Some((before, rss_bytes(), rows))
        } else {
            None
        };
        let before = rss_bytes();
        let (took, t) = rt.block_on(materialize(b, &topic, None, keys))?;
        memory.push(took);
        // The consumer's buffers go with the follower thread; the rows stay with the clone.
        let rows = t.clone();
        rt.block_on(t.close())?;
        if let (Some((Some(start), Some(end), small)), Some(before), Some(after)) = (small, before, rss_bytes()) {
            let (small_growth, growth) = (end as f64 - start as f64, after as f64 - before as f64);
            rss_per_key = Some((growth - small_growth) / (keys - small_keys) as f64);
            rss_per_key_from_empty = Some(growth / keys as f64);
            drop(small);
        }
        table = Some(rows);
    }
    let table = table.context("no round ran")?;

    progress("    table with a local store, then reopening the store");
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let (stored, t) = rt.block_on(materialize(b, &topic, Some(dir.path()), keys))?;
    rt.block_on(t.close())?; // the last checkpoint: every row on disk
    let durable = started.elapsed();
    let (reopened, t) = rt.block_on(materialize(b, &topic, Some(dir.path()), keys))?;
    if t.stats().records_read != 0 {
        bail!("reopening the store read {} records; it should read none", t.stats().records_read);
    }
    rt.block_on(t.close())?;

    progress("    get latency");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let lookups: Vec<String> = (0..keys.min(1_000_000)).map(|_| key(rng.random_range(0..keys))).collect();
    let t = Instant::now();
    for k in &lookups {
        black_box(table.get(k.as_str()));
    }
    let get_mean_ns = t.elapsed().as_nanos() as f64 / lookups.len() as f64;
    let timer_ns = {
        let t = Instant::now();
        for _ in 0..100_000 {
            black_box(Instant::now().elapsed());
        }
        t.elapsed().as_nanos() as f64 / 100_000.0
    };
    let mut single: Vec<u64> = lookups
        .iter()
        .take(200_000)
        .map(|k| {
            let t = Instant::now();
            black_box(table.get(k.as_str()));
            t.elapsed().as_nanos() as u64
        })
        .collect();
    single.sort_unstable();
    let pct = |q: f64| single[((single.len() - 1) as f64 * q) as usize] as f64 - timer_ns;
    let (get_p50_ns, get_p99_ns) = (pct(0.5).max(0.0), pct(0.99).max(0.0));
    delete_topics(rt, b, &[&topic, &small_topic]);
    Ok(TableReport {
        keys,
        produce,
        bare: median(bare),
        memory: median(memory),
        stored,
        durable,
        reopened,
        rss_per_key,
        rss_per_key_from_empty,
        get_mean_ns,
        get_p50_ns,
        get_p99_ns,
        timer_ns,
    })
}

impl TableReport {
    pub(crate) fn print(&self) {
        let rate = |d: Duration| self.keys as f64 / d.as_secs_f64();
        println!(
            "5. table materialization ({} keys, 100-byte values, {PARTITIONS} partitions; produced in {:.2} s; median of {ROUNDS})",
            self.keys,
            self.produce.as_secs_f64()
        );
        println!(
            "  bare read_committed consumer          {:>9.0} records/s ({:.2} s)",
            rate(self.bare),
            self.bare.as_secs_f64()
        );
        println!(
            "  Table, in memory                       {:>9.0} records/s ({:.2} s)   ratio {:.2} (target >= 0.7: {})",
            rate(self.memory),
            self.memory.as_secs_f64(),
            rate(self.memory) / rate(self.bare),
            if rate(self.memory) / rate(self.bare) >= 0.7 { "met" } else { "MISSED" }
        );
        println!(
            "  Table with a sled store: caught up     {:>9.0} records/s ({:.2} s)   ratio {:.2}; every row in the store after {:.2} s ({:.0} rows/s)",
            rate(self.stored),
            self.stored.as_secs_f64(),
            rate(self.stored) / rate(self.bare),
            self.durable.as_secs_f64(),
            rate(self.durable)
        );
        println!(
            "  reopening the store (rows loaded, no record read): {:.2} s ({:.0} rows/s)",
            self.reopened.as_secs_f64(),
            rate(self.reopened)
        );
        println!(
            "  get, one thread: mean {:.0} ns ({:.1} M gets/s); single gets p50 {:.0} ns, p99 {:.0} ns (timer cost {:.0} ns subtracted)",
            self.get_mean_ns,
            1000.0 / self.get_mean_ns,
            self.get_p50_ns,
            self.get_p99_ns,
            self.timer_ns
        );
        // Key and value bytes: "key-NNNNNNN" and 100 bytes.
        let (payload, target) = (11 + 100, 2 * (11 + 100) + 64);
        match (self.rss_per_key, self.rss_per_key_from_empty) {
            (Some(b), Some(from_empty)) => println!(
                "  memory: {b:.0} bytes per key (RSS growth, N/10 to N keys; target <= 2 x (key + value) + 64 = {target}: {}; key + value are {payload} bytes); {from_empty:.0} bytes per key from empty",
                if b <= target as f64 { "met" } else { "MISSED" }
            ),
            _ => println!("  memory: n/a"),
        }
    }
}
