//! Exactly-once Kafka flows: consume → stage → produce, inside Kafka transactions.
//!
//! A flow is Alpakka Kafka's `Transactional.source → flow → Transactional.sink` as one builder. One
//! Kafka transaction per `commit_interval` holds the output records, the journal records (the
//! [`KafkaJournal`](crate::journal::KafkaJournal): one per key the transaction changed, carrying
//! the key's events of the transaction and its state after them, like the changelog behind Kafka
//! Streams' record cache; a hot key's events are split over records of at most 1000 events) and
//! the consumed offsets (`send_offsets_to_transaction` with the consumer group's
//! metadata, KIP-447 style, so one transactional producer per instance is safe across rebalances).
//! Consumers of the outputs and of the journal read with `isolation.level=read_committed`.
//!
//! - **State follows partitions.** Input partition `p`'s entities live in journal partition `p`. On
//!   assignment the flow restores `p` from the journal (newest record per key, up to the partition's
//!   end as of that moment) before processing it; on revocation it commits the in-flight transaction
//!   and releases the state.
//! - **Local state store** ([`FlowBuilder::state_dir`]). The compacted journal stays the state of
//!   record; a local sled store is a checkpoint of it, like Kafka Streams' stores over their
//!   changelogs. A follower thread reads the committed journal (`read_committed`, so never an
//!   aborted transaction) and writes each key's newest entry and the journal offset the rows are
//!   complete up to, off the flow thread. An assignment reads only the journal's records after the
//!   checkpoint, and a key's state is read from the store when the key is first used, so a restart
//!   or a takeover costs the tail, not the partition's history. A crash wipes nothing (the
//!   checkpoint is older, the tail makes it current); a store that cannot be trusted (a row that
//!   does not decode, a checkpoint ahead of the journal, a store of another journal or stage) is
//!   dropped with a warning and the partition restored from the journal in full. Revoked
//!   partitions' rows stay until [`FlowBuilder::state_retention`]; [`Standby`] replicas keep
//!   partitions this instance does not own current, so taking them over reads almost nothing.
//! - **Failures.** A transaction that must abort is aborted, the consumer rewinds to the last
//!   committed offsets and the in-memory state of the transaction is discarded, then processing goes
//!   on. Fencing by a newer instance with the same `transactional.id` stops the flow with
//!   [`FlowError::Fenced`] and commits nothing. A fence of a transaction open longer than
//!   `transaction.timeout.ms` (the broker timed it out: the flow was paused, or a commit outlasted a
//!   coordinator's move) is an abort: the flow replaces its producer, rewinds and goes on. So are a
//!   librdkafka call that does not return (`send_offsets_to_transaction` after the group
//!   coordinator's broker died) and any other fatal producer error but a refused authorization, up
//!   to five replacements without a commit between them. A broker that is down is retried with
//!   backoff.
//! - **Bad input.** A record the decoder rejects (or whose handler panics) goes to the dead-letter
//!   topic with headers naming its source topic, partition, offset and the error, inside the same
//!   transaction; or, by policy, stops the flow.
//! - **Threads.** The flow runs on a thread of its own, so librdkafka's blocking calls never block
//!   the tokio runtime; [`FlowControl`] is async. The output mapping and the produce calls run on a
//!   second thread (the emitter), in the order the flow thread handled the commands: a produce call
//!   costs about as much as decoding and handling a command, so the two threads keep up with about
//!   twice the input one would. Before every commit or abort the flow thread waits until the
//!   emitter has produced everything it was given, so a transaction holds exactly the outputs of
//!   the inputs it commits. A panic in the output mapping stops the flow with
//!   [`FlowError::Crashed`].
//!
//! The same builder runs the other patterns of Alpakka Kafka, on the same machinery:
//!
//! - **At least once** ([`Guarantee::AtLeastOnce`], [`CommitterSettings`]): no transactions; a batch's
//!   journal is written once its outputs are acknowledged and its offsets are committed once its
//!   journal is. Outputs may repeat after a crash; events are never applied twice (journal records
//!   carry the input positions they include). [`consume`] is the consumer-only variant: an async
//!   function per record, then the commit.
//! - **Async enrichment** ([`FlowBuilder::enrich`], [`EnrichSettings`]): an async call per record
//!   between the decoder and the stage, `parallelism` in flight at most, results in input order per
//!   partition, retries with backoff, then the bad-input policy.
//! - **Rebalance listeners** ([`FlowBuilder::on_rebalance`], [`FlowBuilder::on_rebalance_async`]):
//!   a synchronous hook inside the rebalance (after the flow restored or committed the partitions,
//!   before their state is released), and an async one fed in order without blocking the poll loop.

