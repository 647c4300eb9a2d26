//! Opening a table: its consumer, the topic's partitions and ends, the local store and the row
//! cache's budget; then the follower thread starts.

use super::{kafka, Follower, TableConsumer, TableContext};
use crate::table::cache::RowCache;
use crate::table::exported::Exported;
use crate::table::rows::{Index, Rows};
use crate::table::store::{StoreMemory, TableStore, Writer};
use crate::table::stored::Stored;
use crate::table::{Counters, Partitions, Shared, Status, TableBuilder, TableError};
use arc_swap::ArcSwap;
use rdkafka::consumer::Consumer;
use rdkafka::ClientConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

/// The index is sized up front for at most this many keys.
const MAX_PRESIZED_KEYS: usize = 1 << 22;
/// A row cache's budget gives at most this much to the store's block cache and memtables.
const MAX_STORE_SHARE: u64 = 256 << 20;

/// What [`start`] hands to the table: the shared state and the follower thread.
pub(in crate::table) type Started<K, V> = (Arc<Shared<K, V>>, std::thread::JoinHandle<()>);

/// Opens the table: metadata, store, assignment; starts the follower thread.
pub(in crate::table) fn start<K, V>(b: TableBuilder<K, V>) -> Result<Started<K, V>, TableError>
where
    K: Ord + std::hash::Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    let cache = cache_budget(&b)?;
    let mut config = ClientConfig::new();
    if cache.is_some() {
        // The rows are bounded: so is what librdkafka fetches ahead (64 MiB by default).
        config.set("queued.max.messages.kbytes", "16384");
    }
    config
        .set("bootstrap.servers", &b.settings.brokers)
        .set("group.id", format!("eventstage-table-{}", b.settings.topic))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        // The follower takes 10 000 records at a time, so while it reads a backlog librdkafka's
        // fetch queue is often full; with the default 1 s backoff before the next fetch the table
        // read 129k rows/s on Apache Kafka, with 10 ms 500-590k (the e2e bench, 1M keys).
        .set("fetch.queue.backoff.ms", "10");
    for (k, v) in &b.settings.properties {
        config.set(k, v);
    }
    config.set("isolation.level", "read_committed");
    let consumer: TableConsumer = config
        .create_with_context(TableContext { topic: b.settings.topic.clone() })
        .map_err(|e| kafka("create the consumer", e))?;

    let count = partition_count(&consumer, &b.settings.brokers, &b.settings.topic, b.settings.timeout)?;
    let partitions: Vec<i32> = match &b.settings.partitions {
        Partitions::All => (0..count).collect(),
        Partitions::Only(ps) => {
            existing(&b.settings.topic, ps, count)?;
            ps.iter().copied().collect::<BTreeSet<_>>().into_iter().collect()
        }
        Partitions::Assigned => Vec::new(),
    };

    let memory = cache.map_or(StoreMemory::CHECKPOINTS, |(_, store)| store);
    let store = b.settings.store.as_deref().map(|dir| TableStore::open(dir, &b.settings.topic, memory)).transpose()?;
    let marks = watermarks(&consumer, &b.settings.topic, &partitions, b.settings.timeout)?;
    // Sized for the records in the topic (an upper bound of its keys, capped): growing a hash map
    // of a million keys rehashes every key several times on the catch-up path.
    let records: i64 = marks.values().map(|(low, high)| high - low).sum();
    let capacity = if cache.is_some() { 0 } else { (records.max(0) as usize).min(MAX_PRESIZED_KEYS) };
    let stored = match (&store, cache) {
        (Some(store), Some((rows, _))) => Some(Arc::new(Stored {
            store: store.clone(),
            cache: RowCache::new(rows),
            keys: b.keys.clone(),
            values: b.values.clone(),
            owned: ArcSwap::from_pointee(BTreeMap::new()),
        })),
        _ => None,
    };
    let (commands, commands_rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        topic: b.settings.topic.clone(),
        rows: ArcSwap::from_pointee(Rows::new()),
        index: Index::with_capacity(capacity),
        changes: broadcast::channel(b.settings.watch_capacity).0,
        status: watch::channel(Status::CatchingUp).0,
        counters: Counters::default(),
        progress: Mutex::new(Default::default()),
        commands,
        stop: AtomicBool::new(false),
        stored: stored.clone(),
    });
    // A table with a row cache writes each applied batch itself; one held in memory checkpoints
    // in the background.
    let writer = if stored.is_some() { None } else { store.clone().map(Writer::start).transpose()? };
    let mut follower = Follower {
        shared: shared.clone(),
        keys: b.keys,
        values: b.values,
        bad_input: b.settings.bad_input,
        store,
        writer,
        stored,
        batch: HashMap::new(),
        counts: BTreeMap::new(),
        unflushed: false,
        rows: Rows::new(),
        pending_rows: HashMap::new(),
        positions: BTreeMap::new(),
        ends: BTreeMap::new(),
        catching_up: BTreeSet::new(),
        caught_up_now: false,
        follow_all: matches!(b.settings.partitions, Partitions::All),
        count,
        checkpoint_interval: b.settings.checkpoint_interval,
        timeout: b.settings.timeout,
        commands: commands_rx,
        waiters: Vec::new(),
        started: Instant::now(),
        exported: Exported::new(&b.settings.topic),
    };
    follower.read(&consumer, &marks)?;
    follower.publish(&mut Vec::new())?;
    if follower.catching_up.is_empty() {
        shared.status.send_replace(Status::Following);
    }
    tracing::info!(topic = %shared.topic, ?partitions, loaded = follower.keys(), from = ?follower.positions, to = ?follower.ends, "table opened");
    let thread = std::thread::Builder::new()
        .name("eventstage-table".into())
        .spawn(move || follower.run(&consumer))
        .map_err(|e| TableError::Crashed(format!("cannot start the table thread: {e}")))?;
    Ok((shared, thread))
}

