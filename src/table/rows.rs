//! A table's rows, each held once: a [`Row`] (key, value, size, partition) behind one `Arc`,
//! shared by the ordered map that snapshots read ([`Rows`]) and the hash index that
//! [`Table::get`](super::Table::get) reads ([`Index`]). Both hold 8-byte pointers, so a key is
//! stored once instead of twice, and copying an ordered map's node (after each publication)
//! copies pointers instead of keys.

use equivalent::{Comparable, Equivalent};
use hashbrown::hash_table::{Entry as Slot, HashTable};
use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, RwLock};

/// One row: the key, the value, its size as read (for [`TableStats::bytes`](super::TableStats))
/// and its partition (to drop the rows of a revoked partition).
pub(super) struct Row<K, V> {
    pub(super) key: K,
    pub(super) value: V,
    pub(super) size: u32,
    pub(super) partition: i32,
}

/// A row as the ordered map and the index hold it, ordered and compared by its key.
pub(super) struct Entry<K, V>(Arc<Row<K, V>>);

impl<K, V> Entry<K, V> {
    pub(super) fn new(key: K, value: V, size: u32, partition: i32) -> Self {
        Self(Arc::new(Row { key, value, size, partition }))
    }

    /// The row's value, as readers get it.
    pub(super) fn value(&self) -> Value<K, V> {
        Value(self.0.clone())
    }
}

impl<K, V> std::ops::Deref for Entry<K, V> {
    type Target = Row<K, V>;
    fn deref(&self) -> &Row<K, V> {
        &self.0
    }
}

impl<K, V> Clone for Entry<K, V> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// A value read from a [`Table`](super::Table): it shares the table's row (cloning it and holding
/// it are cheap, and it stays valid after the table changes or drops the key), and derefs to the
/// value.
pub struct Value<K, V>(Arc<Row<K, V>>);

impl<K, V> Value<K, V> {
    /// The key of the row.
    pub fn key(&self) -> &K {
        &self.0.key
    }

    /// The partition of the record the value came from.
    pub fn partition(&self) -> i32 {
        self.0.partition
    }
}

impl<K, V> std::ops::Deref for Value<K, V> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.0.value
    }
}

impl<K, V> AsRef<V> for Value<K, V> {
    fn as_ref(&self) -> &V {
        &self.0.value
    }
}

impl<K, V> Borrow<V> for Value<K, V> {
    fn borrow(&self) -> &V {
        &self.0.value
    }
}

impl<K, V> Clone for Value<K, V> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K, V: PartialEq> PartialEq for Value<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.0.value == other.0.value
    }
}

impl<K, V: Eq> Eq for Value<K, V> {}

impl<K, V: fmt::Debug> fmt::Debug for Value<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.value.fmt(f)
    }
}

impl<K, V: fmt::Display> fmt::Display for Value<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.value.fmt(f)
    }
}

impl<K: PartialEq, V> PartialEq for Entry<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl<K: Eq, V> Eq for Entry<K, V> {}

impl<K: Ord, V> PartialOrd for Entry<K, V> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<K: Ord, V> Ord for Entry<K, V> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}

/// A borrowed key (`&str` for `String` keys) looking for its entry in [`Rows`].
pub(super) struct Probe<'a, Q: ?Sized>(pub(super) &'a Q);

impl<Q: ?Sized, K: Borrow<Q>, V> Equivalent<Entry<K, V>> for Probe<'_, Q>
where
    Q: Eq,
{
    fn equivalent(&self, entry: &Entry<K, V>) -> bool {
        self.0 == entry.key.borrow()
    }
}

impl<Q: ?Sized, K: Borrow<Q>, V> Comparable<Entry<K, V>> for Probe<'_, Q>
where
    Q: Ord,
{
    fn compare(&self, entry: &Entry<K, V>) -> Ordering {
        self.0.cmp(entry.key.borrow())
    }
}

/// The rows in key order: a persistent set, so a clone is O(1) and shares all nodes.
pub(super) type Rows<K, V> = imbl::OrdSet<Entry<K, V>>;

type Shard<K, V> = RwLock<HashTable<Entry<K, V>>>;

/// The point-lookup index, updated per record: a hash table of the same entries, sharded so
/// that a reader waits at most for one insert into its shard. (A B-tree lookup of heap-allocated
/// keys costs a cache miss per comparison, over 2 µs at 10^6 keys; a hash lookup a few.)
pub(super) struct Index<K, V> {
    shards: Box<[Shard<K, V>]>,
    // ahash: SipHash (the std default) costs a noticeable share of each record's work here.
    hasher: ahash::RandomState,
    shift: u32,
}

