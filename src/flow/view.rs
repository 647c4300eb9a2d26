//! The committed view of a flow's state that queries read ([`crate::query`]): per partition this
//! instance owns, every key's state as of the last committed transaction, published by the flow
//! thread when a commit settles and read without a lock (an [`ArcSwap`] of persistent maps: a
//! query holds the snapshot it loaded, the flow thread goes on building the next one).
//!
//! What a query may see, and when:
//! - a partition appears as *restoring* when it is assigned here, and becomes readable once its
//!   state is restored;
//! - its keys change when a transaction (or at-least-once batch) commits, never before: an open
//!   transaction's changes are not in the view;
//! - it disappears when the partition is revoked or lost, before the next owner processes
//!   anything, and the whole view empties when the flow stops.

// Without the `query` feature no flow can be made queryable: nothing writes or reads a view.
#![cfg_attr(not(feature = "query"), allow(dead_code))]

use crate::flow::route::Placement;
use crate::replay::Entity;
use crate::stage::{EntityKey, EventSourced};
use arc_swap::ArcSwap;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, OnceLock};

/// A partition of the view.
pub(crate) enum Part<S: EventSourced> {
    /// Assigned here; its state is being restored.
    Restoring,
    /// Its committed state.
    Ready(Ready<S>),
}

impl<S: EventSourced> Clone for Part<S> {
    fn clone(&self) -> Self {
        match self {
            Self::Restoring => Self::Restoring,
            Self::Ready(r) => Self::Ready(r.clone()),
        }
    }
}

/// Reads a partition's local store (a flow with a state cache), from a query's thread.
pub(crate) trait StoreRead<S: EventSourced>: Send + Sync {
    /// The key's stored entity (`None`: none, or deleted).
    fn get(&self, key: &[u8]) -> Result<Option<Entity<S>>, String>;
    /// Up to `limit + 1` stored keys starting with `prefix`, after `after`, in byte order.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<StoredRows<S>, String>;
}

/// Reads the partitions the local store keeps besides the owned ones (standbys, and partitions
/// kept after they went), for queries that accept stale state.
pub(crate) trait StandbyRead<S: EventSourced>: Send + Sync {
    /// `key` in partition `p` (or, unknown, in any partition the store keeps) of those not in
    /// `owned`: its partition, entity, and how far behind the journal the store's copy is.
    fn get(&self, p: Option<i32>, key: &[u8], owned: &[i32]) -> Result<Option<(i32, Entity<S>, Behind)>, String>;
}

/// How far a local store's copy of a partition is behind its journal.
pub(crate) struct Behind {
    /// The journal offset the store's rows are complete up to (exclusive).
    pub(crate) store_next_offset: i64,
    /// The journal partition's end now (None: the broker did not say).
    pub(crate) journal_end: Option<i64>,
}

/// Rows read from a local store: each key's bytes and entity.
pub(crate) type StoredRows<S> = Vec<(Vec<u8>, Entity<S>)>;

/// A readable partition: its keys' committed state, and how far its journal goes.
pub(crate) struct Ready<S: EventSourced> {
    /// Every key's committed state; with a state cache, the keys the local store does not have
    /// yet (deleted ones too: they hide the store's older rows), the others being read from
    /// `store`.
    pub(crate) keys: imbl::OrdMap<S::Key, Entity<S>>,
    pub(crate) store: Option<Arc<dyn StoreRead<S>>>,
    /// Kafka journal: every record of this state is below this offset of the journal partition.
    pub(crate) journal_below: Option<i64>,
    /// When the transaction this state is of committed (ms since the epoch; 0: as restored).
    pub(crate) committed_ms: u64,
}

impl<S: EventSourced> Clone for Ready<S> {
    fn clone(&self) -> Self {
        Self {
            keys: self.keys.clone(),
            store: self.store.clone(),
            journal_below: self.journal_below,
            committed_ms: self.committed_ms,
        }
    }
}

