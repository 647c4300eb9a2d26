//! The Kafka journal as a flow's storage: a compacted topic with one record per key and
//! transaction (a tombstone when the entity is deleted), written at commit like Kafka Streams'
//! record cache in front of a changelog; with a local state store, partitions restore from its
//! checkpoint and read only the journal's tail, and keys are read from the store when first used.

mod checkpoint;

pub use checkpoint::Standby;
pub(crate) use checkpoint::{StoreMemory, StoreSettings};

use super::cache::{self, CacheSettings, Committed, StoreProgress};
use super::state::{KeyMap, PartitionState};
use super::storage::{encode_events, encode_state, Change, Durable, Recorded, RestoreJob, Restored};
use super::storage::{Sealed, Storage, TaskStore, Write};
use crate::codec::Codec;
use crate::error::Error;
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::replay::{decode_state, Entity};
use crate::stage::{EntityKey, EventSourced};
use checkpoint::{read_row, Checkpoints, JournalRecord, Rows};
use eventstage_journal::{printable_key, Envelope, JournalEntry, KafkaJournal, SeqNo, SourcePosition};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A restore that reads nothing for this long fails.
const RESTORE_STALL: Duration = Duration::from_secs(60);

/// With a state cache, a restore whose journal tail would take more of the cache than this
/// (records times [`RESTORED_RECORD_BYTES`]) goes through the local store: see
/// [`Shared::restore_through_store`].
const RESTORED_RECORD_BYTES: u64 = 128;

/// How long the follower may write nothing of a tail it is restoring through the store before
/// the rest is read into memory instead.
const STORE_RESTORE_STALL: Duration = Duration::from_secs(10);

/// A key's journal record is made before the commit once it holds this many events (bounds the
/// record size for a key that takes thousands of commands in one commit interval).
const MAX_EVENTS_PER_JOURNAL_RECORD: usize = 1000;

/// Per partition, what a restore read: the newest journal entry per key (`None`: deleted), the
/// local store's rows if any, and the offset after the last journal record read.
type Latest = BTreeMap<i32, Read>;

#[derive(Default)]
struct Read {
    entries: BTreeMap<Vec<u8>, Option<JournalEntry>>,
    rows: Option<Rows>,
    /// Where the journal was read from (the local store's checkpoint, or 0).
    from: i64,
    end: i64,
}

impl Read {
    /// Where the records written after this restore start: everything before was read.
    fn read_up_to(&self) -> i64 {
        self.from.max(self.end)
    }
}

/// What a task's open transaction or batch has not journaled yet.
struct Unjournaled<S: EventSourced> {
    /// Per key, the events not yet in a journal record: a key's record is written once per
    /// transaction (at commit, with its state then), so a hot key costs one journal record per
    /// commit interval, not one per command.
    events: KeyMap<S::Key, Vec<Envelope>>,
    /// Records made before the commit, written before the per-key records, in the order they
    /// were made: deletions (tombstones; at-least-once, markers that keep the input positions)
    /// and the full records of hot keys. Nothing is produced before the seal: while a
    /// transaction commits, the next one's records must wait.
    ordered: Vec<JournalRecord>,
}

impl<S: EventSourced> Default for Unjournaled<S> {
    fn default() -> Self {
        Self { events: KeyMap::default(), ordered: Vec::new() }
    }
}

/// What the Kafka storage's tasks share: the journal, the local state store over it, and how
/// records are made.
struct Shared {
    journal: KafkaJournal,
    /// The local state store over the journal, if the flow has one.
    checkpoints: Option<Checkpoints>,
    codec: Codec,
    at_least_once: bool,
    metrics: Arc<Metrics>,
    /// The state cache, if the flow has one (it has a local store then).
    cache: Option<CacheSettings>,
    /// Exactly once with a local store: the flow hands the store the journal records of each
    /// transaction it commits (the follower does not read them back from the broker), stamped
    /// with how far the partition's records were acknowledged then.
    direct: Option<Arc<StoreProgress>>,
}

/// The Kafka journal (see the module documentation); each task's store is a [`KafkaTask`].
pub(super) struct KafkaStorage {
    shared: Arc<Shared>,
}

