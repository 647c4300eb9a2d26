//! The flow's output side, on a thread of its own: the output mapping and the produce calls.
//!
//! The flow thread decodes, runs the stage and journals; the emitter thread turns each outcome into
//! output records (the user's mapping, usually serialization) and hands them to the producer. A
//! produce call costs about as much as the rest of a command together (librdkafka copies the
//! record, picks its partition and wakes its broker thread), so two threads keep up with twice the
//! input a single one does. Order is kept: one emitter thread produces outcomes in the order the
//! flow thread handed them over.
//!
//! Commands are handed over [`HANDOFF`] at a time (one wake-up of the emitter per batch), at once
//! when the input runs dry, and before every transaction boundary the flow thread waits until
//! everything handed over is produced ([`Emitter::flush`]): a commit covers exactly the outputs of
//! the inputs it commits, and an abort every output of the aborted transaction. At-least-once
//! batches count each handed-over command as one delivery until its records are produced, so a
//! batch is never taken as acknowledged while its outputs are still on their way to the producer.

use super::committer::{Deliveries, FlowProducerContext};
use super::txn::{classify, is_fence, TxnFailure};
use crate::flow::shared::{kafka, lock, TXN_TIMEOUT};
use crate::flow::{FlowError, InputRecord, Metrics, OutputRecord, Outputs, Processed};
use crate::stage::EventSourced;
use arc_swap::ArcSwap;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, TopicPartitionList};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Commands handed to the emitter thread at once.
const HANDOFF: usize = 64;
/// Hand-overs waiting for the emitter thread before the flow thread waits for it (back-pressure).
const QUEUED_HANDOFFS: usize = 64;

/// The transactional producer, shared by the flow thread (journal records, transactions) and the
/// emitter thread (output records). It can be replaced by a new one of the same transactional id
/// while the flow runs (see [`Sink::start_send_offsets`]).
pub(super) struct Sink {
    producer: ArcSwap<ThreadedProducer<FlowProducerContext>>,
    /// The producer's configuration, for a replacement.
    config: ClientConfig,
    pub(super) deliveries: Arc<Deliveries>,
    pub(super) transactional_id: String,
    /// A topic that exists, for [`connect_to_cluster`] (the flow's first input).
    warm_up_topic: Option<String>,
    /// The producer's `transaction.timeout.ms` (None: not transactional).
    txn_timeout: Option<Duration>,
    /// When the open transaction's first record (or its offsets) went to the producer: where the
    /// coordinator's clock for the transaction timeout starts, at the earliest. None while nothing
    /// was sent in it (an idle flow's open transaction is not one the broker knows).
    opened: Mutex<Option<Instant>>,
    /// `opened` is set (the check on every produce call).
    sent: AtomicBool,
    /// Producers replaced since the last commit.
    replaced: std::sync::atomic::AtomicU32,
}

/// Producer replacements in a row (no commit between them) after which a failure stops the flow.
const MAX_REPLACEMENTS: u32 = 5;

/// How long a replacement producer may take to fence the old one and open its first transaction.
const REPLACEMENT_DEADLINE: Duration = Duration::from_secs(60);
/// How much longer than its own timeout `send_offsets_to_transaction` may take before the producer
/// is taken as wedged.
const SEND_OFFSETS_GRACE: Duration = Duration::from_secs(5);

impl Sink {
    pub(super) fn new(
        producer: ThreadedProducer<FlowProducerContext>,
        config: ClientConfig,
        deliveries: Arc<Deliveries>,
        transactional_id: String,
        warm_up_topic: Option<String>,
    ) -> Self {
        let transactional = config.get("transactional.id").is_some();
        // librdkafka's default, as for the broker's limit, is a minute.
        let txn_timeout = transactional.then(|| {
            let ms = config.get("transaction.timeout.ms").and_then(|v| v.parse().ok()).unwrap_or(60_000);
            Duration::from_millis(ms)
        });
        Self {
            producer: ArcSwap::from_pointee(producer),
            config,
            deliveries,
            transactional_id,
            warm_up_topic,
            txn_timeout,
            opened: Mutex::new(None),
            sent: AtomicBool::new(false),
            replaced: Default::default(),
        }
    }

