//! The embedded store's own memory and speed at 10^7 keys, sled against fjall (issue 24, point 4:
//! "if sled cannot be held to the budget, choose a well-kept embedded store that can, with
//! figures side by side before you switch").
//!
//! Each store runs in a process of its own (this binary again, with `EVENTSTAGE_STORE_CHILD`), so
//! that its resident set and peak are its own. The workload is a local state store's: one row per
//! key, the key's newest journal entry (the bank's account state as a flow journals it, bincode,
//! 40-odd bytes), keys written in a random order (accounts are opened in any order), then 10^6
//! random reads (keys faulted in) and 10^6 random rewrites (the rows of keys a commit changed).
//! Both stores get the same cache budget (`EVENTSTAGE_STORE_CACHE_MB`, default 64): sled's
//! `cache_capacity`, fjall's `cache_size`.
//!
//! `cargo bench --bench store_memory`; `EVENTSTAGE_STORE_KEYS` (default 10^7),
//! `EVENTSTAGE_STORE_CACHE_MB` (default 64), `EVENTSTAGE_STORE_PARTITIONS` (default 1: the keys
//! spread over this many trees or keyspaces, one per partition as the local store keeps them),
//! `EVENTSTAGE_STORE_MEMTABLE_MB` (fjall: the memtable budget, split over the keyspaces; default
//! fjall's own, 64 MiB per keyspace), `EVENTSTAGE_STORE_ONLY` (`sled` or `fjall`). Memory is whole-process RSS from `/proc/self/status`
//! (Linux) after each phase; the peak is the kernel's high-water mark over the whole run.

mod shared;

use eventstage::journal::{Envelope, JournalEntry, SeqNo};
use eventstage::stages::bank::{Account, Bank};
use eventstage::{Codec, EventSourced};
use std::process::Command;
use std::time::Instant;

const CHILD: &str = "EVENTSTAGE_STORE_CHILD";
const OPS: u64 = 1_000_000;

fn main() {
    let keys = env_number("EVENTSTAGE_STORE_KEYS", 10_000_000);
    let cache_mb = env_number("EVENTSTAGE_STORE_CACHE_MB", 64);
    let partitions = env_number("EVENTSTAGE_STORE_PARTITIONS", 1).max(1);
    if let Ok(store) = std::env::var(CHILD) {
        run(&store, keys, cache_mb, partitions);
        return;
    }
    println!("local store rows: {keys} keys in {partitions} partition(s), cache budget {cache_mb} MiB, each store in a process of its own");
    let only = std::env::var("EVENTSTAGE_STORE_ONLY").ok();
    for store in ["sled", "fjall"].into_iter().filter(|s| only.as_deref().is_none_or(|o| o == *s)) {
        let out = Command::new(std::env::current_exe().expect("this binary's path"))
            .env(CHILD, store)
            .output()
            .expect("run a store's process");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            panic!("the {store} run failed: {}", out.status);
        }
    }
}

/// The operations a store is measured on (`p`: the partition's tree or keyspace).
trait Rows {
    fn put(&self, p: usize, key: &[u8], value: &[u8]);
    fn get(&self, p: usize, key: &[u8]) -> bool;
    /// Makes every write durable.
    fn persist(&self);
}

struct Sled(Vec<sled::Tree>, sled::Db);

impl Rows for Sled {
    fn put(&self, p: usize, key: &[u8], value: &[u8]) {
        self.0[p].insert(key, value).expect("sled insert");
    }
    fn get(&self, p: usize, key: &[u8]) -> bool {
        self.0[p].get(key).expect("sled get").is_some()
    }
    fn persist(&self) {
        self.1.flush().expect("sled flush");
    }
}

struct Fjall(Vec<fjall::Keyspace>, fjall::Database);

