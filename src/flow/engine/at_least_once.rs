//! The at-least-once side of the flow (Alpakka Kafka's `Committer.sink`): batches of inputs whose
//! outputs are produced without a transaction; a batch's journal is written once its outputs are
//! acknowledged, and its offsets are committed once its journal is.
//!
//! That order is what makes at-least-once safe for persistent stages. A crash before a batch's
//! journal is written delivers its inputs again and they are handled again against the same
//! state: same outputs again, events applied once. A crash after it delivers inputs whose events
//! are journaled: every journal record carries the input positions its state includes, so those
//! inputs are skipped (their outputs were acknowledged before the journal was written).

use super::core::{Core, FlowConsumer};
use super::guarantee::{Guarantee, Wait};
use super::producer::Sink;
use super::state::PartitionState;
use super::storage::{Out, Storage, Write};
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::record::InputRecord;
use crate::flow::settings::CommitterSettings;
use crate::flow::shared::{kafka, TXN_TIMEOUT};
use crate::stage::EventSourced;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::producer::Producer;
use rdkafka::TopicPartitionList;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) struct PendingBatch {
    id: usize,
    offsets: TopicPartitionList,
    /// What its tasks' stores sealed: the batch's journal, written once its outputs are
    /// acknowledged.
    writes: Vec<Write>,
    /// Whether the batch's journal was written.
    journaled: bool,
}

/// Batches on their way to an offset commit, oldest first.
pub(super) struct Committer {
    pub(super) settings: CommitterSettings,
    pub(super) queue: VecDeque<PendingBatch>,
    /// The batch being filled: its records' acknowledgements are counted under this id.
    pub(super) filling: usize,
    /// Inputs in the batch being filled.
    pub(super) inputs: usize,
    /// The batch being filled must end now (a key holds the most events a journal record takes).
    pub(super) full: bool,
    /// The last batch whose journal records were acknowledged, not yet told to the tasks.
    journaled: Option<usize>,
}

impl Committer {
    pub(super) fn new(settings: CommitterSettings) -> Self {
        Self { settings, queue: VecDeque::new(), filling: 0, inputs: 0, full: false, journaled: None }
    }

    pub(super) fn due(&self) -> bool {
        self.full || self.inputs >= self.settings.max_batch
    }
}

impl Committer {
    /// Starts filling the next batch, the batch filled so far on its way (`sealed`: what it
    /// consumed up to, and its journal to write); returns its id.
    pub(super) fn seal(&mut self, sealed: Option<(TopicPartitionList, Vec<Write>)>) -> usize {
        let id = self.filling;
        self.inputs = 0;
        self.full = false;
        if let Some((offsets, writes)) = sealed {
            self.queue.push_back(PendingBatch { id, offsets, writes, journaled: false });
            self.filling += 1;
        }
        id
    }

    /// Moves pending batches along, oldest first: their journal is written once their outputs are
    /// acknowledged (and made durable by `storage`), their offsets committed once the journal is.
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
                for write in std::mem::take(&mut front.writes) {
                    write(Out { sink, batch: id })?;
                }
                storage.durable()?()?;
                continue;
            }
            let Some(done) = self.queue.pop_front() else { return Ok(()) };
            self.journaled = Some(done.id);
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

/// The at-least-once guarantee: its (idempotent, not transactional) producer and the batches on
/// their way to an offset commit.
pub(super) struct AtLeastOnce {
    sink: Arc<Sink>,
    committer: Committer,
}

impl AtLeastOnce {
    /// Over the flow's one producer (`sinks` has [`Guarantee::PRODUCERS`]).
    pub(super) fn new(mut sinks: Vec<Arc<Sink>>, settings: CommitterSettings) -> Self {
        Self { sink: sinks.remove(0), committer: Committer::new(settings) }
    }
}

impl Guarantee for AtLeastOnce {
    const TRANSACTIONAL: bool = false;
    const PRODUCERS: usize = 1;

    fn batch(&self) -> usize {
        self.committer.filling
    }

    fn took_input(&mut self) {
        self.committer.inputs += 1;
    }

    fn end_soon(&mut self) {
        self.committer.full = true;
    }

    fn due(&self) -> bool {
        self.committer.due()
    }

    /// Batches commit in the background already (up to `parallelism` pending).
    fn busy(&self) -> bool {
        false
    }

    /// Before journaling: the key's journal record carries the input positions its state includes
    /// (a deletion's marker too), so an input delivered again is skipped, not applied twice.
    fn applied<S: EventSourced>(&self, part: &mut PartitionState<S>, key: &S::Key, input: &InputRecord) {
        part.note_applied(key, input);
    }

    fn commit<S: EventSourced>(c: &mut Core<S, Self>, consumer: &FlowConsumer<S, Self>) -> Result<(), FlowError> {
        c.end_batch(consumer)
    }

    fn advance<S: EventSourced>(
        c: &mut Core<S, Self>,
        consumer: &FlowConsumer<S, Self>,
        wait: Wait,
    ) -> Result<(), FlowError> {
        let Core { guarantee, storage, metrics, .. } = c;
        let advanced = guarantee.committer.advance(&guarantee.sink, &mut **storage, consumer, metrics, wait);
        if let Some(id) = guarantee.committer.journaled.take() {
            c.tasks.journaled(id as u64);
        }
        advanced
    }

    /// Nothing to abort: the flow stops, and the inputs of the batches not committed come again.
    fn recover<S: EventSourced>(
        _: &mut Core<S, Self>,
        _: &FlowConsumer<S, Self>,
        e: FlowError,
    ) -> Result<(), FlowError> {
        Err(e)
    }

    fn lost<S: EventSourced>(c: &mut Core<S, Self>, _: &FlowConsumer<S, Self>) -> Result<(), FlowError> {
        // Journal records already handed to the producer land before any restore reads the
        // journal again (ours on reassignment, or the new owner's).
        if let Err(e) = c.emitter.flush() {
            tracing::warn!(error = %e, "producing outputs after losing partitions failed");
        }
        if let Err(e) = c.guarantee.sink.producer().flush(TXN_TIMEOUT) {
            tracing::warn!(error = %e, "flushing the producer after losing partitions failed");
        }
        // Their offsets cannot be committed any more and their journal must not land after the
        // new owner restored.
        c.guarantee.committer.queue.clear();
        c.discard_open_work();
        Ok(())
    }

    fn abandon<S: EventSourced>(_: &mut Core<S, Self>) {}
}

impl<S: EventSourced> Core<S, AtLeastOnce> {
    /// Ends the batch being filled: its in-memory state becomes the state of record, its journal
    /// records wait for its outputs' acknowledgements, then its offsets are committed.
    fn end_batch(&mut self, consumer: &FlowConsumer<S, AtLeastOnce>) -> Result<(), FlowError> {
        // The batch's outputs go to the emitter now; its deliveries count them until produced.
        self.emitter.hand_off()?;
        let sealed = if self.tasks.dirty {
            let (offsets, positions) = self.pending_offsets()?;
            let writes = self.tasks.seal_stores(positions)?.into_iter().map(|s| s.write).collect();
            // Handed to the committer: the next batch starts here.
            self.tasks.seal();
            self.tasks.mark_committed();
            // Its journal is written and acknowledged later: its keys stay in memory until then.
            let generation = self.guarantee.committer.filling as u64;
            self.settle_overlays(Some(generation));
            Some((offsets, writes))
        } else {
            None
        };
        self.guarantee.committer.seal(sealed);
        let parallelism = self.guarantee.committer.settings.parallelism;
        AtLeastOnce::advance(self, consumer, Wait::UntilAtMost(parallelism))
    }
}
