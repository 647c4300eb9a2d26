//! Rebuilding state from a journal: recovery on open (snapshots + tails) and point-in-time rebuilds
//! for tools (events up to a sequence number or a time).

use crate::codec::{Codec, CodecError};
use crate::error::{Error, Result};
use crate::stage::{EntityKey, EventSourced};
use eventstage_journal::{
    printable_key, Envelope, EventQuery, EventRecord, Journal, JournalError, Progress, Recovered, SeqNo,
};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One entity as the runtime holds it.
pub(crate) struct Entity<S: EventSourced> {
    pub(crate) state: Arc<S::State>,
    pub(crate) seq: SeqNo,
}

impl<S: EventSourced> Clone for Entity<S> {
    fn clone(&self) -> Self {
        Self { state: self.state.clone(), seq: self.seq }
    }
}

impl<S: EventSourced> Default for Entity<S> {
    /// An entity that never had an event: the default state at sequence 0.
    fn default() -> Self {
        Self { state: Arc::new(S::State::default()), seq: SeqNo::ZERO }
    }
}

/// What a state cache's entry costs beside the inline sizes of its key, slot and state: the cache's
/// links and index, the state's `Arc` counts, an allocation's rounding. Measured: see
/// `benches/RESULTS.md` ("A bounded state cache").
const ENTRY_OVERHEAD: usize = 64;

/// An entity in a state cache (the flows' and the stage runtime's), with what it weighs.
pub(crate) struct Slot<S: EventSourced> {
    pub(crate) entity: Entity<S>,
    pub(crate) weight: u32,
}

impl<S: EventSourced> Clone for Slot<S> {
    fn clone(&self) -> Self {
        Self { entity: self.entity.clone(), weight: self.weight }
    }
}

impl<S: EventSourced> Slot<S> {
    /// `key`'s `entity`, weighed: the inline sizes of its key, slot and state, the key's bytes,
    /// and [`ENTRY_OVERHEAD`]. Memory a state owns beyond its inline size (a `String` field's
    /// text) is not counted.
    pub(crate) fn new(key: &S::Key, entity: Entity<S>) -> Self {
        let inline = size_of::<S::Key>() + size_of::<Self>() + size_of::<S::State>() + 2 * size_of::<usize>();
        let weight = (inline + key.to_bytes().len() + ENTRY_OVERHEAD).min(u32::MAX as usize) as u32;
        Self { entity, weight }
    }
}

/// Weighs a state cache's entries by their [`Slot::weight`].
#[derive(Clone)]
pub(crate) struct ByWeight;

impl<S: EventSourced> quick_cache::Weighter<S::Key, Slot<S>> for ByWeight {
    fn weight(&self, _: &S::Key, slot: &Slot<S>) -> u64 {
        u64::from(slot.weight)
    }
}

/// What a recovery read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryStats {
    /// Keys rebuilt.
    pub keys: u64,
    /// Snapshots read.
    pub snapshots: u64,
    /// Events applied.
    pub events: u64,
    /// Wall time of the recovery.
    pub elapsed: Duration,
}

/// Decodes a state snapshot of stage `S` (as the Kafka journal stores one with each record); a
/// snapshot of another state version is an error.
pub(crate) fn decode_state<S: EventSourced>(env: &Envelope) -> std::result::Result<S::State, CodecError> {
    if env.type_version != S::STATE_VERSION {
        return Err(CodecError::UnknownVersion { found: env.type_version, current: S::STATE_VERSION });
    }
    Codec::from_id(env.codec).and_then(|c| c.decode(&env.payload))
}

/// Decodes one stored event of stage `S`.
pub(crate) fn decode_event<S: EventSourced>(rec: &EventRecord) -> Result<S::Event> {
    let env = &rec.envelope;
    Codec::from_id(env.codec)
        .and_then(|codec| S::upcast(env.type_version, codec, &env.payload))
        .map_err(|source| Error::Decode { stage: S::NAME.into(), key: printable_key(&rec.key), seq: rec.seq.0, source })
}

struct Current<S: EventSourced> {
    raw: Vec<u8>,
    key: S::Key,
    state: S::State,
    seq: SeqNo,
}

