//! The at-least-once side of the flow (Alpakka Kafka's `Committer.sink`): batches of inputs whose
//! outputs are produced without a transaction; a batch's journal is written once its outputs are
//! acknowledged, and its offsets are committed once its journal is.
//!
//! That order is what makes at-least-once safe for persistent stages. A crash before a batch's
//! journal is written delivers its inputs again and they are handled again against the same
//! state: same outputs again, events applied once. A crash after it delivers inputs whose events
//! are journaled: every journal record carries the input positions its state includes, so those
//! inputs are skipped (their outputs were acknowledged before the journal was written).

use super::core::Core;
use super::emitter::Sink;
use super::partitions::FlowConsumer;
use super::storage::{Out, Storage};
use crate::flow::shared::{kafka, lock, TXN_TIMEOUT};
use crate::flow::{CommitterSettings, FlowError, Metrics};
use crate::stage::EventSourced;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::{ClientContext, TopicPartitionList};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The two delivery guarantees, each with its own committer.
pub(super) enum Delivery {
    /// Exactly-once: the open Kafka transaction holds the outputs, the journal records and the
    /// consumed offsets, and commits or aborts them as one (see `txn`).
    Transactions(Transactions),
    /// At-least-once (Alpakka Kafka's `Committer.sink`): batches whose offsets are committed once
    /// their outputs are acknowledged and their journal is written (see `committer`).
    Batches(Committer),
}

/// The exactly-once committer's own state.
#[derive(Default)]
pub(super) struct Transactions {
    /// Aborts since the last successful commit: repeated failures back off (100 ms .. 5 s).
    pub(super) consecutive_aborts: u32,
}

impl Delivery {
    /// The batch being filled, whose records' acknowledgements are counted under it (exactly-once
    /// has no batches: 0).
    pub(super) fn batch(&self) -> usize {
        match self {
            Self::Transactions(_) => 0,
            Self::Batches(c) => c.filling(),
        }
    }

    /// Whether records of the open work are produced outside a transaction.
    pub(super) fn is_at_least_once(&self) -> bool {
        matches!(self, Self::Batches(_))
    }

    /// Whether the batch being filled must end now (a transaction ends on the commit interval).
    pub(super) fn due(&self) -> bool {
        match self {
            Self::Transactions(_) => false,
            Self::Batches(c) => c.due(),
        }
    }

    /// One more input in the open transaction or batch.
    pub(super) fn count_input(&mut self) {
        match self {
            Self::Transactions(_) => {}
            Self::Batches(c) => c.inputs += 1,
        }
    }

    /// The storage asks for the open batch to end (a transaction writes the record at once).
    pub(super) fn end_soon(&mut self) {
        match self {
            Self::Transactions(_) => {}
            Self::Batches(c) => c.full = true,
        }
    }
}

/// Acknowledgements outstanding per batch, filled in by the producer's delivery callback.
#[derive(Default)]
pub(super) struct Deliveries {
    counting: bool,
    state: Mutex<DeliveryState>,
    acked: Condvar,
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
    fn wait(&self, batch: usize, timeout: Duration) -> Result<bool, FlowError> {
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
        if let Err((e, msg)) = result {
            if self.deliveries.counting {
                lock(&self.deliveries.state).failure.get_or_insert_with(|| (msg.topic().to_string(), e.clone()));
            }
        }
        self.deliveries.done(batch);
    }
}

struct PendingBatch {
    id: usize,
    offsets: TopicPartitionList,
    /// Whether the storage wrote the batch's journal.
    journaled: bool,
}

/// Batches on their way to an offset commit, oldest first.
pub(super) struct Committer {
    pub(super) settings: CommitterSettings,
    queue: VecDeque<PendingBatch>,
    /// The batch being filled: its records' acknowledgements are counted under this id.
    filling: usize,
    /// Inputs in the batch being filled.
    pub(super) inputs: usize,
    /// The batch being filled must end now (a key holds the most events a journal record takes).
    pub(super) full: bool,
}

impl Committer {
    pub(super) fn new(settings: CommitterSettings) -> Self {
        Self { settings, queue: VecDeque::new(), filling: 0, inputs: 0, full: false }
    }

    pub(super) fn filling(&self) -> usize {
        self.filling
    }

    pub(super) fn due(&self) -> bool {
        self.full || self.inputs >= self.settings.max_batch
    }
}

