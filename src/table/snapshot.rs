//! Consistent, immutable views of a table: iteration, ranges and prefix scans.

use super::rows::{Probe, Rows, Value};
use super::stored::StoreView;
use super::TableError;
use std::fmt;
use std::hash::Hash;
use std::ops::{Bound, RangeBounds};

/// A consistent view of a table at one moment (see [`Table::snapshot`](super::Table::snapshot)).
///
/// Its reads return `Result`s: a table with a row cache ([`TableBuilder::cache`](super::TableBuilder::cache))
/// reads them from its local store, which can fail (a damaged store, or a stored row the table's
/// decoders no longer read). A table held in memory never fails them.
pub struct TableSnapshot<K, V> {
    pub(super) view: View<K, V>,
}

pub(super) enum View<K, V> {
    Memory(std::sync::Arc<Rows<K, V>>),
    Store(StoreView<K, V>),
}

type BoxedRows<'a, K, V> = Box<dyn Iterator<Item = Result<Value<K, V>, TableError>> + 'a>;

impl<K, V> fmt::Debug for TableSnapshot<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (keys, store) = match &self.view {
            View::Memory(rows) => (rows.len() as u64, false),
            View::Store(view) => (view.len(), true),
        };
        f.debug_struct("TableSnapshot").field("keys", &keys).field("store", &store).finish()
    }
}

/// A bound on `Q` as a bound on record key bytes.
fn raw_bound<K, V, Q>(view: &StoreView<K, V>, bound: Bound<&Q>) -> Result<Bound<Vec<u8>>, TableError>
where
    K: Hash + Eq + Clone,
    Q: ToOwned<Owned = K> + ?Sized,
{
    Ok(match bound {
        Bound::Included(q) => Bound::Included(view.encode(&q.to_owned())?),
        Bound::Excluded(q) => Bound::Excluded(view.encode(&q.to_owned())?),
        Bound::Unbounded => Bound::Unbounded,
    })
}

impl<K: Ord + Hash + Clone, V> TableSnapshot<K, V> {
    /// The value of `key` (a B-tree lookup in a table held in memory: prefer
    /// [`Table::get`](super::Table::get) for point lookups).
    ///
    /// # Errors
    /// A store that cannot be read, or a stored row that does not decode.
    pub fn get<Q>(&self, key: &Q) -> Result<Option<Value<K, V>>, TableError>
    where
        Q: Ord + ToOwned<Owned = K> + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        match &self.view {
            View::Memory(rows) => Ok(rows.get(&Probe(key)).map(|e| e.value())),
            View::Store(view) => {
                let key = key.to_owned();
                view.get(&view.encode(&key)?, key)
            }
        }
    }

    /// Keys in the snapshot.
    pub fn len(&self) -> usize {
        match &self.view {
            View::Memory(rows) => rows.len(),
            View::Store(view) => view.len() as usize,
        }
    }

    /// True when the snapshot has no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every row in key order (for a table with a row cache: in the order of the record keys'
    /// bytes, the same for `String` and `Vec<u8>` keys).
    pub fn iter(&self) -> impl Iterator<Item = Result<Value<K, V>, TableError>> + '_ {
        let rows: BoxedRows<'_, K, V> = match &self.view {
            View::Memory(rows) => Box::new(rows.iter().map(|e| Ok(e.value()))),
            View::Store(view) => Box::new(view.range((Bound::Unbounded, Bound::Unbounded))),
        };
        rows
    }

    /// The rows with keys in `range`, in key order (see [`iter`](Self::iter)).
    pub fn range<Q, R>(&self, range: R) -> impl Iterator<Item = Result<Value<K, V>, TableError>> + '_
    where
        R: RangeBounds<Q>,
        Q: Ord + ToOwned<Owned = K> + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        let rows: BoxedRows<'_, K, V> = match &self.view {
            View::Memory(rows) => Box::new(
                rows.range((range.start_bound().map(Probe), range.end_bound().map(Probe))).map(|e| Ok(e.value())),
            ),
            View::Store(view) => {
                match raw_bound(view, range.start_bound()).and_then(|s| Ok((s, raw_bound(view, range.end_bound())?))) {
                    Ok(bounds) => Box::new(view.range(bounds)),
                    Err(e) => Box::new(std::iter::once(Err(e))),
                }
            }
        };
        rows
    }

    /// The rows whose key starts with `prefix`, in key order (for `String` keys pass a `&str`,
    /// for `Vec<u8>` keys a `&[u8]`).
    pub fn prefix<'a, Q>(&'a self, prefix: &'a Q) -> impl Iterator<Item = Result<Value<K, V>, TableError>> + 'a
    where
        Q: Prefix + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        let rows: BoxedRows<'a, K, V> = match &self.view {
            View::Memory(rows) => Box::new(
                rows.range((Bound::Included(Probe(prefix)), Bound::Unbounded))
                    .take_while(move |e| e.key.borrow().has_prefix(prefix))
                    .map(|e| Ok(e.value())),
            ),
            View::Store(view) => Box::new(view.prefix(prefix.prefix_bytes())),
        };
        rows
    }
}

/// Key types with prefixes: `str` and `[u8]`.
pub trait Prefix: Ord {
    /// True when `self` starts with `prefix`.
    fn has_prefix(&self, prefix: &Self) -> bool;

    /// The bytes of `self` as a record key starts with them (a table with a row cache scans its
    /// store by them).
    fn prefix_bytes(&self) -> &[u8];
}

impl Prefix for str {
    fn has_prefix(&self, prefix: &Self) -> bool {
        self.starts_with(prefix)
    }

    fn prefix_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Prefix for [u8] {
    fn has_prefix(&self, prefix: &Self) -> bool {
        self.starts_with(prefix)
    }

    fn prefix_bytes(&self) -> &[u8] {
        self
    }
}
