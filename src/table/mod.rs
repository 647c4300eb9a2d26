//! KTable emulation: a compacted topic materialized as a queryable local table.
//!
//! A [`Table`] reads a topic from the beginning (or from the offsets checkpointed in its local
//! store), keeps the newest value per key (last write wins; a tombstone deletes the key), then
//! follows new records. It reads with `isolation.level=read_committed`: records of aborted
//! transactions never appear, and records of open transactions appear once committed.
//!
//! ```no_run
//! use eventstage::table::{Decoder, Table};
//! # async fn run() -> Result<(), eventstage::table::TableError> {
//! let limits = Table::builder("127.0.0.1:9092", "limits")
//!     .keys(Decoder::utf8())
//!     .values(Decoder::<u64>::json())
//!     .store("/var/lib/my-app/limits") // optional: a restart reads only the tail
//!     .open()
//!     .await?;
//! limits.caught_up().await?; // read up to the end offsets seen at open
//! let limit = limits.get("acct-1").map(|l| *l);
//! for row in limits.snapshot().range("acct-1".to_string().."acct-2".to_string()) {
//!     let row = row?; // a table with a row cache reads its store, which can fail
//!     println!("{}: {}", row.key(), *row);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - **Reads never touch the network.** Each row is held once, behind one `Arc`, and reached two
//!   ways: through a sharded hash index for [`Table::get`] (updated as each record is applied), and
//!   through a persistent ordered map published through an atomic pointer per applied batch;
//!   [`Table::snapshot`] is a consistent, immutable view (O(1) to take) that iteration, ranges and
//!   prefix scans run on while the table goes on following the topic.
//! - **One thread per table** consumes the topic and applies records in batches; each batch is
//!   published at once, so readers see whole batches.
//! - **Local store** (optional, sled): rows and consumed offsets are checkpointed together (one
//!   atomic write, by default every second), so a restart loads the store and reads only the
//!   records after the checkpoint. A store remembers its topic and refuses another one.
//! - **Joins.** A stage that holds a `Table` (it is cheap to clone) can consult it in its command
//!   handler (the bank flow's withdrawal limits do). The command sees the table
//!   as of the moment it is processed; the events it persists record what it decided, so replay
//!   never consults the table again.
//! - **Global or co-partitioned.** [`Partitions::All`] reads every partition on every instance;
//!   [`Partitions::Assigned`] with [`Table::follow_assignment`] reads only the partitions the
//!   instance's flow owns, and each new partition is caught up before the flow processes it.

mod assignment;
mod builder;
mod cache;
mod decode;
mod error;
mod exported;
mod follow;
mod rows;
mod snapshot;
mod store;
mod stored;

use assignment::Command;
pub use builder::TableBuilder;
pub use decode::Decoder;
pub use error::TableError;
pub use exported::names as metric_names;
use rows::Rows;
pub use rows::Value;
pub use snapshot::{Prefix, TableSnapshot};

use arc_swap::ArcSwap;
use futures::{Stream, StreamExt};
use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, watch};

/// What to do with a record whose key or value does not decode (or that has no key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadInput {
    /// Skip it, count it in [`TableStats::bad_input`] and log a warning (the default).
    #[default]
    Skip,
    /// Stop following the topic with [`TableError::BadInput`]; the table keeps serving what it
    /// read before the record.
    Stop,
}

/// Which partitions a table reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Partitions {
    /// All of them, including partitions added later (a global table).
    #[default]
    All,
    /// Only these (a table co-partitioned with a fixed set of partitions).
    Only(Vec<i32>),
    /// None at open: the table reads the partitions given to [`Table::assign`] and drops those
    /// taken back by [`Table::revoke`]. A table co-partitioned with a flow follows the flow's
    /// assignment through [`Table::follow_assignment`].
    Assigned,
}

/// A change the table applied, as [`Table::watch`] delivers it.
pub struct Change<K, V> {
    /// The key.
    pub key: K,
    /// The value before (`None`: the key was absent).
    pub old: Option<Value<K, V>>,
    /// The value after (`None`: deleted by a tombstone).
    pub new: Option<Value<K, V>>,
    /// Partition of the record.
    pub partition: i32,
    /// Offset of the record.
    pub offset: i64,
}

impl<K: Clone, V> Clone for Change<K, V> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            old: self.old.clone(),
            new: self.new.clone(),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for Change<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Change")
            .field("key", &self.key)
            .field("old", &self.old)
            .field("new", &self.new)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .finish()
    }
}