/// How long `advance` may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Not at all: move along what is acknowledged already.
    No,
    /// Until at most this many batches are pending.
    UntilAtMost(usize),
}

impl Committer {
    /// Starts filling the next batch, the batch filled so far (`offsets`: what it consumed up to)
    /// on its way; returns its id.
    fn seal(&mut self, offsets: Option<TopicPartitionList>) -> usize {
        let id = self.filling;
        self.inputs = 0;
        self.full = false;
        if let Some(offsets) = offsets {
            self.queue.push_back(PendingBatch { id, offsets, journaled: false });
            self.filling += 1;
        }
        id
    }

    /// Moves pending batches along, oldest first: their journal is written (by `storage`) once
    /// their outputs are acknowledged, their offsets committed once the journal is.
    fn advance<S: EventSourced>(
        &mut self,
        sink: &Sink,
        storage: &mut dyn Storage<S>,
        consumer: &FlowConsumer<S>,
        metrics: &Metrics,
        wait: Wait,
    ) -> Result<(), FlowError> {
        let mut deadline = Instant::now() + TXN_TIMEOUT;
        loop {
            let pending = self.queue.len();
            let Some(front) = self.queue.front_mut() else { return Ok(()) };
            let blocking = matches!(wait, Wait::UntilAtMost(n) if pending > n);
            let id = front.id;
            let step = if blocking { Duration::from_millis(50) } else { Duration::ZERO };
            if !sink.deliveries.wait(id, step)? {
                if !blocking {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    tracing::warn!(batch = id, "outputs still unacknowledged after {TXN_TIMEOUT:?}; waiting on");
                    deadline = Instant::now() + TXN_TIMEOUT;
                }
                continue;
            }
            if !front.journaled {
                // Its records are counted under the batch, so the offsets wait for them too.
                front.journaled = true;
                storage.write_batch(id, Out { sink, batch: id })?;
                continue;
            }
            let Some(done) = self.queue.pop_front() else { return Ok(()) };
            if done.offsets.count() > 0 {
                // The last commit before a revocation or shutdown is synchronous; the others
                // overlap with processing (a failed one is superseded by the next).
                let mode = if wait == Wait::UntilAtMost(0) { CommitMode::Sync } else { CommitMode::Async };
                consumer.commit(&done.offsets, mode).map_err(|e| kafka("commit offsets", e))?;
            }
            metrics.transactions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<S: EventSourced> Core<S> {
    /// Ends the batch being filled: its in-memory state becomes the state of record, its journal
    /// records wait for its outputs' acknowledgements, then its offsets are committed.
    pub(super) fn end_batch(&mut self, consumer: &FlowConsumer<S>) -> Result<(), FlowError> {
        // The batch's outputs go to the emitter now; its deliveries count them until produced.
        self.txn.emitter.hand_off()?;
        let sealed = if self.assigned.dirty {
            let (offsets, positions) = self.pending_offsets()?;
            // Handed to the committer: the next batch starts here.
            self.assigned.mark_committed();
            self.storage.seal_batch(self.txn.delivery.batch(), &self.assigned.partitions, positions)?;
            self.settle_overlays();
            Some(offsets)
        } else {
            None
        };
        let parallelism = match &mut self.txn.delivery {
            Delivery::Batches(c) => {
                c.seal(sealed);
                c.settings.parallelism
            }
            Delivery::Transactions(_) => 1,
        };
        self.advance(consumer, Wait::UntilAtMost(parallelism))
    }

    /// Moves pending at-least-once batches along (see `Committer::advance`); a transaction has
    /// nothing pending after its commit.
    pub(super) fn advance(&mut self, consumer: &FlowConsumer<S>, wait: Wait) -> Result<(), FlowError> {
        match &mut self.txn.delivery {
            Delivery::Batches(c) => c.advance(&self.txn.sink, &mut *self.storage, consumer, &self.metrics, wait),
            Delivery::Transactions(_) => Ok(()),
        }
    }

    /// Forgets batches whose partitions were lost: their offsets cannot be committed any more and
    /// their journal must not land after the new owner restored.
    pub(super) fn drop_batches(&mut self) {
        if let Delivery::Batches(c) = &mut self.txn.delivery {
            c.queue.clear();
        }
        self.storage.drop_batches();
    }
}
