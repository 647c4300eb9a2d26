//! A table whose rows live in its local store, with the rows used lately in a bounded cache
//! ([`TableBuilder::cache`](super::TableBuilder::cache)): point lookups and consistent scans.

use super::cache::RowCache;
use super::rows::{Entry, Value};
use super::store::{Count, TableStore};
use super::{Decoder, TableError};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::hash::Hash;
use std::ops::Bound;
use std::sync::Arc;

/// The partitions a table reads (their rows are visible) and what the store holds of each.
pub(super) type Owned = BTreeMap<i32, Count>;

pub(super) struct Stored<K, V> {
    pub(super) store: TableStore,
    pub(super) cache: RowCache<K, V>,
    pub(super) keys: Decoder<K>,
    pub(super) values: Decoder<V>,
    /// Published by the follower after each applied batch.
    pub(super) owned: ArcSwap<Owned>,
}

impl<K, V> Stored<K, V>
where
    K: Hash + Eq + Clone,
{
    fn encode(&self, key: &K) -> Result<Vec<u8>, TableError> {
        self.keys.encode(key).ok_or_else(|| TableError::Store {
            path: self.store.path(),
            message: format!("the key decoder `{}` has no encoder", self.keys.name()),
        })
    }

    /// Decodes a stored row of `partition` (its raw key and value).
    fn row(&self, key: Option<K>, raw_key: &[u8], partition: i32, value: &[u8]) -> Result<Entry<K, V>, TableError> {
        let undecodable = |what: &str, reason: String| {
            TableError::Store {
            path: self.store.path(),
            message: format!(
                "a stored row of partition {partition} has a {what} that does not decode ({reason}); the decoders changed since the store was written: delete the store to rebuild it"
            ),
        }
        };
        let key = match key {
            Some(k) => k,
            None => self.keys.decode(raw_key).map_err(|r| undecodable("key", r))?,
        };
        let size = (raw_key.len() + value.len()) as u32;
        Ok(Entry::new(key, self.values.decode(value).map_err(|r| undecodable("value", r))?, size, partition))
    }

    /// The row of `key`: from the cache, else from the store (then cached).
    pub(super) fn get<Q>(&self, key: &Q) -> Result<Option<Value<K, V>>, TableError>
    where
        Q: Hash + quick_cache::Equivalent<K> + ToOwned<Owned = K> + ?Sized,
    {
        let ticket = match self.cache.get(key) {
            Ok(entry) => return Ok(Some(entry.value())),
            Err(ticket) => ticket,
        };
        let key = key.to_owned();
        let raw = self.encode(&key)?;
        let Some((partition, row)) = self.store.get(&raw)? else { return Ok(None) };
        if !self.owned.load().contains_key(&partition) {
            return Ok(None);
        }
        let entry = self.row(Some(key), &raw, partition, self.store.split(&row)?.1)?;
        self.cache.admit(ticket, entry.clone());
        Ok(Some(entry.value()))
    }

    /// Keys of the partitions the table reads.
    pub(super) fn len(&self) -> u64 {
        self.owned.load().values().map(|c| c.rows).sum()
    }

    /// A consistent view (whole applied batches) of the partitions the table reads now.
    pub(super) fn view(self: &Arc<Self>) -> StoreView<K, V> {
        let owned = self.owned.load_full();
        let snapshot = self.store.snapshot();
        // The counts written with the snapshot's last batch (the published ones may be a batch
        // behind it).
        let len = match self.store.positions_in(&snapshot) {
            Ok(counts) => owned.keys().filter_map(|p| counts.get(p)).filter_map(|c| c.count).map(|c| c.rows).sum(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the store's counts: the snapshot's length is the last published one");
                owned.values().map(|c| c.rows).sum()
            }
        };
        StoreView { stored: self.clone(), snapshot, owned, len }
    }
}

/// A snapshot of a table's store (see [`TableSnapshot`](super::TableSnapshot)).
pub(super) struct StoreView<K, V> {
    stored: Arc<Stored<K, V>>,
    snapshot: fjall::Snapshot,
    owned: Arc<Owned>,
    len: u64,
}

impl<K, V> StoreView<K, V> {
    pub(super) fn len(&self) -> u64 {
        self.len
    }
}

impl<K, V> StoreView<K, V>
where
    K: Hash + Eq + Clone,
{
    pub(super) fn encode(&self, key: &K) -> Result<Vec<u8>, TableError> {
        self.stored.encode(key)
    }

    pub(super) fn get(&self, raw: &[u8], key: K) -> Result<Option<Value<K, V>>, TableError> {
        use fjall::Readable;
        let store = &self.stored.store;
        let Some(row) = self.snapshot.get(store.rows_keyspace(), raw).map_err(|e| store.storage(e))? else {
            return Ok(None);
        };
        let (partition, value) = store.split(&row)?;
        if !self.owned.contains_key(&partition) {
            return Ok(None);
        }
        self.stored.row(Some(key), raw, partition, value).map(|e| Some(e.value()))
    }

    /// The rows with raw keys within `bounds`, in the order of the raw keys.
    pub(super) fn range(
        &self,
        bounds: (Bound<Vec<u8>>, Bound<Vec<u8>>),
    ) -> impl Iterator<Item = Result<Value<K, V>, TableError>> + '_ {
        use fjall::Readable;
        let store = &self.stored.store;
        self.snapshot.range(store.rows_keyspace(), bounds).filter_map(move |item| {
            let read = || -> Result<Option<Value<K, V>>, TableError> {
                let (k, v) = item.into_inner().map_err(|e| store.storage(e))?;
                let (partition, value) = store.split(&v)?;
                if !self.owned.contains_key(&partition) {
                    return Ok(None);
                }
                self.stored.row(None, &k, partition, value).map(|e| Some(e.value()))
            };
            read().transpose()
        })
    }

    /// The rows whose raw key starts with `prefix`.
    pub(super) fn prefix(&self, prefix: &[u8]) -> impl Iterator<Item = Result<Value<K, V>, TableError>> + '_ {
        let end = prefix_end(prefix);
        self.range((Bound::Included(prefix.to_vec()), end.map_or(Bound::Unbounded, Bound::Excluded)))
    }
}

/// The smallest byte string greater than every string starting with `prefix` (`None`: there is
/// none, the prefix is all 0xff).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn the_end_of_a_prefix_is_the_next_string_after_all_it_starts() {
        assert_eq!(prefix_end(b"acct-1"), Some(b"acct-2".to_vec()));
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