impl KafkaStorage {
    /// The storage over `journal`, with the local state store of `store` (its follower reads the
    /// journal with the `common` client settings; `progress` learns how far the journal's records
    /// were acknowledged) and the state cache over it, if any.
    pub(super) fn open(
        journal: KafkaJournal,
        store: Option<(&StoreSettings, Arc<StoreProgress>, Option<CacheSettings>)>,
        common: &ClientConfig,
        stage: &str,
        codec: Codec,
        at_least_once: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FlowError> {
        let (checkpoints, cache, direct) = match store {
            Some((store, progress, cache)) => {
                let direct = (!at_least_once).then_some(progress.clone());
                let handed_over = direct.is_some();
                let checkpoints =
                    Checkpoints::start(store, &journal, common, stage, metrics.clone(), progress, handed_over)?;
                (Some(checkpoints), cache, direct)
            }
            None => (None, None, None),
        };
        let shared = Shared { journal, checkpoints, codec, at_least_once, metrics, cache, direct };
        Ok(Self { shared: Arc::new(shared) })
    }
}

impl Shared {
    /// The newest journal entry per key (`None`: deleted) of each partition of `wanted` and, if
    /// the flow has a local store and `use_store`, its rows of the partition: the journal's
    /// records after the store's checkpoint (or all of them), read by one consumer for all
    /// partitions in parallel.
    fn latest_entries(&self, wanted: &[i32], use_store: bool) -> Result<Latest, FlowError> {
        let mut latest: Latest = wanted.iter().map(|&p| (p, Read::default())).collect();
        let mut from: Vec<(i32, i64)> = wanted.iter().map(|&p| (p, 0)).collect();
        if let (Some(checkpoints), false, true) = (&self.checkpoints, wanted.is_empty(), use_store) {
            let marks = self.journal.watermarks(wanted)?;
            for (p, start) in &mut from {
                let loaded = checkpoints.load(*p, marks.get(p).copied().unwrap_or_default())?;
                *start = loaded.from;
                let from = loaded.from;
                // With a state cache, evicted keys are read from the rows even when the store had
                // none of the partition's yet (the follower writes them behind the flow).
                let rows = match (loaded.rows, &self.cache) {
                    (None, Some(_)) => Some(checkpoints.rows(*p)?),
                    (rows, _) => rows,
                };
                latest.insert(*p, Read { rows, from, ..Read::default() });
            }
            if let Some(cache) = &self.cache {
                self.restore_through_store(checkpoints, cache, &marks, &mut from);
            }
        }
        let stats = self.journal.restore_partitions_from(&from, RESTORE_STALL, |p, offset, key, entry| {
            let read = latest.entry(p).or_default();
            read.entries.insert(key.to_vec(), entry);
            read.end = read.end.max(offset + 1);
        })?;
        self.metrics.restored_records.fetch_add(stats.records, Ordering::Relaxed);
        if !wanted.is_empty() {
            tracing::info!(partitions = ?wanted, journal_records = stats.records, elapsed_ms = stats.elapsed.as_millis() as u64, "read the journal");
        }
        Ok(latest)
    }

    /// The local store keeps partition `p` current from now on (restored: its journal was read up
    /// to `read_up_to`): exactly once, with the rows of what the flow commits; else by reading the
    /// journal.
    fn keep_current(&self, p: i32, read_up_to: i64) {
        match (&self.checkpoints, &self.direct) {
            (Some(checkpoints), Some(_)) => checkpoints.own(p, read_up_to),
            (Some(checkpoints), None) => checkpoints.follow(p),
            (None, _) => {}
        }
    }

