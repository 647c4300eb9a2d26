//! A table's row cache (a table opened with [`TableBuilder::cache`](super::TableBuilder::cache)):
//! the rows read or written lately, within a budget in bytes, in front of the local store that
//! holds every row.
//!
//! - **Policy:** quick_cache's S3-FIFO, as the flows' state cache (scan resistant: a catch-up or a
//!   burst of keys read once does not push out the hot ones). Sharded, each shard behind a mutex:
//!   a reader waits at most for one cache operation of its shard.
//! - **Never stale.** A reader that misses reads the store, then adds the row to the cache only if
//!   no write of the follower began or ended in between. The follower marks every shard as being
//!   written ([`RowCache::begin_write`]: each shard's version becomes odd), writes its batch to the
//!   store, replaces (or removes) the batch's keys already in the cache, and ends the write (the
//!   versions become even again). A ticket taken during a write, or before one, is void; a row
//!   read from the store before the batch was written is therefore never added after it, and a
//!   key that is cached changes for every reader at once.

use super::rows::Entry;
use quick_cache::unsync::Cache;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What a cached row costs beyond its key and value bytes: the row's allocation and reference
/// counts, the cache's slot (key, pointer, hash and queue bookkeeping) and the key again as the
/// cache's key. Measured sizes of the types are added to it.
const ENTRY_OVERHEAD: usize = 64;

#[derive(Clone)]
struct ByWeight;

impl<K, V> quick_cache::Weighter<K, Entry<K, V>> for ByWeight {
    fn weight(&self, _: &K, entry: &Entry<K, V>) -> u64 {
        weigh::<K, V>(entry.size)
    }
}

/// What a row of `size` bytes (key and value as read) weighs in the budget.
fn weigh<K, V>(size: u32) -> u64 {
    (2 * size_of::<K>() + size_of::<V>() + size_of::<Entry<K, V>>() + ENTRY_OVERHEAD) as u64 + u64::from(size)
}

struct Shard<K, V> {
    rows: Cache<K, Entry<K, V>, ByWeight, ahash::RandomState>,
    /// Bumped by every write of the follower to a key of this shard.
    version: u64,
}

/// Counters of a row cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct CacheUsage {
    pub(super) budget: u64,
    pub(super) bytes: u64,
    pub(super) entries: u64,
    pub(super) hits: u64,
    pub(super) misses: u64,
}

pub(super) struct RowCache<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    hasher: ahash::RandomState,
    budget: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A reader's ticket to add the row it read from the store (see the module docs).
pub(super) struct Ticket {
    shard: usize,
    version: u64,
}

impl<K: Hash + Eq + Clone, V> RowCache<K, V> {
    pub(super) fn new(budget: u64) -> Self {
        let shards = (std::thread::available_parallelism().map_or(1, usize::from) * 8).next_power_of_two().max(8);
        let per_shard = (budget / shards as u64).max(1);
        let estimated = (per_shard / 128).clamp(16, 1 << 20) as usize;
        let shard = || {
            Mutex::new(Shard {
                rows: Cache::with(estimated, per_shard, ByWeight, ahash::RandomState::new(), Default::default()),
                version: 0,
            })
        };
        Self {
            shards: (0..shards).map(|_| shard()).collect(),
            hasher: ahash::RandomState::new(),
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) as usize) & (self.shards.len() - 1)
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Shard<K, V>> {
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached row of `key`, or a ticket to add it once read from the store.
    pub(super) fn get<Q>(&self, key: &Q) -> Result<Entry<K, V>, Ticket>
    where
        Q: Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        let shard = self.shard_of(key);
        let s = self.lock(shard);
        match s.rows.get(key) {
            Some(e) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(e.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Err(Ticket { shard, version: s.version })
            }
        }
    }