impl<K: Hash + Eq, V> Index<K, V> {
    /// An index for about `capacity` keys.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        let shards = (std::thread::available_parallelism().map_or(1, usize::from) * 4).next_power_of_two().max(4);
        let per_shard = capacity.div_ceil(shards);
        Self {
            shards: (0..shards).map(|_| RwLock::new(HashTable::with_capacity(per_shard))).collect(),
            hasher: ahash::RandomState::new(),
            shift: 64 - shards.trailing_zeros(),
        }
    }

    fn shard(&self, hash: u64) -> &Shard<K, V> {
        // The top 7 bits are the hash table's tag within a shard: the shard takes the next ones.
        &self.shards[((hash << 7) >> self.shift) as usize]
    }

    fn find<Q, T>(&self, key: &Q, then: impl FnOnce(&Entry<K, V>) -> T) -> Option<T>
    where
        Q: Hash + Eq + ?Sized,
        K: Borrow<Q>,
    {
        let hash = self.hasher.hash_one(key);
        let shard = self.shard(hash).read().unwrap_or_else(|p| p.into_inner());
        shard.find(hash, |e| e.key.borrow() == key).map(then)
    }

    /// The value of `key`.
    pub(super) fn get<Q>(&self, key: &Q) -> Option<Value<K, V>>
    where
        Q: Hash + Eq + ?Sized,
        K: Borrow<Q>,
    {
        self.find(key, Entry::value)
    }

    /// True when `key` is present.
    pub(super) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        Q: Hash + Eq + ?Sized,
        K: Borrow<Q>,
    {
        self.find(key, |_| ()).is_some()
    }

    /// Inserts `entry`, replacing the entry of its key.
    pub(super) fn insert(&self, entry: Entry<K, V>) {
        let hash = self.hasher.hash_one(&entry.key);
        let mut shard = self.shard(hash).write().unwrap_or_else(|p| p.into_inner());
        match shard.entry(hash, |e| e.key == entry.key, |e| self.hasher.hash_one(&e.key)) {
            Slot::Occupied(mut o) => *o.get_mut() = entry,
            Slot::Vacant(v) => {
                v.insert(entry);
            }
        }
    }

    /// Removes `key`.
    pub(super) fn remove(&self, key: &K) {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash).write().unwrap_or_else(|p| p.into_inner());
        if let Ok(o) = shard.find_entry(hash, |e| e.key == *key) {
            o.remove();
        }
    }

    /// Keys in the index (visits every shard).
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_and_the_ordered_rows_share_entries_and_find_borrowed_keys() {
        let index = Index::<String, u32>::with_capacity(10);
        let mut rows = Rows::<String, u32>::new();
        for i in 0..1000u32 {
            let entry = Entry::new(format!("k{i:04}"), i, 4, (i % 3) as i32);
            index.insert(entry.clone());
            rows.insert(entry);
        }
        let entry = Entry::new("k0007".to_string(), 70, 4, 1);
        index.insert(entry.clone());
        let old = rows.insert(entry).map(|e| e.value);
        assert_eq!(old, Some(7));
        assert_eq!(index.len(), 1000);
        assert_eq!(index.get("k0007").as_deref(), Some(&70));
        assert_eq!(index.get("k0007").map(|v| (v.key().clone(), v.partition())), Some(("k0007".into(), 1)));
        assert!(index.contains_key("k0999"));
        assert!(!index.contains_key("k1000"));
        assert_eq!(rows.get(&Probe("k0007")).map(|e| e.value), Some(70));
        let range: Vec<u32> = rows.range(Probe("k0010")..Probe("k0013")).map(|e| e.value).collect();
        assert_eq!(range, [10, 11, 12]);

        index.remove(&"k0500".to_string());
        rows.remove(&Probe("k0500"));
        assert_eq!(index.len(), 999);
        assert_eq!(rows.len(), 999);
        assert!(index.get("k0500").is_none());
        // One allocation per row: the index, the ordered rows and the values handed out share it.
        let value = index.get("k0001").expect("present");
        assert_eq!(rows.get(&Probe("k0001")).map(|e| Arc::strong_count(&e.0)), Some(3));
        drop((index, rows));
        assert_eq!((*value, Arc::strong_count(&value.0)), (1, 1), "a value outlives the table");
    }
}
