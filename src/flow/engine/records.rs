//! One input record's way through the flow thread: decoded (or dead-lettered), handed to the
//! enrichment pipeline or straight to the stage, run, journaled in the open transaction and
//! handed to the emitter for its outputs.

use super::core::Core;
use super::emitter::Outcome;
use super::guarantee::Guarantee;
use super::storage::Change;
use super::timers::{self, Pending, TIMER_HEADER};
use crate::flow::error::FlowError;
use crate::flow::record::{Decoded, InputRecord, OutputRecord};
use crate::flow::settings::BadInput;
use crate::flow::shared::now_ms;
use crate::replay::Entity;
use crate::stage::{EntityKey, EventSourced, TimerOp};
use eventstage_journal::SeqNo;
use rdkafka::message::{BorrowedMessage, Message};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Timers fired per partition in one call of the flow loop (the rest at the next).
const FIRE_AT_ONCE: usize = 256;

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
        self.run_command(input, key, command, context)
    }

    /// Runs the stage on `command` for `key` (from `input`, or a fired timer): its state read,
    /// the handlers run, its events journaled and its timers changed in the open transaction, its
    /// outcome handed to the emitter.
    fn run_command(
        &mut self,
        input: InputRecord,
        key: S::Key,
        command: S::Command,
        context: crate::flow::record::Context,
    ) -> Result<(), FlowError> {
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
        let executed = match crate::stage::execute(&self.parts.stage, &entity.state, command) {
            Ok(executed) => executed,
            Err(message) => return self.dead_letter(&input, format!("handler panicked: {message}")),
        };
        if !executed.timers.is_empty() {
            self.change_timers(p, &key, executed.timers)?;
        }
        let (events, outcome) = (executed.events, executed.outcome);
        let state = match executed.state {
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

    /// Schedules and cancels `key`'s timers in the open transaction, and writes its timers
    /// record into it.
    fn change_timers(&mut self, p: i32, key: &S::Key, ops: Vec<TimerOp<S>>) -> Result<(), FlowError> {
        let Some(settings) = &self.parts.timers else {
            let fix = if self.parts.placement.is_some() {
                "they need Guarantee::ExactlyOnce (at least once, a fired timer's removal could be written before the command's journal records, and its effect lost in a crash)"
            } else {
                "durable timers run in the flows of an Application (eventstage::flow::Application), which keeps them in <group>-<stage>-timers; run the flow as a stage of one"
            };
            return Err(FlowError::Config(format!("stage `{}` schedules or cancels a timer: {fix}", S::NAME)));
        };
        let (topic, encode) = (settings.topic.clone(), settings.encode);
        let Some(part) = self.tasks.state_mut(p) else { return Ok(()) };
        let mut timers = part.timers.get(key).cloned().unwrap_or_default();
        for op in ops {
            match op {
                TimerOp::Schedule { name, after, command } => {
                    let command = encode(&command).map_err(|e| {
                        FlowError::Config(format!(
                            "stage `{}`: the command of timer `{name}` is not JSON: {e}",
                            S::NAME
                        ))
                    })?;
                    // The clock now, not the loop's: a timer never fires before its time.
                    let due = now_ms().saturating_add(after.as_millis().min(u128::from(u64::MAX)) as u64);
                    timers.insert(name, Pending { due, command: command.into() });
                }
                TimerOp::Cancel { name } => {
                    timers.remove(&name);
                }
            }
        }
        let record = timers::record(&topic, &key.to_bytes(), &timers);
        part.timers.set(key.clone(), timers);
        self.emit(p, record)
    }

    /// Fires the timers due now (a bounded number per call): each is removed in the open
    /// transaction and its command handled as an input whose record names the timer.
    pub(super) fn fire_timers(&mut self) -> Result<(), FlowError> {
        let Some(settings) = &self.parts.timers else { return Ok(()) };
        let now = now_ms();
        if !self.tasks.timer_due(now) {
            return Ok(());
        }
        let (topic, decode, context) = (settings.topic.clone(), settings.decode, settings.context);
        for p in self.tasks.restored_partitions() {
            let Some(part) = self.tasks.state_mut(p) else { continue };
            for (key, name, command) in part.timers.due(now, FIRE_AT_ONCE) {
                let Some(part) = self.tasks.state_mut(p) else { break };
                let mut timers = part.timers.get(&key).cloned().unwrap_or_default();
                let due = timers.remove(&name).map_or(now, |t| t.due);
                let bytes = key.to_bytes().into_owned();
                let record = timers::record(&topic, &bytes, &timers);
                part.timers.set(key.clone(), timers);
                self.emit(p, record)?;
                self.tasks.fired.insert(p);
                self.tasks.dirty = true;
                self.metrics.timers_fired.fetch_add(1, Ordering::Relaxed);
                let input = InputRecord::new(topic.clone(), p, -1, Some(bytes), Some(command.to_vec()))
                    .with_headers(vec![(TIMER_HEADER.into(), name.into_bytes())])
                    .with_timestamp(due as i64);
                match decode(&command) {
                    Ok(command) => self.run_command(input, key, command, context())?,
                    Err(e) => {
                        let reason = format!("the command of a timer of stage `{}` does not decode ({e}): was the command type changed while timers were pending?", S::NAME);
                        self.dead_letter(&input, reason)?;
                    }
                }
            }
        }
        Ok(())
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