/// A watcher fell behind by this many changes (they were dropped for it); take a
/// [`Table::snapshot`] to resynchronize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the watcher fell behind and missed {0} changes; take a snapshot to resynchronize")]
pub struct Lagged(pub u64);

/// Counters of a table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableStats {
    /// Keys in the table.
    pub keys: u64,
    /// Bytes of the keys and values in the table (as read from the topic).
    pub bytes: u64,
    /// Records read from the topic (rows, tombstones and bad records) since open.
    pub records_read: u64,
    /// Rows loaded from the local store at open.
    pub loaded_from_store: u64,
    /// Tombstones read since open.
    pub tombstones: u64,
    /// Records skipped because they did not decode (policy [`BadInput::Skip`]).
    pub bad_input: u64,
    /// End offset of each partition read when the table started reading it (what
    /// [`Table::caught_up`] and [`Table::assign`] wait for).
    pub end_offsets: BTreeMap<i32, i64>,
    /// Next offset to read, per partition.
    pub positions: BTreeMap<i32, i64>,
    /// Checkpoints written to the local store.
    pub checkpoints: u64,
    /// True once the table has read up to [`end_offsets`](Self::end_offsets).
    pub caught_up: bool,
    /// The row cache's budget in bytes ([`TableBuilder::cache`]; 0: no cache, every row in memory).
    pub cache_budget: u64,
    /// Bytes the row cache holds (as it weighs its rows).
    pub cache_bytes: u64,
    /// Rows in the row cache.
    pub cache_entries: u64,
    /// Lookups answered from the row cache.
    pub cache_hits: u64,
    /// Lookups that read the local store.
    pub cache_misses: u64,
}

/// Where the follower thread is.
#[derive(Debug, Clone)]
enum Status {
    CatchingUp,
    Following,
    Failed(TableError),
    Closed,
}

/// Per partition: the next offset to read, and the end offset when the table started reading it.
#[derive(Default, Clone)]
struct Progress {
    positions: BTreeMap<i32, i64>,
    ends: BTreeMap<i32, i64>,
}

#[derive(Default)]
struct Counters {
    bytes: AtomicI64,
    records_read: AtomicU64,
    loaded_from_store: AtomicU64,
    tombstones: AtomicU64,
    bad_input: AtomicU64,
    checkpoints: AtomicU64,
}

/// What the table's handles and its follower thread share.
struct Shared<K, V> {
    topic: String,
    // ArcSwap: readers load the current ordered map without a lock (and never wait for the
    // follower); the follower publishes a new version per applied batch.
    rows: ArcSwap<Rows<K, V>>,
    // The point-lookup index, updated per record: the same entries as `rows`.
    index: rows::Index<K, V>,
    changes: broadcast::Sender<Change<K, V>>,
    status: watch::Sender<Status>,
    counters: Counters,
    // Written by the follower after each batch, read by `stats()`: a mutex is fine off the hot path.
    progress: Mutex<Progress>,
    commands: tokio::sync::mpsc::UnboundedSender<Command>,
    stop: AtomicBool,
    /// A table with a row cache: its rows are in the store (`rows` and `index` stay empty).
    stored: Option<Arc<stored::Stored<K, V>>>,
}

/// Stops the follower when the last handle is dropped.
struct Owner<K, V> {
    shared: Arc<Shared<K, V>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl<K, V> Drop for Owner<K, V> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// A compacted topic materialized as a table: the newest value per key. Cheap to clone; every
/// clone reads the same table. See the [module docs](self).
pub struct Table<K, V> {
    owner: Arc<Owner<K, V>>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        Self { owner: self.owner.clone() }
    }
}

impl<K, V> fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table").field("topic", &self.owner.shared.topic).finish_non_exhaustive()
    }
}