/// What the view holds at one moment.
pub(crate) struct Snapshot<S: EventSourced> {
    pub(crate) parts: BTreeMap<i32, Part<S>>,
    /// False before the flow runs and once it stopped.
    pub(crate) running: bool,
}

/// A flow's committed view: written by its flow thread, read by queries.
pub(crate) struct View<S: EventSourced> {
    current: ArcSwap<Snapshot<S>>,
    /// Where the stage's keys live, when known: an application's stage keeps every key in its
    /// murmur2 partition. A plain flow's key is where its producer put it (unknown here).
    placement: OnceLock<Option<Placement>>,
    /// The Kafka journal's topic (none: a sled journal).
    journal: OnceLock<Option<String>>,
    /// The local store's other partitions (a flow with a state directory).
    standby: OnceLock<Arc<dyn StandbyRead<S>>>,
}

impl<S: EventSourced> Default for View<S> {
    fn default() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot { parts: BTreeMap::new(), running: false }),
            placement: OnceLock::new(),
            journal: OnceLock::new(),
            standby: OnceLock::new(),
        }
    }
}

impl<S: EventSourced> View<S> {
    /// The flow starts with these settings.
    pub(crate) fn started(&self, placement: Option<Placement>, journal: Option<String>) {
        let _ = self.placement.set(placement);
        let _ = self.journal.set(journal);
    }

    /// Stale queries read the local store's other partitions through `reader`.
    pub(crate) fn set_standby(&self, reader: Arc<dyn StandbyRead<S>>) {
        let _ = self.standby.set(reader);
    }

    pub(crate) fn publish(&self, parts: BTreeMap<i32, Part<S>>, running: bool) {
        self.current.store(Arc::new(Snapshot { parts, running }));
    }

    pub(crate) fn load(&self) -> Arc<Snapshot<S>> {
        self.current.load_full()
    }

    fn placement(&self) -> Option<&Placement> {
        self.placement.get().and_then(Option::as_ref)
    }

    /// One key's answer as JSON.
    fn entry(&self, p: i32, ready: &Ready<S>, key: &S::Key, entity: &Entity<S>, stored: bool) -> Value {
        let mut v = json!({
            "stage": S::NAME,
            "key": eventstage_journal::printable_key(&key.to_bytes()),
            "partition": p,
            "seq": entity.seq.0,
            "state": serde_json::to_value(&*entity.state).unwrap_or_else(|e| json!({ "unserializable": e.to_string() })),
        });
        if let Some(Some(topic)) = self.journal.get() {
            v["journal"] = json!({ "topic": topic, "partition": p, "below_offset": ready.journal_below });
        }
        // Where it was read: the view in memory, or the local store (a flow with a state cache).
        v["read_from"] = json!(if stored { "local store" } else { "memory" });
        if ready.committed_ms > 0 {
            v["committed_at_ms"] = json!(ready.committed_ms);
        }
        v
    }
}

/// Whether an entity is a state (not deleted, not the default of a key never written).
fn live<S: EventSourced>(e: &Entity<S>) -> bool {
    e.seq.0 > 0 && !S::is_deleted(&e.state)
}

/// A key found by a scan: with its partition, the partition's view and its entity.
type Found<'a, S> = (<S as EventSourced>::Key, i32, &'a Ready<S>, &'a Entity<S>, bool);

/// A key's answer from this instance's view.
pub(crate) enum Lookup {
    /// Its committed state (the answer's JSON).
    Found(Value),
    /// No state in the partitions searched (its own, when the key's partition is known; else
    /// every partition here), all of them readable.
    Missing,
    /// The key's partition is not owned here.
    NotOwned,
    /// The key's partition (or, when it is unknown, one of this instance's) is being restored.
    Restoring,
    /// The flow is not running.
    Stopped,
    /// The local store could not be read.
    Failed(String),
}