mod builder;
mod checkpoint;
pub use builder::FlowBuilder;
pub use checkpoint::Standby;
mod consume;
mod engine;
mod exported;
mod settings;
mod shared;

pub use exported::names as metric_names;

pub use consume::{consume, ConsumeBuilder};
pub use settings::{CommitterSettings, EnrichSettings, Guarantee, RebalanceActions, RebalanceEvent, TopicPartition};

use crate::stage::EventSourced;
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// An input record, as the decoder sees it (and the output mapping, through [`Processed::input`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InputRecord {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub value: Option<Vec<u8>>,
    /// Headers, in the record's order (a header without a value has an empty one).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp in milliseconds since the epoch (its producer's create time, or the
    /// broker's append time, as the topic says); `None` when the record has none.
    pub timestamp: Option<i64>,
}

impl InputRecord {
    /// A record without headers or timestamp (for decoder tests; add them with
    /// [`with_headers`](Self::with_headers) and [`with_timestamp`](Self::with_timestamp)).
    pub fn new(
        topic: impl Into<String>,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    ) -> Self {
        Self { topic: topic.into(), partition, offset, key, value, headers: Vec::new(), timestamp: None }
    }

    /// The same record with these headers.
    #[must_use]
    pub fn with_headers(mut self, headers: Vec<(String, Vec<u8>)>) -> Self {
        self.headers = headers;
        self
    }

    /// The same record with this timestamp (ms since the epoch).
    #[must_use]
    pub fn with_timestamp(mut self, ms: i64) -> Self {
        self.timestamp = Some(ms);
        self
    }

    /// The value of the last header named `name` (Kafka allows repeats; the last one wins, as in
    /// Kafka Streams' `Headers::lastHeader`).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }
}

/// A record to produce.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputRecord {
    /// Destination topic.
    pub topic: String,
    /// Key (the default partitioner picks the partition from it).
    pub key: Option<Vec<u8>>,
    /// Value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutputRecord {
    /// A record with key and value, no headers.
    pub fn new(topic: impl Into<String>, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self { topic: topic.into(), key: Some(key.into()), value: Some(value.into()), headers: Vec::new() }
    }
}

/// What the stage made of one input record: handed to the output mapping.
///
/// `C` is the context the decoder handed over with the command
/// ([`FlowBuilder::decoder_with_context`]): a request id to echo, a reply topic, a parsed
/// envelope; `()` with [`FlowBuilder::decoder`].
pub struct Processed<'a, S: EventSourced, C = ()> {
    /// The input record (its key, value, headers, timestamp, topic, partition and offset).
    pub input: &'a InputRecord,
    /// The entity key.
    pub key: &'a S::Key,
    /// The events persisted (empty on rejection).
    pub events: &'a [S::Event],
    /// The reply, or the rejection.
    pub outcome: &'a Result<S::Reply, S::Rejection>,
    /// The entity's state after the events.
    pub state: &'a S::State,
    /// What the decoder handed over beside the command.
    pub context: &'a C,
}

impl<S: EventSourced, C> fmt::Debug for Processed<'_, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Processed").field("input", &self.input).field("key", self.key).finish_non_exhaustive()
    }
}

/// What a flow's own closures (the decoder, the enrichment, the at-least-once processing) return
/// when they fail: any error type (`?` or `.into()` makes one of it), or a message (`String`,
/// `&str`). The flow renders it with its chain of sources, `what: why: root cause`, for the
/// dead-letter record's `eventstage.error` header, the log and [`FlowError::BadInput`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of a user closure, with its chain of sources.
pub(crate) fn describe(error: impl Into<BoxError>) -> String {
    let error = error.into();
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The decoder's context for the output mapping, as the engine carries it (the builder knows its
/// type; `()` costs no allocation).
pub(crate) type Context = Box<dyn std::any::Any + Send>;
/// A decoded input record: entity key, command and the context for the output mapping.
pub(crate) type Decoded<S> = (<S as EventSourced>::Key, <S as EventSourced>::Command, Context);
/// Turns an input record into an entity key and a command, or says why it cannot.
pub(crate) type Decoder<S> = Box<dyn Fn(&InputRecord) -> Result<Decoded<S>, String> + Send>;
/// Maps an outcome to zero, one or many output records.
pub(crate) type Outputs<S> = Box<dyn Fn(&Processed<'_, S, Context>) -> Vec<OutputRecord> + Send>;

/// Where a flow keeps its entities' events.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlowJournal {
    /// A compacted Kafka topic (created if missing): state follows partitions across instances.
    Kafka(String),
    /// A local sled store: events and consumed positions in one write, plus an outbox. The store is
    /// local to one instance, so partitions must not move to other instances (run one instance, or
    /// one per fixed set of partitions).
    Sled(std::path::PathBuf),
    /// No journal: for stateless stages (`State = ()`) or state that may start empty after every
    /// restart and rebalance.
    None,
}

/// What to do with an input record that does not decode (or whose handler panics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadInput {
    /// Produce it to this dead-letter topic, with headers naming source and error (the default, to
    /// `<first input topic>.dlq`).
    DeadLetter(String),
    /// Stop the flow with [`FlowError::BadInput`].
    Stop,
}

