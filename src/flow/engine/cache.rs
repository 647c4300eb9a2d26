//! A partition's committed state: every key in memory, or, with a state cache
//! ([`FlowBuilder::state_cache`](crate::flow::FlowBuilder::state_cache)), a bounded cache over the
//! local state store.
//!
//! With a cache, a committed key lives in one of two places:
//! - **not stored yet**: committed, but the local store does not have its journal record yet (its
//!   follower reads the journal behind the flow). It is never evicted: read back from the store
//!   now, it would come back older than it is.
//! - **the cache**: the local store has it, so it may be evicted; a key not in memory is read from
//!   the store when next used. The cache is quick_cache's S3-FIFO (scan resistant: a burst of keys
//!   used once does not push the hot ones out), weighed in bytes.
//!
//! A committed batch knows the journal offset its records are all below once the broker
//! acknowledged them ([`StoreProgress::acked`]); the follower publishes how far the store has the
//! journal's rows ([`StoreProgress::written`]). When the store passed a batch, the batch's keys
//! move to the cache, and the cache evicts what the budget has no room for.

use super::state::KeyMap;
use crate::flow::control::Metrics;
use crate::replay::{ByWeight, Entity, Slot};
use crate::stage::EventSourced;
use quick_cache::unsync::Cache;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// How far the journal's records of each partition were acknowledged, and how far the local
/// store has them: a committed key may leave memory once the store has its record.
pub(super) struct StoreProgress {
    topic: String,
    /// Per journal partition: the offset after the highest journal record the broker acknowledged
    /// (written by the producers' delivery callbacks).
    acked: Box<[AtomicI64]>,
    /// Per journal partition: the next journal offset whose rows the local store does not have
    /// yet (written by the store's follower).
    written: Box<[AtomicI64]>,
}

impl StoreProgress {
    pub(super) fn new(topic: &str, partitions: usize) -> Self {
        let zeros = || (0..partitions).map(|_| AtomicI64::new(0)).collect();
        Self { topic: topic.to_string(), acked: zeros(), written: zeros() }
    }

    /// The broker acknowledged the record at `offset` of `topic`'s partition `p`.
    pub(super) fn acknowledged(&self, topic: &str, p: i32, offset: i64) {
        if topic == self.topic {
            if let Some(a) = self.acked.get(p as usize) {
                a.fetch_max(offset + 1, Ordering::Relaxed);
            }
        }
    }

    /// The local store has partition `p`'s rows up to (not including) journal offset `next`.
    pub(super) fn stored(&self, p: i32, next: i64) {
        if let Some(w) = self.written.get(p as usize) {
            w.store(next, Ordering::Release);
        }
    }

    /// The offset after partition `p`'s highest journal record the broker acknowledged.
    pub(super) fn acked(&self, p: i32) -> i64 {
        self.acked.get(p as usize).map_or(i64::MAX, |a| a.load(Ordering::Relaxed))
    }

    pub(super) fn written(&self, p: i32) -> i64 {
        self.written.get(p as usize).map_or(0, |w| w.load(Ordering::Acquire))
    }
}

/// A flow's state cache: one budget in bytes for all its partitions, split evenly over the
/// partitions it owns.
pub(super) struct CacheSettings {
    pub(super) budget: u64,
    pub(super) progress: Arc<StoreProgress>,
    pub(super) metrics: Arc<Metrics>,
}

/// Collects the keys a cache request evicted (their input positions go with them).
#[derive(Clone)]
struct Evictions(Arc<Metrics>);

impl<S: EventSourced> quick_cache::Lifecycle<S::Key, Slot<S>> for Evictions {
    type RequestState = Vec<S::Key>;

    fn begin_request(&self) -> Self::RequestState {
        Vec::new()
    }

    fn on_evict(&self, evicted: &mut Self::RequestState, key: S::Key, _: Slot<S>) {
        self.0.cache_evictions.fetch_add(1, Ordering::Relaxed);
        evicted.push(key);
    }
}

/// A committed batch whose keys wait for the local store (they are in `unstored` with its id).
struct Batch {
    id: u64,
    /// The guarantee's generation of the batch: it is journaled once the guarantee says so (at
    /// least once: when its records were acknowledged); `None`: journaled when committed.
    generation: Option<u64>,
    /// The journal offset its records are all below, once known.
    below: Option<i64>,
}

