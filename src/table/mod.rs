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
//! for (account, limit) in limits.snapshot().range("acct-1".to_string().."acct-2".to_string()) {
//!     println!("{account}: {limit}");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - **Reads never touch the network.** The rows live in memory twice: in a sharded hash map for
//!   [`Table::get`] (updated as each record is applied), and in a persistent ordered map published
//!   through an atomic pointer per applied batch;
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

mod decode;
mod follow;
mod store;

pub use decode::Decoder;

use arc_swap::ArcSwap;
use futures::{Stream, StreamExt};
use imbl::OrdMap;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hash;
use std::ops::RangeBounds;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// Why a table cannot be opened or stopped following its topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// No broker answered.
    #[error("cannot reach the Kafka cluster at {brokers}: {message}; check the broker addresses (--brokers) and that the cluster is up")]
    Unreachable {
        /// The bootstrap servers.
        brokers: String,
        /// The client's message.
        message: String,
    },
    /// The topic does not exist.
    #[error(
        "topic `{topic}` does not exist on {brokers}; create it (cleanup.policy=compact) or check the name (--topic)"
    )]
    MissingTopic {
        /// Topic.
        topic: String,
        /// The bootstrap servers.
        brokers: String,
    },
    /// A requested partition does not exist.
    #[error("topic `{topic}` has {count} partitions; partition {partition} does not exist")]
    NoSuchPartition {
        /// Topic.
        topic: String,
        /// Partition asked for.
        partition: i32,
        /// Partitions the topic has.
        count: i32,
    },
    /// The local store belongs to another topic.
    #[error("the table store at {path} holds topic `{found}`, not `{expected}`: use another store directory for `{expected}`, or delete this one to rebuild it")]
    StoreMismatch {
        /// Store directory.
        path: String,
        /// Its topic.
        found: String,
        /// The topic asked for.
        expected: String,
    },
    /// The local store is behind the topic's start or past its end: the topic was recreated or
    /// truncated since the checkpoint.
    #[error("the table store at {path} read topic `{topic}` partition {partition} up to offset {checkpoint}, but the topic now holds offsets {low}..{high}: the topic was recreated or truncated; delete the store directory to rebuild it")]
    StoreAhead {
        /// Store directory.
        path: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Checkpointed next offset.
        checkpoint: i64,
        /// The partition's first offset.
        low: i64,
        /// The partition's end offset.
        high: i64,
    },
    /// The directory is not a table store.
    #[error("{path} is not an eventstage table store ({why}); give an empty or new directory")]
    NotAStore {
        /// Directory.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The local store failed.
    #[error("table store at {path}: {message}")]
    Store {
        /// Store directory.
        path: String,
        /// What failed.
        message: String,
    },
    /// A record did not decode and the policy is [`BadRecords::Stop`].
    #[error("topic `{topic}` partition {partition} offset {offset}: {reason}; the table stopped before this record (policy: stop); fix the producer or open the table with BadRecords::Skip")]
    BadRecord {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// Why it does not decode.
        reason: String,
    },
    /// Kafka failed in a way retrying does not fix.
    #[error("kafka: {context}: {message}")]
    Kafka {
        /// What the table was doing.
        context: String,
        /// The client's message.
        message: String,
    },
    /// The table was closed.
    #[error("the table was closed")]
    Closed,
}

/// What to do with a record whose key or value does not decode (or that has no key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRecords {
    /// Skip it, count it in [`TableStats::bad_records`] and log a warning (the default).
    #[default]
    Skip,
    /// Stop following the topic with [`TableError::BadRecord`]; the table keeps serving what it
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
    pub old: Option<Arc<V>>,
    /// The value after (`None`: deleted by a tombstone).
    pub new: Option<Arc<V>>,
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
    /// Records skipped because they did not decode (policy [`BadRecords::Skip`]).
    pub bad_records: u64,
    /// End offset of each partition read when the table started reading it (what
    /// [`Table::caught_up`] and [`Table::assign`] wait for).
    pub end_offsets: BTreeMap<i32, i64>,
    /// Next offset to read, per partition.
    pub positions: BTreeMap<i32, i64>,
    /// Checkpoints written to the local store.
    pub checkpoints: u64,
    /// True once the table has read up to [`end_offsets`](Self::end_offsets).
    pub caught_up: bool,
}

/// Where the follower thread is.
#[derive(Debug, Clone)]
enum Status {
    CatchingUp,
    Following,
    Failed(TableError),
    Closed,
}

/// One row: the value, its size as read (for [`TableStats::bytes`]) and its partition (to drop
/// the rows of a revoked partition).
struct Slot<V> {
    value: Arc<V>,
    size: u32,
    partition: i32,
}

