//! The sled backend: an embedded, durable journal store.
//!
//! A store is a directory:
//!
//! ```text
//! PATH/eventstage-journal.json   identifies the directory and its format version
//! PATH/sled/                     the sled database; one tree per journal, named `journal:<name>`
//! PATH/marks/<hex name>.mark     commit marks (see below)
//! ```
//!
//! Inside a journal's tree, storage keys start with a one-byte prefix followed by the
//! order-preserving key encoding of `keys.rs`:
//!
//! ```text
//! e | key | seq (u64 BE)      -> event envelope, or (grouped appends) an `Events` record of the
//!                                key's events up to this seq from the batch that wrote them
//! k | key                     -> last seq of the key (u64 BE)      (head index: recovery seeks per key)
//! s | key                     -> seq (u64 BE) | snapshot envelope   (latest snapshot only)
//! p | topic | partition       -> next offset (i64 BE)
//! m | "batch"                 -> number of committed batches (u64 BE)
//! m | "archive"               -> committed length of the history archive (u64 BE)
//! m | "archivable"            -> event records written since the last move to it (u64 BE)
//! ```
//!
//! Event records a key's snapshot covers move to the journal's history archive (see `archive.rs`),
//! in the background once the snapshot is written: sled then holds snapshots and the events after
//! them, and what it costs in memory and time to open follows the state, not the history.
//!
//! An append is one `Tree::apply_batch`, which sled applies atomically, also across crashes. The
//! batch counter travels in the same write; the commit mark file records it again after each flush,
//! so a store that lost batches (sled truncates a damaged log tail on recovery) is refused on open
//! with [`JournalError::MissingBatches`] instead of quietly replaying a shorter history.

mod archive;
mod read;
mod store;
mod verify;

use store::{storage_error, StoreInner};
pub use store::{SledStore, SledStoreBuilder, DEFAULT_ARCHIVE_AFTER, STORE_FORMAT_VERSION};

use crate::error::{JournalError, Result};
use crate::keys::{decode_key, encode_key_into, printable_key};
use crate::mark::MarkFile;
use crate::stream::{blocking_stream, Chunker};
use crate::types::{
    Batch, Committed, EventQuery, EventRecord, JournalStats, Progress, Recovered, SourcePosition, VerifyReport,
};
use crate::{Envelope, Journal, RecordKind};
use archive::Archive;
use futures::{Stream, StreamExt};
use read::Raw;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

const TREE_PREFIX: &str = "journal:";
const E: u8 = b'e';
const K: u8 = b'k';
const S: u8 = b's';
const P: u8 = b'p';
const X: u8 = b'x';
const BATCH_KEY: &[u8] = b"mbatch";
const ARCHIVE_KEY: &[u8] = b"marchive";
/// Event records written since the last move to the archive (u64 BE), so that the count survives
/// restarts that each write fewer than the threshold.
const ARCHIVABLE_KEY: &[u8] = b"marchivable";

/// A move to the archive writes (one fsync of the archive) after this many bytes of frames.
const ARCHIVE_STEP: usize = 4 << 20;

/// Records a move removes from sled per batch.
const REMOVALS_PER_BATCH: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

fn event_key(key: &[u8], seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 11);
    out.push(E);
    encode_key_into(key, &mut out);
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

fn prefixed_key(prefix: u8, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 3);
    out.push(prefix);
    encode_key_into(key, &mut out);
    out
}

fn position_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut out = prefixed_key(P, topic.as_bytes());
    out.extend_from_slice(&((partition as u32) ^ 0x8000_0000).to_be_bytes());
    out
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Splits an `e` storage key into entity key and seq.
fn parse_event_key(storage_key: &[u8]) -> Option<(Vec<u8>, u64)> {
    let (key, rest) = decode_key(storage_key.get(1..)?)?;
    Some((key, be_u64(rest)?))
}

fn parse_position(storage_key: &[u8], value: &[u8]) -> Option<SourcePosition> {
    let (topic, rest) = decode_key(storage_key.get(1..)?)?;
    let partition = (u32::from_be_bytes(rest.try_into().ok()?) ^ 0x8000_0000) as i32;
    Some(SourcePosition {
        topic: String::from_utf8(topic).ok()?,
        partition,
        next_offset: i64::from_be_bytes(value.try_into().ok()?),
    })
}

/// Events per grouped record at most: a long run of one key's events in a batch is split, so
/// that a replay chunk of records never stands for more than `stream::CHUNK` events.
const MAX_GROUP: usize = 256;

