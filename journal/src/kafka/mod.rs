//! The Kafka journal: a compacted topic with as many partitions as the input, record key = entity key.
//!
//! Every record a flow writes for a key carries that key's new events **and its state after them**
//! (like a Kafka Streams changelog), so the newest record per key alone rebuilds the key exactly:
//! replay is compaction-safe. A deleted entity writes a tombstone (null value).
//!
//! The value is an [`Envelope`](crate::Envelope) of kind [`RecordKind::Entry`](crate::RecordKind::Entry) whose payload is:
//!
//! ```text
//! u64 LE   last seq (the seq of the last event in this entry)
//! u32 LE   number of events n
//! n times: u32 LE length, then an event envelope
//! u32 LE   length of the state envelope (0: none), then the state (snapshot) envelope
//! type version 2 only (at-least-once flows):
//! u32 LE   number of input positions m
//! m times: u16 LE topic length, topic (UTF-8), i32 LE partition, i64 LE next offset
//! ```
//!
//! The input positions say which inputs the key's state already includes: an at-least-once flow
//! writes its journal without transactions, so after a crash it sees inputs again whose events
//! are journaled, and skips them (a redelivered input never applies its events twice). A record
//! whose state is absent but that has positions marks a deleted entity.
//!
//! Writes happen inside the flow's Kafka transaction (see the `eventstage` crate), so the journal,
//! the outputs and the consumed offsets commit atomically; restore reads with `read_committed`.

use crate::error::{JournalError, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod client;
mod entry;
mod owners;
pub use client::{Detached, ReaderContext};
pub use entry::JournalEntry;
pub use owners::{Claim, OWNERS_TOPIC};

use client::{consumer_error_is_fatal, damaged, kafka_err, watermarks, RESTORE};

/// How long a restore waits for a journal partition's open transactions to end (see
/// [`KafkaJournal::restore_partitions_from`]).
const SETTLE: Duration = Duration::from_secs(2);

/// What a restore read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Records read (entries and tombstones).
    pub records: u64,
    /// The end offset the restore read up to.
    pub end_offset: i64,
    /// Wall time.
    pub elapsed: Duration,
}

/// A compacted Kafka topic used as a journal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct KafkaJournal {
    topic: String,
    config: ClientConfig,
    partitions: i32,
}

impl KafkaJournal {
    /// Connects to the journal topic `topic`: creates it with `partitions` partitions and
    /// `cleanup.policy=compact` if missing; if present, checks its partition count and cleanup policy.
    /// `config` holds the client settings (`bootstrap.servers` and any security properties).
    ///
    /// # Errors
    /// A clear [`JournalError::Storage`] when the broker is unreachable or the topic is configured
    /// differently (saying what to change).
    pub async fn ensure(config: ClientConfig, topic: &str, partitions: i32) -> Result<Self> {
        let admin: Detached<AdminClient<DefaultClientContext>> =
            Detached::new(config.create().map_err(|e| kafka_err(topic, "admin client", e))?);
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
        let created = admin.create_topics(&[new], &opts).await.map_err(|e| kafka_err(topic, "create topic", e))?;
        for r in created {
            match r {
                Ok(_) => tracing::info!(topic, partitions, "created the journal topic (cleanup.policy=compact)"),
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(JournalError::Storage {
                        path: format!("kafka topic {topic}").into(),
                        message: format!("cannot create the journal topic: {code}"),
                    })
                }
            }
        }
        let journal = Self { topic: topic.into(), config, partitions };
        // The admin client's connection, not a new client's (a new consumer's first metadata
        // request took 50-60 ms of a flow's start).
        let found = journal.partition_count(admin.inner())?;
        if found != partitions {
            return Err(JournalError::Storage {
                path: format!("kafka topic {topic}").into(),
                message: format!(
                    "the journal topic has {found} partitions, the input has {partitions}: state partitions must line up with input partitions; use a journal topic with {partitions} partitions (or add partitions to it)"
                ),
            });
        }
        // A topic always has a cleanup.policy (the broker's default, `delete`, when the topic does
        // not set one). A broker that does not know the topic yet answers without it, or with an
        // error: on a three-node cluster, a topic just created was described that way by a broker
        // the creation had not reached. Asked again until the answer has the policy, for a while.
        let deadline = Instant::now() + Duration::from_secs(15);
        let policy = loop {
            let described = admin
                .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
                .await
                .map_err(|e| kafka_err(topic, "describe topic configs", e))?;
            let answer = match described.into_iter().next() {
                Some(Ok(r)) => r
                    .get("cleanup.policy")
                    .and_then(|e| e.value.clone())
                    .filter(|v| !v.is_empty())
                    .ok_or("no cleanup.policy".to_string()),
                Some(Err(code)) => Err(code.to_string()),
                None => Err("no answer".to_string()),
            };
            match answer {
                Ok(policy) => break policy,
                Err(why) if Instant::now() < deadline => {
                    tracing::debug!(topic, %why, "the journal topic's configuration is not known yet; asking again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(why) => {
                    return Err(JournalError::Storage {
                        path: format!("kafka topic {topic}").into(),
                        message: format!("the cluster does not say the journal topic's cleanup.policy ({why}): check that the topic exists and that this client may describe its configuration"),
                    })
                }
            }
        };
        if !policy.split(',').any(|p| p.trim() == "compact") {
            return Err(JournalError::Storage {
                path: format!("kafka topic {topic}").into(),
                message: format!(
                    "the journal topic has cleanup.policy={policy}; a journal needs cleanup.policy=compact (or compact,delete is not allowed either: deletion would lose state). Change it with kafka-configs --alter --add-config cleanup.policy=compact, or pick another topic"
                ),
            });
        }
        Ok(journal)
    }

