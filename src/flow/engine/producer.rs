//! A flow's producer (`Sink`; exactly once has two that take turns), shared by the flow thread
//! (journal records, transactions) and the emitter thread (output records): its commit on a
//! thread of its own, its replacement when it breaks, the acknowledgements counted per
//! at-least-once batch, and how a transactional error is classified.

use super::cache::StoreProgress;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::flow::shared::{kafka, lock, TXN_TIMEOUT};
use arc_swap::ArcSwap;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How a transactional error must be handled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TxnFailure {
    Fenced,
    Fatal,
    Abort,
    Retry,
}

/// A code saying that the broker refused this producer's epoch.
pub(super) fn is_fence(code: RDKafkaErrorCode) -> bool {
    matches!(code, RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch | RDKafkaErrorCode::Fenced)
}

pub(super) fn classify(e: &KafkaError) -> TxnFailure {
    if e.rdkafka_error_code().is_some_and(is_fence) {
        return TxnFailure::Fenced;
    }
    match e {
        KafkaError::Transaction(r) if r.is_fatal() => TxnFailure::Fatal,
        KafkaError::Transaction(r) if r.txn_requires_abort() => TxnFailure::Abort,
        KafkaError::Transaction(r) if r.is_retriable() => TxnFailure::Retry,
        _ => TxnFailure::Abort,
    }
}

/// A producer of the flow, shared by the flow thread (journal records, transactions) and the
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
    /// A transaction is begun (and neither committed nor aborted since).
    in_txn: AtomicBool,
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
            in_txn: AtomicBool::new(transactional),
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

    /// Begins a transaction, unless one is begun already.
    pub(super) fn begin(&self) -> Result<(), FlowError> {
        if self.in_txn.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.producer().begin_transaction().map_err(|e| self.error("begin transaction".into(), e))?;
        self.reset_opened();
        self.in_txn.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Aborts the transaction begun (or the failed commit's), if there is one: whether there was.
    pub(super) fn abort(&self) -> KafkaResult<bool> {
        if !self.in_txn.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.producer().abort_transaction(TXN_TIMEOUT)?;
        self.in_txn.store(false, Ordering::Relaxed);
        Ok(true)
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

/// What a commit's thread reports: the storage's write failed (the outer error: the flow stops),
/// or the Kafka commit's outcome.
pub(super) type CommitOutcome = Result<KafkaResult<()>, FlowError>;

/// A transaction's commit under way on a thread of its own, while the flow thread goes on with the
/// next transaction (whose records wait for the next begin).
pub(super) struct Committing {
    done: Receiver<CommitOutcome>,
    /// Every record of the transaction is acknowledged (in its partition's log): records produced
    /// by another producer from now on land after them.
    flushed: Arc<AtomicBool>,
    /// When the commit started (on the flow thread: the seal included).
    pub(super) started: Instant,
}

impl Committing {
    /// The commit's outcome, once it ended.
    pub(super) fn wait(&self) -> CommitOutcome {
        self.done.recv().unwrap_or_else(|_| Err(Self::gone()))
    }

    /// The commit's outcome once it ended; None while it runs, unless `wait`.
    pub(super) fn outcome(&self, wait: bool) -> Option<CommitOutcome> {
        if wait {
            return Some(self.wait());
        }
        match self.done.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(Err(Self::gone())),
        }
    }

    /// Every record of the transaction is acknowledged (see [`Sink::start_commit`]).
    pub(super) fn flushed(&self) -> bool {
        self.flushed.load(Ordering::Acquire)
    }

    fn gone() -> FlowError {
        FlowError::Crashed("the transaction's commit thread stopped".into())
    }
}

impl Sink {
    /// Commits the open transaction on a thread of its own: waits for every record it produced
    /// to be acknowledged (then [`Committing::flushed`] says so: the flow's other producer may
    /// produce the next transaction's records, which land after these), for its offsets
    /// (`sending`) and for the storage's write (`durable`), then commits. The acknowledgements
    /// are waited for with librdkafka's own flush (see [`flush`]), not by `commit_transaction`'s,
    /// which with a `ThreadedProducer` waits in 100 ms polling steps. A retriable failure of the
    /// commit is retried twice. Nothing may be produced with this producer until the
    /// outcome is taken and its next transaction begun.
    pub(super) fn start_commit(
        self: &Arc<Self>,
        sending: Option<SendingOffsets>,
        durable: impl FnOnce() -> Result<(), FlowError> + Send + 'static,
        started: Instant,
    ) -> Result<Committing, FlowError> {
        let (tx, done) = sync_channel(1);
        let flushed = Arc::new(AtomicBool::new(false));
        let (sink, flushed_) = (self.clone(), flushed.clone());
        std::thread::Builder::new()
            .name("eventstage-commit".into())
            .spawn(move || {
                let thread_started = Instant::now();
                // Past the timeout the commit fails (its own flush does), and the records of the
                // next transaction wait for its outcome.
                if flush(&sink.producer.load_full(), TXN_TIMEOUT) {
                    flushed_.store(true, Ordering::Release);
                }
                let flushed_at = thread_started.elapsed();
                let sent = sending.map_or(Ok(()), |sending| sending.wait(&sink));
                let offsets_at = thread_started.elapsed();
                let stored = durable();
                let durable_at = thread_started.elapsed();
                let outcome = stored.map(|()| sent.and_then(|()| sink.commit_transaction()));
                // Where a commit's time goes: the seal on the flow thread, then on this thread the
                // acknowledgements, the offsets' round trips, the storage's write, the commit.
                tracing::debug!(
                    transactional_id = %sink.transactional_id,
                    seal_us = thread_started.duration_since(started).as_micros() as u64,
                    flushed_us = flushed_at.as_micros() as u64,
                    offsets_us = offsets_at.as_micros() as u64,
                    durable_us = durable_at.as_micros() as u64,
                    committed_us = thread_started.elapsed().as_micros() as u64,
                    "commit"
                );
                let _ = tx.send(outcome);
            })
            .map_err(|e| FlowError::Crashed(format!("cannot start a thread for the transaction's commit: {e}")))?;
        Ok(Committing { done, flushed, started })
    }

    /// `commit_transaction`, tried again (twice at most) after a retriable failure.
    fn commit_transaction(&self) -> KafkaResult<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.producer().commit_transaction(TXN_TIMEOUT) {
                Err(e) if classify(&e) == TxnFailure::Retry && attempt < 3 => {
                    tracing::warn!(error = %e, attempt, "commit failed; retrying");
                    std::thread::sleep(Duration::from_millis(100 * attempt));
                }
                Ok(()) => {
                    self.in_txn.store(false, Ordering::Relaxed);
                    return Ok(());
                }
                other => return other,
            }
        }
    }
}

