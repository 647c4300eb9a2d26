//! What the follower of a table with a row cache does differently: its rows are in the store,
//! written once per applied batch together with the offsets and the partitions' counts.

use super::Follower;
use crate::table::rows::Entry;
use crate::table::store::{Position, TableStore};
use crate::table::stored::Stored;
use crate::table::TableError;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A key's row before a record: its partition, size, and the row when it was decoded.
type OldRow<K, V> = (i32, u32, Option<Entry<K, V>>);

impl<K, V> Follower<K, V>
where
    K: Ord + std::hash::Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Applies a record to a table with a row cache: the row joins the batch (written to the store
    /// when it is published), and the partitions' counts follow. Returns the key's row before
    /// (decoded only when someone watches the table's changes).
    pub(super) fn apply_stored(
        &mut self,
        stored: &Stored<K, V>,
        raw_key: &[u8],
        payload: Option<&[u8]>,
        key: &K,
        new: Option<Entry<K, V>>,
    ) -> Result<Option<Entry<K, V>>, TableError> {
        let watched = self.shared.changes.receiver_count() > 0;
        // The row before: in this batch, in the cache, else in the store.
        let old: Option<OldRow<K, V>> = match self.batch.get(raw_key) {
            Some((_, row)) => row.as_ref().map(|(e, _)| (e.partition, e.size, Some(e.clone()))),
            None => match stored.cache.peek(key) {
                Some(e) => Some((e.partition, e.size, Some(e))),
                None => match stored.store.get(raw_key)? {
                    None => None,
                    Some((partition, row)) => {
                        let value = stored.store.split(&row)?.1;
                        let size = (raw_key.len() + value.len()) as u32;
                        // A stored value the decoder no longer reads is not a row to report.
                        let entry = watched
                            .then(|| stored.values.decode(value).ok())
                            .flatten()
                            .map(|v| Entry::new(key.clone(), v, size, partition));
                        Some((partition, size, entry))
                    }
                },
            },
        };
        let counters = &self.shared.counters;
        if let Some((partition, size, _)) = &old {
            counters.bytes.fetch_sub(i64::from(*size), Ordering::Relaxed);
            if let Some(c) = self.counts.get_mut(partition) {
                c.rows = c.rows.saturating_sub(1);
                c.bytes = c.bytes.saturating_sub(u64::from(*size));
            }
        }
        if let Some(e) = &new {
            let c = self.counts.entry(e.partition).or_default();
            c.rows += 1;
            c.bytes += u64::from(e.size);
        }
        let row = new.zip(payload).map(|(e, v)| (e, v.to_vec()));
        self.batch.insert(raw_key.to_vec(), (key.clone(), row));
        Ok(old.and_then(|(_, _, e)| e))
    }

    /// With a row cache: the rows of the partitions of `marks` are in the store already; their
    /// counts come from the store's positions (a store written by checkpoints has none: its rows
    /// are counted once, and the counts written).
    pub(super) fn open_stored(
        &mut self,
        store: &TableStore,
        marks: &BTreeMap<i32, (i64, i64)>,
        positions: &BTreeMap<i32, Position>,
        starts: &BTreeMap<i32, i64>,
    ) -> Result<(), TableError> {
        let uncounted: Vec<i32> =
            marks.keys().copied().filter(|p| positions.get(p).and_then(|pos| pos.count).is_none()).collect();
        let counted = if uncounted.is_empty() {
            BTreeMap::new()
        } else {
            let started = Instant::now();
            let counted = store.count()?;
            tracing::info!(topic = %self.shared.topic, partitions = ?uncounted, ms = started.elapsed().as_millis() as u64, "counted the store's rows (it was written without counts)");
            let writes = uncounted.iter().map(|&p| (p, starts[&p], counted.get(&p).copied().unwrap_or_default()));
            store.apply(std::iter::empty(), writes.collect::<Vec<_>>())?;
            counted
        };
        let counters = &self.shared.counters;
        for &p in marks.keys() {
            let count =
                positions.get(&p).and_then(|pos| pos.count).or_else(|| counted.get(&p).copied()).unwrap_or_default();
            counters.loaded_from_store.fetch_add(count.rows, Ordering::Relaxed);
            counters.bytes.fetch_add(count.bytes as i64, Ordering::Relaxed);
            self.counts.insert(p, count);
        }
        Ok(())
    }

    /// With a row cache: writes the batch and the positions to the store in one atomic write,
    /// then tells the cache (see the `cache` module docs) and publishes the counts.
    pub(super) fn write_batch(&mut self, stored: &Stored<K, V>) -> Result<(), TableError> {
        let batch = std::mem::take(&mut self.batch);
        let rows = batch
            .iter()
            .map(|(raw, (_, row))| (raw.as_slice(), row.as_ref().map(|(e, v)| (e.partition, v.as_slice()))));
        let counts = &self.counts;
        let positions = self.positions.iter().map(|(&p, &next)| (p, next, counts.get(&p).copied().unwrap_or_default()));
        // A batch of offsets only (a partition's end, transaction markers) changes no cached row.
        let changes_rows = !batch.is_empty();
        if changes_rows {
            stored.cache.begin_write();
        }
        let written = stored.store.apply(rows, positions);
        if written.is_ok() {
            for (key, row) in batch.values() {
                stored.cache.written(key, row.as_ref().map(|(e, _)| e));
            }
            self.unflushed = true;
        }
        if changes_rows {
            stored.cache.end_write();
        }
        written?;
        stored.owned.store(Arc::new(self.counts.clone()));
        Ok(())
    }
}
