//! Restart time of the bank stage after 10^5 and 10^6 events, with snapshots (every 100 events per
//! key) and without.
//!
//! Each dataset is built once, outside the measurement: the events a bank over 1000 accounts would
//! have written (first event of an account `Opened`, then `Deposited`, accounts picked at random),
//! encoded with bincode exactly as the runtime does, appended in batches of 10 000 and flushed once.
//! The "snapshots on" datasets also carry the snapshots the runtime would have written: after a batch
//! in which an account crossed a multiple of 100 events, its state at the end of that batch.
//!
//! One iteration = `SledStore::open` + `store.journal("bank")` + `StageRuntime::open(Bank, ..)` +
//! `shutdown`. The store is dropped after each iteration, outside the measurement.

mod shared;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use eventstage::journal::{Batch, SledStore};
use eventstage::stages::bank::{Account, Bank, BankEvent};
use eventstage::{EventSourced, RecoveryStats, RuntimeConfig, StageHandle, StageRuntime};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tempfile::TempDir;

const ACCOUNTS: usize = 1000;
const BATCH: u64 = 10_000;
const SNAPSHOT_EVERY: u64 = 100;

/// A populated store and what a correct recovery must find in it.
struct Dataset {
    dir: TempDir,
    events: u64,
    snapshots: bool,
    /// Per account: (last seq, balance).
    expected: Vec<(u64, u64)>,
}

fn populate(rt: &tokio::runtime::Runtime, events: u64, snapshots: bool) -> Dataset {
    let dir = TempDir::new().expect("create a temporary directory");
    let store = SledStore::open(dir.path()).expect("open the store");
    let journal = store.journal(Bank::NAME).expect("open the bank journal");
    let keys: Vec<String> = (0..ACCOUNTS).map(shared::key).collect();
    // Same seed for both variants: the same history, with or without snapshots.
    let mut rng = shared::SplitMix::new(events);
    let mut expected = vec![(0u64, 0u64); ACCOUNTS];
    let ts = shared::now_ms();
    let mut written = 0;
    let batches = std::iter::from_fn(|| {
        if written == events {
            return None;
        }
        let n = BATCH.min(events - written);
        written += n;
        let before = expected.clone();
        let mut batch = Batch::default();
        for _ in 0..n {
            let a = rng.below(ACCOUNTS);
            let (seq, balance) = &mut expected[a];
            *seq += 1;
            let event = if *seq == 1 {
                BankEvent::Opened
            } else {
                let amount = 1 + rng.below(100) as u64;
                *balance += amount;
                BankEvent::Deposited { amount }
            };
            batch.events.push(shared::bincode_event(&keys[a], *seq, ts, Bank::EVENT_VERSION, &event));
        }
        if snapshots {
            for (a, (&(seq, balance), &(seq_before, _))) in expected.iter().zip(&before).enumerate() {
                if seq / SNAPSHOT_EVERY > seq_before / SNAPSHOT_EVERY {
                    let state = Account { open: true, balance };
                    batch.snapshots.push(shared::bincode_snapshot(&keys[a], seq, ts, Bank::STATE_VERSION, &state));
                }
            }
        }
        Some(batch)
    });
    rt.block_on(shared::write_all(&journal, batches));
    drop(journal);
    drop(store);
    Dataset { dir, events, snapshots, expected }
}

fn restart(c: &mut Criterion) {
    let rt = shared::tokio_runtime();
    let mut group = c.benchmark_group("restart");
    // A restart after 10^6 events without snapshots takes on the order of a second: flat sampling
    // with 10 samples keeps it at about 10 restarts.
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    for events in [100_000u64, 1_000_000] {
        for snapshots in [true, false] {
            let variant = if snapshots { "snapshots_on" } else { "snapshots_off" };
            let id = BenchmarkId::new(format!("events_{events}"), variant);
            // Built just before its benchmark and deleted right after: populating (or sled's
            // background work on) one dataset must not disturb the measurement of another.
            let start = Instant::now();
            let data = populate(&rt, events, snapshots);
            let written = start.elapsed();
            // The first open after writing is much slower (sled settles its files): do it here,
            // untimed, so that warm-up and estimates see ordinary restarts.
            let start = Instant::now();
            let (store, handle, recovery) = rt.block_on(reopen(&data));
            check(&data, &recovery, &handle);
            drop((store, handle));
            eprintln!(
                "restart: {events} events ({variant}) written in {written:.1?}, first open {:.1?}",
                start.elapsed()
            );
            // Ten restarts of about a second each do not fit the default 5 s.
            let seconds = if events >= 1_000_000 && !snapshots { 15 } else { 5 };
            group.measurement_time(Duration::from_secs(seconds));
            group.bench_function(id, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let data = &data;
                    async move {
                        let mut measured = Duration::ZERO;
                        for _ in 0..iters {
                            let start = Instant::now();
                            let (store, handle, recovery) = reopen(data).await;
                            measured += start.elapsed();
                            check(data, &recovery, &handle);
                            drop(handle);
                            drop(store);
                        }
                        measured
                    }
                });
            });
        }
    }
    group.finish();
}

/// One restart: open the store and the journal, recover the stage, shut it down. Returns the store
/// (so the caller drops it outside the measurement), a handle to the recovered state and the recovery
/// statistics.
async fn reopen(data: &Dataset) -> (SledStore, StageHandle<Bank>, RecoveryStats) {
    let store = SledStore::open(data.dir.path()).expect("reopen the store");
    let journal = store.journal(Bank::NAME).expect("reopen the bank journal");
    let snapshot_every = if data.snapshots { SNAPSHOT_EVERY } else { 0 };
    let config = RuntimeConfig::default().snapshot_every(snapshot_every);
    let stage = StageRuntime::open(Bank, journal, config).await.expect("recover the bank stage");
    let handle = stage.handle();
    let recovery = black_box(stage.recovery());
    stage.shutdown().await.expect("shut the stage down");
    (store, handle, recovery)
}

/// The recovered state is the one the dataset was built to produce.
fn check(data: &Dataset, recovery: &RecoveryStats, handle: &StageHandle<Bank>) {
    assert_eq!(recovery.keys, ACCOUNTS as u64, "every account recovered");
    if data.snapshots {
        assert!(recovery.snapshots > 0 && recovery.events < data.events, "snapshots used: {recovery:?}");
    } else {
        assert_eq!((recovery.snapshots, recovery.events), (0, data.events), "whole history replayed");
    }
    for (a, &(seq, balance)) in data.expected.iter().enumerate() {
        let key = shared::key(a);
        // Queries of a runtime holding every key never wait: polled once, they are ready.
        let entity = futures::executor::block_on(async { (handle.seq(&key).await, handle.get(&key).await) });
        assert_eq!(entity.0.expect("seq").0, seq, "seq of {key}");
        let account = entity.1.expect("get").expect("recovered account");
        assert_eq!(*account, Account { open: true, balance }, "state of {key}");
    }
}

criterion_group!(benches, restart);
criterion_main!(benches);
