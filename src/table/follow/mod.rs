//! The follower thread: consumes and applies records in batches, publishing each batch to the
//! readers and checkpointing the store. Opening the table is in `open`; what a table with a row
//! cache does differently (its rows written to the store per batch) is in `cached`.

mod cached;
mod open;

pub(super) use open::start;

use super::assignment::Reply;
use super::exported::Exported;
use super::rows::{Entry, Probe, Rows};
use super::store::{Count, PendingRow, TableStore, Writer};
use super::stored::Stored;
use super::{BadInput, Change, Command, Counters, Decoder, Progress, Shared, Status, TableError};
use open::{existing, watermarks};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A key of a batch, and its new row (decoded, and its value's bytes for the store; `None`:
/// deleted).
type Pending<K, V> = (K, Option<(Entry<K, V>, Vec<u8>)>);

/// Someone waiting for partitions to be caught up (see [`Table::assign`](super::Table::assign)).
type Waiter = (BTreeSet<i32>, Reply);

struct Follower<K, V> {
    shared: Arc<Shared<K, V>>,
    keys: Decoder<K>,
    values: Decoder<V>,
    bad_input: BadInput,
    store: Option<TableStore>,
    /// Writes the store's checkpoints in the background (a table held in memory).
    writer: Option<Writer>,
    /// A table with a row cache: the store holds its rows.
    stored: Option<Arc<Stored<K, V>>>,
    /// With a row cache: the rows of the batch being applied, by record key (written to the store
    /// when it is published): the decoded key, and the new row with its value bytes (`None`:
    /// deleted).
    batch: HashMap<Vec<u8>, Pending<K, V>>,
    /// With a row cache: the rows and bytes of each partition read, as the store will hold them
    /// once the batch is written.
    counts: BTreeMap<i32, Count>,
    /// With a row cache: batches were written since the last flush.
    unflushed: bool,
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
                    self.publish(&mut changes)?;
                    return Err(e);
                }
            }
            // With a row cache every batch is written (and published) at once: its rows are held
            // in memory until then.
            let behind = polled == MAX_BATCH && !self.caught_up_now && self.stored.is_none();
            if polled > 0 && (!behind || last_publish.elapsed() >= PUBLISH_WHILE_BEHIND) {
                self.publish(&mut changes)?;
                last_publish = Instant::now();
            }
            if self.caught_up_now {
                self.announce_caught_up();
            }
            self.wake_waiters();
            self.export(consumer, false);
            let pending = self.unflushed || !self.pending_rows.is_empty();
            if self.pending_rows.len() >= MAX_PENDING_ROWS
                || (pending && last_checkpoint.elapsed() >= self.checkpoint_interval)
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
        self.publish(&mut changes)
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
                if value.is_none() {
                    counters.tombstones.fetch_add(1, Ordering::Relaxed);
                }
                let size = (raw_key.len() + msg.payload_len()) as u32;
                counters.bytes.fetch_add(if value.is_some() { i64::from(size) } else { 0 }, Ordering::Relaxed);
                let new = value.map(|value| Entry::new(key.clone(), value, size, p));
                let old = match self.stored.clone() {
                    Some(stored) => self.apply_stored(&stored, raw_key, msg.payload(), &key, new.clone())?,
                    None => {
                        let old = match &new {
                            None => {
                                self.shared.index.remove(&key);
                                self.rows.remove(&Probe(&key))
                            }
                            Some(entry) => {
                                self.shared.index.insert(entry.clone());
                                self.rows.insert(entry.clone())
                            }
                        };
                        if let Some(old) = &old {
                            counters.bytes.fetch_sub(i64::from(old.size), Ordering::Relaxed);
                        }
                        if self.store.is_some() {
                            let row = msg.payload().map(|v| (p, v.to_vec()));
                            self.pending_rows.insert(raw_key.to_vec(), row);
                        }
                        old
                    }
                };
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

    /// Keys in the table.
    fn keys(&self) -> usize {
        match &self.stored {
            Some(_) => self.counts.values().map(|c| c.rows).sum::<u64>() as usize,
            None => self.rows.len(),
        }
    }

    /// Starts reading the partitions of `marks` (their first and end offsets): loads their rows
    /// from the store, then assigns them to the consumer from the store's checkpoint (or their
    /// first offset).
    fn read(&mut self, consumer: &TableConsumer, marks: &BTreeMap<i32, (i64, i64)>) -> Result<(), TableError> {
        let topic = self.shared.topic.clone();
        self.collect_checkpoint(true)?; // the store's offsets and rows as of its last checkpoint
        let positions = self.store.as_ref().map(TableStore::positions).transpose()?.unwrap_or_default();
        let checkpoints: BTreeMap<i32, i64> = positions.iter().map(|(&p, pos)| (p, pos.next)).collect();
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
        if let (Some(store), Some(_)) = (self.store.clone(), &self.stored) {
            self.open_stored(&store, marks, &positions, &starts)?;
        } else if let Some(store) = &self.store {
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
                        self.publish(changes)?;
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
                self.publish(changes)?;
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
        if let Some(stored) = &self.stored {
            // Their rows stay in the store (a partition assigned again reads only its tail), out
            // of sight: readers skip the rows of partitions the table does not read.
            let mut bytes = 0;
            for p in gone {
                bytes += self.counts.remove(p).map_or(0, |c| c.bytes);
            }
            self.shared.counters.bytes.fetch_sub(bytes as i64, Ordering::Relaxed);
            stored.owned.store(Arc::new(self.counts.clone()));
            stored.cache.drop_partitions(gone);
            tracing::info!(topic = %self.shared.topic, partitions = ?gone, "table dropped revoked partitions");
            return Ok(());
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
            keys = self.keys(),
            records = self.shared.counters.records_read.load(Ordering::Relaxed),
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "table caught up"
        );
        self.shared.status.send_replace(Status::Following);
    }

    /// Publishes the table's metrics (once a second, or `now`).
    fn export(&mut self, consumer: &TableConsumer, now: bool) {
        // Counting the index's keys visits every shard: only when publishing.
        let keys = if self.stored.is_some() { Some(self.keys()) } else { None };
        let keys = || keys.unwrap_or_else(|| self.shared.index.len());
        let topic = &self.shared.topic;
        let end_of = |p| consumer.fetch_watermarks(topic, p, Duration::from_secs(1)).ok().map(|(_, high)| high);
        self.exported.publish(now, end_of, &self.shared.counters, keys, &self.positions, self.catching_up.len());
    }

    /// Makes the applied records visible: the new map to readers (with a row cache: the batch
    /// written to the store), then the changes to watchers.
    fn publish(&mut self, changes: &mut Vec<Change<K, V>>) -> Result<(), TableError> {
        match &self.stored {
            Some(stored) => self.write_batch(&stored.clone())?,
            None => self.shared.rows.store(Arc::new(self.rows.clone())),
        }
        *self.shared.progress.lock().unwrap_or_else(|p| p.into_inner()) =
            Progress { positions: self.positions.clone(), ends: self.ends.clone() };
        for c in changes.drain(..) {
            // An error only means that every watcher has gone.
            let _ = self.shared.changes.send(c);
        }
        Ok(())
    }

    /// Hands the rows changed since the last checkpoint and the positions to the store's writer.
    /// `durable`: waits until they are on disk. Otherwise, while a checkpoint is being written the
    /// rows keep collecting (newest per key) for the next one, unless there are too many of them.
    /// Returns whether a checkpoint was started.
    fn checkpoint(&mut self, durable: bool) -> Result<bool, TableError> {
        if let Some(stored) = &self.stored {
            // The batches are written already: a checkpoint makes them durable.
            if !self.unflushed {
                return Ok(false);
            }
            stored.store.flush()?;
            self.unflushed = false;
            self.shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
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