    /// With a state cache, a journal tail larger than the cache could hold (a first start on an
    /// empty store, a takeover without standbys, a store far behind) is not read into memory:
    /// the local store's follower writes it to the store first, and only what it has not written
    /// when it reaches the end (or stops making progress) is read into memory. Kafka Streams
    /// restores into its stores the same way. The tail's keys are then read from the store when
    /// used, as every evicted key is; memory holds the budget during a restore too.
    fn restore_through_store(
        &self,
        checkpoints: &Checkpoints,
        cache: &CacheSettings,
        marks: &BTreeMap<i32, (i64, i64)>,
        from: &mut [(i32, i64)],
    ) {
        let fits = cache.budget / (from.len() as u64).max(1) / RESTORED_RECORD_BYTES;
        let large: Vec<(i32, i64)> = from
            .iter()
            .filter_map(|&(p, start)| {
                let high = marks.get(&p).map_or(0, |m| m.1);
                (u64::try_from(high - start).unwrap_or(0) > fits).then_some((p, high))
            })
            .collect();
        if large.is_empty() {
            return;
        }
        let partitions: Vec<i32> = large.iter().map(|&(p, _)| p).collect();
        let written = || partitions.iter().map(|&p| cache.progress.written(p)).sum::<i64>();
        let started = std::time::Instant::now();
        partitions.iter().for_each(|&p| checkpoints.restore(p));
        // The follower's progress, and when it last moved.
        let mut moved = (written(), started);
        while !large.iter().all(|&(p, high)| cache.progress.written(p) >= high) {
            let now = written();
            if now > moved.0 {
                moved = (now, std::time::Instant::now());
            } else if moved.1.elapsed() > STORE_RESTORE_STALL {
                tracing::warn!(?partitions, "the local store's follower wrote nothing of the restored journal tail for 10 s; reading the rest into memory");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for (p, start) in from.iter_mut().filter(|(p, _)| partitions.contains(p)) {
            *start = (*start).max(cache.progress.written(*p));
        }
        tracing::info!(
            ?partitions,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restored through the local store (the journal tail was larger than the state cache)"
        );
    }
}

impl<S: EventSourced> Storage<S> for KafkaStorage {
    fn name(&self) -> String {
        let store = if self.shared.checkpoints.is_some() { " (with a local state store)" } else { "" };
        format!("kafka:{}{store}", self.shared.journal.topic())
    }

    /// Reads the partitions' journal (after their checkpoint, with a local store) with one
    /// consumer, in parallel.
    fn restore(&mut self, wanted: &[i32]) -> RestoreJob<S> {
        let (shared, wanted) = (self.shared.clone(), wanted.to_vec());
        Box::new(move || {
            let mut restored = Vec::new();
            let mut read_up_to = Vec::new();
            for (p, read) in shared.latest_entries(&wanted, true)? {
                let rows = read.rows.clone();
                read_up_to.push((p, read.read_up_to()));
                let state = shared.restore_entries::<S>(p, read)?;
                let (open, committing) = (Unjournaled::default(), None);
                let store =
                    KafkaTask::<S> { p, shared: shared.clone(), open, committing, rows, last_ts: 0, rebuilt: false };
                restored.push((p, Restored { state, store: Box::new(store), applied: None }));
            }
            read_up_to.into_iter().for_each(|(p, up_to)| shared.keep_current(p, up_to));
            Ok(restored)
        })
    }

    /// The journal records are part of the transaction or batch: nothing to wait for.
    fn durable(&mut self) -> Result<Durable, FlowError> {
        Ok(Box::new(|| Ok(())))
    }

    fn release(&mut self, p: i32) {
        if let Some(checkpoints) = &self.shared.checkpoints {
            checkpoints.release(p);
        }
    }

    /// The local store reads the journal up to what this instance committed last.
    fn close(&mut self) {
        if let Some(checkpoints) = &self.shared.checkpoints {
            checkpoints.close();
        }
    }
}

/// A task's part of the Kafka journal: its partition's records not written yet, and its local
/// store rows.
struct KafkaTask<S: EventSourced> {
    /// The journal partition (the task's input partition).
    p: i32,
    shared: Arc<Shared>,
    open: Unjournaled<S>,
    /// The journal records of the transaction being committed, for the local store once it
    /// committed (see [`Shared::direct`]).
    committing: Option<Arc<Vec<JournalRecord>>>,
    /// The local store's rows of the partition: a key's state is read from there when first used.
    rows: Option<Rows>,
    /// The journal's timestamp of the last change (snapshots in records are stamped with it).
    last_ts: u64,
    /// The committed state was rebuilt from the journal since the view last took it.
    rebuilt: bool,
}

impl<S: EventSourced> KafkaTask<S> {
    /// A journal record's value: the key's `events`, its state after them (at `seq`) and the input
    /// positions that state includes.
    fn journal_value(
        &self,
        key: &S::Key,
        events: Vec<Envelope>,
        seq: SeqNo,
        state: &S::State,
        sources: Vec<SourcePosition>,
    ) -> Result<Vec<u8>, FlowError> {
        let codec = self.shared.codec;
        let snapshot =
            Envelope::snapshot(codec.id(), S::STATE_VERSION, self.last_ts, encode_state::<S>(codec, key, state)?);
        Ok(JournalEntry { last_seq: seq, events, state: Some(snapshot), sources }.encode())
    }

    /// The input positions `key`'s state includes, for its journal record: at least once (a
    /// redelivered input below them is skipped); exactly-once records leave them to the
    /// transaction, which commits the offsets with the record.
    fn sources(&self, part: &PartitionState<S>, key: &S::Key) -> Vec<SourcePosition> {
        match self.shared.at_least_once {
            true => part.applied.get(key).cloned().unwrap_or_default(),
            false => Vec::new(),
        }
    }

    /// The open transaction's or batch's journal records: those made before (deletions, hot keys'
    /// records) in order, then one record per key it changed, with its state now and its
    /// [`sources`](Self::sources).
    fn journal_records(&mut self, part: &PartitionState<S>) -> Result<Vec<JournalRecord>, FlowError> {
        let open = std::mem::take(&mut self.open);
        let mut records = open.ordered;
        records.reserve(open.events.len());
        for (key, events) in open.events {
            let Some(entity) = part.overlay.get(&key) else { continue };
            let value = self.journal_value(&key, events, entity.seq, &entity.state, self.sources(part, &key))?;
            records.push((key.to_bytes().into_owned(), Some(value)));
        }
        Ok(records)
    }

    /// Drops the partition's local store (`why` it cannot be used) and restores the partition's
    /// committed state from the journal in full, keeping the open transaction's changes.
    fn restore_in_full(&mut self, part: &mut PartitionState<S>, why: &str) -> Result<(), FlowError> {
        let p = self.p;
        if let Some(checkpoints) = &self.shared.checkpoints {
            checkpoints.drop_partition(p, why);
        }
        self.rows = None;
        self.rebuilt = true;
        let read = self.shared.latest_entries(&[p], false)?.remove(&p).unwrap_or_default();
        let read_up_to = read.read_up_to();
        if let (Some(checkpoints), Some(_)) = (&self.shared.checkpoints, &self.shared.cache) {
            // The partition's new, empty rows: every key restored stays in memory until the
            // follower wrote it there again.
            self.rows = Some(checkpoints.rows(p)?);
        }
        let mut restored = self.shared.restore_entries::<S>(p, read)?;
        for (key, sources) in std::mem::take(&mut part.applied) {
            if part.overlay.contains_key(&key) || part.sealed.contains_key(&key) {
                restored.applied.insert(key, sources);
            }
        }
        // The partition keeps its share of the cache's budget.
        if let Some(share) = part.committed.budget() {
            restored.committed.set_budget(share);
        }
        part.committed = restored.committed;
        part.applied = restored.applied;
        // A transaction committing meanwhile hands its rows over once it committed: the store
        // takes them after what was read here (again, if the read included them).
        self.shared.keep_current(p, read_up_to);
        Ok(())
    }
}

/// Reads a partition's rows from the local store for queries, on their threads (fjall's handles
/// are shared safely).
struct RowReader {
    rows: Rows,
}

impl<S: EventSourced> crate::flow::view::StoreRead<S> for RowReader {
    fn get(&self, key: &[u8]) -> Result<Option<Entity<S>>, String> {
        match self.rows.get(key).map_err(|e| format!("the local store: {e}"))? {
            None => Ok(None),
            Some(v) => row_entity::<S>(key, &v),
        }
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::flow::view::StoredRows<S>, String> {
        let mut out = Vec::new();
        for item in self.rows.prefix(prefix) {
            let (k, v) = item.into_inner().map_err(|e| format!("the local store: {e}"))?;
            if after.is_some_and(|a| k.as_ref() <= a) {
                continue;
            }
            if let Some(entity) = row_entity::<S>(&k, &v)? {
                out.push((k.to_vec(), entity));
                if out.len() > limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// The standby reader of a stage's view (see [`crate::flow::view::StandbyRead`]).
struct Standbys<S> {
    reader: checkpoint::StandbyReader,
    stage: std::marker::PhantomData<fn() -> S>,
}

impl<S: EventSourced> crate::flow::view::StandbyRead<S> for Standbys<S> {
    fn get(
        &self,
        p: Option<i32>,
        key: &[u8],
        owned: &[i32],
    ) -> Result<Option<(i32, Entity<S>, crate::flow::view::Behind)>, String> {
        let Some((p, row, next, end)) = self.reader.get(p, key, owned)? else { return Ok(None) };
        Ok(row_entity::<S>(key, &row)?
            .map(|e| (p, e, crate::flow::view::Behind { store_next_offset: next, journal_end: end })))
    }
}

impl KafkaStorage {
    /// A reader of the local store's other partitions for stale queries (a flow with one).
    pub(super) fn standby_reader<S: EventSourced>(
        &self,
        common: &ClientConfig,
    ) -> Option<Arc<dyn crate::flow::view::StandbyRead<S>>> {
        let reader = self.shared.checkpoints.as_ref()?.standby_reader(common);
        Some(Arc::new(Standbys::<S> { reader, stage: std::marker::PhantomData }))
    }
}

/// A stored row's entity (`None`: deleted).
fn row_entity<S: EventSourced>(key: &[u8], row: &[u8]) -> Result<Option<Entity<S>>, String> {
    let entry = read_row(row).map_err(|e| format!("the row of key {}: {e}", printable_key(key)))?;
    entity_of::<S>(key, Some(entry)).map(|(e, _)| e).map_err(|e| e.to_string())
}

impl<S: EventSourced> TaskStore<S> for KafkaTask<S> {
    fn query_reader(&self) -> Option<Arc<dyn crate::flow::view::StoreRead<S>>> {
        self.rows.clone().map(|rows| Arc::new(RowReader { rows }) as Arc<dyn crate::flow::view::StoreRead<S>>)
    }

    fn take_rebuilt(&mut self) -> bool {
        std::mem::take(&mut self.rebuilt)
    }

    /// Reads `key`'s state from the local store, the first time it is used. A row that cannot be
    /// read drops the partition's store and restores it from the journal in full.
    fn fault_in(&mut self, part: &mut PartitionState<S>, key: &S::Key) -> Result<Option<Entity<S>>, FlowError> {
        let Some(rows) = &self.rows else { return Ok(None) };
        let held = part.holds(key);
        cache::count(&self.shared.metrics, held);
        if held {
            return Ok(None);
        }
        let raw = key.to_bytes();
        let entry = match rows.get(raw.as_ref()) {
            Ok(None) => None,
            Ok(Some(v)) => match read_row(&v) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    let why = format!("the row of key {} does not decode ({e})", printable_key(&raw));
                    return self.restore_in_full(part, &why).map(|()| None);
                }
            },
            Err(e) => return self.restore_in_full(part, &format!("fjall: {e}")).map(|()| None),
        };
        self.shared.metrics.store_rows.fetch_add(u64::from(entry.is_some()), Ordering::Relaxed);
        let (entity, sources) = entity_of::<S>(&raw, entry)?;
        // A key without a row (or deleted) is remembered too, as the default state: it is not
        // looked up again. A deletion marker's input positions hold: the deleting input, delivered
        // again, is skipped.
        Ok(Some(part.read(key.clone(), entity.unwrap_or_default(), sources)))
    }

    fn record(&mut self, c: Change<'_, S>, part: &PartitionState<S>) -> Result<Recorded, FlowError> {
        self.last_ts = c.ts;
        let envelopes = encode_events::<S>(self.shared.codec, c.key, c.events, c.ts)?;
        let raw = || c.key.to_bytes().into_owned();
        if S::is_deleted(c.state) {
            // At least once not a tombstone: the deletion must keep the input positions it
            // includes, so that the deleting input, delivered again, is skipped rather than handled
            // again.
            let value = self.shared.at_least_once.then(|| {
                let sources = self.sources(part, c.key);
                JournalEntry { last_seq: SeqNo::ZERO, events: Vec::new(), state: None, sources }.encode()
            });
            // Records of the key written later in this transaction or batch (a new entity under
            // the same key) must come after the deletion.
            self.open.events.remove(c.key);
            self.open.ordered.push((raw(), value));
            return Ok(Recorded { end_soon: false, forgotten: true });
        }
        // No copy of the key for a key already pending (the common case for a busy key).
        let pending = match self.open.events.get_mut(c.key) {
            Some(pending) => {
                pending.extend(envelopes);
                pending.len()
            }
            None => {
                let n = envelopes.len();
                self.open.events.insert(c.key.clone(), envelopes);
                n
            }
        };
        if pending < MAX_EVENTS_PER_JOURNAL_RECORD {
            return Ok(Recorded::default());
        }
        // A hot key: its record so far is made now, with its state now, and the open work is
        // asked to end soon.
        let events = self.open.events.remove(c.key).unwrap_or_default();
        let seq = SeqNo(c.before.0 + c.events.len() as u64);
        let value = self.journal_value(c.key, events, seq, c.state, self.sources(part, c.key))?;
        self.open.ordered.push((raw(), Some(value)));
        Ok(Recorded { end_soon: true, forgotten: false })
    }

    fn keep_output(&mut self, _: OutputRecord) {}

    /// One journal record per key the open work changed, produced when the guarantee writes it:
    /// at once into the transaction (without input positions: the transaction commits the
    /// offsets), or counted under the batch once its outputs are acknowledged (its offsets wait
    /// for them).
    fn seal(&mut self, part: &PartitionState<S>, _: Vec<SourcePosition>) -> Result<Sealed, FlowError> {
        let records = self.journal_records(part)?;
        if records.is_empty() {
            return Ok(Sealed::nothing());
        }
        let (shared, p, records) = (self.shared.clone(), self.p, Arc::new(records));
        if self.shared.direct.is_some() {
            debug_assert!(self.committing.is_none(), "one transaction commits at a time");
            self.committing = Some(records.clone());
        }
        let write: Write = Box::new(move |out| {
            let topic = shared.journal.topic();
            records.iter().try_for_each(|(k, v)| out.produce(topic, p, k, v.as_deref()))
        });
        Ok(Sealed { write, outbox: None })
    }

    /// The local store takes the committed transaction's records, all below the partition's
    /// newest acknowledged offset (the next transaction's records are produced after this).
    fn committed(&mut self) {
        let Some(records) = self.committing.take() else { return };
        if let (Some(checkpoints), Some(progress)) = (&self.shared.checkpoints, &self.shared.direct) {
            checkpoints.committed(self.p, records, progress.acked(self.p));
        }
    }

    fn discard(&mut self) {
        self.open = Unjournaled::default();
        self.committing = None;
    }
}

/// A key's entity and the input positions its journal entry includes, from its newest entry or
/// row. No entity for a tombstone or no row (`None`) and for an at-least-once deletion marker
/// (no state), whose positions still hold.
fn entity_of<S: EventSourced>(
    raw: &[u8],
    entry: Option<JournalEntry>,
) -> Result<(Option<Entity<S>>, Vec<SourcePosition>), FlowError> {
    let Some(entry) = entry else { return Ok((None, Vec::new())) };
    let Some(env) = &entry.state else { return Ok((None, entry.sources)) };
    let state = decode_state::<S>(env).map_err(|source| Error::Decode {
        stage: S::NAME.into(),
        key: printable_key(raw),
        seq: entry.last_seq.0,
        source,
    })?;
    Ok((Some(Entity { state: Arc::new(state), seq: entry.last_seq }), entry.sources))
}

impl Shared {
    /// The state of partition `p` from what a restore `read`: the newest journal entry of each key
    /// (`None`: deleted), on top of the local store's rows if it has them (read as keys are first
    /// used).
    fn restore_entries<S: EventSourced>(&self, p: i32, read: Read) -> Result<PartitionState<S>, FlowError> {
        let has_rows = read.rows.is_some();
        let mut entities = KeyMap::with_capacity_and_hasher(read.entries.len(), ahash::RandomState::new());
        let mut applied = KeyMap::default();
        for (raw, entry) in read.entries {
            let key = S::Key::from_bytes(&raw)
                .ok_or_else(|| Error::BadKey { stage: S::NAME.into(), key: printable_key(&raw) })?;
            let (entity, sources) = entity_of::<S>(&raw, entry)?;
            match entity {
                Some(entity) => {
                    entities.insert(key.clone(), entity);
                }
                // Deleted after the store's checkpoint: its row there is older.
                None if has_rows => {
                    entities.insert(key.clone(), Entity::default());
                }
                None => {}
            }
            // A deletion marker's too: the input that deleted the key, delivered again after a
            // crash, is skipped rather than handled again.
            if !sources.is_empty() {
                applied.insert(key, sources);
            }
        }
        tracing::info!(partition = p, keys = entities.len(), local_store = has_rows, "restored partition state");
        let mut committed = match &self.cache {
            Some(cache) => Committed::cached(p, cache),
            None => Committed::default(),
        };
        committed.restored(entities, read.end);
        let mut restored = PartitionState::new(committed);
        restored.applied = applied;
        Ok(restored)
    }
}