/// Errors that stop a flow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// Kafka failed in a way retrying does not fix.
    // The client's error is part of the message, not a `source`: an error printed with its chain
    // (anyhow's `{:#}`) said librdkafka's message twice.
    #[error("kafka: {context}: {error}")]
    Kafka {
        /// What the flow was doing.
        context: String,
        /// The client's error.
        error: rdkafka::error::KafkaError,
    },
    /// The broker refused this producer's epoch while its transaction was younger than
    /// `transaction.timeout.ms`: another instance with the same transactional id took over (this
    /// one is a zombie). Nothing after its last commit counts; restarting it is safe (it fences any
    /// other instance with the id), but two instances sharing an id keep fencing each other. (A
    /// fence of a transaction older than the timeout is the broker's timeout: the flow recovers
    /// from it by itself.)
    #[error("fenced: the broker refused this producer's epoch for transactional.id `{transactional_id}`: another instance with this id took over (give each instance its own id); this instance committed nothing since its last commit and stopped")]
    Fenced {
        /// The transactional id.
        transactional_id: String,
    },
    /// The journal failed (missing/misconfigured topic, damaged record).
    #[error(transparent)]
    Journal(#[from] eventstage_journal::JournalError),
    /// A journal record does not decode into the stage's state.
    #[error(transparent)]
    Stage(#[from] crate::Error),
    /// A bad input record, under [`BadInput::Stop`].
    #[error("input {topic}[{partition}]@{offset} rejected: {reason}")]
    BadInput {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// Why.
        reason: String,
    },
    /// Settings that cannot work.
    #[error("flow configuration: {0}")]
    Config(String),
    /// Stopped by [`FlowControl::abort`].
    #[error("aborted by the application")]
    Aborted,
    /// The flow thread died.
    #[error("the flow thread stopped unexpectedly: {0}")]
    Crashed(String),
}

/// Counters of a running flow.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    records_in: AtomicU64,
    records_out: AtomicU64,
    dead_letters: AtomicU64,
    transactions: AtomicU64,
    aborts: AtomicU64,
    restored_records: AtomicU64,
    store_rows: AtomicU64,
    store_dropped: AtomicU64,
    restoring_partitions: AtomicU64,
    last_commit_us: AtomicU64,
    max_commit_us: AtomicU64,
    lag: AtomicU64,
    assigned_partitions: AtomicU64,
    skipped_redeliveries: AtomicU64,
    enrich_in_flight: AtomicU64,
    max_enrich_in_flight: AtomicU64,
    rebalances: AtomicU64,
}

/// A snapshot of a flow's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlowMetrics {
    /// Input records processed (committed or not).
    pub records_in: u64,
    /// Output records produced (journal records not included).
    pub records_out: u64,
    /// Records sent to the dead-letter topic.
    pub dead_letters: u64,
    /// Committed transactions (exactly-once), or committed batches (at-least-once).
    pub transactions: u64,
    /// Aborted transactions.
    pub aborts: u64,
    /// Journal records read by restores.
    pub restored_records: u64,
    /// Rows restores loaded from the local state store (see [`FlowBuilder::state_dir`]).
    pub store_rows: u64,
    /// Times the local state store, or a partition of it, was unusable (damaged, of another
    /// journal, ahead of the journal) and was dropped and restored from the journal in full.
    pub store_dropped: u64,
    /// Partitions being restored right now.
    pub restoring_partitions: u64,
    /// Latency of the last commit.
    pub last_commit: Duration,
    /// Highest commit latency seen.
    pub max_commit: Duration,
    /// Records behind the end of the assigned input partitions (as of the last fetch).
    pub lag: u64,
    /// Input partitions assigned to this instance.
    pub assigned_partitions: u64,
    /// Inputs delivered again whose events the journal already held (skipped, not applied twice).
    pub skipped_redeliveries: u64,
    /// Enrichment calls running now.
    pub enrich_in_flight: u64,
    /// Most enrichment calls ever running at once.
    pub max_enrich_in_flight: u64,
    /// Rebalances this instance took part in (assignments and revocations).
    pub rebalances: u64,
}