impl<V> Clone for Slot<V> {
    fn clone(&self) -> Self {
        Self { value: self.value.clone(), size: self.size, partition: self.partition }
    }
}

/// A change of the partitions a table reads, sent to its follower thread.
enum Command {
    /// Read these too; the reply comes once they are caught up (or why they cannot be read).
    Assign(Vec<i32>, std::sync::mpsc::Sender<Result<(), TableError>>),
    /// Stop reading these and drop their rows; the reply comes once they are gone.
    Revoke(Vec<i32>, std::sync::mpsc::Sender<Result<(), TableError>>),
}

/// Per partition: the next offset to read, and the end offset when the table started reading it.
#[derive(Default, Clone)]
struct Progress {
    positions: BTreeMap<i32, i64>,
    ends: BTreeMap<i32, i64>,
}

/// The rows in key order: a persistent map, so a clone is O(1) and shares all nodes.
type Rows<K, V> = OrdMap<K, Slot<V>>;

#[derive(Default)]
struct Counters {
    bytes: AtomicI64,
    records_read: AtomicU64,
    loaded_from_store: AtomicU64,
    tombstones: AtomicU64,
    bad_records: AtomicU64,
    checkpoints: AtomicU64,
}

/// What the table's handles and its follower thread share.
struct Shared<K, V> {
    topic: String,
    // ArcSwap: readers load the current ordered map without a lock (and never wait for the
    // follower); the follower publishes a new version per applied batch.
    rows: ArcSwap<Rows<K, V>>,
    // The point-lookup index, updated per record. A B-tree lookup of heap-allocated keys costs a
    // cache miss per comparison (over 2 µs at 10^6 keys); a sharded hash map costs a few, and its
    // shard locks are held for one insert, so a reader never waits long.
    // ahash: SipHash (the std default) costs a noticeable share of each record's work here.
    index: dashmap::DashMap<K, Slot<V>, ahash::RandomState>,
    changes: broadcast::Sender<Change<K, V>>,
    status: watch::Sender<Status>,
    counters: Counters,
    // Written by the follower after each batch, read by `stats()`: a mutex is fine off the hot path.
    progress: Mutex<Progress>,
    commands: tokio::sync::mpsc::UnboundedSender<Command>,
    stop: AtomicBool,
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

impl Table<Vec<u8>, Vec<u8>> {
    /// A builder for a table of `topic` on the cluster at `brokers`, with keys and values as raw
    /// bytes until [`TableBuilder::keys`] / [`TableBuilder::values`] say otherwise.
    pub fn builder(brokers: impl Into<String>, topic: impl Into<String>) -> TableBuilder<Vec<u8>, Vec<u8>> {
        TableBuilder {
            settings: Settings {
                brokers: brokers.into(),
                topic: topic.into(),
                partitions: Partitions::All,
                store: None,
                bad_records: BadRecords::Skip,
                properties: Vec::new(),
                checkpoint_interval: Duration::from_secs(1),
                watch_capacity: 4096,
                timeout: Duration::from_secs(30),
            },
            keys: Decoder::bytes(),
            values: Decoder::bytes(),
        }
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

    /// The value of `key`, if present. Never blocks.
    pub fn get<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        Q: Hash + Eq + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        self.shared().index.get(key).map(|s| s.value.clone())
    }

    /// True when `key` is present.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        Q: Hash + Eq + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        self.shared().index.contains_key(key)
    }

    /// Keys in the table.
    pub fn len(&self) -> usize {
        self.shared().index.len()
    }

    /// True when the table has no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A consistent, immutable view of the whole table (O(1) to take): iterate it, range over it
    /// and scan prefixes while the table goes on changing.
    pub fn snapshot(&self) -> TableSnapshot<K, V> {
        TableSnapshot { rows: self.shared().rows.load_full() }
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
        TableStats {
            keys: s.index.len() as u64,
            bytes: c.bytes.load(Ordering::Relaxed).max(0) as u64,
            records_read: c.records_read.load(Ordering::Relaxed),
            loaded_from_store: c.loaded_from_store.load(Ordering::Relaxed),
            tombstones: c.tombstones.load(Ordering::Relaxed),
            bad_records: c.bad_records.load(Ordering::Relaxed),
            end_offsets: progress.ends,
            positions: progress.positions,
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            caught_up: matches!(*s.status.borrow(), Status::Following),
        }
    }

    /// Starts reading `partitions` too (those already read are left as they are): their rows come
    /// from the local store, if any, and then from the topic after the store's checkpoint.
    /// Resolves once they are read up to their end offsets as of this call, so a join that runs
    /// after it sees every row committed before the assignment.
    ///
    /// # Errors
    /// A partition the topic does not have, a store that is ahead of the topic, a failed table,
    /// or [`TableError::Closed`].
    pub async fn assign(&self, partitions: &[i32]) -> Result<(), TableError> {
        let rx = self.send(partitions, Command::Assign)?;
        let replied = tokio::task::spawn_blocking(move || rx.recv()).await;
        self.reply(replied.ok().and_then(Result::ok))
    }