/// The committed state of a partition with a state cache (see the module documentation).
pub(super) struct Cached<S: EventSourced> {
    p: i32,
    progress: Arc<StoreProgress>,
    /// Committed keys the local store does not have yet, with the batch that committed them last.
    unstored: KeyMap<S::Key, (Entity<S>, u64)>,
    /// Their batches, oldest first.
    batches: VecDeque<Batch>,
    next_batch: u64,
    cache: Cache<S::Key, Slot<S>, ByWeight, ahash::RandomState, Evictions>,
    /// With a committed view ([`Committed::watch_stored`]): the keys that left `unstored` since it
    /// last took them (the local store has their newest state now).
    left: Option<Vec<S::Key>>,
}

/// A partition's committed state.
pub(super) enum Committed<S: EventSourced> {
    /// Every key in memory (no state cache).
    All(KeyMap<S::Key, Entity<S>>),
    /// A bounded cache over the local store.
    Cached(Box<Cached<S>>),
}

impl<S: EventSourced> Default for Committed<S> {
    fn default() -> Self {
        Self::All(KeyMap::default())
    }
}

impl<S: EventSourced> Committed<S> {
    /// An empty cache of partition `p` (its share of the budget is set when its task takes it).
    pub(super) fn cached(p: i32, settings: &CacheSettings) -> Self {
        let estimated = (settings.budget / 256).clamp(16, 1 << 20) as usize;
        let cache = Cache::with(
            estimated,
            settings.budget.max(1),
            ByWeight,
            ahash::RandomState::new(),
            Evictions(settings.metrics.clone()),
        );
        Self::Cached(Box::new(Cached {
            p,
            progress: settings.progress.clone(),
            unstored: KeyMap::default(),
            batches: VecDeque::new(),
            next_batch: 0,
            cache,
            left: None,
        }))
    }

    /// `key`'s committed entity, if in memory.
    pub(super) fn get(&self, key: &S::Key) -> Option<&Entity<S>> {
        match self {
            Self::All(map) => map.get(key),
            Self::Cached(c) => c.unstored.get(key).map(|(e, _)| e).or_else(|| c.cache.get(key).map(|s| &s.entity)),
        }
    }