impl Metrics {
    fn snapshot(&self) -> FlowMetrics {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FlowMetrics {
            records_in: l(&self.records_in),
            records_out: l(&self.records_out),
            dead_letters: l(&self.dead_letters),
            transactions: l(&self.transactions),
            aborts: l(&self.aborts),
            restored_records: l(&self.restored_records),
            store_rows: l(&self.store_rows),
            store_dropped: l(&self.store_dropped),
            restoring_partitions: l(&self.restoring_partitions),
            last_commit: Duration::from_micros(l(&self.last_commit_us)),
            max_commit: Duration::from_micros(l(&self.max_commit_us)),
            lag: l(&self.lag),
            assigned_partitions: l(&self.assigned_partitions),
            skipped_redeliveries: l(&self.skipped_redeliveries),
            enrich_in_flight: l(&self.enrich_in_flight),
            max_enrich_in_flight: l(&self.max_enrich_in_flight),
            rebalances: l(&self.rebalances),
        }
    }
}

const RUN: u8 = 0;
const DRAIN: u8 = 1;
const ABORT: u8 = 2;

/// Asks a running flow to stop; cheap to clone (e.g. into a signal handler).
#[derive(Debug, Clone)]
pub struct FlowStopper(Arc<AtomicU8>);

impl FlowStopper {
    /// Stop polling, finish in-flight work, commit, leave the group.
    pub fn drain(&self) {
        let _ = self.0.compare_exchange(RUN, DRAIN, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Stop now: abort the open transaction (nothing since the last commit becomes visible).
    pub fn abort(&self) {
        self.0.store(ABORT, Ordering::SeqCst);
    }
}

/// Reads a running flow's counters and readiness from anywhere; see [`FlowControl::status`].
#[derive(Debug, Clone)]
pub struct FlowStatus(Arc<Metrics>);

impl FlowStatus {
    /// The flow's counters now.
    pub fn metrics(&self) -> FlowMetrics {
        self.0.snapshot()
    }

    /// Ready to serve: the instance joined its group (took part in a rebalance) and no assigned
    /// partition is being restored, so it polls and processes. What a readiness probe asks.
    pub fn ready(&self) -> bool {
        let m = self.metrics();
        m.rebalances > 0 && m.restoring_partitions == 0
    }
}

/// Controls a running flow.
#[derive(Debug)]
pub struct FlowControl {
    stop: FlowStopper,
    metrics: Arc<Metrics>,
    done: oneshot::Receiver<Result<(), FlowError>>,
}

impl FlowControl {
    /// A handle that can stop the flow from elsewhere.
    pub fn stopper(&self) -> FlowStopper {
        self.stop.clone()
    }

    /// The flow's counters now.
    pub fn metrics(&self) -> FlowMetrics {
        self.metrics.snapshot()
    }

    /// A cheap, cloneable reader of the flow's counters and readiness, e.g. for a health endpoint.
    pub fn status(&self) -> FlowStatus {
        FlowStatus(self.metrics.clone())
    }

    /// Waits until the flow stops; the error is what stopped it.
    ///
    /// # Errors
    /// The [`FlowError`] that stopped the flow.
    pub async fn wait(self) -> Result<(), FlowError> {
        self.done.await.unwrap_or_else(|_| Err(FlowError::Crashed("the flow thread ended without a result".into())))
    }

    /// Waits until the flow stops; returns its result and its final counters.
    pub async fn wait_with_metrics(self) -> (Result<(), FlowError>, FlowMetrics) {
        let metrics = self.metrics.clone();
        let result = self.wait().await;
        (result, metrics.snapshot())
    }

    /// Stops polling, finishes in-flight work, commits the last transaction, leaves the group.
    ///
    /// # Errors
    /// The error that stopped the flow, if it failed before or while draining.
    pub async fn drain_and_shutdown(self) -> Result<(), FlowError> {
        self.stop.drain();
        self.wait().await
    }

    /// Stops at once, aborting the open transaction.
    ///
    /// # Errors
    /// The error that stopped the flow before the abort, if any.
    pub async fn abort(self) -> Result<(), FlowError> {
        self.stop.abort();
        match self.wait().await {
            Err(FlowError::Aborted) => Ok(()),
            other => other,
        }
    }
}
