//! Configuring and opening a table.

use super::{follow, BadInput, Decoder, Owner, Partitions, Table, TableError};
use std::fmt;
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
                cache: None,
                bad_input: BadInput::Skip,
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

/// Configures and opens a [`Table`].
pub struct TableBuilder<K, V> {
    pub(super) settings: Settings,
    pub(super) keys: Decoder<K>,
    pub(super) values: Decoder<V>,
}

/// What a [`TableBuilder`] holds besides its decoders.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) brokers: String,
    pub(super) topic: String,
    pub(super) partitions: Partitions,
    pub(super) store: Option<PathBuf>,
    pub(super) cache: Option<u64>,
    pub(super) bad_input: BadInput,
    pub(super) properties: Vec<(String, String)>,
    pub(super) checkpoint_interval: Duration,
    pub(super) watch_capacity: usize,
    pub(super) timeout: Duration,
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
            .field("cache", &self.settings.cache)
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

    /// Holds the table's rows in its local store ([`store`](Self::store), required) and only the
    /// rows used lately in memory, within `bytes` for the whole table: for tables larger than
    /// memory. Default: none (every row in memory).
    ///
    /// - A quarter of the budget (at most 256 MiB) is the store's block cache and memtables; the
    ///   rest holds decoded rows (an S3-FIFO cache: a burst of keys read once does not push out
    ///   the hot ones). A row weighs its key and value bytes plus about 150 bytes.
    /// - [`Table::get`] of a row not in memory reads the store (tens of µs), and keeps the row.
    /// - Each batch of records the table applies is written to the store at once, in one atomic
    ///   write with its offsets; [`Table::snapshot`] is a consistent view of the store (whole
    ///   batches), and iterates in the order of the record keys' bytes.
    /// - A restart reads nothing up front: the store holds the rows, and the table reads the
    ///   topic from the store's offsets.
    /// - The key decoder must be able to give back a key's bytes ([`Decoder::with_encoder`];
    ///   [`Decoder::utf8`] and [`Decoder::bytes`] can).
    ///
    /// Opening refuses a cache without a store, a key decoder without an encoder, and 0 bytes.
    #[must_use]
    pub fn cache(mut self, bytes: u64) -> Self {
        self.settings.cache = Some(bytes);
        self
    }

    /// What to do with records that do not decode. Default: [`BadInput::Skip`].
    #[must_use]
    pub fn bad_input(mut self, policy: BadInput) -> Self {
        self.settings.bad_input = policy;
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
    /// otherwise unusable), or a bad record in the store under [`BadInput::Stop`].
    pub async fn open(self) -> Result<Table<K, V>, TableError> {
        let handle = tokio::task::spawn_blocking(move || follow::start(self));
        let (shared, thread) =
            handle.await.map_err(|e| TableError::Crashed(format!("the task opening the table failed: {e}")))??;
        Ok(Table { owner: Arc::new(Owner { shared, thread: Mutex::new(Some(thread)) }) })
    }
}