/// A prefix scan of this instance's partitions.
pub(crate) struct Scan {
    pub(crate) items: Vec<Value>,
    /// The last key returned when more may follow (the next page's `after`).
    pub(crate) next: Option<String>,
    pub(crate) partitions: Vec<i32>,
    pub(crate) restoring: Vec<i32>,
    /// A local store could not be read.
    pub(crate) failed: Option<String>,
}

/// The query layer's side of a view, over stages of every type.
pub(crate) trait StageView: Send + Sync {
    fn stage(&self) -> &'static str;
    /// The key's bytes as a key of the stage, or why not.
    fn check_key(&self, key: &[u8]) -> Result<(), String>;
    /// Where `key` lives, when the stage's partitioning is known.
    fn partition_of(&self, key: &[u8]) -> Option<i32>;
    /// `key` as this instance holds it.
    fn get(&self, key: &[u8]) -> Lookup;
    /// Up to `limit` keys starting with `prefix` after `after`, in key order.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Scan;
    /// The partitions this instance owns (restoring or not), and whether the flow runs.
    fn owned(&self) -> (Vec<i32>, bool);
    /// `key` from the local store's copy of a partition this instance does not own (a standby),
    /// marked stale with how far behind it is; `None` when the store keeps no such copy of it.
    fn stale(&self, key: &[u8]) -> Option<Result<Value, String>>;
}

