//! Consistent, immutable views of a table: iteration, ranges and prefix scans.

use super::rows::{Probe, Rows};
use std::fmt;
use std::hash::Hash;
use std::ops::RangeBounds;

/// A consistent view of a table at one moment (see [`Table::snapshot`](super::Table::snapshot)).
pub struct TableSnapshot<K, V> {
    pub(super) rows: std::sync::Arc<Rows<K, V>>,
}

impl<K, V> fmt::Debug for TableSnapshot<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableSnapshot").field("keys", &self.rows.len()).finish()
    }
}

impl<K: Ord + Hash + Clone, V> TableSnapshot<K, V> {
    /// The value of `key` (a B-tree lookup: prefer [`Table::get`](super::Table::get) for point lookups).
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        Q: Ord + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        self.rows.get(&Probe(key)).map(|e| &e.value)
    }

    /// Keys in the snapshot.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when the snapshot has no keys.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Every row in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.rows.iter().map(|e| (&e.key, &e.value))
    }

    /// The rows with keys in `range`, in key order.
    pub fn range<Q, R>(&self, range: R) -> impl Iterator<Item = (&K, &V)> + '_
    where
        R: RangeBounds<Q>,
        Q: Ord + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        self.rows.range((range.start_bound().map(Probe), range.end_bound().map(Probe))).map(|e| (&e.key, &e.value))
    }

    /// The rows whose key starts with `prefix`, in key order (for `String` keys pass a `&str`,
    /// for `Vec<u8>` keys a `&[u8]`).
    pub fn prefix<'a, Q>(&'a self, prefix: &'a Q) -> impl Iterator<Item = (&'a K, &'a V)> + 'a
    where
        Q: Prefix + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        self.rows
            .range((std::ops::Bound::Included(Probe(prefix)), std::ops::Bound::Unbounded))
            .take_while(move |e| e.key.borrow().has_prefix(prefix))
            .map(|e| (&e.key, &e.value))
    }
}

/// Key types with prefixes: `str` and `[u8]`.
pub trait Prefix: Ord {
    /// True when `self` starts with `prefix`.
    fn has_prefix(&self, prefix: &Self) -> bool;
}

impl Prefix for str {
    fn has_prefix(&self, prefix: &Self) -> bool {
        self.starts_with(prefix)
    }
}

impl Prefix for [u8] {
    fn has_prefix(&self, prefix: &Self) -> bool {
        self.starts_with(prefix)
    }
}