    /// The committed keys the local store does not have yet (with a state cache; every key without
    /// one).
    pub(super) fn unstored(&self) -> Box<dyn Iterator<Item = (&S::Key, &Entity<S>)> + '_> {
        match self {
            Self::All(map) => Box::new(map.iter()),
            Self::Cached(c) => Box::new(c.unstored.iter().map(|(k, (e, _))| (k, e))),
        }
    }

    /// From now on, keeps the keys that leave the unstored ones for [`Self::take_stored`].
    pub(super) fn watch_stored(&mut self) {
        if let Self::Cached(c) = self {
            c.left.get_or_insert_with(Vec::new);
        }
    }

    /// The keys the local store caught up with since the last call (see [`Self::watch_stored`]).
    pub(super) fn take_stored(&mut self) -> Vec<S::Key> {
        match self {
            Self::Cached(c) => c.left.as_mut().map(std::mem::take).unwrap_or_default(),
            Self::All(_) => Vec::new(),
        }
    }

    /// Every committed key, when all are in memory (no state cache).
    pub(super) fn all(&self) -> Option<&KeyMap<S::Key, Entity<S>>> {
        match self {
            Self::All(map) => Some(map),
            Self::Cached(_) => None,
        }
    }

    /// Whether `key` is in memory.
    pub(super) fn contains(&self, key: &S::Key) -> bool {
        match self {
            Self::All(map) => map.contains_key(key),
            Self::Cached(c) => c.unstored.contains_key(key) || c.cache.contains_key(key),
        }
    }

    /// `key` as read from the local store (or as the journal's tail left it, without a store).
    /// Returns the keys the cache evicted to make room.
    pub(super) fn insert_read(&mut self, key: S::Key, entity: Entity<S>) -> Vec<S::Key> {
        match self {
            Self::All(map) => {
                map.insert(key, entity);
                Vec::new()
            }
            Self::Cached(c) => c.cache_insert(key, entity),
        }
    }

    /// `changes` committed (`generation`: see [`Batch::generation`]). Returns the keys the cache
    /// evicted.
    pub(super) fn settle(&mut self, changes: KeyMap<S::Key, Entity<S>>, generation: Option<u64>) -> Vec<S::Key> {
        match self {
            Self::All(map) => {
                map.extend(changes);
                Vec::new()
            }
            Self::Cached(c) => {
                if !changes.is_empty() {
                    let id = c.next_batch;
                    c.next_batch += 1;
                    for (key, entity) in changes {
                        c.cache.remove(&key);
                        c.unstored.insert(key, (entity, id));
                    }
                    c.batches.push_back(Batch { id, generation, below: None });
                }
                c.journaled(None);
                c.cache_stored()
            }
        }
    }

    /// The committed entities of a restore, read from the journal's tail up to `end` (the offset
    /// after its last record): the local store has them once its follower passed `end`.
    pub(super) fn restored(&mut self, entities: KeyMap<S::Key, Entity<S>>, end: i64) {
        match self {
            Self::All(map) => map.extend(entities),
            Self::Cached(c) => {
                let id = c.next_batch;
                c.next_batch += 1;
                c.unstored.extend(entities.into_iter().map(|(k, e)| (k, (e, id))));
                c.batches.push_back(Batch { id, generation: None, below: Some(end) });
            }
        }
    }

    /// The guarantee journaled its batches up to `generation` (their records were acknowledged).
    pub(super) fn journaled(&mut self, generation: u64) {
        if let Self::Cached(c) = self {
            c.journaled(Some(generation));
        }
    }

    /// Moves the keys the local store has caught up with to the cache (which evicts what does not
    /// fit). Returns the keys evicted.
    pub(super) fn store_caught_up(&mut self) -> Vec<S::Key> {
        match self {
            Self::All(_) => Vec::new(),
            Self::Cached(c) => c.cache_stored(),
        }
    }

    /// The cache's share of the budget (`None`: no cache).
    pub(super) fn budget(&self) -> Option<u64> {
        match self {
            Self::All(_) => None,
            Self::Cached(c) => Some(c.cache.capacity()),
        }
    }

    /// Sets the cache's share of the budget (what no longer fits is evicted).
    pub(super) fn set_budget(&mut self, bytes: u64) {
        if let Self::Cached(c) = self {
            c.cache.set_capacity(bytes.max(1));
        }
    }

    /// What the partition holds in memory.
    pub(super) fn usage(&self) -> Usage {
        match self {
            Self::All(map) => Usage { entries: map.len() as u64, ..Usage::default() },
            Self::Cached(c) => Usage {
                bytes: c.cache.weight(),
                entries: c.cache.len() as u64,
                unstored: c.unstored.len() as u64,
                store_lag: (c.progress.acked(c.p) - c.progress.written(c.p)).max(0) as u64,
            },
        }
    }
}

impl<S: EventSourced> Cached<S> {
    fn cache_insert(&mut self, key: S::Key, entity: Entity<S>) -> Vec<S::Key> {
        let slot = Slot::new(&key, entity);
        self.cache.insert_with_lifecycle(key, slot)
    }

    /// Stamps the batches journaled (up to `generation`, and those journaled when committed) with
    /// the journal offset their records are below.
    fn journaled(&mut self, generation: Option<u64>) {
        let mut acked = None;
        for b in self.batches.iter_mut().filter(|b| b.below.is_none()) {
            let done = match (b.generation, generation) {
                (None, _) => true,
                (Some(g), Some(upto)) => g <= upto,
                (Some(_), None) => false,
            };
            if done {
                b.below = Some(*acked.get_or_insert_with(|| self.progress.acked(self.p)));
            }
        }
    }