    /// A producer failure that a new producer of the same transactional id heals, as long as
    /// replacements do not keep failing ([`MAX_REPLACEMENTS`] without a commit between them):
    /// - a fence of a transaction open longer than its timeout (see `expired`): the broker timed it
    ///   out. A younger transaction's fence means that another instance took over: never healed;
    /// - any other fatal error but a refused authorization: librdkafka's idempotence state broken
    ///   by a broker restart ("sequence desynchronization"), or an abort refused with
    ///   INVALID_TXN_STATE after the broker timed the transaction out.
    pub(super) fn heals(&self, e: &KafkaError) -> bool {
        if !self.is_transactional() || self.replaced.load(Ordering::Relaxed) >= MAX_REPLACEMENTS {
            return false;
        }
        let code = match classify(e) {
            TxnFailure::Fenced => return self.expired().is_some(),
            TxnFailure::Fatal => e.rdkafka_error_code(),
            // A produce call of a producer in a fatal state fails with `Fatal`; the state says why.
            _ if e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) => {
                self.producer().client().fatal_error().map(|(code, _)| code)
            }
            _ => return false,
        };
        if code.is_some_and(is_fence) {
            return self.expired().is_some();
        }
        !matches!(
            code,
            Some(
                RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::GroupAuthorizationFailed
            )
        )
    }

    /// A fence (as [`FlowError::Fenced`]) healed by a new producer: the broker timed the
    /// transaction out.
    pub(super) fn heals_fence(&self) -> bool {
        self.replaced.load(Ordering::Relaxed) < MAX_REPLACEMENTS && self.expired().is_some()
    }

    /// A transaction committed: the replacements before it healed.
    pub(super) fn committed(&self) {
        self.replaced.store(0, Ordering::Relaxed);
    }

    /// The producer has a transactional id.
    pub(super) fn is_transactional(&self) -> bool {
        self.txn_timeout.is_some()
    }

    /// Begins a transaction.
    pub(super) fn begin(&self) -> Result<(), FlowError> {
        self.producer().begin_transaction().map_err(|e| self.error("begin transaction".into(), e))?;
        self.reset_opened();
        Ok(())
    }

    fn reset_opened(&self) {
        *lock(&self.opened) = None;
        self.sent.store(false, Ordering::Relaxed);
    }

    /// Marks the open transaction as sent to (from now on, known by) the broker.
    fn sending(&self) {
        if !self.sent.load(Ordering::Relaxed) {
            lock(&self.opened).get_or_insert_with(Instant::now);
            self.sent.store(true, Ordering::Relaxed);
        }
    }

    /// How long the open transaction has been open, when that is longer than the transaction
    /// timeout: the broker aborts such a transaction and fences its producer's epoch, so a fence
    /// then says the broker timed it out, not that another instance took over.
    pub(super) fn expired(&self) -> Option<Duration> {
        let open = lock(&self.opened).as_ref().map(Instant::elapsed)?;
        self.txn_timeout.filter(|t| open >= *t).map(|_| open)
    }

    /// The current producer.
    pub(super) fn producer(&self) -> arc_swap::Guard<Arc<ThreadedProducer<FlowProducerContext>>> {
        self.producer.load()
    }

    /// Starts adding the consumed `offsets` of `group` to the open transaction.
    ///
    /// librdkafka's `send_offsets_to_transaction` waits without a deadline for its request to the
    /// group coordinator (its timeout is never checked: librdkafka issue #5456), and after the
    /// coordinator's broker dies and leaves the cluster's metadata, librdkafka no longer looks for
    /// the new coordinator (issue #5511): on Apache Kafka the flow stopped for good, silently. So the
    /// call runs on a thread of its own; past its timeout and a grace, the producer is taken as
    /// wedged and replaced by a new one of the same transactional id. The new one fences the old
    /// (whose open transaction the coordinator aborts) and opens a transaction, and the call fails
    /// as an abortable error: the caller aborts, rewinds and processes the inputs again. The old
    /// producer is released by its thread if librdkafka ever returns.
    ///
    /// The caller goes on until [`SendingOffsets::wait`]. Produce calls may go on meanwhile; no
    /// other transactional call may.
    pub(super) fn start_send_offsets(
        &self,
        offsets: &TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> SendingOffsets {
        self.sending();
        let producer = self.producer.load_full();
        let offsets = offsets.clone();
        let (done, result) = sync_channel(1);
        let call = std::thread::Builder::new().name("eventstage-txn-offsets".into()).spawn(move || {
            let _ = done.send(producer.send_offsets_to_transaction(&offsets, &group, TXN_TIMEOUT));
        });
        if let Err(e) = call {
            // Out of threads: the transaction aborts and its inputs are processed again.
            tracing::error!(error = %e, "cannot start a thread for send_offsets_to_transaction");
            return SendingOffsets(None);
        }
        SendingOffsets(Some(result))
    }
}