impl Rows for Fjall {
    fn put(&self, p: usize, key: &[u8], value: &[u8]) {
        self.0[p].insert(key, value).expect("fjall insert");
    }
    fn get(&self, p: usize, key: &[u8]) -> bool {
        self.0[p].get(key).expect("fjall get").is_some()
    }
    fn persist(&self) {
        self.1.persist(fjall::PersistMode::SyncAll).expect("fjall persist");
    }
}

fn run(store: &str, keys: u64, cache_mb: u64, partitions: u64) {
    let names: Vec<String> = (0..partitions).map(|p| format!("p{p}")).collect();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rows: Box<dyn Rows> = match store {
        "sled" => {
            let db = sled::Config::new().path(dir.path()).cache_capacity(cache_mb << 20).open().expect("open sled");
            let trees = names.iter().map(|n| db.open_tree(n).expect("sled tree")).collect();
            Box::new(Sled(trees, db))
        }
        _ => {
            let db = fjall::Database::builder(dir.path()).cache_size(cache_mb << 20).open().expect("open fjall");
            // fjall's memtables are per keyspace (64 MiB each by default): a budget for all of them
            // is split over the keyspaces.
            let memtable = std::env::var("EVENTSTAGE_STORE_MEMTABLE_MB").ok().and_then(|v| v.parse::<u64>().ok());
            let options = || match memtable {
                Some(mb) => fjall::KeyspaceCreateOptions::default().max_memtable_size((mb << 20) / partitions),
                None => fjall::KeyspaceCreateOptions::default(),
            };
            let keyspaces = names.iter().map(|n| db.keyspace(n, options).expect("fjall keyspace"));
            Box::new(Fjall(keyspaces.collect(), db))
        }
    };
    // A key's row: its newest journal entry, as the flow's local store keeps it.
    let row = |balance: u64| {
        let state = Codec::Bincode.encode(&Account { open: true, balance }).expect("encode an account");
        let snapshot = Envelope::snapshot(Codec::Bincode.id(), Bank::STATE_VERSION, 1_764_806_400_000, state);
        JournalEntry { last_seq: SeqNo(balance), events: Vec::new(), state: Some(snapshot), sources: Vec::new() }
            .encode()
    };
    // Keys in a random order: a permutation of 0..keys (the multiplier is prime to 2 and 5).
    let key = |i: u64| {
        let k = i.wrapping_mul(2_654_435_761) % keys;
        ((k % partitions) as usize, format!("acct-{k:010}").into_bytes())
    };
    let started = Instant::now();
    for i in 0..keys {
        let (p, k) = key(i);
        rows.put(p, &k, &row(i % 1000));
    }
    rows.persist();
    let wrote = started.elapsed();
    let (after_writes, _) = memory();

    let mut rng = Lcg(7);
    let started = Instant::now();
    for _ in 0..OPS {
        let (p, k) = key(rng.below(keys));
        assert!(rows.get(p, &k), "every key has a row");
    }
    let read = started.elapsed();
    let (after_reads, _) = memory();

    let started = Instant::now();
    for j in 0..OPS {
        let (p, k) = key(rng.below(keys));
        rows.put(p, &k, &row(j % 1000 + 1));
    }
    rows.persist();
    let rewrote = started.elapsed();
    let (after_rewrites, peak) = memory();
    drop(rows);
    let disk = shared::dir_size(dir.path());

    let per_s = |n: u64, d: std::time::Duration| n as f64 / d.as_secs_f64();
    println!(
        "  {store:5}: writes {:>7.0}/s, random reads {:>7.0}/s, random rewrites {:>7.0}/s; RSS after writes {after_writes} MiB, after reads {after_reads} MiB, after rewrites {after_rewrites} MiB, peak {peak} MiB; {} MiB on disk",
        per_s(keys, wrote),
        per_s(OPS, read),
        per_s(OPS, rewrote),
        disk >> 20,
    );
}

/// Whole-process resident set and its high-water mark, MiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A small deterministic generator (the same keys for both stores).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}