impl<K, V> Table<K, V>
where
    K: Ord + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn shared(&self) -> &Shared<K, V> {
        &self.owner.shared
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.shared().topic
    }

    /// The value of `key`, if present. Never blocks, and never touches the network; a table with
    /// a row cache reads a key it does not hold in memory from its local store (a store that
    /// cannot be read is logged and reads as `None`: [`try_get`](Self::try_get) returns the error).
    pub fn get<Q>(&self, key: &Q) -> Option<Value<K, V>>
    where
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        match self.try_get(key) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(topic = %self.topic(), error = %e, "table lookup failed");
                None
            }
        }
    }

    /// The value of `key`, if present, or why the local store could not say (a table held in
    /// memory never fails).
    ///
    /// # Errors
    /// A store that cannot be read, or a stored row the table's decoders no longer read.
    pub fn try_get<Q>(&self, key: &Q) -> Result<Option<Value<K, V>>, TableError>
    where
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        match &self.shared().stored {
            Some(stored) => stored.get(key),
            None => Ok(self.shared().index.get(key)),
        }
    }

    /// True when `key` is present.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        match &self.shared().stored {
            Some(_) => self.get(key).is_some(),
            None => self.shared().index.contains_key(key),
        }
    }

    /// Keys in the table.
    pub fn len(&self) -> usize {
        match &self.shared().stored {
            Some(stored) => stored.len() as usize,
            None => self.shared().index.len(),
        }
    }

    /// True when the table has no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A consistent, immutable view of the whole table (O(1) to take): iterate it, range over it
    /// and scan prefixes while the table goes on changing.
    pub fn snapshot(&self) -> TableSnapshot<K, V> {
        let view = match &self.shared().stored {
            Some(stored) => snapshot::View::Store(stored.view()),
            None => snapshot::View::Memory(self.shared().rows.load_full()),
        };
        TableSnapshot { view }
    }

    /// Resolves once the table has read every partition up to its end offset as of
    /// [`open`](TableBuilder::open) (records of transactions still open then are not waited for).
    ///
    /// # Errors
    /// The error that stopped the table, or [`TableError::Closed`].
    pub async fn caught_up(&self) -> Result<(), TableError> {
        let mut rx = self.shared().status.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Status::CatchingUp => {}
                Status::Following => return Ok(()),
                Status::Failed(e) => return Err(e.clone()),
                Status::Closed => return Err(TableError::Closed),
            }
            if rx.changed().await.is_err() {
                return Err(TableError::Closed);
            }
        }
    }

    /// The error that stopped the table, if one did.
    pub fn error(&self) -> Option<TableError> {
        match &*self.shared().status.borrow() {
            Status::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// The changes the table applies from now on, in order (per partition, in offset order). A
    /// watcher that falls more than the watch capacity (default 4096) behind gets [`Lagged`] and
    /// continues with newer changes. The stream ends when the table stops.
    ///
    /// To keep a copy in sync, subscribe first and take a [`snapshot`](Self::snapshot) second, then
    /// apply the stream's changes to the copy: a change that the snapshot already holds sets a key
    /// to the value it has, so nothing is missed or wrongly applied.
    pub fn watch(&self) -> impl Stream<Item = Result<Change<K, V>, Lagged>> + Send + 'static {
        tokio_stream::wrappers::BroadcastStream::new(self.shared().changes.subscribe())
            .map(|r| r.map_err(|tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)| Lagged(n)))
    }

    /// Counters and offsets.
    pub fn stats(&self) -> TableStats {
        let s = self.shared();
        let c = &s.counters;
        let progress = s.progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let usage = s.stored.as_ref().map(|stored| stored.cache.usage()).unwrap_or_default();
        TableStats {
            keys: self.len() as u64,
            bytes: c.bytes.load(Ordering::Relaxed).max(0) as u64,
            records_read: c.records_read.load(Ordering::Relaxed),
            loaded_from_store: c.loaded_from_store.load(Ordering::Relaxed),
            tombstones: c.tombstones.load(Ordering::Relaxed),
            bad_input: c.bad_input.load(Ordering::Relaxed),
            end_offsets: progress.ends,
            positions: progress.positions,
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            caught_up: matches!(*s.status.borrow(), Status::Following),
            cache_budget: usage.budget,
            cache_bytes: usage.bytes,
            cache_entries: usage.entries,
            cache_hits: usage.hits,
            cache_misses: usage.misses,
        }
    }

    /// Stops following the topic, writes a last checkpoint and waits for the follower thread.
    /// Other clones keep serving the rows read so far. (Dropping the last clone stops the
    /// follower too, without waiting for it.)
    ///
    /// # Errors
    /// The error that had stopped the table, if one had.
    pub async fn close(self) -> Result<(), TableError> {
        self.shared().stop.store(true, Ordering::SeqCst);
        let thread = self.owner.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.error().map_or(Ok(()), Err)
    }
}
