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

mod checkpoint;
pub use checkpoint::Standby;
mod consume;
mod engine;
mod settings;
mod sled_backend;

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

/// An input record, as the decoder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
pub struct Processed<'a, S: EventSourced> {
    /// The input record.
    pub input: &'a InputRecord,
    /// The entity key.
    pub key: &'a S::Key,
    /// The events persisted (empty on rejection).
    pub events: &'a [S::Event],
    /// The reply, or the rejection.
    pub outcome: &'a Result<S::Reply, S::Rejection>,
    /// The entity's state after the events.
    pub state: &'a S::State,
}

impl<S: EventSourced> fmt::Debug for Processed<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Processed").field("input", &self.input).field("key", self.key).finish_non_exhaustive()
    }
}

/// Turns an input record into an entity key and a command, or says why it cannot.
pub type Decoder<S> =
    Box<dyn Fn(&InputRecord) -> Result<(<S as EventSourced>::Key, <S as EventSourced>::Command), String> + Send>;
/// Maps an outcome to zero, one or many output records.
pub type Outputs<S> = Box<dyn Fn(&Processed<'_, S>) -> Vec<OutputRecord> + Send>;

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
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What the flow was doing.
        context: String,
        /// The client's error.
        source: rdkafka::error::KafkaError,
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

/// Builds a flow around a stage. See the module docs.
pub struct FlowBuilder<S: EventSourced> {
    stage: S,
    brokers: String,
    group_id: String,
    inputs: Vec<String>,
    consumer: BTreeMap<String, String>,
    producer: BTreeMap<String, String>,
    transactional_id: Option<String>,
    commit_interval: Duration,
    journal: Option<FlowJournal>,
    state_dir: Option<std::path::PathBuf>,
    state_retention: Duration,
    checkpoint_interval: Duration,
    standby: Standby,
    snapshot_every: u64,
    decoder: Option<Decoder<S>>,
    outputs: Option<Outputs<S>>,
    bad_input: Option<BadInput>,
    codec: crate::Codec,
    guarantee: Guarantee,
    committer: CommitterSettings,
    enrich: Option<settings::Enrichment<S>>,
    on_rebalance: Vec<settings::SyncListener>,
    on_rebalance_async: Option<settings::AsyncListener>,
}

impl<S: EventSourced> fmt::Debug for FlowBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowBuilder")
            .field("stage", &S::NAME)
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("inputs", &self.inputs)
            .finish_non_exhaustive()
    }
}

impl<S: EventSourced> FlowBuilder<S> {
    /// A flow of `stage` reading `inputs` as consumer group `group_id` from `brokers`.
    pub fn new(stage: S, brokers: impl Into<String>, group_id: impl Into<String>, inputs: &[&str]) -> Self {
        Self {
            stage,
            brokers: brokers.into(),
            group_id: group_id.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
            transactional_id: None,
            commit_interval: Duration::from_millis(100),
            journal: None,
            state_dir: None,
            state_retention: Duration::from_secs(24 * 3600),
            checkpoint_interval: Duration::from_secs(1),
            standby: Standby::None,
            snapshot_every: 100,
            decoder: None,
            outputs: None,
            bad_input: None,
            codec: crate::Codec::Bincode,
            guarantee: Guarantee::ExactlyOnce,
            committer: CommitterSettings::default(),
            enrich: None,
            on_rebalance: Vec::new(),
            on_rebalance_async: None,
        }
    }

    /// Exactly-once (transactions, the default) or at-least-once (see [`Guarantee`]).
    #[must_use]
    pub fn guarantee(mut self, guarantee: Guarantee) -> Self {
        self.guarantee = guarantee;
        self
    }

    /// How an at-least-once flow batches its offset commits.
    #[must_use]
    pub fn committer(mut self, settings: CommitterSettings) -> Self {
        self.committer = settings;
        self
    }

    /// Async enrichment between the decoder and the stage (Akka's `mapAsync(parallelism)`, the ask
    /// pattern): `enrich(key, command)` may call a service, a database or an actor and returns the
    /// command the stage handles. At most `settings.parallelism` calls run at once (the flow stops
    /// consuming while that many records wait), and the stage sees each partition's records in
    /// input order whatever order the calls finish in. A call that fails (or times out) is retried
    /// with backoff; after the last attempt the record goes to the bad-input policy (dead letter,
    /// or stop). The calls run on the tokio runtime `run()` is called from (or a runtime of the
    /// flow's own outside one). Works under both guarantees: offsets only ever cover records the
    /// stage handled.
    #[must_use]
    pub fn enrich<F, Fut>(mut self, settings: EnrichSettings, enrich: F) -> Self
    where
        S::Command: Clone,
        F: Fn(S::Key, S::Command) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<S::Command, String>> + Send + 'static,
    {
        self.enrich = Some((settings, settings::retrying(settings, enrich)));
        self
    }

