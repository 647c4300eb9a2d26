//! The conformance suite every [`Journal`] backend runs, plus proptest strategies for model tests.
//!
//! ```no_run
//! # async fn demo() {
//! use eventstage_journal::{testkit, MemoryJournal};
//! testkit::conformance(|| async { MemoryJournal::new("t") }).await;
//! # }
//! ```

use crate::{
    Batch, CodecId, Envelope, EventQuery, EventRecord, Journal, Progress, Recovered, SeqNo, SnapshotRecord,
    SourcePosition,
};
use futures::{StreamExt, TryStreamExt};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::future::Future;

pub mod fuzz;

/// An event record with a raw payload.
pub fn event(key: &[u8], seq: u64, payload: &[u8], timestamp_ms: u64) -> EventRecord {
    EventRecord {
        key: key.to_vec(),
        seq: SeqNo(seq),
        envelope: Envelope::event(CodecId::RAW, 1, timestamp_ms, payload.to_vec()),
    }
}

/// A snapshot record with a raw payload.
pub fn snapshot(key: &[u8], seq: u64, payload: &[u8]) -> SnapshotRecord {
    SnapshotRecord {
        key: key.to_vec(),
        seq: SeqNo(seq),
        envelope: Envelope::snapshot(CodecId::RAW, 1, 0, payload.to_vec()),
    }
}

/// All events matching `query`, collected.
///
/// # Panics
/// On a journal error.
pub async fn collect_events<J: Journal>(journal: &J, query: EventQuery) -> Vec<EventRecord> {
    journal.events(query).try_concat().await.expect("events")
}

/// Everything [`Journal::recover`] yields, collected.
///
/// # Panics
/// On a journal error.
pub async fn collect_recovered<J: Journal>(journal: &J) -> Vec<Recovered> {
    journal.recover().try_concat().await.expect("recover")
}

/// Runs every conformance check; `make` returns a fresh, empty journal each call.
///
/// # Panics
/// When the backend breaks the contract.
pub async fn conformance<J: Journal, F: Future<Output = J>>(mut make: impl FnMut() -> F) {
    empty(&make().await).await;
    append_and_read(&make().await).await;
    sequence_conflicts_write_nothing(&make().await).await;
    snapshots_and_recovery(&make().await).await;
    positions(&make().await).await;
    meta(&make().await).await;
    long_histories_stream_in_chunks(&make().await).await;
}

async fn empty<J: Journal>(j: &J) {
    assert!(collect_events(j, EventQuery::all()).await.is_empty());
    assert!(collect_recovered(j).await.is_empty());
    assert_eq!(j.key_count().await.expect("key_count"), 0);
    assert!(j.positions().await.expect("positions").is_empty());
    let stats = j.stats().await.expect("stats");
    assert_eq!((stats.keys, stats.events, stats.batches), (0, 0, 0));
    assert!(j.verify(Progress::none()).await.expect("verify").is_ok());
}

async fn append_and_read<J: Journal>(j: &J) {
    let first = Batch {
        events: vec![event(b"b", 1, b"b1", 10), event(b"a", 1, b"a1", 10), event(b"a", 2, b"a2", 20)],
        ..Batch::default()
    };
    assert_eq!(j.append(first).await.expect("append").batch, 1);
    let second = Batch { events: vec![event(b"a", 3, b"a3", 30), event(b"b", 2, b"b2", 40)], ..Batch::default() };
    assert_eq!(j.append(second).await.expect("append").batch, 2);
    j.flush().await.expect("flush");
    let all: Vec<_> =
        collect_events(j, EventQuery::all()).await.into_iter().map(|e| (e.key, e.seq.0, e.envelope.payload)).collect();
    let expected = vec![
        (b"a".to_vec(), 1, b"a1".to_vec()),
        (b"a".to_vec(), 2, b"a2".to_vec()),
        (b"a".to_vec(), 3, b"a3".to_vec()),
        (b"b".to_vec(), 1, b"b1".to_vec()),
        (b"b".to_vec(), 2, b"b2".to_vec()),
    ];
    assert_eq!(all, expected, "events come in key order, then seq order");
    let a_from_2: Vec<u64> = collect_events(j, EventQuery { from_seq: SeqNo(2), ..EventQuery::key(b"a".to_vec()) })
        .await
        .iter()
        .map(|e| e.seq.0)
        .collect();
    assert_eq!(a_from_2, vec![2, 3]);
    let until: Vec<u64> = collect_events(j, EventQuery { until_seq: Some(SeqNo(2)), ..EventQuery::all() })
        .await
        .iter()
        .map(|e| e.seq.0)
        .collect();
    assert_eq!(until, vec![1, 2, 1, 2]);
    let by_time: Vec<u64> = collect_events(j, EventQuery { until_time_ms: Some(25), ..EventQuery::all() })
        .await
        .iter()
        .map(|e| e.seq.0)
        .collect();
    assert_eq!(by_time, vec![1, 2, 1]);
    assert!(collect_events(j, EventQuery::key(b"zz".to_vec())).await.is_empty());
    let stats = j.stats().await.expect("stats");
    assert_eq!((stats.keys, stats.events, stats.snapshots, stats.batches), (2, 5, 0, 2));
    assert_eq!((stats.first_event_ms, stats.last_event_ms), (Some(10), Some(40)));
    let report = j.verify(Progress::none()).await.expect("verify");
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!((report.events, report.keys), (5, 2));
}

