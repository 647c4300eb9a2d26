//! The open work (a transaction, or an at-least-once batch) as every guarantee sees it: the
//! offsets it consumed up to, its state changes settled or discarded, its outputs handed to the
//! emitter, and finishing it before a revocation or on shutdown. How it commits and how a failure
//! is recovered from is the guarantee's (`exactly_once`, `at_least_once`).

use super::core::{Core, FlowConsumer};
use super::guarantee::{Guarantee, Wait};
use super::state::Positions;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::flow::shared::kafka;
use crate::stage::EventSourced;
use eventstage_journal::SourcePosition;
use rdkafka::{Offset, TopicPartitionList};

impl<S: EventSourced, G: Guarantee> Core<S, G> {
    /// Commits what the flow did since the last commit: the open transaction, or the batch being
    /// filled (which goes on its way to an offset commit).
    pub(super) fn commit(&mut self, consumer: &FlowConsumer<S, G>) -> Result<(), FlowError> {
        G::commit(self, consumer)
    }

    /// Moves work committed earlier along (at-least-once batches waiting for acknowledgements).
    pub(super) fn advance(&mut self, consumer: &FlowConsumer<S, G>, wait: Wait) -> Result<(), FlowError> {
        G::advance(self, consumer, wait)
    }

    /// The one way back from a failure, wherever it surfaced (a produce call, a commit, a
    /// rebalance callback): the guarantee classifies it once, and heals it or returns it (the
    /// flow stops).
    pub(super) fn recover(&mut self, consumer: &FlowConsumer<S, G>, e: FlowError) -> Result<(), FlowError> {
        G::recover(self, consumer, e)
    }

    /// Queues a record of partition `p`'s open work for the emitter (which keeps it for the sled
    /// outbox).
    pub(super) fn emit(&mut self, p: i32, o: OutputRecord) -> Result<(), FlowError> {
        self.emitter.record(self.guarantee.batch(), p, o)
    }

    /// Waits until the emitter has produced everything queued; with the sled journal (exactly
    /// once), the records it produced go to the outbox.
    pub(super) fn flush_outputs(&mut self) -> Result<(), FlowError> {
        for (p, o) in self.emitter.flush()? {
            self.tasks.keep_output(p, o);
        }
        Ok(())
    }

    /// The offsets consumed since the last commit, for the consumer group and (per partition) as
    /// the journal's source positions.
    pub(super) fn pending_offsets(&self) -> Result<(TopicPartitionList, Positions), FlowError> {
        let mut tpl = TopicPartitionList::new();
        let mut positions = Positions::new();
        for (topic, p, o) in self.tasks.offsets() {
            if o.next > o.sealed && o.next >= 0 {
                tpl.add_partition_offset(topic, p, Offset::Offset(o.next)).map_err(|e| kafka("offsets", e))?;
                positions.entry(p).or_default().push(SourcePosition {
                    topic: topic.to_string(),
                    partition: p,
                    next_offset: o.next,
                });
            }
        }
        // A task whose timers fired commits its journal records without an input.
        for p in &self.tasks.fired {
            positions.entry(*p).or_default();
        }
        Ok((tpl, positions))
    }

    /// The open transaction's (or batch's) state becomes the state of record at once (no commit
    /// is under way: at least once, or the sled journal holding the transaction).
    pub(super) fn settle_overlays(&mut self, generation: Option<u64>) {
        self.seal_overlays();
        self.settle_sealed(generation);
    }

    /// The open transaction's state goes to its commit: the next transaction's changes start in
    /// an empty overlay.
    pub(super) fn seal_overlays(&mut self) {
        for part in self.tasks.states_mut() {
            debug_assert!(part.sealed.is_empty(), "one transaction commits at a time");
            std::mem::swap(&mut part.sealed, &mut part.overlay);
            part.timers.seal();
        }
    }

    /// The transaction being committed committed: its state becomes the state of record
    /// (`generation`: the guarantee's, when its journal records are not acknowledged yet; see
    /// [`TaskManager::journaled`](super::state::TaskManager::journaled)).
    pub(super) fn settle_sealed(&mut self, generation: Option<u64>) {
        self.tasks.settle(generation, self.wall_ms);
        let usage = self.tasks.usage();
        let set = |a: &std::sync::atomic::AtomicU64, v| a.store(v, std::sync::atomic::Ordering::Relaxed);
        set(&self.metrics.cache_bytes, usage.bytes);
        set(&self.metrics.cache_entries, usage.entries);
        set(&self.metrics.cache_unstored, usage.unstored);
        set(&self.metrics.store_lag, usage.store_lag);
        set(&self.metrics.timers_pending, self.tasks.timers_pending());
    }

    /// Forgets the open transaction's (or batch's) work: state changes, journal records not yet
    /// written, sled writes not yet made, records waiting for enrichment.
    pub(super) fn discard_open_work(&mut self) {
        self.tasks.discard();
        self.emitter.discard_held();
        if let Some(pipeline) = &mut self.pipeline {
            pipeline.clear();
        }
    }

    /// Gives the open transaction or batch up when the flow stops on an error: the guarantee
    /// aborts what it can (the transaction; best effort: a fenced producer cannot), then what it
    /// changed is dropped, and the revocation of closing the consumer commits nothing. The inputs
    /// it held come again to whoever processes the partitions next.
    pub(super) fn abandon(&mut self) {
        self.stopped = true;
        G::abandon(self);
        self.discard_open_work();
        self.tasks.forget_uncommitted();
    }

    /// Finishes in-flight work and commits it: before a revocation and on shutdown.
    pub(super) fn finish(&mut self, consumer: &FlowConsumer<S, G>) -> Result<(), FlowError> {
        self.drain_pipeline()?;
        // Recovered here, not in the loop: a revocation must not hand over partitions whose
        // transaction is still to be aborted or produced again from the outbox. Work committing
        // already ends first, then the open work commits, and that commit is waited for.
        self.advance(consumer, Wait::UntilAtMost(0)).or_else(|e| self.recover(consumer, e))?;
        self.commit(consumer).or_else(|e| self.recover(consumer, e))?;
        self.advance(consumer, Wait::UntilAtMost(0)).or_else(|e| self.recover(consumer, e))
    }
}