    /// A synchronous rebalance listener, called on the flow's thread inside the rebalance: on
    /// assignment once the partitions' state is restored and before any of their records is
    /// processed (it may [`seek`](RebalanceActions::seek)); on revocation once the flow has
    /// finished and committed their in-flight work, before their state is released; on loss after
    /// their uncommitted work was dropped. Keep it short: the group waits for it. Each call adds
    /// a listener; they run in the order they were added.
    #[must_use]
    pub fn on_rebalance(
        mut self,
        listener: impl FnMut(&RebalanceEvent, &mut RebalanceActions<'_>) + Send + 'static,
    ) -> Self {
        self.on_rebalance.push(Box::new(listener));
        self
    }

    /// An async rebalance listener (the talk's actor-based listener): every event, in order, is
    /// handed to `listener` on a task of its own, so it never blocks the consumer's poll loop.
    #[must_use]
    pub fn on_rebalance_async<F, Fut>(mut self, listener: F) -> Self
    where
        F: Fn(RebalanceEvent) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.on_rebalance_async = Some(Arc::new(move |e| Box::pin(listener(e)) as settings::BoxFuture<()>));
        self
    }

    /// Any librdkafka consumer property, passed through.
    #[must_use]
    pub fn consumer_property(mut self, key: &str, value: &str) -> Self {
        self.consumer.insert(key.into(), value.into());
        self
    }

    /// Any librdkafka producer property, passed through.
    #[must_use]
    pub fn producer_property(mut self, key: &str, value: &str) -> Self {
        self.producer.insert(key.into(), value.into());
        self
    }

    /// The producer's `transactional.id`: stable per instance, so a restarted instance fences its
    /// zombie. Default: `eventstage-<group>-<random>`.
    #[must_use]
    pub fn transactional_id(mut self, id: impl Into<String>) -> Self {
        self.transactional_id = Some(id.into());
        self
    }