/// How many events a stored event record holds, read from its header without checking it (a
/// damaged record counts as one; decoding reports it).
fn group_len(value: &[u8]) -> usize {
    if value.get(3) != Some(&(RecordKind::Events as u8)) {
        return 1;
    }
    let at = crate::HEADER_LEN + 8;
    value.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(1, |b| u32::from_le_bytes(b) as usize)
}

/// The events of an `Events` record stored under `last`: (seq, envelope) in order.
fn decode_group(value: &[u8], last: u64) -> std::result::Result<Vec<(u64, Envelope)>, String> {
    let outer = Envelope::decode(value).map_err(|e| e.to_string())?;
    let p = &outer.payload;
    let first = p.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).ok_or("group header truncated")?;
    let count = p.get(8..12).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).ok_or("group header truncated")?;
    if count == 0 || first.checked_add(u64::from(count) - 1) != Some(last) {
        return Err(format!("a group of {count} events from seq {first} stored under seq {last}"));
    }
    let mut at = 12usize;
    // The count is read from the record: a damaged (or re-sealed) one may claim 2^32 events.
    let mut out = Vec::with_capacity((count as usize).min(MAX_GROUP));
    for i in 0..u64::from(count) {
        let len = p.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).ok_or("group truncated")?
            as usize;
        let bytes = p.get(at + 4..at + 4 + len).ok_or("group truncated")?;
        let env = Envelope::decode(bytes).map_err(|e| format!("event {}: {e}", first + i))?;
        if env.kind != RecordKind::Event {
            return Err(format!("event {} of the group is not an event record", first + i));
        }
        out.push((first + i, env));
        at += 4 + len;
    }
    if at != p.len() {
        return Err(format!("{} bytes after the group's events", p.len() - at));
    }
    Ok(out)
}

/// An `Events` record of `events` (consecutive seqs from `first`).
fn encode_group(first: u64, events: &[&EventRecord]) -> Vec<u8> {
    let len: usize = events.iter().map(|e| 4 + e.envelope.encoded_len()).sum();
    let mut payload = Vec::with_capacity(crate::HEADER_LEN + 12 + len);
    payload.resize(crate::HEADER_LEN, 0);
    payload.extend_from_slice(&first.to_le_bytes());
    payload.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        payload.extend_from_slice(&(e.envelope.encoded_len() as u32).to_le_bytes());
        e.envelope.encode_into(&mut payload);
    }
    let ts = events.last().map_or(0, |e| e.envelope.timestamp_ms);
    Envelope::seal(RecordKind::Events, crate::CodecId::RAW, 1, ts, payload)
}

/// A journal in a [`SledStore`]. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct SledJournal {
    inner: Arc<JournalInner>,
}

#[derive(Debug)]
struct JournalInner {
    name: String,
    store: Arc<StoreInner>,
    tree: sled::Tree,
    /// Serialises appends; holds the number of the last applied batch.
    write: Mutex<u64>,
    applied: AtomicU64,
    durable: AtomicU64,
    mark: Mutex<MarkFile>,
    /// The commit mark as found on open.
    marked: u64,
    /// The journal held batches but no commit mark on open.
    mark_missing: bool,
    /// The history archive. Scans hold it for reading; a move to it holds it for writing, so no
    /// scan sees a record both in sled and in the archive, or in neither.
    archive: RwLock<Archive>,
    /// Keys whose snapshot advanced since their history was last moved (when the store archives).
    to_archive: Mutex<HashSet<Vec<u8>>>,
    /// Event records written since the last move (an estimate of what sled holds beyond state).
    unarchived: AtomicU64,
    /// Whether this process moved the history of every key once (keys snapshotted before it
    /// started are not in `to_archive`).
    swept: std::sync::atomic::AtomicBool,
    /// The batch counter at the archiver's previous look (unchanged: the journal is idle).
    archiver_seen: AtomicU64,
}

impl Drop for JournalInner {
    fn drop(&mut self) {
        if let Err(e) = self.flush_blocking() {
            tracing::error!(journal = %self.name, error = %e, "final flush failed");
        }
    }
}

impl SledJournal {
    /// Opens (or creates) the store at `path` and the journal `name` in it.
    ///
    /// # Errors
    /// See [`SledStoreBuilder::open`] and [`SledStore::journal`].
    pub fn open(path: impl Into<PathBuf>, name: &str) -> Result<Self> {
        SledStore::open(path)?.journal(name)
    }

    /// The store this journal lives in.
    pub fn store(&self) -> SledStore {
        SledStore { inner: self.inner.store.clone() }
    }

