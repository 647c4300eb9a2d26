//! How the open work commits and how the flow recovers: the transaction (exactly once) or the
//! batch (at least once, see `committer`), abort and rewind, the sled outbox redo, and
//! [`Core::recover`], the one way back from a failure.

use super::committer::{Delivery, Wait};
use super::core::Core;
use super::partitions::FlowConsumer;
use super::producer::{classify, SendingOffsets, TxnFailure};
use super::storage::Out;
use crate::flow::error::FlowError;
use crate::flow::shared::{kafka, TXN_TIMEOUT};
use crate::stage::EventSourced;
use eventstage_journal::SourcePosition;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What [`Core::recover`] makes of a failure.
enum Failure {
    /// The producer is broken but a new one of the same id heals it: replace it, then abort.
    ProducerFailed,
    /// Abort the transaction (and rewind, or produce the sled outbox again).
    Abortable,
    /// Nothing the flow can do: it stops with the error.
    Stop,
}

impl<S: EventSourced> Core<S> {
    /// Commits what the flow did since the last commit: the open transaction, or the batch being
    /// filled (which goes on its way to an offset commit).
    pub(super) fn commit(&mut self, consumer: &FlowConsumer<S>) -> Result<(), FlowError> {
        match self.txn.delivery {
            Delivery::Transactions(_) => self.commit_transaction(consumer),
            Delivery::Batches(_) => self.end_batch(consumer),
        }
    }

