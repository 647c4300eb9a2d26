//! An in-memory journal for tests and examples. Not durable; same semantics as the durable backends.

use crate::error::{JournalError, Result};
use crate::keys::printable_key;
use crate::types::{
    Batch, Committed, EventQuery, EventRecord, JournalStats, Problem, Progress, Recovered, SeqNo, SnapshotRecord,
    SourcePosition, VerifyReport,
};
use crate::{Envelope, Journal};
use futures::Stream;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// An in-memory [`Journal`]. Clones share the same contents.
#[derive(Debug, Clone)]
pub struct MemoryJournal {
    name: Arc<str>,
    // A std Mutex: every critical section is short and never awaits.
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    events: BTreeMap<Vec<u8>, Vec<(Envelope, u64)>>,
    snapshots: BTreeMap<Vec<u8>, SnapshotRecord>,
    positions: BTreeMap<(String, i32), i64>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
    batches: u64,
}

impl MemoryJournal {
    /// An empty journal.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: Arc::from(name.into()), inner: Arc::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner half-updated: append validates first and
        // mutates after, with no fallible step in between.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn last_seq(&self, key: &[u8]) -> u64 {
        self.events.get(key).map_or(0, |v| v.len() as u64)
    }

    /// `key`'s latest snapshot, then its events after it.
    fn recover_key(&self, key: &[u8], events: &[(Envelope, u64)], out: &mut Vec<Recovered>) {
        let mut from = 1;
        if let Some(snap) = self.snapshots.get(key) {
            from = snap.seq.0 + 1;
            out.push(Recovered::Snapshot(snap.clone()));
        }
        for (envelope, seq) in events.iter().filter(|(_, s)| *s >= from) {
            out.push(Recovered::Event(EventRecord { key: key.to_vec(), seq: SeqNo(*seq), envelope: envelope.clone() }));
        }
    }
}

fn chunks<T: Send + 'static>(items: Vec<T>) -> impl Stream<Item = Result<Vec<T>>> + Send + 'static {
    let mut out = Vec::new();
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        out.push(Ok(it.by_ref().take(crate::stream::CHUNK).collect()));
    }
    futures::stream::iter(out)
}

impl Journal for MemoryJournal {
    fn name(&self) -> &str {
        &self.name
    }

    async fn append(&self, batch: Batch) -> Result<Committed> {
        let mut inner = self.lock();
        let mut next: BTreeMap<&[u8], u64> = BTreeMap::new();
        for ev in &batch.events {
            let expected = next.entry(&ev.key).or_insert_with(|| inner.last_seq(&ev.key) + 1);
            if ev.seq.0 != *expected {
                return Err(JournalError::SequenceConflict {
                    journal: self.name.to_string(),
                    key: printable_key(&ev.key),
                    expected: *expected,
                    found: ev.seq.0,
                });
            }
            *expected += 1;
        }
        for snap in &batch.snapshots {
            let last = next.get(snap.key.as_slice()).map_or_else(|| inner.last_seq(&snap.key), |n| n - 1);
            if snap.seq.0 > last || snap.seq.0 == 0 {
                return Err(JournalError::SequenceConflict {
                    journal: self.name.to_string(),
                    key: printable_key(&snap.key),
                    expected: last,
                    found: snap.seq.0,
                });
            }
        }
        for ev in batch.events {
            inner.events.entry(ev.key).or_default().push((ev.envelope, ev.seq.0));
        }
        for snap in batch.snapshots {
            inner.snapshots.insert(snap.key.clone(), snap);
        }
        for p in batch.positions {
            inner.positions.insert((p.topic, p.partition), p.next_offset);
        }
        for (k, v) in batch.meta {
            match v {
                Some(v) => inner.meta.insert(k, v),
                None => inner.meta.remove(&k),
            };
        }
        inner.batches += 1;
        Ok(Committed { batch: inner.batches })
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn events(&self, query: EventQuery) -> impl Stream<Item = Result<Vec<EventRecord>>> + Send + 'static {
        let inner = self.lock();
        let mut out = Vec::new();
        let keys: Vec<&Vec<u8>> = match &query.key {
            Some(k) => inner.events.get_key_value(k).map(|(k, _)| k).into_iter().collect(),
            None => inner.events.keys().collect(),
        };
        for key in keys {
            for (envelope, seq) in &inner.events[key] {
                let seq = SeqNo(*seq);
                if seq < query.from_seq {
                    continue;
                }
                if query.is_past(seq, envelope.timestamp_ms) {
                    break;
                }
                out.push(EventRecord { key: key.clone(), seq, envelope: envelope.clone() });
            }
        }
        chunks(out)
    }

