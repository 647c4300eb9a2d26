//! The follower thread: opens the topic, loads the store, then consumes and applies records in
//! batches, publishing each batch to the readers and checkpointing the store.

use super::assignment::Reply;
use super::exported::Exported;
use super::rows::{Entry, Index, Probe, Rows};
use super::store::{PendingRow, TableStore, Writer};
use super::{
    BadInput, Change, Command, Counters, Decoder, Partitions, Progress, Shared, Status, TableBuilder, TableError,
};
use arc_swap::ArcSwap;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

/// The index is sized up front for at most this many keys.
const MAX_PRESIZED_KEYS: usize = 1 << 22;

/// Records applied (and published) together at most.
const MAX_BATCH: usize = 10_000;
/// While the table reads a backlog (full batches), readers' ordered snapshot is published at most
/// this often. Publishing shares every node of the ordered map with the readers, so the next
/// batch copies each node it touches (pointers to the rows): published per 10 000-record batch, a
/// catch-up of random keys copies most of the map every batch.
const PUBLISH_WHILE_BEHIND: Duration = Duration::from_secs(1);
/// Rows waiting for a checkpoint that force one before the interval.
const MAX_PENDING_ROWS: usize = 200_000;
/// Rows waiting while a checkpoint is being written that make reading wait for it (memory bound).
const MAX_WAITING_ROWS: usize = 1_000_000;
/// How often a table of all partitions looks for new partitions.
const METADATA_REFRESH: Duration = Duration::from_secs(30);

struct TableContext {
    topic: String,
}

impl ClientContext for TableContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(topic = %self.topic, %error, reason, "table consumer error (the client retries)");
        }
    }
}

impl ConsumerContext for TableContext {}

type TableConsumer = BaseConsumer<TableContext>;

fn kafka(context: &str, e: KafkaError) -> TableError {
    TableError::Kafka { context: context.into(), source: e }
}

/// What [`start`] hands to the table: the shared state and the follower thread.
pub(super) type Started<K, V> = (Arc<Shared<K, V>>, std::thread::JoinHandle<()>);