/// A `send_offsets_to_transaction` under way on a thread of its own.
#[must_use = "the transaction's offsets are only added once waited for"]
pub(super) struct SendingOffsets(Option<Receiver<KafkaResult<()>>>);

impl SendingOffsets {
    /// Its outcome. A call that does not return (a wedged producer) is given up after the
    /// transaction timeout and a grace period, and the producer is replaced.
    pub(super) fn wait(self, sink: &Sink) -> KafkaResult<()> {
        let Some(result) = self.0 else { return Err(KafkaError::Global(RDKafkaErrorCode::Fail)) };
        match result.recv_timeout(TXN_TIMEOUT + SEND_OFFSETS_GRACE) {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(
                    waited_s = (TXN_TIMEOUT + SEND_OFFSETS_GRACE).as_secs(),
                    transactional_id = %sink.transactional_id,
                    "librdkafka's send_offsets_to_transaction did not return (its group coordinator request waits without a deadline after a broker loss: librdkafka #5456, #5511); replacing the transactional producer"
                );
                sink.replace_producer()?;
                Err(KafkaError::Global(RDKafkaErrorCode::OperationTimedOut))
            }
        }
    }
}

/// Brings up a transactional producer's connection to a cluster broker before
/// `init_transactions`. librdkafka looks for the transaction coordinator as soon as
/// `init_transactions` is called; with no broker connection up yet, it finds "no brokers
/// available" and asks again on a 500 ms timer (half of all starts here). Two metadata requests
/// for `topic` (one that exists: a producer's metadata request may create a topic) bring up a
/// connection: the first goes through the bootstrap connection, which librdkafka drops once it
/// knows the cluster's brokers; the second through one of those (a few ms). If they fail,
/// `init_transactions` says why.
pub(super) fn connect_to_cluster(producer: &ThreadedProducer<FlowProducerContext>, topic: Option<&str>) {
    for _ in 0..2 {
        let _ = producer.client().fetch_metadata(topic, Duration::from_secs(1));
    }
}

impl Sink {
    /// Replaces the producer with a new one of the same transactional id, in a transaction.
    pub(super) fn replace_producer(&self) -> KafkaResult<()> {
        let producer: ThreadedProducer<_> =
            self.config.create_with_context(FlowProducerContext { deliveries: self.deliveries.clone() })?;
        connect_to_cluster(&producer, self.warm_up_topic.as_deref());
        let deadline = Instant::now() + REPLACEMENT_DEADLINE;
        let mut delay = Duration::from_millis(100);
        loop {
            match producer.init_transactions(TXN_TIMEOUT) {
                Ok(()) => break,
                Err(e) if classify(&e) == TxnFailure::Retry && Instant::now() + delay < deadline => {
                    tracing::warn!(error = %e, "the replacement producer's init_transactions failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
        producer.begin_transaction()?;
        self.reset_opened();
        self.replaced.fetch_add(1, Ordering::Relaxed);
        self.producer.store(Arc::new(producer));
        tracing::info!(transactional_id = %self.transactional_id, "the transactional producer was replaced");
        Ok(())
    }

    /// Produces a record whose acknowledgement counts for `batch` (at-least-once; exactly-once has
    /// no batches), waiting while librdkafka's queue is full.
    pub(super) fn produce(
        &self,
        batch: usize,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<&OwnedHeaders>,
    ) -> Result<(), FlowError> {
        let mut deadline = None;
        self.sending();
        self.deliveries.add(batch);
        loop {
            let mut rec: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(topic, batch);
            if let Some(k) = key {
                rec = rec.key(k);
            }
            if let Some(v) = value {
                rec = rec.payload(v);
            }
            if let Some(p) = partition {
                rec = rec.partition(p);
            }
            if let Some(h) = headers {
                rec = rec.headers(h.clone());
            }
            match self.producer().send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if Instant::now() < *deadline.get_or_insert_with(|| Instant::now() + TXN_TIMEOUT) =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => {
                    // Refused by the client: it will never be acknowledged.
                    self.deliveries.done(batch);
                    return Err(self.error(format!("produce to {topic}"), e));
                }
            }
        }
    }

    /// Produces an output record, headers included.
    pub(super) fn produce_output(&self, batch: usize, o: &OutputRecord) -> Result<(), FlowError> {
        let headers = (!o.headers.is_empty()).then(|| {
            o.headers
                .iter()
                .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: Some(v.as_slice()) }))
        });
        self.produce(batch, &o.topic, None, o.key.as_deref(), o.value.as_deref(), headers.as_ref())
    }

