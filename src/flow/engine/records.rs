//! One input record's way through the flow thread: decoded (or dead-lettered), handed to the
//! enrichment pipeline or straight to the stage, run, journaled in the open transaction and
//! handed to the emitter for its outputs.

use super::core::Core;
use super::emitter::Outcome;
use super::guarantee::Guarantee;
use super::storage::Change;
use crate::flow::error::FlowError;
use crate::flow::record::{Decoded, InputRecord, OutputRecord};
use crate::flow::settings::BadInput;
use crate::replay::Entity;
use crate::stage::{EntityKey, EventSourced};
use eventstage_journal::SeqNo;
use rdkafka::message::{BorrowedMessage, Message};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl<S: EventSourced, G: Guarantee> Core<S, G> {
    fn dead_letter(&mut self, input: &InputRecord, reason: String) -> Result<(), FlowError> {
        match &self.bad_input {
            BadInput::Stop => Err(FlowError::BadInput {
                topic: input.topic.clone(),
                partition: input.partition,
                offset: input.offset,
                reason,
            }),
            BadInput::DeadLetter(dlq) => {
                if let Some(unlogged) = self.bad_input_log.check() {
                    tracing::warn!(topic = %input.topic, partition = input.partition, offset = input.offset, %reason, dead_letter = %dlq, unlogged_before = unlogged, "bad input record, sent to the dead-letter topic (after the first 10, one line per 10 s says how many were not logged)");
                }
                // The record as it came (its own headers too), then where it came from and why.
                let mut headers = input.headers.clone();
                headers.extend([
                    ("eventstage.source.topic".into(), input.topic.as_bytes().to_vec()),
                    ("eventstage.source.partition".into(), input.partition.to_string().into_bytes()),
                    ("eventstage.source.offset".into(), input.offset.to_string().into_bytes()),
                    ("eventstage.error".into(), reason.into_bytes()),
                ]);
                let record =
                    OutputRecord { topic: dlq.clone(), key: input.key.clone(), value: input.value.clone(), headers };
                self.emit(input.partition, record)?;
                self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Takes a consumed record: decodes it, then hands it to the enrichment pipeline or the stage.
    pub(super) fn process(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), FlowError> {
        if !self.tasks.takes(msg.topic(), msg.partition(), msg.offset()) {
            // Its task restores: read again once it has.
            return Ok(());
        }
        let input = InputRecord {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            value: msg.payload().map(<[u8]>::to_vec),
            // No allocation for a record without headers (most).
            headers: msg
                .headers()
                .map(|h| {
                    rdkafka::message::Headers::iter(h)
                        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
            timestamp: msg.timestamp().to_millis(),
        };
        let offset = input.offset;
        if self.skip_applied
            && self.tasks.offsets_mut(&input.topic, input.partition).is_some_and(|o| offset < o.applied_until)
        {
            // Applied before a crash (sled positions); its outputs were produced again from the outbox.
            self.metrics.skipped_redeliveries.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let decoded = (self.parts.decoder)(&input);
        if let Some(pipeline) = &mut self.pipeline {
            pipeline.submit(input, decoded, &self.metrics);
            return Ok(());
        }
        self.handle(input, decoded)
    }

    /// Runs the stage on a decoded (and enriched) input record, in input order per partition.
    pub(super) fn handle(&mut self, input: InputRecord, decoded: Result<Decoded<S>, String>) -> Result<(), FlowError> {
        let Some(offsets) = self.tasks.offsets_mut(&input.topic, input.partition) else {
            tracing::warn!(topic = %input.topic, partition = input.partition, "record of a partition not assigned here; skipped");
            return Ok(());
        };
        offsets.next = input.offset + 1;
        self.tasks.dirty = true;
        self.metrics.records_in.fetch_add(1, Ordering::Relaxed);
        self.guarantee.took_input();
        let (key, command, context) = match decoded {
            Ok(decoded) => decoded,
            Err(reason) => return self.dead_letter(&input, reason),
        };
        if let Some(placement) = &self.parts.placement {
            let bytes = key.to_bytes();
            let home = placement.partition_of(&bytes);
            if home != input.partition {
                if input.topic == placement.topic {
                    // Written here by this application's own producers, which partition the same way.
                    return self.dead_letter(&input, format!("the key {key:?} belongs in partition {home} of `{}`, not {}: was the topic written by a producer that does not partition by murmur2?", placement.topic, input.partition));
                }
                // Its producer partitioned by another function: the key's state lives in `home`.
                let record = placement.forward(&input, &bytes);
                self.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
                return self.emit(input.partition, record);
            }
        }
        let p = input.partition;
        let Some((part, store)) = self.tasks.restored_mut(p) else {
            return Err(FlowError::Config(format!("partition {p} has no restored state")));
        };
        let read = store.fault_in(part, &key)?;
        if part.includes(&key, &input.topic, input.offset) {
            // Delivered again (at-least-once): its events are journaled and its outputs were
            // acknowledged before they were.
            self.metrics.skipped_redeliveries.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let entity = match read {
            Some(entity) => entity,
            None => part.get(&key).cloned().unwrap_or_default(),
        };
        let (events, outcome, new_state) = match crate::stage::execute(&self.parts.stage, &entity.state, command) {
            Ok(executed) => (executed.events, executed.outcome, executed.state),
            Err(message) => return self.dead_letter(&input, format!("handler panicked: {message}")),
        };
        let state = match new_state {
            None => entity.state,
            Some(state) => {
                // Before journaling: a deletion's marker must include the deleting input.
                if let Some(part) = self.tasks.state_mut(p) {
                    self.guarantee.applied(part, &key, &input);
                }
                let forgotten = self.journal(p, &key, entity.seq, &events, &state)?;
                let state = Arc::new(state);
                let entity = if forgotten {
                    Entity::default()
                } else {
                    Entity { state: state.clone(), seq: SeqNo(entity.seq.0 + events.len() as u64) }
                };
                if let Some(part) = self.tasks.state_mut(p) {
                    match part.overlay.get_mut(&key) {
                        Some(slot) => *slot = entity,
                        None => {
                            part.overlay.insert(key.clone(), entity);
                        }
                    }
                }
                state
            }
        };
        self.emitter.outcome(self.guarantee.batch(), Outcome { input, key, events, outcome, state, context })
    }

    /// Records in partition `p`'s store what one command changed: `events` applied to `key` (at
    /// sequence `before`), leaving `state`. True when the store forgot the key (a deletion it
    /// journals as a tombstone: the key starts again from its default state).
    fn journal(
        &mut self,
        p: i32,
        key: &S::Key,
        before: SeqNo,
        events: &[S::Event],
        state: &S::State,
    ) -> Result<bool, FlowError> {
        let Some((part, store)) = self.tasks.restored_mut(p) else { return Ok(false) };
        let change = Change { key, before, events, state, ts: self.wall_ms };
        let recorded = store.record(change, part)?;
        if recorded.end_soon {
            self.guarantee.end_soon();
        }
        Ok(recorded.forgotten)
    }

    /// Hands the records whose enrichment finished to the stage, in order per partition.
    pub(super) fn run_pipeline(&mut self) -> Result<(), FlowError> {
        let Some(pipeline) = &mut self.pipeline else { return Ok(()) };
        for (input, decoded) in pipeline.take_ready(&self.metrics) {
            self.handle(input, decoded)?;
        }
        Ok(())
    }

    /// Finishes every record in the pipeline (before a commit that must include them).
    pub(super) fn drain_pipeline(&mut self) -> Result<(), FlowError> {
        loop {
            self.run_pipeline()?;
            match &mut self.pipeline {
                Some(p) if !p.is_empty() => p.wait(Duration::from_millis(50), &self.metrics),
                _ => return Ok(()),
            }
        }
    }
}
