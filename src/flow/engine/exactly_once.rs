//! Exactly once: the open Kafka transaction holds the outputs, the journal records and the
//! consumed offsets, and commits or aborts them as one. This guarantee alone drives the flow's two
//! transactional producers, which take turns (see [`ExactlyOnce`]): the begin, the offsets, the
//! commit and the abort, and a producer's replacement after a wedged call, a fatal error or a
//! transaction the broker timed out; over the sled journal (the state of record), the outbox
//! produced again after a failed commit.

use super::core::{Core, FlowConsumer};
use super::guarantee::{Guarantee, Wait};
use super::producer::{classify, Committing, SendingOffsets, Sink, TxnFailure};
use super::state::{PartitionState, Positions};
use super::storage::Out;
use crate::flow::error::FlowError;
use crate::flow::record::{InputRecord, OutputRecord};
use crate::flow::shared::{kafka, TXN_TIMEOUT};
use crate::stage::EventSourced;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The exactly-once guarantee: its two transactional producers and the state of their
/// transactions.
///
/// The producers take turns. While one commits a transaction, the flow processes the next, whose
/// records go to the other producer as soon as every record of the committing one is acknowledged
/// (so that in each partition they land after them: a key's records keep their order). Its commit
/// starts only once the first one's ended: the transactions commit one after the other, in order,
/// and a failure of the first aborts the second too. With one producer the next transaction's
/// records waited for the whole commit (its offsets, the storage's write, the commit round trips),
/// then went out in a burst that the next commit waited to see acknowledged.
pub(super) struct ExactlyOnce {
    sinks: Vec<Arc<Sink>>,
    /// The producer of the open transaction (the other one commits, or waits for its turn).
    open: usize,
    /// Aborts since the last successful commit: repeated failures back off (100 ms .. 5 s).
    consecutive_aborts: u32,
    /// The last commit failed in a way an abort heals (librdkafka's abortable state).
    abortable: bool,
    /// The committing transaction once the storage of record (sled) holds it: its producer, its
    /// offsets and its outbox (per task). A failed commit of it is made good by producing the
    /// outbox again with the offsets, never by a rewind.
    redo: Option<Redo>,
    /// The commit under way (by the producer that is not `open`), while the next transaction is
    /// processed.
    committing: Option<Committing>,
}

impl ExactlyOnce {
    /// Over `sinks` ([`Guarantee::PRODUCERS`] of them), whose producers have begun a transaction.
    pub(super) fn new(sinks: Vec<Arc<Sink>>) -> Self {
        Self { sinks, open: 0, consecutive_aborts: 0, abortable: false, redo: None, committing: None }
    }

    /// The producer of the open transaction.
    fn sink(&self) -> &Arc<Sink> {
        &self.sinks[self.open]
    }

    /// The producer that is not `open`'s: it commits, or waits for its turn.
    fn other(&self) -> usize {
        (self.open + 1) % self.sinks.len()
    }
}

/// A transaction the storage of record holds (see [`ExactlyOnce::redo`]).
struct Redo {
    producer: usize,
    offsets: TopicPartitionList,
    outbox: Vec<Arc<Vec<OutputRecord>>>,
}

/// What [`Core::recover`] makes of a failure.
enum Failure {
    /// The producer is broken but a new one of the same id heals it: replace it, then abort.
    ProducerFailed,
    /// Abort the transaction (and rewind, or produce the sled outbox again).
    Abortable,
    /// Nothing the flow can do: it stops with the error.
    Stop,
}

impl Guarantee for ExactlyOnce {
    const TRANSACTIONAL: bool = true;
    const PRODUCERS: usize = 2;

    fn batch(&self) -> usize {
        0
    }

    fn took_input(&mut self) {}

    // A hot key's record waits in the storage for the seal: the transaction ends on its interval.
    fn end_soon(&mut self) {}

    // A transaction ends on the commit interval.
    fn due(&self) -> bool {
        false
    }

    fn busy(&self) -> bool {
        self.committing.is_some()
    }