    /// See [`Committed::store_caught_up`].
    ///
    /// Batches are stored in order (their stamps only grow), so the stored ones are a prefix: one
    /// pass over the waiting keys moves those whose newest batch is in it (a key committed again
    /// by a later batch waits for that one). The pass runs when the store caught up with a batch,
    /// not per commit: a key committed in every commit costs one insert per commit.
    fn cache_stored(&mut self) -> Vec<S::Key> {
        let written = self.progress.written(self.p);
        let mut stored = None;
        while let Some(b) = self.batches.front() {
            match b.below {
                Some(below) if below <= written => stored = Some(b.id),
                _ => break,
            }
            self.batches.pop_front();
        }
        let Some(upto) = stored else { return Vec::new() };
        let mut moved = Vec::new();
        self.unstored.retain(|key, (entity, id)| {
            let keep = *id > upto;
            if !keep {
                moved.push((key.clone(), entity.clone()));
            }
            keep
        });
        if let Some(left) = &mut self.left {
            left.extend(moved.iter().map(|(k, _)| k.clone()));
        }
        let mut evicted = Vec::new();
        for (key, entity) in moved {
            evicted.extend(self.cache_insert(key, entity));
        }
        evicted
    }
}

/// What partitions hold in memory (summed over partitions with [`Usage::add`]).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Usage {
    /// Bytes in the cache (as weighed: see `Slot::new`).
    pub(super) bytes: u64,
    /// Entries in the cache (every committed key, without a cache).
    pub(super) entries: u64,
    /// Committed entries the local store does not have yet (never evicted).
    pub(super) unstored: u64,
    /// Journal records acknowledged that the local store does not have yet.
    pub(super) store_lag: u64,
}

impl Usage {
    pub(super) fn add(self, o: Usage) -> Usage {
        Usage {
            bytes: self.bytes + o.bytes,
            entries: self.entries + o.entries,
            unstored: self.unstored + o.unstored,
            store_lag: self.store_lag + o.store_lag,
        }
    }
}