    /// An existing journal topic, for tools that inspect it: nothing is created or checked but
    /// that the topic exists.
    ///
    /// # Errors
    /// [`JournalError::Storage`] when the cluster cannot be reached within `timeout` or has no
    /// topic `topic` (the message says which).
    pub fn existing(config: ClientConfig, topic: &str, timeout: Duration) -> Result<Self> {
        let consumer: BaseConsumer = config.create().map_err(|e| kafka_err(topic, "consumer", e))?;
        let md = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| kafka_err(topic, "metadata", e))?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32);
        if partitions == 0 {
            return Err(JournalError::Storage {
                path: format!("kafka topic {topic}").into(),
                message: "the topic does not exist on this cluster: check the name (a flow's journal is <group>-<stage>-journal unless set)".into(),
            });
        }
        Ok(Self { topic: topic.into(), config, partitions })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partitions (equal to the input's).
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The topic's partition count, once the cluster's metadata lists it with a leader for every
    /// partition. Kafka creates topics asynchronously: CreateTopics answers once the controller
    /// has the topic, and a broker's metadata can lack it (or its leaders) for a moment after, so a
    /// topic just created (or confirmed to exist) is looked up again until it shows, for up to 30 s.
    fn partition_count<C: ClientContext>(&self, client: &rdkafka::client::Client<C>) -> Result<i32> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let md = client
                .fetch_metadata(Some(&self.topic), Duration::from_secs(30))
                .map_err(|e| kafka_err(&self.topic, "metadata", e))?;
            let found = md
                .topics()
                .iter()
                .find(|t| t.name() == self.topic && t.error().is_none())
                .filter(|t| t.partitions().iter().all(|p| p.leader() >= 0))
                .map_or(0, |t| t.partitions().len() as i32);
            if found > 0 || std::time::Instant::now() >= deadline {
                return Ok(found);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reads partition `partition` from its start up to its end **as of now** (the last stable offset:
    /// records of open or aborted transactions are not read; the end is an offset, not a record, so a
    /// partition that ends with a transaction marker is read to its end too) and calls `on_record`
    /// with each key and entry (`None`: tombstone), oldest first. A transaction committed just
    /// before (its markers on their way) is waited for, for up to 2 s, so that a restore right after
    /// another instance's last commit reads it. Blocking: call it off the async runtime.
    ///
    /// # Errors
    /// Broker errors, a record that does not decode (named by partition and offset), or no progress
    /// for `stall` (the message says so).
    pub fn restore_partition(
        &self,
        partition: i32,
        stall: Duration,
        mut on_record: impl FnMut(&[u8], Option<JournalEntry>),
    ) -> Result<RestoreStats> {
        self.restore_partitions(&[partition], stall, |_, key, entry| on_record(key, entry))
    }

    /// [`restore_partition`](Self::restore_partition) for several partitions at once, with one
    /// consumer fetching them all in parallel; `on_record` also gets the partition. Records of one
    /// partition arrive in order.
    ///
    /// # Errors
    /// As [`restore_partition`](Self::restore_partition).
    pub fn restore_partitions(
        &self,
        partitions: &[i32],
        stall: Duration,
        mut on_record: impl FnMut(i32, &[u8], Option<JournalEntry>),
    ) -> Result<RestoreStats> {
        let from: Vec<(i32, i64)> = partitions.iter().map(|&p| (p, 0)).collect();
        self.restore_partitions_from(&from, stall, |p, _, key, entry| on_record(p, key, entry))
    }

    /// The low and high watermarks (first offset, and the offset after the last record) of
    /// `partitions`.
    ///
    /// # Errors
    /// Broker errors.
    pub fn watermarks(&self, partitions: &[i32]) -> Result<BTreeMap<i32, (i64, i64)>> {
        let consumer: Detached<BaseConsumer<ReaderContext>> =
            Detached::new(self.config.create_with_context(RESTORE).map_err(|e| kafka_err(&self.topic, "consumer", e))?);
        partitions
            .iter()
            .map(|&p| {
                let marks =
                    watermarks(&consumer, &self.topic, p).map_err(|e| kafka_err(&self.topic, "watermarks", e))?;
                Ok((p, marks))
            })
            .collect()
    }

    /// Reads each `(partition, offset)` of `from` from that offset up to the partition's end as of
    /// now (see [`restore_partition`](Self::restore_partition)): the tail after a local
    /// checkpoint. `on_record` gets the partition, the record's offset, its key and its entry. An
    /// offset below the partition's start reads from its start.
    ///
    /// # Errors
    /// As [`restore_partition`](Self::restore_partition).
    pub fn restore_partitions_from(
        &self,
        from: &[(i32, i64)],
        stall: Duration,
        mut on_record: impl FnMut(i32, i64, &[u8], Option<JournalEntry>),
    ) -> Result<RestoreStats> {
        let topic = &self.topic;
        self.scan(from, stall, |p, offset, key, value| {
            let entry = match value {
                None => None,
                Some(v) => Some(JournalEntry::decode(v).map_err(|e| {
                    damaged(topic, format!("record at partition {p} offset {offset} does not decode: {e}"))
                })?),
            };
            on_record(p, offset, key, entry);
            Ok(())
        })
    }

    /// Reads each `(partition, offset)` of `from` up to the partition's end as of now, as
    /// [`restore_partitions_from`](Self::restore_partitions_from) does, without decoding:
    /// `on_record` gets the partition, offset, key and value (`None`: tombstone) of each record,
    /// and an error it returns ends the scan. For tools that report damage instead of stopping.
    ///
    /// # Errors
    /// Broker errors, no progress for `stall`, or what `on_record` returns.
    pub fn scan(
        &self,
        from: &[(i32, i64)],
        stall: Duration,
        mut on_record: impl FnMut(i32, i64, &[u8], Option<&[u8]>) -> Result<()>,
    ) -> Result<RestoreStats> {
        let started = Instant::now();
        let topic = &self.topic;
        let consumer = self.reader(topic, &format!("eventstage-restore-{topic}"))?;
        let mut stats = RestoreStats::default();
        let mut tpl = TopicPartitionList::new();
        // The end of each partition as of now; a partition is done when its position reaches it.
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        let partitions: Vec<i32> = from.iter().map(|(p, _)| *p).collect();
        let stable = self.stable_ends(&consumer, &partitions)?;
        for &(p, start) in from {
            let (low, high) = stable.get(&p).copied().unwrap_or_default();
            stats.end_offset += high;
            let start = start.max(low);
            tracing::debug!(topic, partition = p, low, high, start, "journal partition to restore");
            if high > start {
                ends.insert(p, high);
                tpl.add_partition_offset(topic, p, Offset::Offset(start)).map_err(|e| kafka_err(topic, "assign", e))?;
            }
        }
        if ends.is_empty() {
            stats.elapsed = started.elapsed();
            return Ok(stats);
        }
        consumer.assign(&tpl).map_err(|e| kafka_err(topic, "assign", e))?;
        let mut last_progress = Instant::now();
        // The last error the client reported and retries (a broker down for a moment): named
        // when the read stalls because of it.
        let mut retrying: Option<KafkaError> = None;
        while !ends.is_empty() {
            match consumer.poll(Duration::from_millis(200)) {
                None => {
                    if last_progress.elapsed() > stall {
                        let cause = retrying.take().unwrap_or(KafkaError::NoMessageReceived);
                        return Err(kafka_err(
                            topic,
                            &format!(
                                "restore stalled (no record for {stall:?}; partitions not done: {:?})",
                                ends.keys()
                            ),
                            cause,
                        ));
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    ends.remove(&p);
                }
                Some(Err(e)) if !consumer_error_is_fatal(&e) => {
                    tracing::debug!(topic, error = %e, "journal read: consumer error (the client retries)");
                    retrying = Some(e);
                }
                Some(Err(e)) => return Err(kafka_err(topic, "restore", e)),
                Some(Ok(msg)) => {
                    last_progress = Instant::now();
                    stats.records += 1;
                    let p = msg.partition();
                    let key = msg.key().unwrap_or_default();
                    on_record(p, msg.offset(), key, msg.payload())?;
                    if ends.get(&p).is_some_and(|&end| msg.offset() + 1 >= end) {
                        ends.remove(&p);
                    }
                }
            }
        }
        stats.elapsed = started.elapsed();
        Ok(stats)
    }

    /// A consumer reading `topic` to its end with `read_committed` (assigned, never subscribed:
    /// `group` only names it), which reports the end of each partition; dropped off the caller's
    /// thread.
    fn reader(&self, topic: &str, group: &str) -> Result<Detached<BaseConsumer<ReaderContext>>> {
        let mut config = self.config.clone();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            // A partition that ends in a transaction marker is done when a fetch comes back
            // empty; the broker holds an empty fetch this long (default 500 ms, per read).
            .set("fetch.wait.max.ms", "10");
        config.create_with_context(RESTORE).map(Detached::new).map_err(|e| kafka_err(topic, "reader consumer", e))
    }

    /// The low watermark and the last stable offset of each partition, once the partitions'
    /// transactions have ended (the last stable offset reached the high watermark), waiting up to
    /// [`SETTLE`]. A transaction's commit returns before its markers are written: a restore right
    /// after another instance committed (on a rebalance) would otherwise end before that
    /// instance's last transaction and miss it. A transaction still open after [`SETTLE`] (its
    /// producer died in it: it stays open until its timeout) is not waited for.
    fn stable_ends(
        &self,
        committed: &BaseConsumer<ReaderContext>,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, (i64, i64)>> {
        let topic = &self.topic;
        let mut config = self.config.clone();
        config.set("isolation.level", "read_uncommitted");
        let all: Detached<BaseConsumer<ReaderContext>> =
            Detached::new(config.create_with_context(RESTORE).map_err(|e| kafka_err(topic, "watermarks consumer", e))?);
        let marks = |consumer: &BaseConsumer<ReaderContext>, p: i32| {
            watermarks(consumer, topic, p).map_err(|e| kafka_err(topic, "watermarks", e))
        };
        let deadline = Instant::now() + SETTLE;
        let mut ends = BTreeMap::new();
        let mut open: Vec<i32> = partitions.to_vec();
        loop {
            let mut still = Vec::new();
            for p in open {
                let (low, stable) = marks(committed, p)?;
                let (_, high) = marks(&all, p)?;
                ends.insert(p, (low, stable));
                if stable < high {
                    still.push(p);
                }
            }
            if still.is_empty() {
                return Ok(ends);
            }
            if Instant::now() >= deadline {
                tracing::info!(topic, partitions = ?still, "journal partitions hold a transaction still open after {SETTLE:?} (its producer died in it?); restoring up to their last stable offset");
                return Ok(ends);
            }
            open = still;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The newest entry per key of a partition: exactly what compaction leaves. Tombstoned keys are
    /// absent.
    ///
    /// # Errors
    /// As [`KafkaJournal::restore_partition`].
    pub fn latest_per_key(&self, partition: i32, stall: Duration) -> Result<BTreeMap<Vec<u8>, JournalEntry>> {
        Ok(self.latest_per_key_of(&[partition], stall)?.remove(&partition).unwrap_or_default())
    }

    /// [`latest_per_key`](Self::latest_per_key) of several partitions, read in parallel.
    ///
    /// # Errors
    /// As [`KafkaJournal::restore_partition`].
    pub fn latest_per_key_of(
        &self,
        partitions: &[i32],
        stall: Duration,
    ) -> Result<BTreeMap<i32, BTreeMap<Vec<u8>, JournalEntry>>> {
        let mut latest: BTreeMap<i32, BTreeMap<Vec<u8>, JournalEntry>> =
            partitions.iter().map(|&p| (p, BTreeMap::new())).collect();
        self.restore_partitions(partitions, stall, |p, key, entry| {
            let keys = latest.entry(p).or_default();
            match entry {
                Some(e) => {
                    keys.insert(key.to_vec(), e);
                }
                None => {
                    keys.remove(key);
                }
            }
        })?;
        Ok(latest)
    }
}