/// Folds journal records into per-key states. A key's records come in seq order; keys mostly come
/// one after the other (sled, recovery), but may interleave (a sled journal's history archive).
pub(crate) struct Folder<S: EventSourced> {
    map: BTreeMap<S::Key, Entity<S>>,
    current: Option<Current<S>>,
    /// Keys whose snapshot this build cannot read: replayed from their first event afterwards.
    refetch: Vec<Vec<u8>>,
    skipping: Option<Vec<u8>>,
    /// Only the keys this accepts are rebuilt (all when `None`); the records of the others are
    /// skipped.
    keep: Option<KeyFilter<S>>,
    /// The key of the records being skipped because `keep` refused it.
    ignored: Option<Vec<u8>>,
    pub(crate) stats: RecoveryStats,
}

/// Which keys a scan rebuilds.
pub(crate) type KeyFilter<S> = Box<dyn Fn(&<S as EventSourced>::Key) -> bool + Send>;

impl<S: EventSourced> Folder<S> {
    pub(crate) fn new() -> Self {
        Self {
            map: BTreeMap::new(),
            current: None,
            refetch: Vec::new(),
            skipping: None,
            keep: None,
            ignored: None,
            stats: RecoveryStats::default(),
        }
    }

    fn close_current(&mut self) {
        if let Some(c) = self.current.take() {
            self.map.insert(c.key, Entity { state: Arc::new(c.state), seq: c.seq });
        }
    }

    /// The key of `raw`, or `None` when `keep` refuses it (its records are then skipped).
    fn key(&mut self, raw: &[u8]) -> Result<Option<S::Key>> {
        self.close_current();
        let key =
            S::Key::from_bytes(raw).ok_or_else(|| Error::BadKey { stage: S::NAME.into(), key: printable_key(raw) })?;
        if self.keep.as_ref().is_some_and(|keep| !keep(&key)) {
            self.ignored = Some(raw.to_vec());
            return Ok(None);
        }
        self.ignored = None;
        Ok(Some(key))
    }

    /// Makes `raw` the current key, going on from where the fold left it if it was seen before.
    fn resume(&mut self, raw: &[u8]) -> Result<()> {
        let Some(key) = self.key(raw)? else { return Ok(()) };
        let (state, seq) = match self.map.remove(&key) {
            Some(e) => (Arc::unwrap_or_clone(e.state), e.seq),
            None => (S::State::default(), SeqNo::ZERO),
        };
        self.current = Some(Current { raw: raw.to_vec(), key, state, seq });
        Ok(())
    }

    fn start(&mut self, raw: &[u8], state: S::State, seq: SeqNo) -> Result<()> {
        let Some(key) = self.key(raw)? else { return Ok(()) };
        self.current = Some(Current { raw: raw.to_vec(), key, state, seq });
        Ok(())
    }

    pub(crate) fn snapshot(&mut self, snap: &eventstage_journal::SnapshotRecord) -> Result<()> {
        let env = &snap.envelope;
        if env.type_version != S::STATE_VERSION {
            tracing::info!(stage = S::NAME, key = %printable_key(&snap.key), version = env.type_version,
                "snapshot has another state version; replaying the key from its events");
            self.close_current();
            self.refetch.push(snap.key.clone());
            self.skipping = Some(snap.key.clone());
            return Ok(());
        }
        let state = decode_state::<S>(env).map_err(|source| Error::Decode {
            stage: S::NAME.into(),
            key: printable_key(&snap.key),
            seq: snap.seq.0,
            source,
        })?;
        self.skipping = None;
        self.stats.snapshots += 1;
        self.start(&snap.key, state, snap.seq)
    }

    pub(crate) fn event(&mut self, rec: &EventRecord) -> Result<()> {
        if self.skipping.as_deref() == Some(rec.key.as_slice()) {
            return Ok(());
        }
        self.skipping = None;
        if self.current.as_ref().is_none_or(|c| c.raw != rec.key) {
            if self.ignored.as_deref() == Some(rec.key.as_slice()) {
                return Ok(());
            }
            self.resume(&rec.key)?;
            if self.current.is_none() {
                return Ok(());
            }
        }
        let event = decode_event::<S>(rec)?;
        let Some(cur) = self.current.as_mut() else { return Ok(()) };
        if rec.seq != cur.seq.next() {
            return Err(Error::Journal(JournalError::Damaged {
                journal: S::NAME.into(),
                what: format!("key {} jumps from seq {} to {}", printable_key(&rec.key), cur.seq, rec.seq),
            }));
        }
        S::apply(&mut cur.state, &event);
        cur.seq = rec.seq;
        self.stats.events += 1;
        Ok(())
    }

