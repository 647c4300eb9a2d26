//! Replay throughput from sled, in events per second, against raw sled iteration over the same tree.
//!
//! One journal of 200 000 events (1000 keys x 200 events, 100-byte bincode payloads, written in
//! batches of 1000 and flushed), then in one group:
//! - `raw_sled_iter`: `journal.sled_tree().iter()`, touching key and value lengths;
//! - `journal_events`: `Journal::events(EventQuery::all())` consumed fully (envelope decode + CRC);
//! - `journal_recover`: `Journal::recover()` consumed fully;
//! - `stage_open`: full stage recovery, `StageRuntime::open` of a stage whose events are these
//!   records (bincode decode + apply), snapshots disabled, then `shutdown`.
//!
//! Target: stage recovery at least half as fast as raw iteration and at least 1M events/s; a summary
//! line with the ratios is printed after the group.

mod shared;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use eventstage::journal::{Batch, EventQuery, Journal, Recovered, SledJournal};
use eventstage::{Effect, EventSourced, RuntimeConfig, StageRuntime};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::time::{Duration, SystemTime};
use tempfile::TempDir;

const KEYS: usize = 1000;
const EVENTS_PER_KEY: u64 = 200;
const EVENTS: u64 = KEYS as u64 * EVENTS_PER_KEY;
/// 99 data bytes: bincode writes the length in one byte, so the payload is 100 bytes.
const DATA_LEN: usize = 99;
const PAYLOAD_LEN: usize = 100;
const GROUP: &str = "replay";

/// A stage that only counts what it is given: its events carry ~100 bytes each.
struct Blobs;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Blob {
    data: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Totals {
    events: u64,
    bytes: u64,
}

impl EventSourced for Blobs {
    const NAME: &'static str = "blobs";
    type Key = String;
    type Command = Vec<u8>;
    type Event = Blob;
    type State = Totals;
    type Reply = u64;
    type Rejection = String;

    fn handle(&self, _: &Totals, data: Vec<u8>) -> Result<Effect<Self>, String> {
        Ok(Effect::persist([Blob { data }]).then_reply(|t: &Totals| t.events))
    }

    fn apply(totals: &mut Totals, event: &Blob) {
        totals.events += 1;
        totals.bytes += event.data.len() as u64;
    }
}

/// 1000 keys x 200 events, one batch per round over the keys (1000 events), as a stage would write
/// them (bincode, type version 1, journal named after the stage).
fn populate(rt: &tokio::runtime::Runtime, journal: &SledJournal) {
    let keys: Vec<String> = (0..KEYS).map(shared::key).collect();
    let ts = shared::now_ms();
    let batches = (1..=EVENTS_PER_KEY).map(|seq| {
        let events = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let blob = Blob { data: vec![(i as u64 + seq) as u8; DATA_LEN] };
                shared::bincode_event(key, seq, ts, Blobs::EVENT_VERSION, &blob)
            })
            .collect();
        Batch { events, ..Batch::default() }
    });
    rt.block_on(shared::write_all(journal, batches));
}

fn replay(c: &mut Criterion) {
    let rt = shared::tokio_runtime();
    let dir = TempDir::new().expect("create a temporary directory");
    let journal = SledJournal::open(dir.path().join("journal"), Blobs::NAME).expect("open the journal");
    populate(&rt, &journal);
    let sample = shared::bincode_event("k", 1, 0, 1, &Blob { data: vec![0; DATA_LEN] });
    assert_eq!(sample.envelope.payload.len(), PAYLOAD_LEN, "payload size");

    let started = SystemTime::now();
    let mut group = c.benchmark_group(GROUP);
    // Each iteration reads the whole journal (~0.1 s): flat sampling, 10 samples.
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(EVENTS));

    group.bench_function("raw_sled_iter", |b| {
        b.iter(|| {
            let mut records = 0u64;
            let mut bytes = 0usize;
            for item in journal.sled_tree().iter() {
                let (k, v) = item.expect("sled iteration");
                records += 1;
                bytes += black_box(k.len()) + black_box(v.len());
            }
            black_box((records, bytes))
        });
    });

    group.bench_function("journal_events", |b| {
        b.to_async(&rt).iter(|| async {
            let mut events = 0u64;
            let mut stream = std::pin::pin!(journal.events(EventQuery::all()));
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.expect("read events");
                events += chunk.len() as u64;
                black_box(&chunk);
            }
            assert_eq!(events, EVENTS, "every event read");
        });
    });

    group.bench_function("journal_recover", |b| {
        b.to_async(&rt).iter(|| async {
            let mut events = 0u64;
            let mut stream = std::pin::pin!(journal.recover());
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.expect("recover");
                events += chunk.iter().filter(|r| matches!(r, Recovered::Event(_))).count() as u64;
                black_box(&chunk);
            }
            assert_eq!(events, EVENTS, "every event recovered");
        });
    });

    group.bench_function("stage_open", |b| {
        b.to_async(&rt).iter(|| async {
            let config = RuntimeConfig::default().snapshot_every(0);
            let stage = StageRuntime::open(Blobs, journal.clone(), config).await.expect("open the stage");
            let recovery = black_box(stage.recovery());
            assert_eq!(recovery.events, EVENTS, "every event applied");
            stage.shutdown().await.expect("shut the stage down");
        });
    });

    group.finish();
    summary(started);
}

/// One line: each reader's events/s and its ratio to raw sled iteration.
fn summary(since: SystemTime) {
    let rate = |f: &str| shared::measured_mean(GROUP, f, since).map(|t| shared::per_second(EVENTS, t));
    let Some(raw) = rate("raw_sled_iter") else { return };
    let mut line = format!("replay summary ({EVENTS} events of {PAYLOAD_LEN} bytes): raw sled {}", shared::rate(raw));
    for f in ["journal_events", "journal_recover", "stage_open"] {
        if let Some(r) = rate(f) {
            line.push_str(&format!("; {f} {} ({:.2}x raw)", shared::rate(r), r / raw));
        }
    }
    if let Some(stage) = rate("stage_open") {
        let ok = stage >= 0.5 * raw && stage >= 1e6;
        line.push_str(if ok { "; target met" } else { "; TARGET MISSED (>= 0.5x raw and >= 1M/s)" });
    }
    println!("{line}");
}

criterion_group!(benches, replay);
criterion_main!(benches);
