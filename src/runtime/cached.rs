//! A stage runtime with a state cache ([`RuntimeConfig::state_cache`](super::RuntimeConfig)): the
//! keys used lately in memory, within a budget in bytes, in front of the journal that holds every
//! key's snapshot and tail.
//!
//! - **Nothing is read on open.** A key is read from the journal (its latest snapshot and the
//!   events after it, [`Journal::recover_keys`]) when a command or a query first uses it; the
//!   writer reads all the keys of a batch it does not hold with one journal read.
//! - **Policy:** quick_cache's S3-FIFO, as the flows' state cache and the tables' row cache (scan
//!   resistant: keys used once do not push out the ones used often).
//! - **Only durable state is cached or read.** Every key in memory is as the journal has it: the
//!   writer adds a batch's new states to the cache once the batch is durable, as the runtime does
//!   without a cache. A reader that misses reads the journal under the *gate*, which the writer
//!   holds from a batch's append until its states are in the cache: a reader never sees a batch
//!   the journal has not made durable yet, and never adds a state older than the cache's.

use crate::error::{Error, Result};
use crate::replay::{recover_keys, recover_matching, ByWeight, Entity, KeyFilter, Slot};
use crate::stage::{EntityKey, EventSourced};
use eventstage_journal::{printable_key, Journal};
use futures::future::BoxFuture;
use quick_cache::sync::Cache;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How keys not in memory are read: the runtime's journal, behind a trait object so that handles
/// need not name the journal's type.
pub(crate) trait Source<S: EventSourced>: Send + Sync + 'static {
    /// The keys of `keys` that have events, each from its latest snapshot and tail.
    fn load(&self, keys: Vec<Vec<u8>>) -> BoxFuture<'_, Result<BTreeMap<S::Key, Entity<S>>>>;
    /// Every key `keep` accepts, read from the whole journal.
    fn scan(&self, keep: KeyFilter<S>) -> BoxFuture<'_, Result<BTreeMap<S::Key, Entity<S>>>>;
    /// The number of keys with events.
    fn count(&self) -> BoxFuture<'_, Result<u64>>;
}

impl<S: EventSourced, J: Journal> Source<S> for J {
    fn load(&self, keys: Vec<Vec<u8>>) -> BoxFuture<'_, Result<BTreeMap<S::Key, Entity<S>>>> {
        Box::pin(recover_keys::<S, J>(self, keys))
    }

    fn scan(&self, keep: KeyFilter<S>) -> BoxFuture<'_, Result<BTreeMap<S::Key, Entity<S>>>> {
        Box::pin(recover_matching::<S, J>(self, keep))
    }

    fn count(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move { Ok(self.key_count().await?) })
    }
}

/// Counts the entries an insert pushed out. quick_cache also reports the value an insert
/// replaces (the same key's older state) this way, which is not an eviction: see
/// [`Cached::insert`].
#[derive(Clone)]
struct Evictions;

impl<S: EventSourced> quick_cache::Lifecycle<S::Key, Slot<S>> for Evictions {
    type RequestState = u64;

    fn begin_request(&self) -> Self::RequestState {
        0
    }

    fn on_evict(&self, out: &mut Self::RequestState, _: S::Key, _: Slot<S>) {
        *out += 1;
    }
}

/// Counters of a stage runtime's state cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StateCacheStats {
    /// The budget in bytes ([`RuntimeConfig::state_cache`](super::RuntimeConfig::state_cache)).
    pub budget: u64,
    /// What the keys in memory weigh.
    pub bytes: u64,
    /// Keys in memory.
    pub entries: u64,
    /// Uses of a key that found it in memory.
    pub hits: u64,
    /// Uses of a key that read it from the journal (a key without events included).
    pub misses: u64,
    /// Keys evicted to keep the budget.
    pub evictions: u64,
}