/// A row cache's budget split between the rows and the store (`None`: no cache), or why the
/// settings cannot have one.
fn cache_budget<K, V>(b: &TableBuilder<K, V>) -> Result<Option<(u64, StoreMemory)>, TableError> {
    let Some(bytes) = b.settings.cache else { return Ok(None) };
    let refuse = |message: &str| Err(TableError::Settings { topic: b.settings.topic.clone(), message: message.into() });
    if bytes == 0 {
        return refuse("a row cache of 0 bytes cannot hold a row: give it a budget (e.g. 64 MiB), or no cache to hold every row in memory");
    }
    if b.settings.store.is_none() {
        return refuse("a row cache needs a local store (`store(dir)`, CLI `--store DIR`): the rows it does not hold are read from it");
    }
    if !b.keys.can_encode() {
        return refuse(&format!(
            "a row cache needs a key decoder that gives back a key's bytes (`Decoder::with_encoder`); `{}` has none (utf8 and bytes do)",
            b.keys.name()
        ));
    }
    let share = (bytes / 4).min(MAX_STORE_SHARE);
    let store = StoreMemory { cache: (share / 2).max(1 << 20), memtable: (share / 2).max(1 << 20) };
    Ok(Some(((bytes - share).max(1), store)))
}

fn partition_count(consumer: &TableConsumer, brokers: &str, topic: &str, timeout: Duration) -> Result<i32, TableError> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| TableError::Unreachable { brokers: brokers.into(), source })?;
    match md.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len() as i32),
        _ => Err(TableError::MissingTopic { topic: topic.into(), brokers: brokers.into() }),
    }
}

/// `Err` naming the first of `partitions` that a topic of `count` partitions does not have.
pub(super) fn existing(topic: &str, partitions: &[i32], count: i32) -> Result<(), TableError> {
    match partitions.iter().find(|&&p| p < 0 || p >= count) {
        Some(&partition) => Err(TableError::NoSuchPartition { topic: topic.into(), partition, count }),
        None => Ok(()),
    }
}

/// The first and end offsets of each of `partitions`, as of now.
pub(super) fn watermarks(
    consumer: &TableConsumer,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<BTreeMap<i32, (i64, i64)>, TableError> {
    partitions
        .iter()
        .map(|&p| {
            let marks =
                consumer.fetch_watermarks(topic, p, timeout).map_err(|e| kafka("read the partition ends", e))?;
            Ok((p, marks))
        })
        .collect()
}