    /// [`Journal::append`], storing each key's events of the batch as one record (of kind
    /// [`RecordKind::Events`], under the key's last seq) instead of one record per event: a flow's
    /// transaction writes one sled value per key it changed, not one per event. Readers see the
    /// same events either way; `verify` checks a group's events one by one.
    ///
    /// # Errors
    /// As [`Journal::append`].
    pub async fn append_grouped(&self, batch: Batch) -> Result<Committed> {
        self.spawn(move |j| {
            j.store.require_version(2)?;
            j.append_blocking(batch, true)
        })
        .await
    }

    /// Moves the event records every snapshot covers into the journal's history archive now (a
    /// store with [`SledStoreBuilder::archive_history`] does this in the background as snapshots
    /// are written; this also moves what a store written without it holds). Returns how many
    /// records moved. Reads see the same events before and after; `recover` reads less.
    ///
    /// # Errors
    /// When sled or the archive file cannot be read or written; nothing is lost either way.
    pub async fn archive_history(&self) -> Result<u64> {
        self.spawn(|j| j.archive_all(&|| false)).await
    }

    /// The sled tree holding this journal, for benchmarks comparing against raw sled iteration.
    pub fn sled_tree(&self) -> &sled::Tree {
        &self.inner.tree
    }

    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&JournalInner) -> Result<T> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            let name = inner.name.clone();
            tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|_| JournalError::Closed(name))?
        }
    }
}

impl JournalInner {
    fn storage(&self, e: sled::Error) -> JournalError {
        storage_error(&self.store.path, e)
    }

    fn damaged(&self, what: impl Into<String>) -> JournalError {
        JournalError::Damaged { journal: self.name.clone(), what: what.into() }
    }

    fn last_seq(&self, key: &[u8]) -> Result<u64> {
        match self.tree.get(prefixed_key(K, key)).map_err(|e| self.storage(e))? {
            None => Ok(0),
            Some(v) => be_u64(&v)
                .ok_or_else(|| self.damaged(format!("head index of key {} is not 8 bytes", printable_key(key)))),
        }
    }

    fn append_blocking(&self, batch: Batch, grouped: bool) -> Result<Committed> {
        let mut last_batch = lock(&self.write);
        let mut next: HashMap<&[u8], u64> = HashMap::new();
        let mut writes = sled::Batch::default();
        let mut buf = Vec::new();
        // Grouped: each key's events of the batch, written as one record once checked.
        let mut groups: HashMap<&[u8], Vec<&EventRecord>> = HashMap::new();
        let mut writes_of_events = 0usize;
        for ev in &batch.events {
            let expected = match next.get_mut(ev.key.as_slice()) {
                Some(n) => n,
                None => next.entry(&ev.key).or_insert(self.last_seq(&ev.key)? + 1),
            };
            if ev.seq.0 != *expected {
                return Err(JournalError::SequenceConflict {
                    journal: self.name.clone(),
                    key: printable_key(&ev.key),
                    expected: *expected,
                    found: ev.seq.0,
                });
            }
            *expected += 1;
            if grouped {
                groups.entry(&ev.key).or_default().push(ev);
                continue;
            }
            buf.clear();
            ev.envelope.encode_into(&mut buf);
            writes.insert(event_key(&ev.key, ev.seq.0), buf.as_slice());
            writes_of_events += 1;
        }
        for (key, events) in groups {
            for run in events.chunks(MAX_GROUP) {
                let (Some(first), Some(last)) = (run.first(), run.last()) else { continue };
                let value = if run.len() == 1 { first.envelope.encode() } else { encode_group(first.seq.0, run) };
                writes.insert(event_key(key, last.seq.0), value);
                writes_of_events += 1;
            }
        }
        for snap in &batch.snapshots {
            let last = match next.get(snap.key.as_slice()) {
                Some(n) => n - 1,
                None => self.last_seq(&snap.key)?,
            };
            if snap.seq.0 > last || snap.seq.0 == 0 {
                return Err(JournalError::SequenceConflict {
                    journal: self.name.clone(),
                    key: printable_key(&snap.key),
                    expected: last,
                    found: snap.seq.0,
                });
            }
            let mut value = Vec::with_capacity(8 + snap.envelope.encoded_len());
            value.extend_from_slice(&snap.seq.0.to_be_bytes());
            snap.envelope.encode_into(&mut value);
            writes.insert(prefixed_key(S, &snap.key), value);
        }
        if self.store.archive_history.is_some() {
            if !batch.snapshots.is_empty() {
                lock(&self.to_archive).extend(batch.snapshots.iter().map(|s| s.key.clone()));
            }
            let records = writes_of_events as u64;
            let unarchived = self.unarchived.fetch_add(records, Ordering::AcqRel) + records;
            writes.insert(ARCHIVABLE_KEY, &unarchived.to_be_bytes());
        }
        for (key, n) in &next {
            writes.insert(prefixed_key(K, key), &(n - 1).to_be_bytes());
        }
        for p in &batch.positions {
            writes.insert(position_key(&p.topic, p.partition), &p.next_offset.to_be_bytes());
        }
        for (k, v) in &batch.meta {
            let key = prefixed_key(X, k);
            match v {
                Some(v) => writes.insert(key, v.as_slice()),
                None => writes.remove(key),
            }
        }
        let number = *last_batch + 1;
        writes.insert(BATCH_KEY, &number.to_be_bytes());
        self.tree.apply_batch(writes).map_err(|e| self.storage(e))?;
        *last_batch = number;
        self.applied.store(number, Ordering::Release);
        Ok(Committed { batch: number })
    }

