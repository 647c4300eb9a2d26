//! The at-least-once side of the flow (Alpakka Kafka's `Committer.sink`): batches of inputs whose
//! outputs are produced without a transaction; a batch's journal is written once its outputs are
//! acknowledged, and its offsets are committed once its journal is.
//!
//! That order is what makes at-least-once safe for persistent stages. A crash before a batch's
//! journal is written delivers its inputs again and they are handled again against the same
//! state: same outputs again, events applied once. A crash after it delivers inputs whose events
//! are journaled: every journal record carries the input positions its state includes, so those
//! inputs are skipped (their outputs were acknowledged before the journal was written).

use super::producer::Sink;
use super::storage::{Out, Storage};
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::settings::CommitterSettings;
use crate::flow::shared::{kafka, TXN_TIMEOUT};
use crate::stage::EventSourced;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::TopicPartitionList;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
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

pub(super) struct PendingBatch {
    id: usize,
    offsets: TopicPartitionList,
    /// Whether the storage wrote the batch's journal.
    journaled: bool,
}

/// Batches on their way to an offset commit, oldest first.
pub(super) struct Committer {
    pub(super) settings: CommitterSettings,
    pub(super) queue: VecDeque<PendingBatch>,
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
    pub(super) fn seal(&mut self, offsets: Option<TopicPartitionList>) -> usize {
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
    pub(super) fn advance<S: EventSourced, C: ConsumerContext>(
        &mut self,
        sink: &Sink,
        storage: &mut dyn Storage<S>,
        consumer: &BaseConsumer<C>,
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