    /// The cached row of `key`, if there is one, without counting a hit or a miss nor marking it
    /// used (the follower's look at a key's old row).
    pub(super) fn peek<Q>(&self, key: &Q) -> Option<Entry<K, V>>
    where
        Q: Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        self.lock(self.shard_of(key)).rows.peek(key).cloned()
    }

    /// Adds a row read from the store, unless a write of the follower began or ended since
    /// `ticket` (see the module docs).
    pub(super) fn admit(&self, ticket: Ticket, entry: Entry<K, V>) {
        let mut s = self.lock(ticket.shard);
        if s.version == ticket.version && ticket.version % 2 == 0 {
            s.rows.insert(entry.key.clone(), entry);
        }
    }

    /// The follower begins (`true`) or ends (`false`) writing a batch to the store.
    fn mark(&self, writing: bool) {
        for shard in 0..self.shards.len() {
            let mut s = self.lock(shard);
            debug_assert_eq!(s.version % 2 == 1, !writing, "writes do not nest");
            s.version += 1;
        }
    }

    /// The follower is about to write a batch to the store.
    pub(super) fn begin_write(&self) {
        self.mark(true);
    }

    /// The follower wrote its batch and told the cache of each of its keys.
    pub(super) fn end_write(&self) {
        self.mark(false);
    }

    /// The follower wrote `key` (`Some`: its new row; `None`: deleted) to the store, between
    /// [`begin_write`](Self::begin_write) and [`end_write`](Self::end_write): a cached row of it
    /// is replaced (or removed).
    pub(super) fn written(&self, key: &K, row: Option<&Entry<K, V>>) {
        let mut s = self.lock(self.shard_of(key));
        match row {
            Some(e) if s.rows.contains_key(key) => {
                s.rows.insert(key.clone(), e.clone());
            }
            Some(_) => {}
            None => {
                s.rows.remove(key);
            }
        }
    }

    /// Drops the cached rows of `partitions` (taken from this instance).
    pub(super) fn drop_partitions(&self, partitions: &std::collections::BTreeSet<i32>) {
        for shard in 0..self.shards.len() {
            let mut s = self.lock(shard);
            s.version += 2;
            s.rows.retain(|_, e| !partitions.contains(&e.partition));
        }
    }

    pub(super) fn usage(&self) -> CacheUsage {
        let mut usage = CacheUsage {
            budget: self.budget,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            ..CacheUsage::default()
        };
        for shard in 0..self.shards.len() {
            let s = self.lock(shard);
            usage.bytes += s.rows.weight();
            usage.entries += s.rows.len() as u64;
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: u64) -> Entry<String, u64> {
        Entry::new(key.to_string(), value, (key.len() + 8) as u32, 0)
    }

    #[test]
    fn a_row_read_before_the_follower_wrote_it_is_not_added() {
        let cache = RowCache::<String, u64>::new(1 << 20);
        let write = |row: Option<Entry<String, u64>>| {
            cache.begin_write();
            cache.written(&"a".to_string(), row.as_ref());
            cache.end_write();
        };
        let Err(ticket) = cache.get("a") else { panic!("empty cache") };
        // The follower writes a new row of `a` while the reader reads the old one from the store.
        write(Some(entry("a", 2)));
        cache.admit(ticket, entry("a", 1));
        assert!(cache.get("a").is_err(), "the old row must not be cached");
        // A ticket taken while a batch is being written is void too.
        cache.begin_write();
        let Err(during) = cache.get("a") else { panic!("not cached") };
        cache.end_write();
        cache.admit(during, entry("a", 1));
        assert!(cache.get("a").is_err(), "a row read during a write must not be cached");
        // A reader after the write adds what it read; a later write replaces it.
        let Err(ticket) = cache.get("a") else { panic!("not cached") };
        cache.admit(ticket, entry("a", 2));
        assert_eq!(cache.get("a").map(|e| e.value).ok(), Some(2));
        write(Some(entry("a", 3)));
        assert_eq!(cache.get("a").map(|e| e.value).ok(), Some(3));
        write(None);
        assert!(cache.get("a").is_err(), "a deleted row leaves the cache");
        let usage = cache.usage();
        assert_eq!((usage.hits, usage.misses, usage.entries), (2, 6, 0));
    }

    #[test]
    fn the_cache_keeps_its_budget_and_drops_revoked_partitions() {
        let budget = 64 * 1024;
        let cache = RowCache::<String, u64>::new(budget);
        for i in 0..10_000u64 {
            let key = format!("key-{i}");
            let Err(ticket) = cache.get(key.as_str()) else { panic!("new key cached") };
            cache.admit(ticket, Entry::new(key.clone(), i, 16, (i % 2) as i32));
        }
        let usage = cache.usage();
        assert!(usage.bytes <= budget, "{usage:?}");
        assert!(usage.entries > 100, "{usage:?}");
        cache.drop_partitions(&[0].into_iter().collect());
        let shards = cache.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()));
        assert!(shards.flat_map(|s| s.rows.iter().map(|(_, e)| e.partition).collect::<Vec<_>>()).all(|p| p == 1));
    }
}