    fn flush_blocking(&self) -> Result<()> {
        let applied = self.applied.load(Ordering::Acquire);
        if applied <= self.durable.load(Ordering::Acquire) {
            return Ok(());
        }
        self.tree.flush().map_err(|e| self.storage(e))?;
        let mut mark = lock(&self.mark);
        if applied > mark.last {
            mark.write(applied)?;
        }
        self.durable.fetch_max(applied, Ordering::AcqRel);
        Ok(())
    }
}

impl Journal for SledJournal {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn append(&self, batch: Batch) -> impl std::future::Future<Output = Result<Committed>> + Send {
        self.spawn(move |j| j.append_blocking(batch, false))
    }

    fn flush(&self) -> impl std::future::Future<Output = Result<()>> + Send {
        self.spawn(JournalInner::flush_blocking)
    }

    fn events(&self, query: EventQuery) -> impl Stream<Item = Result<Vec<EventRecord>>> + Send + 'static {
        let (inner, reader) = (self.inner.clone(), self.inner.clone());
        let producer_query = query.clone();
        // Per key, once an event is past the query's end, the rest of that key is skipped (a set:
        // the archive's keys interleave).
        let mut past: HashSet<Vec<u8>> = HashSet::new();
        blocking_stream(4, move |tx| {
            let mut out = Chunker::new(tx);
            match inner.events_blocking(&producer_query, &mut out) {
                Ok(()) => out.finish(),
                Err(e) => out.fail(e),
            }
        })
        .map(move |chunk: Result<Vec<Raw>>| {
            let mut events = Vec::new();
            for raw in chunk? {
                let Raw::Event(k, v, from) = raw else { continue };
                for ev in reader.decode_events(&k, &v, from)? {
                    if ev.seq < query.from_seq || past.contains(&ev.key) {
                        continue;
                    }
                    if query.is_past(ev.seq, ev.envelope.timestamp_ms) {
                        past.insert(ev.key);
                        continue;
                    }
                    events.push(ev);
                }
            }
            Ok(events)
        })
    }

    fn recover(&self) -> impl Stream<Item = Result<Vec<Recovered>>> + Send + 'static {
        self.recovered(JournalInner::recover_blocking)
    }

    fn recover_keys(&self, keys: Vec<Vec<u8>>) -> impl Stream<Item = Result<Vec<Recovered>>> + Send + 'static {
        self.recovered(move |j, out| j.recover_keys_blocking(keys, out))
    }

    fn key_count(&self) -> impl std::future::Future<Output = Result<u64>> + Send {
        self.spawn(JournalInner::key_count_blocking)
    }

    fn positions(&self) -> impl std::future::Future<Output = Result<Vec<SourcePosition>>> + Send {
        self.spawn(JournalInner::positions_blocking)
    }

    fn meta(&self, key: &[u8]) -> impl std::future::Future<Output = Result<Option<Vec<u8>>>> + Send {
        let key = prefixed_key(X, key);
        self.spawn(move |j| Ok(j.tree.get(&key).map_err(|e| j.storage(e))?.map(|v| v.to_vec())))
    }

    fn stats(&self) -> impl std::future::Future<Output = Result<JournalStats>> + Send {
        self.spawn(JournalInner::stats_blocking)
    }

    fn verify(&self, progress: Progress) -> impl std::future::Future<Output = Result<VerifyReport>> + Send {
        self.spawn(move |j| j.verify_blocking(&progress))
    }
}