    /// Names a producer failure: a fatal state caused by a newer instance is [`FlowError::Fenced`].
    pub(super) fn error(&self, context: String, e: KafkaError) -> FlowError {
        let fenced = classify(&e) == TxnFailure::Fenced
            || self.producer().client().fatal_error().is_some_and(|(code, _)| is_fence(code));
        if fenced {
            FlowError::Fenced { transactional_id: self.transactional_id.clone() }
        } else {
            kafka(context, e)
        }
    }
}

/// What the stage made of one input record, owned: the emitter thread maps it to output records.
pub(super) struct Outcome<S: EventSourced> {
    pub(super) input: InputRecord,
    pub(super) key: S::Key,
    pub(super) events: Vec<S::Event>,
    pub(super) outcome: Result<S::Reply, S::Rejection>,
    /// The entity's state after the events.
    pub(super) state: Arc<S::State>,
    /// What the decoder handed over for the output mapping.
    pub(super) context: crate::flow::Context,
}

enum Job<S: EventSourced> {
    /// Output records from the mapping.
    Outcome(usize, Outcome<S>),
    /// One record as it is (a dead letter, an outbox record produced again): batch, partition.
    Record(usize, i32, OutputRecord),
}

enum Message<S: EventSourced> {
    Jobs(Vec<Job<S>>),
    /// Answered once every job before it is produced.
    Flush(SyncSender<Flushed>),
}

struct Flushed {
    failure: Option<FlowError>,
    outbox: Vec<(i32, OutputRecord)>,
}

/// Set by the emitter thread when a job failed; `stop` by the flow thread to have it skip the rest.
#[derive(Default)]
struct Flags {
    failed: AtomicBool,
    stop: AtomicBool,
}

/// The flow thread's end of the emitter.
pub(super) struct Emitter<S: EventSourced> {
    sink: Arc<Sink>,
    collected: Vec<Job<S>>,
    queue: Option<SyncSender<Message<S>>>,
    flags: Arc<Flags>,
    thread: Option<JoinHandle<()>>,
}

impl<S: EventSourced> Emitter<S> {
    /// Starts the emitter thread. With `keep_outbox`, every record it produces is also handed back
    /// at the next flush (the sled journal's outbox).
    pub(super) fn start(
        outputs: Outputs<S>,
        sink: Arc<Sink>,
        metrics: Arc<Metrics>,
        keep_outbox: bool,
    ) -> Result<Self, FlowError> {
        let (queue, jobs) = sync_channel(QUEUED_HANDOFFS);
        let flags = Arc::new(Flags::default());
        let worker = Worker { outputs, sink: sink.clone(), metrics, flags: flags.clone(), keep_outbox };
        let thread = std::thread::Builder::new()
            .name(format!("eventstage-emit-{}", S::NAME))
            .spawn(move || worker.run(jobs))
            .map_err(|e| FlowError::Config(format!("cannot start the flow's emitter thread: {e}")))?;
        Ok(Self { sink, collected: Vec::with_capacity(HANDOFF), queue: Some(queue), flags, thread: Some(thread) })
    }

    /// Queues an outcome's output records for `batch`.
    pub(super) fn outcome(&mut self, batch: usize, outcome: Outcome<S>) -> Result<(), FlowError> {
        self.push(batch, Job::Outcome(batch, outcome))
    }

    /// Queues one record of partition `p` for `batch`.
    pub(super) fn record(&mut self, batch: usize, p: i32, record: OutputRecord) -> Result<(), FlowError> {
        self.push(batch, Job::Record(batch, p, record))
    }

    fn push(&mut self, batch: usize, job: Job<S>) -> Result<(), FlowError> {
        // Counted until the emitter thread has produced the job's records (at-least-once).
        self.sink.deliveries.add(batch);
        self.collected.push(job);
        if self.collected.len() >= HANDOFF {
            return self.hand_off();
        }
        Ok(())
    }