async fn sequence_conflicts_write_nothing<J: Journal>(j: &J) {
    j.append(Batch { events: vec![event(b"k", 1, b"x", 1)], ..Batch::default() }).await.expect("append");
    for bad in [
        Batch { events: vec![event(b"other", 1, b"o", 1), event(b"k", 1, b"dup", 1)], ..Batch::default() },
        Batch { events: vec![event(b"other", 1, b"o", 1), event(b"k", 3, b"gap", 1)], ..Batch::default() },
        Batch { events: vec![event(b"new", 2, b"n", 1)], ..Batch::default() },
        Batch { snapshots: vec![snapshot(b"k", 2, b"ahead")], ..Batch::default() },
    ] {
        assert!(j.append(bad).await.is_err(), "a batch that breaks a key's sequence is refused");
    }
    let all = collect_events(j, EventQuery::all()).await;
    assert_eq!(all.len(), 1, "a refused batch writes nothing, not even its valid part");
    assert_eq!(
        j.append(Batch { events: vec![event(b"k", 2, b"y", 1)], ..Batch::default() }).await.expect("append").batch,
        2
    );
}

async fn snapshots_and_recovery<J: Journal>(j: &J) {
    let evs = (1..=5).map(|s| event(b"s", s, format!("e{s}").as_bytes(), s)).collect();
    j.append(Batch { events: evs, snapshots: vec![snapshot(b"s", 3, b"state@3")], ..Batch::default() })
        .await
        .expect("append");
    j.append(Batch { events: vec![event(b"t", 1, b"t1", 1)], ..Batch::default() }).await.expect("append");
    let rec = collect_recovered(j).await;
    let shape: Vec<(Vec<u8>, &str, u64)> = rec
        .iter()
        .map(|r| match r {
            Recovered::Snapshot(s) => (s.key.clone(), "snap", s.seq.0),
            Recovered::Event(e) => (e.key.clone(), "event", e.seq.0),
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            (b"s".to_vec(), "snap", 3),
            (b"s".to_vec(), "event", 4),
            (b"s".to_vec(), "event", 5),
            (b"t".to_vec(), "event", 1)
        ]
    );
    // A newer snapshot replaces the older one.
    j.append(Batch {
        events: vec![event(b"s", 6, b"e6", 6)],
        snapshots: vec![snapshot(b"s", 6, b"state@6")],
        ..Batch::default()
    })
    .await
    .expect("append");
    let rec = collect_recovered(j).await;
    assert!(matches!(&rec[0], Recovered::Snapshot(s) if s.seq.0 == 6 && s.envelope.payload == b"state@6"));
    assert_eq!(rec.iter().filter(|r| r.key() == b"s").count(), 1);
    // One key's part of recover, for the keys asked in the order asked; an unknown key yields nothing.
    j.append(Batch { events: vec![event(b"t", 2, b"t2", 2)], ..Batch::default() }).await.expect("append");
    let rec = collect_recovered(j).await;
    let part = |k: &[u8]| rec.iter().filter(|r| r.key() == k).cloned().collect::<Vec<_>>();
    let asked = j.recover_keys(vec![b"t".to_vec(), b"none".to_vec(), b"s".to_vec()]).try_concat().await;
    assert_eq!(asked.expect("recover_keys"), [part(b"t"), part(b"s")].concat());
    assert!(j.recover_keys(Vec::new()).try_concat().await.expect("recover_keys").is_empty());
    assert_eq!(j.key_count().await.expect("key_count"), 2);
    assert_eq!(j.stats().await.expect("stats").snapshots, 1);
    assert!(j.verify(Progress::none()).await.expect("verify").is_ok());
}

async fn positions<J: Journal>(j: &J) {
    let pos = |t: &str, p, o| SourcePosition { topic: t.into(), partition: p, next_offset: o };
    j.append(Batch { positions: vec![pos("in", 0, 10), pos("in", 1, 5)], ..Batch::default() }).await.expect("append");
    j.append(Batch { events: vec![event(b"x", 1, b"x", 1)], positions: vec![pos("in", 0, 11)], ..Batch::default() })
        .await
        .expect("append");
    assert_eq!(j.positions().await.expect("positions"), vec![pos("in", 0, 11), pos("in", 1, 5)]);
}