    // A transaction's journal records and its offsets commit as one: no positions to note.
    fn applied<S: EventSourced>(&self, _: &mut PartitionState<S>, _: &S::Key, _: &InputRecord) {}

    fn commit<S: EventSourced>(c: &mut Core<S, Self>, consumer: &FlowConsumer<S, Self>) -> Result<(), FlowError> {
        c.commit_transaction(consumer)
    }

    /// Takes the outcome of the commit under way once it ended (or, `Wait::UntilAtMost(0)`,
    /// waits for it).
    fn advance<S: EventSourced>(c: &mut Core<S, Self>, _: &FlowConsumer<S, Self>, wait: Wait) -> Result<(), FlowError> {
        c.end_commit(wait == Wait::UntilAtMost(0))
    }

    fn recover<S: EventSourced>(
        c: &mut Core<S, Self>,
        consumer: &FlowConsumer<S, Self>,
        e: FlowError,
    ) -> Result<(), FlowError> {
        c.recover_transaction(consumer, e)
    }

    fn lost<S: EventSourced>(c: &mut Core<S, Self>, consumer: &FlowConsumer<S, Self>) -> Result<(), FlowError> {
        // The commit under way ends first (it may still commit: its partitions were ours then).
        if let Err(e) = c.end_commit(true) {
            tracing::warn!(error = %e, "the commit under way when the partitions were lost failed");
        }
        let aborted = c.abort_all().and_then(|()| c.rewind(consumer)).or_else(|e| match e {
            FlowError::Fenced { .. } => Err(e),
            other => {
                tracing::warn!(error = %other, "aborting the lost partitions' transaction failed");
                Ok(())
            }
        });
        aborted.and_then(|()| c.resume())
    }

    fn abandon<S: EventSourced>(c: &mut Core<S, Self>) {
        // No other transactional call may run beside the commit under way.
        if let Some(committing) = c.guarantee.committing.take() {
            let _ = committing.wait();
        }
        c.guarantee.redo = None;
        c.guarantee.abortable = false;
        for sink in &c.guarantee.sinks {
            if let Err(e) = sink.abort() {
                tracing::debug!(error = %e, transactional_id = %sink.transactional_id, "aborting the open transaction of a stopped flow failed (the broker aborts it after its timeout)");
            }
        }
    }
}

impl<S: EventSourced> Core<S, ExactlyOnce> {
    /// Seals the open transaction and starts its commit on a thread of its own; the flow thread
    /// goes on with the next transaction meanwhile: its state changes in a new overlay, its
    /// records held until the committing transaction's are acknowledged, then produced by the
    /// other producer (see [`Self::end_commit`]). One transaction commits at a time: a commit
    /// still under way is waited for first (the loop starts none while one is). A failure goes to
    /// [`Core::recover`] like every other (marked when an abort heals it).
    fn commit_transaction(&mut self, consumer: &FlowConsumer<S, ExactlyOnce>) -> Result<(), FlowError> {
        self.end_commit(true)?;
        if !self.tasks.dirty {
            return Ok(());
        }
        let started = Instant::now();
        let sink = self.guarantee.sink().clone();
        // The offsets are final now: their round trips (AddOffsetsToTxn, TxnOffsetCommit) run
        // while the emitter's last outputs and the journal's records are produced, not after
        // them. Under load those round trips took 20-60 ms of each commit.
        let (tpl, positions) = self.pending_offsets()?;
        let mut offsets = self.start_offsets(consumer, &sink, &tpl);
        let written = self.flush_outputs().and_then(|()| self.write_sealed(&sink, positions));
        if written.is_err() {
            // No other transactional call may run while the offsets' call does.
            if let Some(o) = offsets.take() {
                let _ = o.wait(&sink);
            }
        }
        let outbox = written?;
        self.tasks.seal();
        if let Some(outbox) = outbox {
            // A storage that is the state of record (sled) holds the transaction from here on: a
            // failed commit is made good from the outbox, never by a rewind.
            self.guarantee.redo = Some(Redo { producer: self.guarantee.open, offsets: tpl, outbox });
            self.settle_overlays(None);
        } else {
            self.seal_overlays();
        }
        self.emitter.hold();
        let durable = self.storage.durable()?;
        self.guarantee.committing = Some(sink.start_commit(offsets, durable, started)?);
        // The next transaction is the other producer's (begun when its last commit ended).
        self.guarantee.open = self.guarantee.other();
        Ok(())
    }