    pub(crate) fn finish(mut self) -> (BTreeMap<S::Key, Entity<S>>, RecoveryStats) {
        self.close_current();
        self.stats.keys = self.map.len() as u64;
        (self.map, self.stats)
    }
}

/// Rebuilds every key from its latest snapshot and the events after it.
pub(crate) async fn recover<S: EventSourced, J: Journal>(
    journal: &J,
    progress: &Progress,
) -> Result<(BTreeMap<S::Key, Entity<S>>, RecoveryStats)> {
    fold_recovered(journal, journal.recover(), Folder::new(), progress).await
}

/// Rebuilds the keys of `keys` (their stored bytes) that have events, each from its latest snapshot
/// and the events after it: what a runtime with a bounded cache reads when keys are first used.
pub(crate) async fn recover_keys<S: EventSourced, J: Journal>(
    journal: &J,
    keys: Vec<Vec<u8>>,
) -> Result<BTreeMap<S::Key, Entity<S>>> {
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let stream = journal.recover_keys(keys);
    Ok(fold_recovered(journal, stream, Folder::new(), &Progress::none()).await?.0)
}

/// Rebuilds the keys `keep` accepts from the whole journal: only they are held while it is read.
pub(crate) async fn recover_matching<S: EventSourced, J: Journal>(
    journal: &J,
    keep: impl Fn(&S::Key) -> bool + Send + 'static,
) -> Result<BTreeMap<S::Key, Entity<S>>> {
    let folder = Folder { keep: Some(Box::new(keep)), ..Folder::new() };
    Ok(fold_recovered(journal, journal.recover(), folder, &Progress::none()).await?.0)
}

async fn fold_recovered<S: EventSourced, J: Journal>(
    journal: &J,
    stream: impl futures::Stream<Item = eventstage_journal::Result<Vec<Recovered>>>,
    mut folder: Folder<S>,
    progress: &Progress,
) -> Result<(BTreeMap<S::Key, Entity<S>>, RecoveryStats)> {
    let started = Instant::now();
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        for item in chunk? {
            match &item {
                Recovered::Snapshot(s) => folder.snapshot(s)?,
                Recovered::Event(e) => folder.event(e)?,
            }
        }
        progress.report(folder.stats.events + folder.stats.snapshots);
    }
    folder.skipping = None;
    // Keys whose snapshot this build cannot read, from their first event: one query for a key, one
    // pass over the whole journal for several (a key's query may scan a sled journal's archive).
    let refetch = std::mem::take(&mut folder.refetch);
    let (query, only): (_, std::collections::HashSet<Vec<u8>>) = match refetch.as_slice() {
        [] => (None, Default::default()),
        [key] => (Some(EventQuery::key(key.clone())), Default::default()),
        _ => (Some(EventQuery::default()), refetch.into_iter().collect()),
    };
    if let Some(query) = query {
        let mut events = std::pin::pin!(journal.events(query));
        while let Some(chunk) = events.next().await {
            for e in chunk? {
                if only.is_empty() || only.contains(&e.key) {
                    folder.event(&e)?;
                }
            }
        }
    }
    let (map, mut stats) = folder.finish();
    stats.elapsed = started.elapsed();
    Ok((map, stats))
}

/// Rebuilds the state of every key (or of `query.key`) from events alone, as of the point the query
/// gives (`until_seq`, `until_time_ms`). Snapshots are not used, so any point in history works.
///
/// # Errors
/// Journal failures and records that do not decode.
pub async fn rebuild<S: EventSourced, J: Journal>(
    journal: &J,
    query: EventQuery,
    progress: &Progress,
) -> Result<BTreeMap<S::Key, (S::State, SeqNo)>> {
    let query = EventQuery { from_seq: SeqNo::ZERO, ..query };
    let mut folder = Folder::<S>::new();
    let mut stream = std::pin::pin!(journal.events(query));
    while let Some(chunk) = stream.next().await {
        for e in chunk? {
            folder.event(&e)?;
        }
        progress.report(folder.stats.events);
    }
    let (map, _) = folder.finish();
    Ok(map.into_iter().map(|(k, e)| (k, (Arc::unwrap_or_clone(e.state), e.seq))).collect())
}