async fn meta<J: Journal>(j: &J) {
    assert_eq!(j.meta(b"outbox").await.expect("meta"), None);
    let put = |v: Option<&[u8]>| Batch { meta: vec![(b"outbox".to_vec(), v.map(<[u8]>::to_vec))], ..Batch::default() };
    j.append(put(Some(b"one"))).await.expect("append");
    j.append(put(Some(b"two"))).await.expect("append");
    assert_eq!(j.meta(b"outbox").await.expect("meta"), Some(b"two".to_vec()));
    j.append(put(None)).await.expect("append");
    assert_eq!(j.meta(b"outbox").await.expect("meta"), None);
    // A refused batch does not write its metadata either.
    let bad = Batch { events: vec![event(b"k", 5, b"gap", 1)], ..put(Some(b"three")) };
    assert!(j.append(bad).await.is_err());
    assert_eq!(j.meta(b"outbox").await.expect("meta"), None);
}

async fn long_histories_stream_in_chunks<J: Journal>(j: &J) {
    for chunk in 0..5u64 {
        let evs = (1..=1000).map(|i| event(b"long", chunk * 1000 + i, &i.to_le_bytes(), 1)).collect();
        j.append(Batch { events: evs, ..Batch::default() }).await.expect("append");
    }
    let chunks: Vec<usize> = j.events(EventQuery::all()).map(|c| c.expect("chunk").len()).collect().await;
    assert!(chunks.len() > 1 && chunks.iter().all(|&c| c <= 1024), "replay is chunked: {chunks:?}");
    assert_eq!(chunks.iter().sum::<usize>(), 5000);
    let seqs: Vec<u64> = collect_events(j, EventQuery::key(b"long".to_vec())).await.iter().map(|e| e.seq.0).collect();
    assert_eq!(seqs, (1..=5000).collect::<Vec<_>>());
}

/// One batch of a model test: events per key (count), snapshot wishes and a position.
#[derive(Debug, Clone)]
pub struct ModelBatch {
    /// `(key index, number of events)` pairs.
    pub writes: Vec<(u8, u8)>,
    /// Key indexes to snapshot at their last event in this batch.
    pub snapshot: Vec<u8>,
    /// Next offset of partition 0 of topic `in`.
    pub offset: i64,
}

/// Random batches over `keys` keys.
pub fn model_batches(keys: u8, max_batches: usize) -> impl Strategy<Value = Vec<ModelBatch>> {
    let batch =
        (proptest::collection::vec((0..keys, 1u8..4), 0..5), proptest::collection::vec(0..keys, 0..2), 0i64..1_000_000)
            .prop_map(|(writes, snapshot, offset)| ModelBatch { writes, snapshot, offset });
    proptest::collection::vec(batch, 0..max_batches)
}

/// The model: per key, the payloads of its events in order.
pub type Model = BTreeMap<Vec<u8>, Vec<Vec<u8>>>;

/// Turns model batches into journal batches, updating `model` as if each were committed.
pub fn to_batches(batches: &[ModelBatch], model: &mut Model) -> Vec<Batch> {
    batches
        .iter()
        .map(|mb| {
            let mut batch = Batch::default();
            for &(k, n) in &mb.writes {
                let key = vec![b'k', k];
                let history = model.entry(key.clone()).or_default();
                for _ in 0..n {
                    let seq = history.len() as u64 + 1;
                    let payload = format!("{k}:{seq}").into_bytes();
                    history.push(payload.clone());
                    batch.events.push(event(&key, seq, &payload, seq));
                }
            }
            for &k in &mb.snapshot {
                let key = vec![b'k', k];
                if let Some(history) = model.get(&key).filter(|h| !h.is_empty()) {
                    // The "state" of a key in the model is the concatenation of its payloads.
                    batch.snapshots.push(snapshot(&key, history.len() as u64, &history.concat()));
                }
            }
            batch.positions.push(SourcePosition { topic: "in".into(), partition: 0, next_offset: mb.offset });
            batch
        })
        .collect()
}

/// Rebuilds the model state (concatenated payloads per key) from [`Journal::recover`], the way a
/// stage would: start from the snapshot, fold the tail.
pub async fn fold_recovered<J: Journal>(j: &J) -> BTreeMap<Vec<u8>, Vec<u8>> {
    fold(collect_recovered(j).await)
}

/// [`fold_recovered`] of [`Journal::recover_keys`] for `keys`: the model state of those keys, each
/// read on its own, as a runtime that loads keys when first used reads them.
///
/// # Panics
/// On a journal error.
pub async fn fold_recovered_keys<J: Journal>(j: &J, keys: Vec<Vec<u8>>) -> BTreeMap<Vec<u8>, Vec<u8>> {
    fold(j.recover_keys(keys).try_concat().await.expect("recover_keys"))
}

fn fold(recovered: Vec<Recovered>) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for r in recovered {
        match r {
            Recovered::Snapshot(s) => {
                state.insert(s.key, s.envelope.payload);
            }
            Recovered::Event(e) => state.entry(e.key).or_default().extend_from_slice(&e.envelope.payload),
        }
    }
    state
}

/// The state the model says: concatenated payloads per key.
pub fn fold_model(model: &Model) -> BTreeMap<Vec<u8>, Vec<u8>> {
    model.iter().filter(|(_, h)| !h.is_empty()).map(|(k, h)| (k.clone(), h.concat())).collect()
}