    /// Seals every task that consumed inputs in the open transaction (up to `positions`) and writes
    /// what each must: journal records into the transaction, or a local journal's batch. Returns
    /// the transaction's outbox when a storage of record holds it now.
    fn write_sealed(
        &mut self,
        sink: &Sink,
        positions: Positions,
    ) -> Result<Option<Vec<Arc<Vec<OutputRecord>>>>, FlowError> {
        let mut outbox = None;
        for sealed in self.tasks.seal_stores(positions)? {
            (sealed.write)(Out { sink, batch: 0 })?;
            if let Some(kept) = sealed.outbox {
                outbox.get_or_insert_with(Vec::new).push(kept);
            }
        }
        Ok(outbox)
    }

    /// Moves the commit under way along (`wait`: until it ended). Once its records are all
    /// acknowledged, the records held since it started go to the open transaction's producer.
    /// Committed: its state becomes the state of record and its producer begins its next
    /// transaction. Failed: the error, for [`Core::recover`].
    fn end_commit(&mut self, wait: bool) -> Result<(), FlowError> {
        let Some(committing) = self.guarantee.committing.as_ref() else { return Ok(()) };
        if self.emitter.holds() && committing.flushed() {
            self.release_held()?;
        }
        let Some(outcome) = self.guarantee.committing.as_ref().and_then(|c| c.outcome(wait)) else { return Ok(()) };
        let started = self.guarantee.committing.take().map(|c| c.started);
        let sink = self.guarantee.sinks[self.guarantee.other()].clone();
        if let Err(e) = outcome? {
            // An abort heals what a fence, a fatal error or an authorization failure does not:
            // `recover` decides.
            self.guarantee.abortable = matches!(classify(&e), TxnFailure::Abort | TxnFailure::Retry);
            return Err(sink.error("commit transaction".into(), e));
        }
        self.guarantee.redo = None;
        sink.committed();
        // Its journal records were all acknowledged before the commit.
        self.settle_sealed(None);
        self.tasks.mark_committed();
        self.guarantee.consecutive_aborts = 0;
        if let Some(started) = started {
            let took = started.elapsed();
            self.exported.commit(took);
            let us = took.as_micros() as u64;
            self.metrics.last_commit_us.store(us, Ordering::Relaxed);
            self.metrics.max_commit_us.fetch_max(us, Ordering::Relaxed);
        }
        self.metrics.transactions.fetch_add(1, Ordering::Relaxed);
        sink.begin()?;
        self.release_held()
    }

    /// The records held since the last commit started go to the open transaction's producer.
    fn release_held(&mut self) -> Result<(), FlowError> {
        let sink = self.guarantee.sink().clone();
        self.emitter.switch(&sink)?;
        self.emitter.release()
    }

    /// Every producer has begun a transaction, and the emitter produces with the open one's.
    fn resume(&mut self) -> Result<(), FlowError> {
        for sink in &self.guarantee.sinks {
            sink.begin()?;
        }
        self.release_held()
    }

    /// Starts adding `offsets` to `sink`'s open transaction (None: nothing to add, or no group).
    fn start_offsets(
        &self,
        consumer: &FlowConsumer<S, ExactlyOnce>,
        sink: &Sink,
        offsets: &TopicPartitionList,
    ) -> Option<SendingOffsets> {
        let group = consumer.group_metadata().filter(|_| offsets.count() > 0)?;
        Some(sink.start_send_offsets(offsets, group))
    }

