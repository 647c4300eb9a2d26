//! State follows partitions: on assignment the consumer's rebalance callback creates a task per
//! partition and starts its restore on a thread of its own (from the Kafka journal, or from sled
//! with its positions and outbox), its partitions paused while the flow goes on with its other
//! tasks; the flow thread hands the restored state to its task and resumes them. On revocation
//! the tasks' work is committed and they are closed.

use super::core::{Core, FlowConsumer, FlowContext};
use super::guarantee::Guarantee;
use super::storage::Applied;
use crate::flow::error::FlowError;
use crate::flow::settings::{Partitions, RebalanceActions, RebalanceEvent, TopicPartition};
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
        if !matches!(rebalance, Rebalance::Assign(_)) {
            return;
        }
        let pauses = std::mem::take(&mut core.tasks.pending_pauses);
        if !pauses.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (topic, p) in &pauses {
                tpl.add_partition(topic, *p);
            }
            // A record polled before the pause is dropped, and sought back to once restored.
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(error = %e, "pausing the partitions being restored failed; their records are dropped until restored, then read again");
            }
        }
        if let Err(e) = core.seek_pending(consumer) {
            core.failure.get_or_insert(e);
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
        // The new tasks' state: restored by the storage on a thread of its own (for all of them
        // at once: the Kafka journal reads their partitions in parallel), their partitions
        // paused meanwhile (`post_rebalance`).
        let wanted = self.tasks.unrestored();
        // Partitions of a task restored already (another input topic's, assigned before) are
        // ready at once; the others once their task is restored (`take_restores`).
        let (ready, restoring): (Vec<_>, Vec<_>) =
            topic_partitions(tpl).into_iter().partition(|tp| !wanted.contains(&tp.partition));
        if !wanted.is_empty() {
            self.metrics.restoring_partitions.fetch_add(wanted.len() as u64, Ordering::Relaxed);
            let job = self.storage.restore(&wanted);
            let job = match &self.parts.timers {
                None => job,
                // The partitions' timers are read on the restore's thread too.
                Some(t) => {
                    let (config, topic) = (t.config.clone(), t.topic.clone());
                    Box::new(move || {
                        let mut restored = job()?;
                        let partitions: Vec<i32> = restored.iter().map(|(p, _)| *p).collect();
                        let mut timers = super::timers::read_partitions(&config, &topic, &partitions)?;
                        for (p, r) in &mut restored {
                            r.state.timers.load(timers.remove(p).unwrap_or_default());
                        }
                        Ok(restored)
                    }) as super::storage::RestoreJob<S>
                }
            };
            self.tasks.start_restore(wanted, job)?;
            tracing::info!(partitions = %Partitions(&restoring), "assigned; restoring their state");
        }
        self.metrics.assigned_partitions.store(self.tasks.assigned() as u64, Ordering::Relaxed);
        self.metrics.rebalances.fetch_add(1, Ordering::Relaxed);
        self.exported.publish(&self.metrics.snapshot());
        if !ready.is_empty() || restoring.is_empty() {
            tracing::info!(partitions = %Partitions(&ready), "assigned and restored");
            self.notify(RebalanceEvent::Assigned(ready));
        }
        Ok(())
    }

    /// Hands the restores that ended (`all`: every one, waited for) to their tasks: a storage of
    /// record's positions are reconciled with the group's committed offsets, the outbox of a
    /// write the Kafka commit missed is produced again, and the partitions resume (from the
    /// inputs dropped while they were restored, if any).
    pub(super) fn take_restores(&mut self, consumer: &FlowConsumer<S, G>, all: bool) -> Result<(), FlowError> {
        for run in self.tasks.take_restores(all) {
            self.metrics.restoring_partitions.fetch_sub(run.partitions.len() as u64, Ordering::Relaxed);
            let elapsed = run.started.elapsed();
            let mut resume = TopicPartitionList::new();
            let mut restored_here = Vec::new();
            for (p, restored) in run.join()? {
                if let Some(applied) = restored.applied {
                    self.reconcile(p, applied)?;
                }
                for (topic, offset) in self.tasks.restored(p, restored.state, restored.store) {
                    self.tasks.pending_seeks.push((topic, p, offset));
                }
                for topic in self.tasks.topics(p) {
                    resume.add_partition(&topic, p);
                    restored_here.push(TopicPartition { topic, partition: p });
                }
            }
            // Inputs a storage of record (sled) applied beyond the group's committed offsets
            // before a crash are skipped as they come again (checked per record only while there
            // are any).
            self.skip_applied = self.tasks.offsets().any(|(_, _, o)| o.applied_until >= 0);
            self.exported.publish(&self.metrics.snapshot());
            let elapsed_ms = elapsed.as_millis() as u64;
            tracing::info!(partitions = %Partitions(&restored_here), elapsed_ms, "assigned and restored");
            // The listeners hear of the partitions once their state is here (their seeks are made
            // with the others, once the partitions resumed).
            self.notify(RebalanceEvent::Assigned(restored_here));
            if resume.count() > 0 {
                consumer.resume(&resume).map_err(|e| kafka("resume restored partitions", e))?;
                self.wake_fetchers(consumer, &resume)?;
            }
            self.seek_pending(consumer)?;
        }
        Ok(())
    }

    /// Reconciles the input positions a storage of record (sled) holds for partition `p` with the
    /// group's committed offsets: behind them, the store is not this group's (an error); ahead,
    /// a crash came between its write and the Kafka commit: the inputs in between are skipped,
    /// and their outputs produced again from the outbox with their offsets.
    fn reconcile(&mut self, p: i32, applied: Applied) -> Result<(), FlowError> {
        let mut ahead = false;
        let mut seeks = Vec::new();
        for (topic, o) in self.tasks.task_offsets_mut(p).into_iter().flatten() {
            let stored = applied.positions.iter().find(|s| &s.topic == topic && s.partition == p);
            let stored_next = stored.map_or(-1, |s| s.next_offset);
            if stored_next < o.committed {
                return Err(FlowError::Config(format!(
                    "the {} journal is behind the group's committed offset of {topic}[{p}] ({stored_next} < {}): its state was lost or belongs to another instance; a sled journal must stay with the instance that wrote it (use a Kafka journal to move partitions between instances)",
                    self.storage.name(),
                    o.committed
                )));
            }
            o.applied_until = stored_next;
            if stored_next > o.committed {
                tracing::warn!(topic = %topic, partition = p, kafka = o.committed, stored = stored_next,
                    "inputs were applied before a crash but not committed to Kafka: producing their outputs again from the outbox");
                o.next = stored_next;
                seeks.push((topic.clone(), p, stored_next));
                ahead = true;
            }
        }
        self.tasks.pending_seeks.extend(seeks);
        if ahead {
            // Committed again with the offsets the storage holds, and the outputs again.
            self.tasks.dirty = true;
            for o in applied.outbox {
                self.emit(p, o)?;
            }
        }
        Ok(())
    }

    /// Seeks the `resumed` partitions that no other seek is asked for to where they resume (the
    /// task's next offset; the beginning when the group committed none, as `auto.offset.reset`).
    /// librdkafka's resume of a partition whose fetcher was started does not wake the broker
    /// thread that fetches it: that thread would notice at its next wake-up, up to a second
    /// later (a second of every restart here, after the restore). A seek starts the fetcher
    /// again, which wakes it. Made after the resume: a seek of a paused partition wakes the
    /// thread too early, to find the partition paused.
    fn wake_fetchers(&mut self, consumer: &FlowConsumer<S, G>, resumed: &TopicPartitionList) -> Result<(), FlowError> {
        let mut tpl = TopicPartitionList::new();
        for el in resumed.elements() {
            let (topic, p) = (el.topic(), el.partition());
            if self.tasks.pending_seeks.iter().any(|(t, sp, _)| t == topic && *sp == p) {
                continue;
            }
            let Some(next) = self.tasks.offsets_mut(topic, p).map(|o| o.next) else { continue };
            let at = if next >= 0 { Offset::Offset(next) } else { Offset::Beginning };
            tpl.add_partition_offset(topic, p, at).map_err(|e| kafka("seek", e))?;
        }
        if tpl.count() > 0 {
            consumer.seek_partitions(tpl, TXN_TIMEOUT).map_err(|e| kafka("seek resumed partitions", e))?;
        }
        Ok(())
    }

    /// Makes the seeks asked for: past inputs a storage of record applied, back to inputs
    /// dropped while a task restored (a failure is the flow's: those inputs must come again),
    /// the rebalance listeners'.
    fn seek_pending(&mut self, consumer: &FlowConsumer<S, G>) -> Result<(), FlowError> {
        if self.tasks.pending_seeks.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, p, o) in std::mem::take(&mut self.tasks.pending_seeks) {
            tpl.add_partition_offset(&topic, p, Offset::Offset(o)).map_err(|e| kafka("seek", e))?;
        }
        consumer.seek_partitions(tpl, TXN_TIMEOUT).map_err(|e| kafka("seek", e))?;
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
        // Restores under way end first: a task is closed whole.
        let restores = self.take_restores(consumer, true);
        let lost = consumer.assignment_lost();
        let committed = if let Err(e) = restores {
            Err(e)
        } else if self.stopped {
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
        tracing::info!(partitions = %Partitions(&topic_partitions(tpl)), "revoked");
        committed
    }
}