/// Counts a key's lookup for the flow's metrics: found in memory, or read from the store.
pub(super) fn count(metrics: &Metrics, hit: bool) {
    let counter: &AtomicU64 = if hit { &metrics.cache_hits } else { &metrics.cache_misses };
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::bank::{Account, Bank};
    use eventstage_journal::SeqNo;

    fn entity(balance: u64) -> Entity<Bank> {
        Entity { state: Arc::new(Account { open: true, balance }), seq: SeqNo(balance) }
    }

    fn changes(keys: std::ops::Range<u64>, balance: u64) -> KeyMap<String, Entity<Bank>> {
        keys.map(|k| (format!("acct-{k}"), entity(balance))).collect()
    }

    fn balance(c: &Committed<Bank>, k: u64) -> Option<u64> {
        c.get(&format!("acct-{k}")).map(|e| e.state.balance)
    }

    /// A cache of partition 0 with room for `entries` entries.
    fn cache(entries: u64) -> (Committed<Bank>, Arc<StoreProgress>, Arc<Metrics>) {
        let progress = Arc::new(StoreProgress::new("journal", 1));
        let metrics = Arc::new(Metrics::default());
        let budget = entries * u64::from(Slot::<Bank>::new(&"acct-0".to_string(), Entity::default()).weight);
        let settings = CacheSettings { budget, progress: progress.clone(), metrics: metrics.clone() };
        (Committed::cached(0, &settings), progress, metrics)
    }

    #[test]
    fn committed_keys_stay_until_the_store_has_them_then_the_budget_holds() {
        let (mut c, progress, metrics) = cache(10);
        // A transaction's records are acknowledged before it commits.
        progress.acknowledged("journal", 0, 99);
        progress.acknowledged("other-topic", 0, 5000);
        c.settle(changes(0..100, 1), None);
        // Nothing stored: all 100 stay, beyond the budget.
        assert_eq!(c.usage().unstored, 100, "the store does not have them yet");
        assert!((0..100).all(|k| balance(&c, k) == Some(1)));
        assert_eq!(c.usage().store_lag, 100);
        progress.stored(0, 99);
        assert_eq!(c.store_caught_up().len(), 0, "one record short of the batch's last");
        progress.stored(0, 100);
        let evicted = c.store_caught_up();
        let usage = c.usage();
        assert_eq!(usage.unstored, 0);
        assert!(
            usage.entries <= 10
                && usage.bytes <= 10 * u64::from(Slot::<Bank>::new(&"acct-0".to_string(), Entity::default()).weight),
            "{usage:?}"
        );
        assert_eq!(evicted.len() as u64, 100 - usage.entries);
        assert_eq!(metrics.cache_evictions.load(Ordering::Relaxed), evicted.len() as u64);
        assert!((0..100).all(|k| balance(&c, k).is_none_or(|b| b == 1)));
    }

    #[test]
    fn a_key_committed_again_waits_for_its_newest_batch() {
        let (mut c, progress, _) = cache(1);
        progress.acknowledged("journal", 0, 9);
        c.settle(changes(0..3, 1), None);
        // Committed again, in a batch whose records are beyond the first one's.
        progress.acknowledged("journal", 0, 19);
        c.settle(changes(0..1, 2), None);
        progress.stored(0, 10);
        c.store_caught_up();
        assert_eq!(balance(&c, 0), Some(2), "the newest state, still waiting for the store");
        assert_eq!(c.usage().unstored, 1);
        progress.stored(0, 20);
        c.store_caught_up();
        assert_eq!(c.usage().unstored, 0);
        assert!(balance(&c, 0).is_none_or(|b| b == 2));
    }

    #[test]
    fn an_at_least_once_batch_waits_until_the_guarantee_journaled_it() {
        let (mut c, progress, _) = cache(1);
        progress.acknowledged("journal", 0, 1000);
        progress.stored(0, 2000);
        c.settle(changes(0..5, 1), Some(7));
        assert_eq!(c.usage().unstored, 5, "its journal records are not written yet");
        c.journaled(6);
        c.store_caught_up();
        assert_eq!(c.usage().unstored, 5);
        progress.acknowledged("journal", 0, 2500);
        c.journaled(7);
        c.store_caught_up();
        assert_eq!(c.usage().unstored, 5, "stamped with what was acknowledged then, beyond the store");
        progress.stored(0, 2501);
        c.store_caught_up();
        assert_eq!(c.usage().unstored, 0);
        assert!(c.usage().entries <= 1);
    }

    #[test]
    fn a_restored_tail_waits_for_the_store_and_reads_fill_the_cache() {
        let (mut c, progress, _) = cache(4);
        c.restored(changes(0..6, 3), 50);
        progress.stored(0, 49);
        c.store_caught_up();
        assert_eq!(c.usage().unstored, 6);
        progress.stored(0, 50);
        c.store_caught_up();
        assert_eq!(c.usage().unstored, 0);
        for k in 10..20 {
            c.insert_read(format!("acct-{k}"), entity(k));
            assert_eq!(balance(&c, k), Some(k), "a key just read is in memory");
        }
        assert!(c.usage().entries <= 4);
        let one = u64::from(Slot::<Bank>::new(&"acct-0".to_string(), Entity::default()).weight);
        c.set_budget(one);
        assert!(c.usage().entries <= 1);
        assert_eq!(c.budget(), Some(one));
        assert_eq!(Committed::<Bank>::default().budget(), None);
    }

    /// Why a key read from the store is handed to its command directly: the cache may evict the
    /// very entry it was given (a key evicted before comes back as a ghost into the hot queue,
    /// which evicts to keep its share). Found by the crash loop with a 4 KiB cache: the command
    /// saw the default state of an open account.
    #[test]
    fn a_full_cache_may_evict_the_key_it_was_just_given() {
        let mut evicted_itself = false;
        for room in 1..8 {
            let (mut c, _, _) = cache(room);
            for i in 0..200u64 {
                let k = (i * 7919) % 23;
                if c.get(&format!("acct-{k}")).is_none() {
                    let evicted = c.insert_read(format!("acct-{k}"), entity(k));
                    evicted_itself |= evicted.contains(&format!("acct-{k}"));
                }
            }
        }
        assert!(evicted_itself, "some insert evicted the key it inserted");
    }

    #[test]
    fn without_a_cache_every_key_stays() {
        let mut c = Committed::<Bank>::default();
        c.settle(changes(0..100, 1), None);
        c.insert_read("acct-500".into(), entity(5));
        assert!(c.store_caught_up().is_empty());
        assert_eq!(c.usage().entries, 101);
        assert!((0..100).all(|k| balance(&c, k) == Some(1)));
    }
}