    /// After the sled write, the Kafka transaction must commit the same outputs and offsets:
    /// producer `i` aborts and tries again with the outbox until it does (or is fenced).
    fn redo_outbox(&mut self, consumer: &FlowConsumer<S, ExactlyOnce>, redo: &Redo) -> Result<(), FlowError> {
        let Redo { producer: i, offsets, outbox } = redo;
        let i = *i;
        let mut delay = Duration::from_millis(100);
        loop {
            let sink = self.guarantee.sinks[i].clone();
            match sink.abort() {
                // The first time round the caller's abort did it already.
                Ok(aborted) => {
                    if aborted {
                        self.metrics.aborts.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) if sink.heals(&e) => {
                    // The new producer's (empty) transaction is aborted next time round.
                    self.replace(i, &e)?;
                    continue;
                }
                Err(e) => return Err(sink.error("abort transaction".into(), e)),
            }
            sink.begin()?;
            for o in outbox.iter().flat_map(|kept| kept.iter()) {
                sink.produce_output(0, o)?;
            }
            let offsets = self.start_offsets(consumer, &sink, offsets);
            let committing = sink.start_commit(offsets, || Ok(()), Instant::now())?;
            match committing.wait()? {
                Ok(()) => {
                    sink.committed();
                    self.metrics.transactions.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if sink.heals(&e) => self.replace(i, &e)?,
                Err(e) if matches!(classify(&e), TxnFailure::Abort | TxnFailure::Retry) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "outbox commit failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(sink.error("commit outbox".into(), e)),
            }
        }
    }

    /// Whether a new producer heals the failure of producer `i` (see `Sink::heals`): Kafka bumps
    /// the producer's epoch when it times a transaction out (Kafka Streams recovers the same way
    /// from what it calls a migrated task), and librdkafka's fatal states end with its producer.
    fn heals_with(&self, i: usize, e: &FlowError) -> bool {
        let sink = &self.guarantee.sinks[i];
        match e {
            FlowError::Fenced { .. } => sink.heals_fence(),
            FlowError::Kafka { error, .. } => sink.heals(error),
            _ => false,
        }
    }

    /// Whether a new producer heals the failure (for one of the producers, at least).
    fn heals(&self, e: &FlowError) -> bool {
        (0..self.guarantee.sinks.len()).any(|i| self.heals_with(i, e))
    }

    /// Replaces every producer a new one heals after [`Self::heals`].
    fn replace_failed(&mut self, cause: &FlowError) -> Result<(), FlowError> {
        for i in 0..self.guarantee.sinks.len() {
            if self.heals_with(i, cause) {
                self.replace(i, cause)?;
            }
        }
        Ok(())
    }

    /// Replaces producer `i` by a new one of the same transactional id (which fences the old
    /// one), in a transaction; the caller aborts (and rewinds, or produces the sled outbox
    /// again). Seen when the flow was paused past the transaction timeout, when a commit
    /// outlasted it while the transaction coordinator moved to another broker, and after a
    /// broker restart.
    fn replace(&mut self, i: usize, cause: &dyn std::fmt::Display) -> Result<(), FlowError> {
        let sink = self.guarantee.sinks[i].clone();
        match sink.expired() {
            Some(open) => tracing::warn!(
                error = %cause,
                open_ms = open.as_millis() as u64,
                transactional_id = %sink.transactional_id,
                "the broker aborted the open transaction after its timeout (transaction.timeout.ms) and fenced this producer; replacing the producer and processing again from the last commit"
            ),
            None => tracing::warn!(
                error = %cause,
                transactional_id = %sink.transactional_id,
                "the transactional producer failed for good; replacing it and processing again from the last commit"
            ),
        }
        // What the emitter still holds, and its failure, belong to the old producer.
        let _ = self.emitter.flush();
        sink.replace_producer().map_err(|e| sink.error("replace the failed producer".into(), e))
    }

    /// The one way back from a failure, wherever it surfaced (a produce call, a commit, a flush, a
    /// rebalance callback), classified once:
    /// - a producer failure a new producer heals (see [`Self::heals`]): replace it, then abort;
    /// - an abortable failure (a commit the broker refused, a produce call refused because
    ///   librdkafka put the transaction in an abortable state, e.g. records timed out while the
    ///   flow was paused): abort;
    /// - anything else (fenced by a live instance, a storage or configuration error, a fatal
    ///   consumer error): the flow stops with it.
    ///
    /// Both producers' transactions abort (the open one was made on top of the committing one).
    /// A transaction the storage of record (sled) holds already is committed again from its
    /// outbox with the same offsets; the consumer is rewound to the last committed offsets. Then
    /// the next transactions begin.
    fn recover_transaction(&mut self, consumer: &FlowConsumer<S, ExactlyOnce>, e: FlowError) -> Result<(), FlowError> {
        // No other transactional call may run beside a commit under way: it ends first (its own
        // failure is healed with this one by the abort below).
        if let Err(failed) = self.end_commit(true) {
            tracing::warn!(error = %failed, "the commit under way failed too");
        }
        match self.failure_of(&e) {
            Failure::Stop => return Err(e),
            Failure::ProducerFailed => self.replace_failed(&e)?,
            Failure::Abortable => tracing::warn!(error = %e, "the transaction failed; aborting it"),
        }
        self.guarantee.abortable = false;
        let redo = self.guarantee.redo.take();
        match self.abort_all() {
            // The abort found that the broker had timed a transaction out.
            Err(fenced) if self.heals(&fenced) => {
                self.replace_failed(&fenced)?;
                self.abort_all()?;
            }
            aborted => aborted?,
        }
        if let Some(redo) = redo {
            tracing::warn!(error = %e, "the transaction failed after the sled write; producing its outbox again");
            self.redo_outbox(consumer, &redo)?;
            self.tasks.mark_committed();
            self.guarantee.consecutive_aborts = 0;
        }
        self.rewind(consumer)?;
        self.resume()
    }

    fn failure_of(&self, e: &FlowError) -> Failure {
        match e {
            _ if self.heals(e) => Failure::ProducerFailed,
            _ if self.guarantee.abortable => Failure::Abortable,
            FlowError::Kafka { error: KafkaError::MessageProduction(RDKafkaErrorCode::State), .. } => {
                Failure::Abortable
            }
            _ => Failure::Stop,
        }
    }

    /// Aborts every producer's transaction (whatever the emitter still holds belongs to them),
    /// backing off when aborts keep coming.
    fn abort_all(&mut self) -> Result<(), FlowError> {
        match self.emitter.flush() {
            Err(e @ FlowError::Fenced { .. }) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "producing the aborted transaction's outputs failed"),
            Ok(_) => {}
        }
        for sink in &self.guarantee.sinks {
            sink.abort().map_err(|e| sink.error("abort transaction".into(), e))?;
        }
        // One abort of the flow's work, whichever producers held part of it.
        self.metrics.aborts.fetch_add(1, Ordering::Relaxed);
        self.guarantee.consecutive_aborts += 1;
        let aborts = self.guarantee.consecutive_aborts;
        if aborts > 1 {
            let delay = Duration::from_millis(100 << aborts.min(6)).min(Duration::from_secs(5));
            tracing::error!(
                aborts,
                retry_in_ms = delay.as_millis() as u64,
                "transactions keep failing (is the broker down, or an output topic missing?); retrying"
            );
            std::thread::sleep(delay);
        }
        Ok(())
    }

    /// Forgets what was processed since the last commit and seeks the consumer back to it.
    fn rewind(&mut self, consumer: &FlowConsumer<S, ExactlyOnce>) -> Result<(), FlowError> {
        self.discard_open_work();
        self.tasks.forget_uncommitted();
        let mut tpl = TopicPartitionList::new();
        for (topic, p, o) in self.tasks.offsets() {
            let to = if o.committed >= 0 { Offset::Offset(o.committed) } else { Offset::Beginning };
            tpl.add_partition_offset(topic, p, to).map_err(|e| kafka("rewind", e))?;
        }
        if tpl.count() > 0 {
            consumer.seek_partitions(tpl, TXN_TIMEOUT).map_err(|e| kafka("rewind (seek)", e))?;
        }
        Ok(())
    }
}