    fn recover(&self) -> impl Stream<Item = Result<Vec<Recovered>>> + Send + 'static {
        let inner = self.lock();
        let mut out = Vec::new();
        for (key, events) in &inner.events {
            inner.recover_key(key, events, &mut out);
        }
        chunks(out)
    }

    fn recover_keys(&self, keys: Vec<Vec<u8>>) -> impl Stream<Item = Result<Vec<Recovered>>> + Send + 'static {
        let inner = self.lock();
        let mut out = Vec::new();
        for key in &keys {
            if let Some(events) = inner.events.get(key) {
                inner.recover_key(key, events, &mut out);
            }
        }
        chunks(out)
    }

    async fn key_count(&self) -> Result<u64> {
        Ok(self.lock().events.len() as u64)
    }

    async fn positions(&self) -> Result<Vec<SourcePosition>> {
        let inner = self.lock();
        Ok(inner
            .positions
            .iter()
            .map(|((topic, partition), off)| SourcePosition {
                topic: topic.clone(),
                partition: *partition,
                next_offset: *off,
            })
            .collect())
    }

    async fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().meta.get(key).cloned())
    }

    async fn stats(&self) -> Result<JournalStats> {
        let positions = self.positions().await?;
        let inner = self.lock();
        let all = inner.events.values().flatten().map(|(e, _)| e);
        let mut stats = JournalStats {
            name: self.name.to_string(),
            keys: inner.events.len() as u64,
            snapshots: inner.snapshots.len() as u64,
            batches: inner.batches,
            positions,
            ..JournalStats::default()
        };
        for e in all {
            stats.events += 1;
            stats.bytes += e.encoded_len() as u64;
            stats.first_event_ms = Some(stats.first_event_ms.map_or(e.timestamp_ms, |t| t.min(e.timestamp_ms)));
            stats.last_event_ms = Some(stats.last_event_ms.map_or(e.timestamp_ms, |t| t.max(e.timestamp_ms)));
        }
        stats.bytes += inner.snapshots.values().map(|s| s.envelope.encoded_len() as u64).sum::<u64>();
        Ok(stats)
    }

    async fn verify(&self, progress: Progress) -> Result<VerifyReport> {
        let inner = self.lock();
        let mut report = VerifyReport { name: self.name.to_string(), ..VerifyReport::default() };
        for (key, events) in &inner.events {
            report.keys += 1;
            for (i, (_, seq)) in events.iter().enumerate() {
                report.events += 1;
                if *seq != i as u64 + 1 {
                    report.problems.push(Problem::at(key, Some(*seq), format!("expected seq {}", i + 1)));
                }
            }
        }
        report.snapshots = inner.snapshots.len() as u64;
        for (key, snap) in &inner.snapshots {
            if snap.seq.0 > inner.last_seq(key) {
                report.problems.push(Problem::at(key, Some(snap.seq.0), "snapshot is ahead of the key's events"));
            }
        }
        report.records = report.events + report.snapshots;
        progress.report(report.records);
        if inner.events.is_empty() && !inner.snapshots.is_empty() {
            report.problems.push(Problem::general("snapshots without events"));
        }
        Ok(report)
    }
}