    /// Hands the collected commands to the emitter thread; the error of an earlier one, if any.
    pub(super) fn hand_off(&mut self) -> Result<(), FlowError> {
        if !self.collected.is_empty() {
            let jobs = std::mem::replace(&mut self.collected, Vec::with_capacity(HANDOFF));
            self.send(Message::Jobs(jobs))?;
        }
        if self.flags.failed.load(Ordering::Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    /// Waits until everything queued is produced: its first failure, or the records it produced
    /// for the outbox since the last flush.
    pub(super) fn flush(&mut self) -> Result<Vec<(i32, OutputRecord)>, FlowError> {
        if !self.collected.is_empty() {
            let jobs = std::mem::take(&mut self.collected);
            self.send(Message::Jobs(jobs))?;
        }
        let (reply, flushed) = sync_channel(1);
        self.send(Message::Flush(reply))?;
        let flushed = flushed.recv().map_err(|_| Self::gone())?;
        match flushed.failure {
            Some(e) => Err(e),
            None => Ok(flushed.outbox),
        }
    }

    fn send(&self, message: Message<S>) -> Result<(), FlowError> {
        self.queue.as_ref().ok_or_else(Self::gone)?.send(message).map_err(|_| Self::gone())
    }

    fn gone() -> FlowError {
        FlowError::Crashed("the flow's emitter thread stopped".into())
    }
}

impl<S: EventSourced> Drop for Emitter<S> {
    /// Stops the emitter thread without producing what is still queued (the flow stopped; an open
    /// transaction is not committed).
    fn drop(&mut self) {
        self.flags.stop.store(true, Ordering::SeqCst);
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker<S: EventSourced> {
    outputs: Outputs<S>,
    sink: Arc<Sink>,
    metrics: Arc<Metrics>,
    flags: Arc<Flags>,
    keep_outbox: bool,
}

impl<S: EventSourced> Worker<S> {
    fn run(self, jobs: Receiver<Message<S>>) {
        let (mut failure, mut outbox) = (None, Vec::new());
        while let Ok(message) = jobs.recv() {
            match message {
                Message::Jobs(batch) => {
                    // Counted once per hand-over: the flow thread writes its counters next to it.
                    let mut records_out = 0;
                    for job in batch {
                        let id = match &job {
                            Job::Outcome(id, _) | Job::Record(id, _, _) => *id,
                        };
                        if failure.is_none() && !self.flags.stop.load(Ordering::Relaxed) {
                            match self.emit(job, &mut outbox) {
                                Ok(n) => records_out += n,
                                Err(e) => {
                                    self.flags.failed.store(true, Ordering::Relaxed);
                                    failure = Some(e);
                                }
                            }
                        }
                        self.sink.deliveries.done(id);
                    }
                    self.metrics.records_out.fetch_add(records_out, Ordering::Relaxed);
                }
                Message::Flush(reply) => {
                    self.flags.failed.store(false, Ordering::Relaxed);
                    let _ = reply.send(Flushed { failure: failure.take(), outbox: std::mem::take(&mut outbox) });
                }
            }
        }
    }

    /// Produces a job's records: how many of them are output records (dead letters and outbox
    /// records produced again are not counted).
    fn emit(&self, job: Job<S>, outbox: &mut Vec<(i32, OutputRecord)>) -> Result<u64, FlowError> {
        let (batch, p, records, outputs) = match job {
            Job::Record(batch, p, record) => (batch, p, vec![record], 0),
            Job::Outcome(batch, o) => {
                let processed = Processed {
                    input: &o.input,
                    key: &o.key,
                    events: &o.events,
                    outcome: &o.outcome,
                    state: o.state.as_ref(),
                    context: &o.context,
                };
                let records = catch_unwind(AssertUnwindSafe(|| (self.outputs)(&processed))).map_err(|panic| {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    FlowError::Crashed(format!("the output mapping panicked: {msg}"))
                })?;
                let n = records.len() as u64;
                (batch, o.input.partition, records, n)
            }
        };
        for record in &records {
            self.sink.produce_output(batch, record)?;
        }
        if self.keep_outbox {
            outbox.extend(records.into_iter().map(|r| (p, r)));
        }
        Ok(outputs)
    }
}