pub(crate) struct Cached<S: EventSourced> {
    cache: Cache<S::Key, Slot<S>, ByWeight, ahash::RandomState, Evictions>,
    budget: u64,
    /// Held for writing by the writer from a batch's append until its states are in the cache;
    /// for reading by a reader that reads keys from the journal (see the module's docs).
    pub(super) gate: tokio::sync::RwLock<()>,
    /// The journal; `None` once the runtime shut down (handles must not keep it open).
    source: std::sync::Mutex<Option<Arc<dyn Source<S>>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl<S: EventSourced> Cached<S> {
    pub(super) fn new(budget: u64, source: impl Source<S>) -> Self {
        // quick_cache sizes its table by the expected count of entries: about 128 bytes each.
        let estimated = budget / 128;
        Self {
            cache: Cache::with(
                estimated.clamp(16, 1 << 24) as usize,
                budget.max(1),
                ByWeight,
                ahash::RandomState::new(),
                Evictions,
            ),
            budget,
            gate: tokio::sync::RwLock::new(()),
            source: std::sync::Mutex::new(Some(Arc::new(source))),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The journal, unless the runtime shut down.
    fn source(&self) -> Result<Arc<dyn Source<S>>> {
        let source = self.source.lock().unwrap_or_else(|p| p.into_inner()).clone();
        source.ok_or_else(|| Error::Closed(S::NAME.into()))
    }

    /// Lets go of the journal: keys not in memory can no longer be read.
    pub(super) fn close(&self) {
        self.source.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    pub(super) fn stats(&self) -> StateCacheStats {
        StateCacheStats {
            budget: self.budget,
            bytes: self.cache.weight(),
            entries: self.cache.len() as u64,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    fn cached(&self, key: &S::Key) -> Option<Entity<S>> {
        let hit = self.cache.get(key).map(|slot| slot.entity);
        let counter = if hit.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// Adds `key`'s durable state (a key without events is not cached: it has no state).
    pub(super) fn insert(&self, key: S::Key, entity: Entity<S>) {
        if entity.seq.0 > 0 {
            // A replaced older state is reported like an eviction (see `Evictions`).
            let replaced = u64::from(self.cache.peek(&key).is_some());
            let slot = Slot::new(&key, entity);
            let out = self.cache.insert_with_lifecycle(key, slot);
            self.evictions.fetch_add(out.saturating_sub(replaced), Ordering::Relaxed);
        }
    }

    /// The durable state of `key` for a reader: from memory, else from the journal (and kept).
    pub(super) async fn get(&self, key: &S::Key) -> Result<Option<Entity<S>>> {
        if let Some(hit) = self.cached(key) {
            return Ok(Some(hit));
        }
        let _gate = self.gate.read().await;
        // Published while this reader waited for the gate.
        if let Some(slot) = self.cache.peek(key) {
            return Ok(Some(slot.entity));
        }
        let loaded = self.source()?.load(vec![key.to_bytes().into_owned()]).await?;
        let entity = loaded.into_values().next();
        if let Some(e) = &entity {
            self.insert(key.clone(), e.clone());
        }
        Ok(entity)
    }

    /// The durable state of every key of a batch for the writer, into `touched` (key → seq before
    /// the batch, entity); the keys it could not read go to `unreadable` with the reason. Runs
    /// between batches: nothing is being appended, so what the journal has is durable.
    pub(super) async fn load_batch(
        &self,
        keys: Vec<&S::Key>,
        touched: &mut HashMap<S::Key, (u64, Entity<S>)>,
        unreadable: &mut HashMap<S::Key, String>,
    ) {
        let mut seen = HashSet::with_capacity(keys.len());
        let mut missing = Vec::new();
        for key in keys {
            if !seen.insert(key) {
                continue;
            }
            match self.cached(key) {
                Some(e) => {
                    touched.insert(key.clone(), (e.seq.0, e));
                }
                None => missing.push(key.clone()),
            }
        }
        if missing.is_empty() {
            return;
        }
        let source = match self.source() {
            Ok(source) => source,
            Err(e) => {
                unreadable.extend(missing.into_iter().map(|k| (k, e.to_string())));
                return;
            }
        };
        let raw = missing.iter().map(|k| k.to_bytes().into_owned()).collect();
        let mut loaded = match source.load(raw).await {
            Ok(loaded) => loaded,
            // One key's damage must not fail the others: read them one by one to find it.
            Err(_) => {
                let mut loaded = BTreeMap::new();
                for key in &missing {
                    match source.load(vec![key.to_bytes().into_owned()]).await {
                        Ok(one) => loaded.extend(one),
                        Err(e) => {
                            tracing::error!(stage = S::NAME, key = %printable_key(&key.to_bytes()), error = %e,
                                "the key's state cannot be read from the journal; its commands fail");
                            unreadable.insert(key.clone(), e.to_string());
                        }
                    }
                }
                loaded
            }
        };
        for key in missing {
            if unreadable.contains_key(&key) {
                continue;
            }
            let entity = loaded.remove(&key).unwrap_or_default();
            self.insert(key.clone(), entity.clone());
            touched.insert(key, (entity.seq.0, entity));
        }
    }

    /// Every key `keep` accepts, as of a whole batch: read from the journal while no batch is
    /// appended.
    pub(super) async fn scan(&self, keep: KeyFilter<S>) -> Result<BTreeMap<S::Key, Entity<S>>> {
        let _gate = self.gate.read().await;
        self.source()?.scan(keep).await
    }

    /// The number of keys with events, as of a whole batch.
    pub(super) async fn count(&self) -> Result<u64> {
        let _gate = self.gate.read().await;
        self.source()?.count().await
    }
}
