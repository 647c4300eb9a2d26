//! Append throughput on sled, in events (= commands) per second.
//!
//! - `append_runtime`: commands through the stage runtime (bank stage, `Durability::Durable`, so each
//!   batch is one append plus one fsync: group commit), for `max_batch` 1, 100, 1000 and 1 or 64
//!   client tasks, each looping `ask(account, Deposit(1))` on its own account. Snapshots stay at the
//!   default (every 100 events per key), as in production.
//! - `append_journal`: the journal alone, `SledJournal::append` + `flush` of pre-built batches of 1,
//!   100 and 1000 events with 100-byte payloads (one fsync per batch).
//! - `codec_check`: what the journals' read-back check costs per record (issue 22: an event or
//!   state that replay could not decode is refused before it is persisted). `encode` is what a
//!   record cost before; `encode_read_back` is what the runtime and flows do now (encode, then
//!   decode the bytes as replay would: `upcast` for events, the codec for states), for the bank's
//!   events and its account state; `json_encode_read_back` is the alternative (a self-describing
//!   default codec that reads every serde shape).

mod shared;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eventstage::journal::{Batch, Journal, SledJournal};
use eventstage::stages::bank::{Account, Bank, BankCommand, BankEvent};
use eventstage::{Codec, Durability, EventSourced, RuntimeConfig, StageRuntime};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Accounts the journal-level batches spread their events over.
const JOURNAL_KEYS: u64 = 1000;

fn append_runtime(c: &mut Criterion) {
    let rt = shared::tokio_runtime();
    let mut group = c.benchmark_group("append_runtime");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    // One iteration = one command (one Deposited event).
    group.throughput(Throughput::Elements(1));
    for max_batch in [1usize, 100, 1000] {
        for tasks in [1u64, 64] {
            let dir = TempDir::new().expect("create a temporary directory");
            let journal = SledJournal::open(dir.path().join("journal"), Bank::NAME).expect("open the journal");
            let config = RuntimeConfig::default().max_batch(max_batch).durability(Durability::Durable);
            let stage = rt.block_on(StageRuntime::open(Bank, journal, config)).expect("open the bank stage");
            let handle = stage.handle();
            let accounts: Vec<String> = (0..tasks as usize).map(shared::key).collect();
            rt.block_on(async {
                for account in &accounts {
                    let opened = handle.ask(account.clone(), BankCommand::Open).await.expect("send Open");
                    opened.expect("open an account");
                }
            });
            let id = BenchmarkId::new(format!("max_batch_{max_batch}"), format!("tasks_{tasks}"));
            group.bench_function(id, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let handle = handle.clone();
                    let accounts = accounts.clone();
                    async move {
                        let start = Instant::now();
                        let clients: Vec<_> = accounts
                            .into_iter()
                            .enumerate()
                            .map(|(i, account)| {
                                let n = iters / tasks + u64::from((i as u64) < iters % tasks);
                                let handle = handle.clone();
                                tokio::spawn(async move {
                                    for _ in 0..n {
                                        let reply = handle
                                            .ask(account.clone(), BankCommand::Deposit(1))
                                            .await
                                            .expect("send Deposit");
                                        black_box(reply.expect("deposit accepted"));
                                    }
                                })
                            })
                            .collect();
                        for client in clients {
                            client.await.expect("client task");
                        }
                        start.elapsed()
                    }
                });
            });
            rt.block_on(stage.shutdown()).expect("shut the stage down");
        }
    }
    group.finish();
}

/// Batches of `size` events continuing the sequence of a journal: event number `g` (counted over
/// the journal's life) goes to key `g % JOURNAL_KEYS` with seq `g / JOURNAL_KEYS + 1`.
fn next_batches(written: &mut u64, size: u64, count: u64) -> Vec<Batch> {
    let keys: Vec<String> = (0..JOURNAL_KEYS as usize).map(shared::key).collect();
    let ts = shared::now_ms();
    (0..count)
        .map(|_| {
            let events = (*written..*written + size)
                .map(|g| {
                    shared::raw_event(&keys[(g % JOURNAL_KEYS) as usize], g / JOURNAL_KEYS + 1, ts, vec![0xAB; 100])
                })
                .collect();
            *written += size;
            Batch { events, ..Batch::default() }
        })
        .collect()
}

fn append_journal(c: &mut Criterion) {
    let rt = shared::tokio_runtime();
    let mut group = c.benchmark_group("append_journal");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for size in [1u64, 100, 1000] {
        let dir = TempDir::new().expect("create a temporary directory");
        let journal = SledJournal::open(dir.path().join("journal"), "raw").expect("open the journal");
        let mut written = 0;
        // One iteration = one batch of `size` events: append, then flush (fsync).
        group.throughput(Throughput::Elements(size));
        group.bench_function(BenchmarkId::new("batch", size), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let batches = next_batches(&mut written, size, iters);
                let journal = journal.clone();
                async move {
                    let start = Instant::now();
                    for batch in batches {
                        black_box(journal.append(batch).await.expect("append"));
                        journal.flush().await.expect("flush");
                    }
                    start.elapsed()
                }
            });
        });
    }
    group.finish();
}

fn codec_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec_check");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let codec = Codec::Bincode;
    let events = [BankEvent::Opened, BankEvent::Deposited { amount: 700 }, BankEvent::Withdrawn { amount: 30 }];
    let state = Account { open: true, balance: 1_234_567 };
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("event/encode", |b| {
        b.iter(|| {
            for e in &events {
                black_box(codec.encode(black_box(e)).expect("encode"));
            }
        })
    });
    group.bench_function("event/encode_read_back", |b| {
        b.iter(|| {
            for e in &events {
                let bytes = codec.encode(black_box(e)).expect("encode");
                black_box(Bank::upcast(Bank::EVENT_VERSION, codec, &bytes).expect("read back"));
                black_box(bytes);
            }
        })
    });
    // The alternative issue 22 weighed: a self-describing codec that decodes every serde shape by
    // default (JSON here), paid on every append and every replay.
    group.bench_function("event/json_encode_read_back", |b| {
        b.iter(|| {
            for e in &events {
                let bytes = Codec::Json.encode(black_box(e)).expect("encode");
                black_box(Bank::upcast(Bank::EVENT_VERSION, Codec::Json, &bytes).expect("read back"));
                black_box(bytes);
            }
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("state/encode", |b| b.iter(|| black_box(codec.encode(black_box(&state)).expect("encode"))));
    group.bench_function("state/encode_read_back", |b| {
        b.iter(|| {
            let bytes = codec.encode(black_box(&state)).expect("encode");
            black_box(codec.decode::<Account>(&bytes).expect("read back"));
            black_box(bytes)
        })
    });
    group.finish();
}

criterion_group!(benches, append_runtime, append_journal, codec_check);
criterion_main!(benches);