impl<S: EventSourced> StageView for View<S> {
    fn stage(&self) -> &'static str {
        S::NAME
    }

    fn check_key(&self, key: &[u8]) -> Result<(), String> {
        match S::Key::from_bytes(key) {
            Some(_) => Ok(()),
            None => Err(format!(
                "`{}` is not a key of stage `{}` (its key type does not decode these bytes)",
                eventstage_journal::printable_key(key),
                S::NAME
            )),
        }
    }

    fn partition_of(&self, key: &[u8]) -> Option<i32> {
        self.placement().map(|p| p.partition_of(key))
    }

    fn get(&self, key: &[u8]) -> Lookup {
        let Some(k) = S::Key::from_bytes(key) else { return Lookup::Missing };
        let snapshot = self.load();
        if !snapshot.running {
            return Lookup::Stopped;
        }
        let found = |p: i32, ready: &Ready<S>| -> Result<Option<Value>, String> {
            let stored;
            let (entity, from_store) = match (ready.keys.get(&k), &ready.store) {
                (Some(e), _) => (Some(e), false),
                (None, Some(store)) => {
                    stored = store.get(key)?;
                    (stored.as_ref(), true)
                }
                (None, None) => (None, false),
            };
            Ok(entity.filter(|e| live::<S>(e)).map(|e| self.entry(p, ready, &k, e, from_store)))
        };
        match self.partition_of(key) {
            Some(p) => match snapshot.parts.get(&p) {
                None => Lookup::NotOwned,
                Some(Part::Restoring) => Lookup::Restoring,
                Some(Part::Ready(ready)) => match found(p, ready) {
                    Ok(v) => v.map_or(Lookup::Missing, Lookup::Found),
                    Err(e) => Lookup::Failed(e),
                },
            },
            // Where the producer put the key is unknown: every partition here is searched.
            None => {
                let mut restoring = false;
                for (p, part) in &snapshot.parts {
                    match part {
                        Part::Restoring => restoring = true,
                        Part::Ready(ready) => match found(*p, ready) {
                            Ok(Some(v)) => return Lookup::Found(v),
                            Ok(None) => {}
                            Err(e) => return Lookup::Failed(e),
                        },
                    }
                }
                if restoring {
                    Lookup::Restoring
                } else {
                    Lookup::Missing
                }
            }
        }
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Scan {
        let snapshot = self.load();
        let after = after.and_then(S::Key::from_bytes);
        let start = S::Key::from_bytes(prefix);
        let mut found: Vec<Found<'_, S>> = Vec::new();
        // Rows read from the local stores (owned here, borrowed by `found` below).
        let mut stored: Vec<(S::Key, i32, Entity<S>)> = Vec::new();
        let mut failed = None;
        let (mut partitions, mut restoring) = (Vec::new(), Vec::new());
        for (p, part) in &snapshot.parts {
            let ready = match part {
                Part::Restoring => {
                    restoring.push(*p);
                    continue;
                }
                Part::Ready(ready) => ready,
            };
            partitions.push(*p);
            // Keys in their type's order; for text and numbers, that is their bytes' order, so
            // the prefix's keys follow each other from the prefix on.
            let iter: Box<dyn Iterator<Item = (&S::Key, &Entity<S>)>> = match (&after, &start) {
                (Some(a), _) => {
                    let bounds: (Bound<&S::Key>, Bound<&S::Key>) = (Bound::Excluded(a), Bound::Unbounded);
                    Box::new(ready.keys.range::<_, S::Key>(bounds))
                }
                (None, Some(s)) => Box::new(ready.keys.range::<_, S::Key>(s..)),
                (None, None) => Box::new(ready.keys.iter()),
            };
            let ordered = start.is_some();
            let mut taken = 0;
            for (k, e) in iter {
                let bytes = k.to_bytes();
                if !bytes.starts_with(prefix) {
                    if ordered && bytes.as_ref() > prefix {
                        break;
                    }
                    continue;
                }
                // A deleted key in memory hides the store's older row.
                found.push((k.clone(), *p, ready, e, false));
                taken += usize::from(live::<S>(e));
                if taken > limit {
                    break;
                }
            }
            if let Some(store) = &ready.store {
                let after_bytes = after.as_ref().map(|a| a.to_bytes().into_owned());
                match store.scan(prefix, after_bytes.as_deref(), limit) {
                    Ok(rows) => stored.extend(rows.into_iter().filter_map(|(raw, e)| {
                        let k = S::Key::from_bytes(&raw)?;
                        (!ready.keys.contains_key(&k)).then_some((k, *p, e))
                    })),
                    Err(e) => failed = Some(e),
                }
            }
        }
        let stored_found: Vec<Found<'_, S>> = stored
            .iter()
            .filter_map(|(k, p, e)| match snapshot.parts.get(p) {
                Some(Part::Ready(r)) => Some((k.clone(), *p, r, e, true)),
                _ => None,
            })
            .collect();
        found.extend(stored_found);
        found.retain(|(_, _, _, e, _)| live::<S>(e));
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let more = found.len() > limit;
        found.truncate(limit);
        let next =
            if more { found.last().map(|(k, ..)| eventstage_journal::printable_key(&k.to_bytes())) } else { None };
        let items = found.iter().map(|(k, p, ready, e, stored)| self.entry(*p, ready, k, e, *stored)).collect();
        Scan { items, next, partitions, restoring, failed }
    }

    fn owned(&self) -> (Vec<i32>, bool) {
        let snapshot = self.load();
        (snapshot.parts.keys().copied().collect(), snapshot.running)
    }

    fn stale(&self, key: &[u8]) -> Option<Result<Value, String>> {
        let reader = self.standby.get()?;
        let k = S::Key::from_bytes(key)?;
        let (owned, _) = self.owned();
        let (p, entity, behind) = match reader.get(self.partition_of(key), key, &owned) {
            Ok(found) => found?,
            Err(e) => return Some(Err(e)),
        };
        if !live::<S>(&entity) {
            return None;
        }
        let ready = Ready { keys: imbl::OrdMap::new(), store: None, journal_below: None, committed_ms: 0 };
        let mut v = self.entry(p, &ready, &k, &entity, true);
        if let Some(j) = v.get_mut("journal") {
            j["below_offset"] = json!(behind.store_next_offset);
        }
        v["stale"] = json!({
            "store_next_offset": behind.store_next_offset,
            "journal_end": behind.journal_end,
            "behind_records": behind.journal_end.map(|e| (e - behind.store_next_offset).max(0)),
        });
        Some(Ok(v))
    }
}