    /// How often a transaction commits. Default: 100 ms.
    #[must_use]
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.commit_interval = every;
        self
    }

    /// The Kafka journal topic. Default: `<stage name>-journal`.
    #[must_use]
    pub fn journal_topic(mut self, topic: impl Into<String>) -> Self {
        self.journal = Some(FlowJournal::Kafka(topic.into()));
        self
    }

    /// Where the flow keeps its entities' events (see [`FlowJournal`]). Default: the Kafka topic
    /// `<stage name>-journal`.
    #[must_use]
    pub fn journal(mut self, journal: FlowJournal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Journal in a local sled store at `dir` instead of Kafka (see [`FlowJournal::Sled`]).
    #[must_use]
    pub fn sled_journal(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.journal = Some(FlowJournal::Sled(dir.into()));
        self
    }

    /// With the Kafka journal: keep a local state store in `dir` (created if missing; one
    /// directory per instance), a checkpoint of the journal, so that a restart or an assignment
    /// reads only the journal's records after the checkpoint instead of the whole partition. The
    /// compacted topic stays the state of record; the store holds committed state only, is written
    /// off the flow thread, and a damaged or foreign store is dropped with a warning and restored
    /// from the journal. Default: none (every assignment reads the journal partition in full).
    #[must_use]
    pub fn state_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// With a [`state_dir`](Self::state_dir): how long the rows of a partition that went to
    /// another instance stay in the local store (getting it back within that time reads only what
    /// the other instance wrote). Default: 24 h.
    #[must_use]
    pub fn state_retention(mut self, keep: Duration) -> Self {
        self.state_retention = keep;
        self
    }

    /// With a [`state_dir`](Self::state_dir): how often the local store is checkpointed while the
    /// journal changes. Default: 1 s.
    #[must_use]
    pub fn checkpoint_interval(mut self, every: Duration) -> Self {
        self.checkpoint_interval = every;
        self
    }

    /// With a [`state_dir`](Self::state_dir): which partitions besides its own this instance
    /// keeps current in its local store, so that taking one over after a crash or a rebalance
    /// reads almost nothing from the journal (see [`Standby`]). Default: [`Standby::None`].
    #[must_use]
    pub fn standby(mut self, standby: Standby) -> Self {
        self.standby = standby;
        self
    }

    /// With the sled journal: a snapshot of a key every this many events (0: none). Default: 100.
    #[must_use]
    pub fn snapshot_every(mut self, n: u64) -> Self {
        self.snapshot_every = n;
        self
    }

    /// The decoder from input record to `(key, command)`. Required.
    #[must_use]
    pub fn decoder(
        mut self,
        decode: impl Fn(&InputRecord) -> Result<(S::Key, S::Command), String> + Send + 'static,
    ) -> Self {
        self.decoder = Some(Box::new(decode));
        self
    }

    /// The output mapping. Default: no outputs. It runs on the flow's emitter thread, one
    /// outcome after another in the order the commands were handled.
    #[must_use]
    pub fn outputs(mut self, map: impl Fn(&Processed<'_, S>) -> Vec<OutputRecord> + Send + 'static) -> Self {
        self.outputs = Some(Box::new(map));
        self
    }

    /// What to do with bad input. Default: dead-letter to `<first input>.dlq`.
    #[must_use]
    pub fn bad_input(mut self, policy: BadInput) -> Self {
        self.bad_input = Some(policy);
        self
    }

    /// Codec of journal payloads. Default: bincode.
    #[must_use]
    pub fn codec(mut self, codec: crate::Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Starts the flow on a thread of its own and returns its control handle at once; setup errors
    /// (unreachable broker after retries, a misconfigured journal topic) arrive through
    /// [`FlowControl::wait`].
    ///
    /// # Errors
    /// [`FlowError::Config`] when the builder lacks a decoder or inputs.
    pub fn run(self) -> Result<FlowControl, FlowError> {
        let decoder = self.decoder.ok_or_else(|| FlowError::Config("a decoder is required".into()))?;
        let first = self.inputs.first().cloned().ok_or_else(|| FlowError::Config("no input topics".into()))?;
        let mut common = ClientConfig::new();
        common.set("bootstrap.servers", &self.brokers);
        let mut consumer = common.clone();
        consumer
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false");
        for (k, v) in &self.consumer {
            consumer.set(k, v);
        }
        let transactional_id = self
            .transactional_id
            .unwrap_or_else(|| format!("eventstage-{}-{:016x}", self.group_id, rand::random::<u64>()));
        let mut producer = common.clone();
        match self.guarantee {
            Guarantee::ExactlyOnce => {
                // A transaction that starts right after a commit gets CONCURRENT_TRANSACTIONS from
                // Kafka until the coordinator has written the commit markers; librdkafka retries
                // after retry.backoff.ms (default 100 ms, more than a commit interval). 10 ms (still
                // growing exponentially to retry.backoff.max.ms on real failures): with it, the bank
                // flow kept up with 10k commands/s on Apache Kafka (p50 134-153 ms instead of 2-6 s).
                producer
                    .set("transactional.id", &transactional_id)
                    .set("transaction.timeout.ms", "10000")
                    .set("retry.backoff.ms", "10");
            }
            // Idempotence keeps each partition's records in order across retries: a key's journal
            // records must land in the order they were written.
            Guarantee::AtLeastOnce => {
                producer.set("enable.idempotence", "true");
            }
        }
        for (k, v) in &self.producer {
            producer.set(k, v);
        }
        let stop = FlowStopper(Arc::new(AtomicU8::new(RUN)));
        let metrics = Arc::new(Metrics::default());
        let (tx, done) = oneshot::channel();
        let journal = self.journal.unwrap_or_else(|| FlowJournal::Kafka(format!("{}-journal", S::NAME)));
        let store = match (self.state_dir, &journal) {
            (None, _) => None,
            (Some(dir), FlowJournal::Kafka(_)) => {
                Some(checkpoint::StoreSettings {
                dir,
                retention: self.state_retention,
                interval: self.checkpoint_interval,
                standby: self.standby,
            })
            }
            (Some(dir), _) => {
                return Err(FlowError::Config(format!(
                    "a state directory ({}) keeps a local checkpoint of a Kafka journal; this flow has no Kafka journal (a sled journal is local already)",
                    dir.display()
                )))
            }
        };
        let settings = engine::Settings {
            common,
            consumer,
            producer,
            transactional_id,
            inputs: self.inputs,
            journal,
            store,
            snapshot_every: self.snapshot_every,
            commit_interval: self.commit_interval,
            bad_input: self.bad_input.unwrap_or(BadInput::DeadLetter(format!("{first}.dlq"))),
            codec: self.codec,
            guarantee: self.guarantee,
            committer: self.committer,
        };
        let outputs = self.outputs.unwrap_or_else(|| Box::new(|_| Vec::new()));
        if self.committer.max_batch == 0 || self.committer.parallelism == 0 {
            return Err(FlowError::Config("committer max_batch and parallelism must be at least 1".into()));
        }
        if self.enrich.as_ref().is_some_and(|(s, _)| s.parallelism == 0) {
            return Err(FlowError::Config("enrichment parallelism must be at least 1".into()));
        }
        // Enrichment calls and async listeners run on the caller's tokio runtime, or on one of the
        // flow's own when run() is called outside one.
        let needs_runtime = self.enrich.is_some() || self.on_rebalance_async.is_some();
        let tasks = if needs_runtime { Some(engine::Tasks::current_or_own()?) } else { None };
        let parts = engine::Parts {
            stage: self.stage,
            decoder,
            enrich: self.enrich,
            on_rebalance: self.on_rebalance,
            on_rebalance_async: self.on_rebalance_async,
            tasks,
        };
        let (stop2, metrics2) = (stop.0.clone(), metrics.clone());
        let spawned = std::thread::Builder::new().name(format!("eventstage-flow-{}", S::NAME)).spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine::run(settings, parts, outputs, stop2, metrics2)
            }))
            .unwrap_or_else(|_| Err(FlowError::Crashed("panic on the flow thread".into())));
            if let Err(e) = &result {
                tracing::error!(error = %e, "flow stopped");
            }
            let _ = tx.send(result);
        });
        spawned.map_err(|e| FlowError::Config(format!("cannot start the flow thread: {e}")))?;
        Ok(FlowControl { stop, metrics, done })
    }
}