    /// Commits the open transaction with the consumed offsets and opens the next one. A failure
    /// goes to [`Self::recover`] like every other (marked when an abort heals it).
    fn commit_transaction(&mut self, consumer: &FlowConsumer<S>) -> Result<(), FlowError> {
        if !self.assigned.dirty {
            return Ok(());
        }
        let started = Instant::now();
        // The offsets are final now (nothing is consumed until the commit ends): their round
        // trips (AddOffsetsToTxn, TxnOffsetCommit) run while the emitter's last outputs and the
        // journal's records are produced, not after them. Under load those round trips took
        // 20-60 ms of each commit.
        let (tpl, positions) = self.pending_offsets()?;
        let mut offsets = self.start_offsets(consumer, &tpl);
        let prepared = self.flush_outputs().and_then(|()| {
            // A storage that is the state of record (sled) holds the transaction from here on.
            let out = Out { sink: &self.txn.sink, batch: 0 };
            self.storage.seal_transaction(&self.assigned.partitions, positions, out)
        });
        if prepared.is_err() {
            // No other transactional call may run while the offsets' call does.
            if let Some(o) = offsets.take() {
                let _ = o.wait(&self.txn.sink);
            }
        }
        if prepared? {
            // From here on a failed commit is made good from the outbox, never by a rewind.
            self.txn.redo = Some(tpl.clone());
            self.settle_overlays();
        }
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match self.finish_transaction(consumer, &tpl, offsets.take())? {
                Err(e) if classify(&e) == TxnFailure::Retry && attempt < 3 => {
                    tracing::warn!(error = %e, attempt, "commit failed; retrying");
                    std::thread::sleep(Duration::from_millis(100 * attempt.min(20)));
                }
                other => break other,
            }
        };
        if let Err(e) = result {
            // An abort heals what a fence, a fatal error or an authorization failure does not:
            // `recover` decides.
            self.txn.abortable = matches!(classify(&e), TxnFailure::Abort | TxnFailure::Retry);
            return Err(self.txn.sink.error("commit transaction".into(), e));
        }
        self.txn.redo = None;
        self.txn.sink.committed();
        self.settle_overlays();
        self.assigned.mark_committed();
        if let Delivery::Transactions(t) = &mut self.txn.delivery {
            t.consecutive_aborts = 0;
        }
        let took = started.elapsed();
        self.exported.commit(took);
        let us = took.as_micros() as u64;
        self.metrics.last_commit_us.store(us, Ordering::Relaxed);
        self.metrics.max_commit_us.fetch_max(us, Ordering::Relaxed);
        self.metrics.transactions.fetch_add(1, Ordering::Relaxed);
        self.txn.sink.begin()
    }

    /// The offsets consumed since the last commit, for the consumer group and (per partition) as
    /// the journal's source positions.
    pub(super) fn pending_offsets(
        &self,
    ) -> Result<(TopicPartitionList, BTreeMap<i32, Vec<SourcePosition>>), FlowError> {
        let mut tpl = TopicPartitionList::new();
        let mut positions: BTreeMap<i32, Vec<SourcePosition>> = BTreeMap::new();
        for ((topic, p), o) in &self.assigned.offsets {
            if o.next > o.committed && o.next >= 0 {
                tpl.add_partition_offset(topic, *p, Offset::Offset(o.next)).map_err(|e| kafka("offsets", e))?;
                positions.entry(*p).or_default().push(SourcePosition {
                    topic: topic.clone(),
                    partition: *p,
                    next_offset: o.next,
                });
            }
        }
        Ok((tpl, positions))
    }

    /// The open transaction's (or batch's) state becomes the state of record.
    pub(super) fn settle_overlays(&mut self) {
        for part in self.assigned.partitions.values_mut() {
            let overlay = std::mem::take(&mut part.overlay);
            part.committed.extend(overlay);
        }
    }

    /// Forgets the open transaction's (or batch's) work: state changes, journal records not yet
    /// written, sled writes not yet made, records waiting for enrichment.
    pub(super) fn discard_open_work(&mut self) {
        for part in self.assigned.partitions.values_mut() {
            part.overlay.clear();
        }
        self.storage.discard();
        if let Some(pipeline) = &mut self.pipeline {
            pipeline.clear();
        }
    }

    /// Gives the open transaction or batch up when the flow stops on an error: aborts the
    /// transaction (best effort: a fenced producer cannot), drops what it changed, and makes the
    /// revocation of closing the consumer commit nothing. The inputs it held come again to
    /// whoever processes the partitions next.
    pub(super) fn abandon(&mut self) {
        self.stopped = true;
        self.txn.redo = None;
        self.txn.abortable = false;
        if !self.txn.delivery.is_at_least_once() && self.txn.sink.is_transactional() {
            if let Err(e) = self.txn.sink.producer().abort_transaction(TXN_TIMEOUT) {
                tracing::debug!(error = %e, "aborting the open transaction of a stopped flow failed (the broker aborts it after its timeout)");
            }
        }
        self.discard_open_work();
        self.assigned.forget_uncommitted();
    }

    /// Finishes in-flight work and commits it: before a revocation and on shutdown.
    pub(super) fn finish(&mut self, consumer: &FlowConsumer<S>) -> Result<(), FlowError> {
        self.drain_pipeline()?;
        // Recovered here, not in the loop: a revocation must not hand over partitions whose
        // transaction is still to be aborted or produced again from the outbox.
        self.commit(consumer).or_else(|e| self.recover(consumer, e))?;
        self.advance(consumer, Wait::UntilAtMost(0))
    }

    /// Starts adding `offsets` to the open transaction (None: nothing to add, or no group).
    fn start_offsets(&self, consumer: &FlowConsumer<S>, offsets: &TopicPartitionList) -> Option<SendingOffsets> {
        let group = consumer.group_metadata().filter(|_| offsets.count() > 0)?;
        Some(self.txn.sink.start_send_offsets(offsets, group))
    }

    /// Adds the consumed `offsets` to the open transaction (unless `sending` does already) and
    /// commits it.
    ///
    /// The offsets go first, so that their round trip overlaps the delivery of the transaction's
    /// last records. Then it waits until every produced record is acknowledged: rdkafka's
    /// `commit_transaction` flushes first, and with a `ThreadedProducer` its flush waits in 100 ms
    /// polling steps while the background thread takes the delivery reports; waiting here in
    /// 200 µs steps makes a commit cost milliseconds instead of 100 ms. The storage's write of the
    /// transaction (sled's fsync) runs meanwhile and is durable before the commit; its failure
    /// stops the flow (the outer error).
    fn finish_transaction(
        &mut self,
        consumer: &FlowConsumer<S>,
        offsets: &TopicPartitionList,
        sending: Option<SendingOffsets>,
    ) -> Result<KafkaResult<()>, FlowError> {
        let sent = match sending.or_else(|| self.start_offsets(consumer, offsets)) {
            Some(sending) => sending.wait(&self.txn.sink),
            None => Ok(()),
        };
        let deadline = Instant::now() + TXN_TIMEOUT;
        while self.txn.sink.producer().in_flight_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.storage.durable()?;
        Ok(sent.and_then(|()| self.txn.sink.producer().commit_transaction(TXN_TIMEOUT)))
    }

    /// After the sled write, the Kafka transaction must commit the same outputs and offsets: abort
    /// and try again with the outbox until it does (or the producer is fenced).
    fn redo_outbox(&mut self, consumer: &FlowConsumer<S>, offsets: &TopicPartitionList) -> Result<(), FlowError> {
        let outbox = self.storage.outbox();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.txn.sink.producer().abort_transaction(TXN_TIMEOUT) {
                Ok(()) => {}
                Err(e) if self.txn.sink.heals(&e) => {
                    // The new producer's (empty) transaction is aborted next time round.
                    self.replace_expired(&e)?;
                    continue;
                }
                Err(e) => return Err(self.txn.sink.error("abort transaction".into(), e)),
            }
            self.metrics.aborts.fetch_add(1, Ordering::Relaxed);
            self.txn.sink.begin()?;
            for o in &outbox {
                self.txn.sink.produce_output(0, o)?;
            }
            match self.finish_transaction(consumer, offsets, None)? {
                Ok(()) => {
                    self.txn.sink.committed();
                    self.metrics.transactions.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if self.txn.sink.heals(&e) => self.replace_expired(&e)?,
                Err(e) if matches!(classify(&e), TxnFailure::Abort | TxnFailure::Retry) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "outbox commit failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(self.txn.sink.error("commit outbox".into(), e)),
            }
        }
    }

    /// A failure a new producer heals (see `Sink::heals`): Kafka bumps the producer's epoch when
    /// it times a transaction out (Kafka Streams recovers the same way from what it calls a
    /// migrated task), and librdkafka's fatal states end with its producer.
    fn heals(&self, e: &FlowError) -> bool {
        match e {
            FlowError::Fenced { .. } => self.txn.sink.heals_fence(),
            FlowError::Kafka { error, .. } => self.txn.sink.heals(error),
            _ => false,
        }
    }

    /// Replaces the producer after [`Self::heals`]. Seen when the flow was paused past the
    /// transaction timeout, when a commit outlasted it while the transaction coordinator moved to
    /// another broker, and after a broker restart. The producer is replaced by a new one of the
    /// same transactional id (which fences the old one), in a transaction; the caller aborts (and
    /// rewinds, or produces the sled outbox again).
    fn replace_expired(&mut self, cause: &dyn std::fmt::Display) -> Result<(), FlowError> {
        match self.txn.sink.expired() {
            Some(open) => tracing::warn!(
                error = %cause,
                open_ms = open.as_millis() as u64,
                transactional_id = %self.txn.sink.transactional_id,
                "the broker aborted the open transaction after its timeout (transaction.timeout.ms) and fenced this producer; replacing the producer and processing again from the last commit"
            ),
            None => tracing::warn!(
                error = %cause,
                transactional_id = %self.txn.sink.transactional_id,
                "the transactional producer failed for good; replacing it and processing again from the last commit"
            ),
        }
        // What the emitter still holds, and its failure, belong to the old producer.
        let _ = self.txn.emitter.flush();
        self.txn.sink.replace_producer().map_err(|e| self.txn.sink.error("replace the failed producer".into(), e))
    }

    /// The one way back from a failure, wherever it surfaced (a produce call, a commit, a flush, a
    /// rebalance callback), classified once:
    /// - a producer failure a new producer heals (see [`Self::heals`]): replace it, then abort;
    /// - an abortable failure (a commit the broker refused, a produce call refused because
    ///   librdkafka put the transaction in an abortable state, e.g. records timed out while the
    ///   flow was paused): abort;
    /// - anything else (fenced by a live instance, a storage or configuration error, a fatal
    ///   consumer error, any failure at least once): the flow stops with it.
    ///
    /// After an abort, a transaction the storage of record (sled) holds already is committed again
    /// from its outbox with the same offsets; any other is rewound to the last committed offsets.
    /// Then the next transaction begins.
    pub(super) fn recover(&mut self, consumer: &FlowConsumer<S>, e: FlowError) -> Result<(), FlowError> {
        match self.failure_of(&e) {
            Failure::Stop => return Err(e),
            Failure::ProducerFailed => self.replace_expired(&e)?,
            Failure::Abortable => {
                tracing::warn!(error = %e, "the transaction failed; aborting it");
                // The emitter's failure is this one.
                let _ = self.txn.emitter.flush();
            }
        }
        self.txn.abortable = false;
        match self.txn.redo.take() {
            Some(offsets) => {
                tracing::warn!(error = %e, "the transaction failed after the sled write; producing its outbox again");
                self.redo_outbox(consumer, &offsets)?;
                self.assigned.mark_committed();
            }
            None => match self.abort_and_rewind(consumer) {
                // The abort found that the broker had timed the transaction out.
                Err(fenced) if self.heals(&fenced) => {
                    self.replace_expired(&fenced)?;
                    self.abort_and_rewind(consumer)?;
                }
                aborted => aborted?,
            },
        }
        self.txn.sink.begin()
    }

    fn failure_of(&self, e: &FlowError) -> Failure {
        let transactional = !self.txn.delivery.is_at_least_once() && self.txn.sink.is_transactional();
        match e {
            _ if !transactional => Failure::Stop,
            _ if self.heals(e) => Failure::ProducerFailed,
            _ if self.txn.abortable => Failure::Abortable,
            FlowError::Kafka { error: KafkaError::MessageProduction(RDKafkaErrorCode::State), .. } => {
                Failure::Abortable
            }
            _ => Failure::Stop,
        }
    }

    pub(super) fn abort_and_rewind(&mut self, consumer: &FlowConsumer<S>) -> Result<(), FlowError> {
        // Whatever the emitter still holds belongs to the transaction being aborted.
        match self.txn.emitter.flush() {
            Err(e @ FlowError::Fenced { .. }) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "producing the aborted transaction's outputs failed"),
            Ok(_) => {}
        }
        if let Err(e) = self.txn.sink.producer().abort_transaction(TXN_TIMEOUT) {
            return Err(self.txn.sink.error("abort transaction".into(), e));
        }
        self.metrics.aborts.fetch_add(1, Ordering::Relaxed);
        let aborts = match &mut self.txn.delivery {
            Delivery::Transactions(t) => {
                t.consecutive_aborts += 1;
                t.consecutive_aborts
            }
            Delivery::Batches(_) => 1,
        };
        if aborts > 1 {
            let delay = Duration::from_millis(100 << aborts.min(6)).min(Duration::from_secs(5));
            tracing::error!(
                aborts,
                retry_in_ms = delay.as_millis() as u64,
                "transactions keep failing (is the broker down, or an output topic missing?); retrying"
            );
            std::thread::sleep(delay);
        }
        self.discard_open_work();
        self.assigned.forget_uncommitted();
        let mut tpl = TopicPartitionList::new();
        for ((topic, p), o) in &self.assigned.offsets {
            let to = if o.committed >= 0 { Offset::Offset(o.committed) } else { Offset::Beginning };
            tpl.add_partition_offset(topic, *p, to).map_err(|e| kafka("rewind", e))?;
        }
        if tpl.count() > 0 {
            consumer.seek_partitions(tpl, TXN_TIMEOUT).map_err(|e| kafka("rewind (seek)", e))?;
        }
        Ok(())
    }

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