/// Opens the table: metadata, store, assignment; starts the follower thread.
pub(super) fn start<K, V>(b: TableBuilder<K, V>) -> Result<Started<K, V>, TableError>
where
    K: Ord + std::hash::Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    let mut config = ClientConfig::new();
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

    let store = b.settings.store.as_deref().map(|dir| TableStore::open(dir, &b.settings.topic)).transpose()?;
    let marks = watermarks(&consumer, &b.settings.topic, &partitions, b.settings.timeout)?;
    // Sized for the records in the topic (an upper bound of its keys, capped): growing a hash map
    // of a million keys rehashes every key several times on the catch-up path.
    let records: i64 = marks.values().map(|(low, high)| high - low).sum();
    let capacity = (records.max(0) as usize).min(MAX_PRESIZED_KEYS);
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
    });
    let writer = store.clone().map(Writer::start).transpose()?;
    let mut follower = Follower {
        shared: shared.clone(),
        keys: b.keys,
        values: b.values,
        bad_input: b.settings.bad_input,
        store,
        writer,
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
    follower.publish(&mut Vec::new());
    if follower.catching_up.is_empty() {
        shared.status.send_replace(Status::Following);
    }
    tracing::info!(topic = %shared.topic, ?partitions, loaded = follower.rows.len(), from = ?follower.positions, to = ?follower.ends, "table opened");
    let thread = std::thread::Builder::new()
        .name("eventstage-table".into())
        .spawn(move || follower.run(&consumer))
        .map_err(|e| TableError::Crashed(format!("cannot start the table thread: {e}")))?;
    Ok((shared, thread))
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
fn existing(topic: &str, partitions: &[i32], count: i32) -> Result<(), TableError> {
    match partitions.iter().find(|&&p| p < 0 || p >= count) {
        Some(&partition) => Err(TableError::NoSuchPartition { topic: topic.into(), partition, count }),
        None => Ok(()),
    }
}

/// The first and end offsets of each of `partitions`, as of now.
fn watermarks(
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

/// Decodes a record's key and value; `Err` says why it cannot be a row.
fn decode<K, V>(
    keys: &Decoder<K>,
    values: &Decoder<V>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<(K, Option<V>), String> {
    let key = key.ok_or_else(|| "the record has no key, so it cannot be a table row".to_string())?;
    let key = keys.decode(key).map_err(|e| format!("key does not decode: {e}"))?;
    let value = value.map(|v| values.decode(v).map_err(|e| format!("value does not decode: {e}"))).transpose()?;
    Ok((key, value))
}

/// Rows read back from the store.
type Loaded<K, V> = Vec<Entry<K, V>>;

/// The store's rows of the `wanted` partitions, and their bytes.
fn load<K, V>(
    store: &TableStore,
    keys: &Decoder<K>,
    values: &Decoder<V>,
    bad_input: BadInput,
    wanted: &BTreeSet<i32>,
    counters: &Counters,
) -> Result<(Loaded<K, V>, i64), TableError> {
    let mut rows = Vec::new();
    let mut bytes = 0i64;
    if wanted.is_empty() {
        return Ok((rows, bytes));
    }
    for row in store.rows() {
        let (raw_key, partition, raw_value) = row?;
        if !wanted.contains(&partition) {
            continue;
        }
        match decode(keys, values, Some(&raw_key), Some(&raw_value)) {
            Ok((key, Some(value))) => {
                let size = (raw_key.len() + raw_value.len()) as u32;
                bytes += i64::from(size);
                rows.push(Entry::new(key, value, size, partition));
            }
            Ok((_, None)) => {}
            Err(reason) if bad_input == BadInput::Stop => {
                return Err(TableError::Store {
                    path: store.path(),
                    message: format!("a stored row of partition {partition} does not decode ({reason}); the decoders changed since the store was written: delete the store to rebuild it"),
                })
            }
            Err(reason) => {
                counters.bad_input.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition, %reason, "stored row skipped");
            }
        }
    }
    Ok((rows, bytes))
}

/// Someone waiting for partitions to be caught up (see [`Table::assign`](super::Table::assign)).
type Waiter = (BTreeSet<i32>, Reply);

struct Follower<K, V> {
    shared: Arc<Shared<K, V>>,
    keys: Decoder<K>,
    values: Decoder<V>,
    bad_input: BadInput,
    store: Option<TableStore>,
    /// Writes the store's checkpoints in the background.
    writer: Option<Writer>,
    /// The follower's working copy; each batch publishes a clone (O(1): the map is persistent).
    rows: Rows<K, V>,
    /// Rows changed since the last checkpoint, newest per key.
    pending_rows: HashMap<Vec<u8>, PendingRow>,
    positions: BTreeMap<i32, i64>,
    ends: BTreeMap<i32, i64>,
    /// Partitions not yet read up to their end as of open.
    catching_up: BTreeSet<i32>,
    /// The last partition reached its end in the batch being applied.
    caught_up_now: bool,
    follow_all: bool,
    count: i32,
    checkpoint_interval: Duration,
    timeout: Duration,
    commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
    /// Replies owed once their partitions are caught up.
    waiters: Vec<Waiter>,
    started: Instant,
    exported: Exported,
}

impl<K, V> Follower<K, V>
where
    K: Ord + std::hash::Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn run(mut self, consumer: &TableConsumer) {
        let result = self.follow(consumer);
        let checkpointed = self.checkpoint(true).map(drop);
        self.export(consumer, true);
        let status = match result.and(checkpointed) {
            Ok(()) => Status::Closed,
            Err(e) => {
                tracing::error!(topic = %self.shared.topic, error = %e, "table stopped");
                Status::Failed(e)
            }
        };
        self.shared.status.send_replace(status);
    }

    fn follow(&mut self, consumer: &TableConsumer) -> Result<(), TableError> {
        let mut last_checkpoint = Instant::now();
        let mut last_refresh = Instant::now();
        let mut last_publish = Instant::now();
        let mut changes = Vec::new();
        while !self.shared.stop.load(Ordering::SeqCst) {
            while let Ok(command) = self.commands.try_recv() {
                self.command(consumer, command, &mut changes)?;
            }
            let mut polled = 0;
            let mut timeout = Duration::from_millis(100);
            while polled < MAX_BATCH {
                let Some(result) = consumer.poll(timeout) else { break };
                timeout = Duration::ZERO;
                polled += 1;
                let applied = match result {
                    Ok(msg) => self.apply(&msg, &mut changes),
                    Err(KafkaError::PartitionEOF(p)) => {
                        self.reached_end(p);
                        Ok(())
                    }
                    Err(e) => {
                        tracing::warn!(topic = %self.shared.topic, error = %e, "table consumer error (the client retries)");
                        Ok(())
                    }
                };
                if let Err(e) = applied {
                    // What was applied before the failing record stays readable.
                    self.publish(&mut changes);
                    return Err(e);
                }
            }
            let behind = polled == MAX_BATCH && !self.caught_up_now;
            if polled > 0 && (!behind || last_publish.elapsed() >= PUBLISH_WHILE_BEHIND) {
                self.publish(&mut changes);
                last_publish = Instant::now();
            }
            if self.caught_up_now {
                self.announce_caught_up();
            }
            self.wake_waiters();
            self.export(consumer, false);
            if self.pending_rows.len() >= MAX_PENDING_ROWS
                || (!self.pending_rows.is_empty() && last_checkpoint.elapsed() >= self.checkpoint_interval)
            {
                if self.checkpoint(false)? {
                    last_checkpoint = Instant::now();
                }
            } else {
                self.collect_checkpoint(false)?;
            }
            if self.follow_all && last_refresh.elapsed() >= METADATA_REFRESH {
                self.add_new_partitions(consumer);
                last_refresh = Instant::now();
            }
        }
        self.publish(&mut changes);
        Ok(())
    }

    fn apply(&mut self, msg: &BorrowedMessage<'_>, changes: &mut Vec<Change<K, V>>) -> Result<(), TableError> {
        let (p, offset) = (msg.partition(), msg.offset());
        if self.positions.get(&p).is_some_and(|&pos| offset < pos) {
            return Ok(()); // read again by a re-fetch: applied already
        }
        let counters = &self.shared.counters;
        counters.records_read.fetch_add(1, Ordering::Relaxed);
        match decode(&self.keys, &self.values, msg.key(), msg.payload()) {
            Ok((key, value)) => {
                let raw_key = msg.key().unwrap_or_default();
                let (old, new) = match value {
                    None => {
                        counters.tombstones.fetch_add(1, Ordering::Relaxed);
                        self.shared.index.remove(&key);
                        (self.rows.remove(&Probe(&key)), None)
                    }
                    Some(value) => {
                        let size = (raw_key.len() + msg.payload_len()) as u32;
                        let entry = Entry::new(key.clone(), value, size, p);
                        counters.bytes.fetch_add(i64::from(size), Ordering::Relaxed);
                        self.shared.index.insert(entry.clone());
                        (self.rows.insert(entry.clone()), Some(entry))
                    }
                };
                if let Some(old) = &old {
                    counters.bytes.fetch_sub(i64::from(old.size), Ordering::Relaxed);
                }
                if self.store.is_some() {
                    let row = msg.payload().map(|v| (p, v.to_vec()));
                    self.pending_rows.insert(raw_key.to_vec(), row);
                }
                if self.shared.changes.receiver_count() > 0 {
                    changes.push(Change {
                        key,
                        old: old.map(|e| e.value()),
                        new: new.map(|e| e.value()),
                        partition: p,
                        offset,
                    });
                }
            }
            Err(reason) => match self.bad_input {
                BadInput::Stop => {
                    return Err(TableError::BadInput { topic: self.shared.topic.clone(), partition: p, offset, reason })
                }
                BadInput::Skip => {
                    let n = counters.bad_input.fetch_add(1, Ordering::Relaxed) + 1;
                    if n <= 10 || n % 1000 == 0 {
                        tracing::warn!(topic = %self.shared.topic, partition = p, offset, %reason, skipped = n, "record skipped");
                    }
                }
            },
        }
        self.positions.insert(p, offset + 1);
        if self.catching_up.contains(&p) && self.ends.get(&p).is_some_and(|&end| offset + 1 >= end) {
            self.reached_end(p);
        }
        Ok(())
    }

    /// Starts reading the partitions of `marks` (their first and end offsets): loads their rows
    /// from the store, then assigns them to the consumer from the store's checkpoint (or their
    /// first offset).
    fn read(&mut self, consumer: &TableConsumer, marks: &BTreeMap<i32, (i64, i64)>) -> Result<(), TableError> {
        let topic = self.shared.topic.clone();
        self.collect_checkpoint(true)?; // the store's offsets and rows as of its last checkpoint
        let checkpoints = self.store.as_ref().map(TableStore::offsets).transpose()?.unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        let mut starts = BTreeMap::new();
        for (&p, &(low, high)) in marks {
            let start = match checkpoints.get(&p) {
                Some(&c) if c > high || c < low => {
                    let path = self.store.as_ref().map(TableStore::path).unwrap_or_default();
                    return Err(TableError::StoreAhead { path, topic, partition: p, checkpoint: c, low, high });
                }
                Some(&c) => c,
                None => low,
            };
            tpl.add_partition_offset(&topic, p, Offset::Offset(start)).map_err(|e| kafka("assign", e))?;
            starts.insert(p, start);
        }
        if let Some(store) = &self.store {
            let started = Instant::now();
            let wanted = marks.keys().copied().collect();
            let counters = &self.shared.counters;
            let (rows, bytes) = load(store, &self.keys, &self.values, self.bad_input, &wanted, counters)?;
            counters.loaded_from_store.fetch_add(rows.len() as u64, Ordering::Relaxed);
            counters.bytes.fetch_add(bytes, Ordering::Relaxed);
            let (n, decoded) = (rows.len(), started.elapsed());
            for entry in rows {
                self.shared.index.insert(entry.clone());
                self.rows.insert(entry);
            }
            tracing::info!(
                topic = %topic,
                rows = n,
                read_ms = decoded.as_millis() as u64,
                indexed_ms = (started.elapsed() - decoded).as_millis() as u64,
                "rows loaded from the store"
            );
        }
        consumer.incremental_assign(&tpl).map_err(|e| kafka("assign the partitions", e))?;
        for (&p, &(_, high)) in marks {
            self.positions.insert(p, starts[&p]);
            self.ends.insert(p, high);
            if starts[&p] < high {
                self.catching_up.insert(p);
            }
        }
        Ok(())
    }

    /// Carries out an [`assign`](super::Table::assign) or [`revoke`](super::Table::revoke). Only a
    /// failing store stops the table; other errors go to the caller.
    fn command(
        &mut self,
        consumer: &TableConsumer,
        command: Command,
        changes: &mut Vec<Change<K, V>>,
    ) -> Result<(), TableError> {
        match command {
            Command::Assign(partitions, reply) => {
                let new: Vec<i32> = partitions.into_iter().filter(|p| !self.positions.contains_key(p)).collect();
                let read = existing(&self.shared.topic, &new, self.count)
                    .and_then(|()| watermarks(consumer, &self.shared.topic, &new, self.timeout))
                    .and_then(|marks| self.read(consumer, &marks));
                match read {
                    Ok(()) => {
                        tracing::info!(topic = %self.shared.topic, partitions = ?new, "table reads assigned partitions");
                        self.publish(changes);
                        self.waiters.push((new.into_iter().collect(), reply));
                    }
                    Err(e @ TableError::Store { .. }) => {
                        let _ = reply.send(Err(e.clone()));
                        return Err(e);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Revoke(partitions, reply) => {
                let gone: BTreeSet<i32> = partitions.into_iter().filter(|p| self.positions.contains_key(p)).collect();
                let revoked = self.revoke(consumer, &gone);
                self.publish(changes);
                let _ = reply.send(revoked.clone());
                revoked?;
            }
        }
        Ok(())
    }

    /// Stops reading `gone` and drops their rows, after a checkpoint that keeps them in the store.
    fn revoke(&mut self, consumer: &TableConsumer, gone: &BTreeSet<i32>) -> Result<(), TableError> {
        if gone.is_empty() {
            return Ok(());
        }
        self.checkpoint(true)?;
        let mut tpl = TopicPartitionList::new();
        for &p in gone {
            tpl.add_partition(&self.shared.topic, p);
            self.reached_end(p);
            self.positions.remove(&p);
            self.ends.remove(&p);
        }
        if let Err(e) = consumer.incremental_unassign(&tpl) {
            tracing::warn!(topic = %self.shared.topic, error = %e, "could not unassign revoked partitions");
        }
        let dropped: Vec<Entry<K, V>> = self.rows.iter().filter(|e| gone.contains(&e.partition)).cloned().collect();
        let mut bytes = 0;
        for entry in &dropped {
            self.rows.remove(entry);
            self.shared.index.remove(&entry.key);
            bytes += i64::from(entry.size);
        }
        self.shared.counters.bytes.fetch_sub(bytes, Ordering::Relaxed);
        tracing::info!(topic = %self.shared.topic, partitions = ?gone, rows = dropped.len(), "table dropped revoked partitions");
        Ok(())
    }

    /// Replies to those waiting for partitions that are now caught up.
    fn wake_waiters(&mut self) {
        let catching_up = &self.catching_up;
        self.waiters.retain(|(partitions, reply)| {
            let done = partitions.is_disjoint(catching_up);
            if done {
                let _ = reply.send(Ok(()));
            }
            !done
        });
    }

    fn reached_end(&mut self, p: i32) {
        if self.catching_up.remove(&p) && self.catching_up.is_empty() {
            // Announced once this batch is published, so a reader woken by caught_up() sees it.
            self.caught_up_now = true;
        }
    }

    fn announce_caught_up(&mut self) {
        self.caught_up_now = false;
        // A checkpoint starts now (in the background: readers need not wait for the store), so a
        // restart soon after reads little again.
        if let Err(e) = self.checkpoint(false) {
            tracing::warn!(topic = %self.shared.topic, error = %e, "checkpoint after catching up failed");
        }
        tracing::info!(
            topic = %self.shared.topic,
            keys = self.rows.len(),
            records = self.shared.counters.records_read.load(Ordering::Relaxed),
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "table caught up"
        );
        self.shared.status.send_replace(Status::Following);
    }

    /// Publishes the table's metrics (once a second, or `now`).
    fn export(&mut self, consumer: &TableConsumer, now: bool) {
        // Counting the index's keys visits every shard: only when publishing.
        let keys = || self.shared.index.len();
        let topic = &self.shared.topic;
        let end_of = |p| consumer.fetch_watermarks(topic, p, Duration::from_secs(1)).ok().map(|(_, high)| high);
        self.exported.publish(now, end_of, &self.shared.counters, keys, &self.positions, self.catching_up.len());
    }

    /// Makes the applied records visible: the new map to readers, then the changes to watchers.
    fn publish(&mut self, changes: &mut Vec<Change<K, V>>) {
        self.shared.rows.store(Arc::new(self.rows.clone()));
        *self.shared.progress.lock().unwrap_or_else(|p| p.into_inner()) =
            Progress { positions: self.positions.clone(), ends: self.ends.clone() };
        for c in changes.drain(..) {
            // An error only means that every watcher has gone.
            let _ = self.shared.changes.send(c);
        }
    }

    /// Hands the rows changed since the last checkpoint and the positions to the store's writer.
    /// `durable`: waits until they are on disk. Otherwise, while a checkpoint is being written the
    /// rows keep collecting (newest per key) for the next one, unless there are too many of them.
    /// Returns whether a checkpoint was started.
    fn checkpoint(&mut self, durable: bool) -> Result<bool, TableError> {
        let wait = durable || self.pending_rows.len() >= MAX_WAITING_ROWS;
        self.collect_checkpoint(wait)?;
        let Some(writer) = &mut self.writer else { return Ok(false) };
        if writer.busy() {
            return Ok(false);
        }
        writer.submit(std::mem::take(&mut self.pending_rows), self.positions.clone())?;
        if durable {
            self.collect_checkpoint(true)?;
        }
        Ok(true)
    }

    /// Counts the checkpoint being written if it has finished (`wait`: waits for it); its error
    /// stops the table.
    fn collect_checkpoint(&mut self, wait: bool) -> Result<(), TableError> {
        let Some(writer) = &mut self.writer else { return Ok(()) };
        if writer.collect(wait)? {
            self.shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A table of all partitions also reads partitions added to the topic after it opened.
    fn add_new_partitions(&mut self, consumer: &TableConsumer) {
        let md = match consumer.fetch_metadata(Some(&self.shared.topic), Duration::from_secs(5)) {
            Ok(md) => md,
            Err(e) => {
                tracing::debug!(topic = %self.shared.topic, error = %e, "metadata refresh failed");
                return;
            }
        };
        let Some(count) = md.topics().first().map(|t| t.partitions().len() as i32) else { return };
        if count <= self.count {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for p in self.count..count {
            if tpl.add_partition_offset(&self.shared.topic, p, Offset::Beginning).is_ok() {
                self.positions.insert(p, 0);
            }
        }
        match consumer.incremental_assign(&tpl) {
            Ok(()) => {
                tracing::info!(topic = %self.shared.topic, from = self.count, to = count, "following new partitions");
                self.count = count;
            }
            Err(e) => tracing::warn!(topic = %self.shared.topic, error = %e, "could not follow new partitions"),
        }
    }
}