    /// Stops reading `partitions` and drops their rows (a checkpoint keeps them in the local
    /// store, so a later [`assign`](Self::assign) reads only the tail). [`watch`](Self::watch)
    /// reports changes read from the topic, not rows dropped this way.
    ///
    /// # Errors
    /// A failed checkpoint, a failed table, or [`TableError::Closed`].
    pub async fn revoke(&self, partitions: &[i32]) -> Result<(), TableError> {
        let rx = self.send(partitions, Command::Revoke)?;
        let replied = tokio::task::spawn_blocking(move || rx.recv()).await;
        self.reply(replied.ok().and_then(Result::ok))
    }

    /// A synchronous rebalance listener ([`FlowBuilder::on_rebalance`](crate::flow::FlowBuilder::on_rebalance))
    /// that makes this table read the partitions the flow owns of `input_topic`, for a table
    /// co-partitioned with it: same partition count and the same partitioner, so that a key's
    /// table row and its commands share a partition number (Kafka Streams' co-partitioning rule).
    /// Open the table with [`Partitions::Assigned`].
    ///
    /// On assignment it blocks the flow until the table has read the new partitions to their end
    /// (logging while it waits), so the first command of a partition already sees every row
    /// committed before the assignment. On revocation or loss the table drops those partitions.
    pub fn follow_assignment(
        &self,
        input_topic: &str,
    ) -> impl FnMut(&crate::flow::RebalanceEvent, &mut crate::flow::RebalanceActions<'_>) + Send + 'static {
        use crate::flow::RebalanceEvent;
        let (table, input) = (self.clone(), input_topic.to_string());
        move |event, _| {
            let partitions: Vec<i32> =
                event.partitions().iter().filter(|tp| tp.topic == input).map(|tp| tp.partition).collect();
            if partitions.is_empty() {
                return;
            }
            let (what, command): (_, fn(_, _) -> Command) = match event {
                RebalanceEvent::Assigned(_) => ("read", Command::Assign),
                RebalanceEvent::Revoked(_) | RebalanceEvent::Lost(_) => ("drop", Command::Revoke),
            };
            let replied = table.send(&partitions, command).and_then(|rx| {
                let started = std::time::Instant::now();
                loop {
                    match rx.recv_timeout(Duration::from_secs(10)) {
                        Ok(r) => return table.reply(Some(r)),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                            topic = %table.topic(),
                            ?partitions,
                            waited_s = started.elapsed().as_secs(),
                            "the flow waits for the table to catch up on its new partitions"
                        ),
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return table.reply(None),
                    }
                }
            });
            if let Err(e) = replied {
                tracing::error!(topic = %table.topic(), ?partitions, error = %e, "the table could not {what} the flow's partitions");
            }
        }
    }

    fn send(
        &self,
        partitions: &[i32],
        command: fn(Vec<i32>, std::sync::mpsc::Sender<Result<(), TableError>>) -> Command,
    ) -> Result<std::sync::mpsc::Receiver<Result<(), TableError>>, TableError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared().commands.send(command(partitions.to_vec(), tx)).map_err(|_| self.stopped())?;
        Ok(rx)
    }

    /// The follower's reply; none means it stopped before replying.
    fn reply(&self, reply: Option<Result<(), TableError>>) -> Result<(), TableError> {
        reply.unwrap_or_else(|| Err(self.stopped()))
    }

    fn stopped(&self) -> TableError {
        self.error().unwrap_or(TableError::Closed)
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

/// A consistent view of a table at one moment (see [`Table::snapshot`]).
pub struct TableSnapshot<K, V> {
    rows: Arc<Rows<K, V>>,
}

impl<K, V> fmt::Debug for TableSnapshot<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableSnapshot").field("keys", &self.rows.len()).finish()
    }
}

