//! State follows partitions: the consumer's rebalance callbacks restore a partition's state on
//! assignment (from the Kafka journal, or from sled with its positions and outbox) and commit and
//! release it on revocation.

use super::core::{Core, FlowConsumer, FlowContext};
use super::guarantee::Guarantee;
use super::storage::Restoring;
use crate::flow::error::FlowError;
use crate::flow::settings::{RebalanceActions, RebalanceEvent, TopicPartition};
use crate::flow::shared::{kafka, lock, TXN_TIMEOUT};
use crate::stage::EventSourced;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

impl<S: EventSourced, G: Guarantee> ClientContext for FlowContext<S, G> {}

impl<S: EventSourced, G: Guarantee> ConsumerContext for FlowContext<S, G> {
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        // At-least-once commits are asynchronous; a failed one is superseded by the next.
        if let Err(e) = result {
            tracing::warn!(error = %e, partitions = offsets.count(), "offset commit failed; the next commit covers it");
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut core = lock(&self.core);
        let result = match rebalance {
            Rebalance::Revoke(tpl) => core.on_revoke(consumer, tpl),
            Rebalance::Assign(tpl) => core.on_assign(consumer, tpl),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                Ok(())
            }
        };
        if let Err(e) = result {
            core.failure.get_or_insert(e);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut core = lock(&self.core);
        if !matches!(rebalance, Rebalance::Assign(_)) || core.tasks.pending_seeks.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, p, o) in std::mem::take(&mut core.tasks.pending_seeks) {
            let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(o));
        }
        // Only an optimisation: records below the sled positions are skipped anyway.
        if let Err(e) = consumer.seek_partitions(tpl, TXN_TIMEOUT) {
            tracing::warn!(error = %e, "seek past inputs applied before a crash failed; they are skipped as they arrive");
        }
    }
}

fn topic_partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| TopicPartition { topic: e.topic().to_string(), partition: e.partition() }).collect()
}

impl<S: EventSourced, G: Guarantee> Core<S, G> {
    fn on_assign(&mut self, consumer: &FlowConsumer<S, G>, tpl: &TopicPartitionList) -> Result<(), FlowError> {
        let committed =
            consumer.committed_offsets(tpl.clone(), TXN_TIMEOUT).map_err(|e| kafka("fetch committed offsets", e))?;
        for el in committed.elements() {
            let c = match el.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            self.tasks.assign(el.topic(), el.partition(), c);
        }
        // The new tasks' state: restored by the storage (for all of them at once: the Kafka
        // journal reads their partitions in parallel).
        let wanted = self.tasks.unrestored();
        for (p, restored) in self.storage.restore(&wanted, Restoring { tasks: &mut self.tasks })? {
            if let Some(outbox) = self.tasks.restored(p, restored) {
                // Committed again with the offsets the storage holds, and the outputs again.
                self.tasks.dirty = true;
                for o in outbox {
                    self.emit(p, o)?;
                }
            }
        }
        // Inputs a storage of record (sled) applied beyond the group's committed offsets before a
        // crash are skipped as they come again (checked per record only while there are any).
        self.skip_applied = self.tasks.offsets().any(|(_, _, o)| o.applied_until >= 0);
        self.metrics.assigned_partitions.store(self.tasks.assigned() as u64, Ordering::Relaxed);
        self.metrics.rebalances.fetch_add(1, Ordering::Relaxed);
        self.exported.publish(&self.metrics.snapshot());
        let assigned = topic_partitions(tpl);
        tracing::info!(partitions = %crate::flow::settings::Partitions(&assigned), "assigned and restored");
        self.notify(RebalanceEvent::Assigned(assigned));
        Ok(())
    }

    /// Tells the listeners: the synchronous ones now, in the order they were added (their seeks
    /// are done once librdkafka has made the assignment), the async one through its task.
    fn notify(&mut self, event: RebalanceEvent) {
        let committed: Vec<(TopicPartition, i64)> = self
            .tasks
            .offsets()
            .map(|(topic, partition, o)| (TopicPartition { topic: topic.to_string(), partition }, o.committed))
            .collect();
        for listener in &mut self.parts.on_rebalance {
            let mut actions = RebalanceActions { committed: &committed, seeks: &mut self.tasks.pending_seeks };
            let ran = catch_unwind(AssertUnwindSafe(|| listener(&event, &mut actions)));
            if ran.is_err() {
                tracing::error!(?event, "the rebalance listener panicked; going on");
            }
        }
        if let Some(tx) = &self.rebalance_events {
            let _ = tx.send(event);
        }
    }

    fn on_revoke(&mut self, consumer: &FlowConsumer<S, G>, tpl: &TopicPartitionList) -> Result<(), FlowError> {
        let lost = consumer.assignment_lost();
        let committed = if self.stopped {
            // Stopped on an error: its open work was abandoned, nothing commits.
            Ok(())
        } else if lost {
            // Another instance may own them already: nothing of the open work may commit.
            tracing::warn!(partitions = tpl.count(), "partitions lost (session expired?): dropping uncommitted work");
            G::lost(self, consumer)
        } else {
            // Finish in-flight work: commit before the partitions go to another instance.
            self.finish(consumer)
        };
        let event = if lost { RebalanceEvent::Lost } else { RebalanceEvent::Revoked };
        self.notify(event(topic_partitions(tpl)));
        for el in tpl.elements() {
            if self.tasks.revoke(el.topic(), el.partition()) {
                // Its task closed: the storage lets the partition's state go.
                self.storage.release(el.partition());
            }
        }
        self.metrics.assigned_partitions.store(self.tasks.assigned() as u64, Ordering::Relaxed);
        self.metrics.rebalances.fetch_add(1, Ordering::Relaxed);
        self.exported.publish(&self.metrics.snapshot());
        tracing::info!(partitions = %crate::flow::settings::Partitions(&topic_partitions(tpl)), "revoked");
        committed
    }
}