/// Waits up to `timeout` until every record `producer` was given is acknowledged: true once it
/// is. librdkafka's own flush: while it runs, the records lingering in its queues are sent at
/// once (`linger.ms` does not apply), and it waits on a condition variable. rdkafka's
/// `Producer::flush` calls it with no timeout in a loop of 100 ms polls, so its records linger.
fn flush(producer: &ThreadedProducer<FlowProducerContext>, timeout: Duration) -> bool {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the pointer is the client of `producer`, alive for the call (the caller holds it);
    // rd_kafka_flush may be called from any thread. rdkafka asks for delivery reports as events,
    // so librdkafka's flush only waits for them to be served (by the producer's own thread).
    let code = unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms) };
    code == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
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
        self.in_txn.store(true, Ordering::Relaxed);
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

/// Acknowledgements outstanding per batch, filled in by the producer's delivery callback.
#[derive(Default)]
pub(super) struct Deliveries {
    counting: bool,
    state: Mutex<DeliveryState>,
    acked: Condvar,
    /// With a state cache: where the journal records' acknowledged offsets go.
    pub(super) journal: std::sync::OnceLock<Arc<StoreProgress>>,
}

#[derive(Default)]
struct DeliveryState {
    outstanding: HashMap<usize, u64>,
    failure: Option<(String, KafkaError)>,
}

impl Deliveries {
    pub(super) fn new(counting: bool) -> Self {
        Self { counting, ..Self::default() }
    }

    pub(super) fn add(&self, batch: usize) {
        if self.counting {
            *lock(&self.state).outstanding.entry(batch).or_default() += 1;
        }
    }

    pub(super) fn done(&self, batch: usize) {
        if !self.counting {
            return;
        }
        let mut state = lock(&self.state);
        if let Some(n) = state.outstanding.get_mut(&batch) {
            *n -= 1;
            if *n == 0 {
                state.outstanding.remove(&batch);
            }
        }
        self.acked.notify_all();
    }

    /// Waits up to `timeout` for `batch` to be acknowledged; `Ok(true)` once it is.
    pub(super) fn wait(&self, batch: usize, timeout: Duration) -> Result<bool, FlowError> {
        let state = lock(&self.state);
        let (state, _) = self
            .acked
            .wait_timeout_while(state, timeout, |s| s.failure.is_none() && s.outstanding.contains_key(&batch))
            .unwrap_or_else(|p| p.into_inner());
        if let Some((topic, e)) = &state.failure {
            return Err(kafka(format!("delivery to {topic} failed (its input offsets stay uncommitted)"), e.clone()));
        }
        Ok(!state.outstanding.contains_key(&batch))
    }
}

/// The producer's context: counts acknowledgements per batch (at-least-once).
pub(super) struct FlowProducerContext {
    pub(super) deliveries: Arc<Deliveries>,
}

impl ClientContext for FlowProducerContext {}

impl ProducerContext for FlowProducerContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: usize) {
        match result {
            Err((e, msg)) => {
                if self.deliveries.counting {
                    lock(&self.deliveries.state).failure.get_or_insert_with(|| (msg.topic().to_string(), e.clone()));
                }
            }
            Ok(msg) => {
                if let Some(journal) = self.deliveries.journal.get() {
                    journal.acknowledged(msg.topic(), msg.partition(), msg.offset());
                }
            }
        }
        self.deliveries.done(batch);
    }
}