impl<K: Ord + Hash + Clone, V> TableSnapshot<K, V> {
    /// The value of `key` (a B-tree lookup: prefer [`Table::get`] for point lookups).
    pub fn get<Q>(&self, key: &Q) -> Option<&Arc<V>>
    where
        Q: Ord + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        self.rows.get(key).map(|s| &s.value)
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
    pub fn iter(&self) -> impl Iterator<Item = (&K, &Arc<V>)> + '_ {
        self.rows.iter().map(|(k, s)| (k, &s.value))
    }

    /// The rows with keys in `range`, in key order.
    pub fn range<Q, R>(&self, range: R) -> impl Iterator<Item = (&K, &Arc<V>)> + '_
    where
        R: RangeBounds<Q>,
        Q: Ord + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        self.rows.range(range).map(|(k, s)| (k, &s.value))
    }

    /// The rows whose key starts with `prefix`, in key order (for `String` keys pass a `&str`,
    /// for `Vec<u8>` keys a `&[u8]`).
    pub fn prefix<'a, Q>(&'a self, prefix: &'a Q) -> impl Iterator<Item = (&'a K, &'a Arc<V>)> + 'a
    where
        Q: Prefix + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        self.rows
            .range::<_, Q>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| k.borrow().has_prefix(prefix))
            .map(|(k, s)| (k, &s.value))
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

/// Configures and opens a [`Table`].
pub struct TableBuilder<K, V> {
    settings: Settings,
    keys: Decoder<K>,
    values: Decoder<V>,
}

/// What a [`TableBuilder`] holds besides its decoders.
#[derive(Debug)]
struct Settings {
    brokers: String,
    topic: String,
    partitions: Partitions,
    store: Option<PathBuf>,
    bad_records: BadRecords,
    properties: Vec<(String, String)>,
    checkpoint_interval: Duration,
    watch_capacity: usize,
    timeout: Duration,
}

impl<K, V> fmt::Debug for TableBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableBuilder")
            .field("brokers", &self.settings.brokers)
            .field("topic", &self.settings.topic)
            .field("keys", &self.keys)
            .field("values", &self.values)
            .field("partitions", &self.settings.partitions)
            .field("store", &self.settings.store)
            .finish_non_exhaustive()
    }
}

impl<K, V> TableBuilder<K, V> {
    /// The key decoder. Default: the raw bytes.
    #[must_use]
    pub fn keys<K2>(self, keys: Decoder<K2>) -> TableBuilder<K2, V> {
        TableBuilder { settings: self.settings, keys, values: self.values }
    }

    /// The value decoder. Default: the raw bytes.
    #[must_use]
    pub fn values<V2>(self, values: Decoder<V2>) -> TableBuilder<K, V2> {
        TableBuilder { settings: self.settings, keys: self.keys, values }
    }

    /// Which partitions to read. Default: [`Partitions::All`].
    #[must_use]
    pub fn partitions(mut self, partitions: Partitions) -> Self {
        self.settings.partitions = partitions;
        self
    }

    /// Keeps the table in a local store at `dir` (created if missing), so that a restart reads
    /// only the records after the last checkpoint. Default: none (memory only; every open reads
    /// the topic from the beginning).
    #[must_use]
    pub fn store(mut self, dir: impl Into<PathBuf>) -> Self {
        self.settings.store = Some(dir.into());
        self
    }

    /// What to do with records that do not decode. Default: [`BadRecords::Skip`].
    #[must_use]
    pub fn bad_records(mut self, policy: BadRecords) -> Self {
        self.settings.bad_records = policy;
        self
    }

    /// A librdkafka consumer property (e.g. security settings). `isolation.level` stays
    /// `read_committed` and offsets are never committed to the cluster: the table keeps its own.
    #[must_use]
    pub fn consumer_property(mut self, key: &str, value: &str) -> Self {
        self.settings.properties.push((key.into(), value.into()));
        self
    }

    /// How often the local store is checkpointed. Default: 1 s.
    #[must_use]
    pub fn checkpoint_interval(mut self, every: Duration) -> Self {
        self.settings.checkpoint_interval = every;
        self
    }

    /// Changes a [`Table::watch`] stream may fall behind before it lags. Default: 4096.
    #[must_use]
    pub fn watch_capacity(mut self, n: usize) -> Self {
        self.settings.watch_capacity = n.max(1);
        self
    }

    /// How long opening waits for the cluster. Default: 30 s.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }
}

impl<K, V> TableBuilder<K, V>
where
    K: Ord + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Connects, loads the local store (if any) and starts following the topic. Returns at once
    /// after that; [`Table::caught_up`] tells when the table has read the topic to its end.
    ///
    /// # Errors
    /// An unreachable cluster, a missing topic or partition, a store of another topic (or
    /// otherwise unusable), or a bad record in the store under [`BadRecords::Stop`].
    pub async fn open(self) -> Result<Table<K, V>, TableError> {
        let handle = tokio::task::spawn_blocking(move || follow::start(self));
        let (shared, thread) = handle.await.map_err(|e| TableError::Kafka {
            context: "open the table".into(),
            message: format!("the opening task failed: {e}"),
        })??;
        Ok(Table { owner: Arc::new(Owner { shared, thread: Mutex::new(Some(thread)) }) })
    }
}
