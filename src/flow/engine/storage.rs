//! Where a flow keeps its state: one contract for the engine, three implementations.
//!
//! - `KafkaStorage`: the Kafka journal (a compacted topic,
//!   one record per key and transaction), with or without the local state store over it;
//! - `SledStorage`: the sled journal of one instance, with
//!   the input positions and the outbox of each commit;
//! - [`NoStorage`]: in memory only (stateless stages, tests).
//!
//! The engine calls the same steps whatever the storage: restore the partitions it is assigned,
//! read a key's state when first used, record what a command changed, seal a transaction (exactly
//! once) or a batch (at least once), and release the partitions it loses.

use super::producer::Sink;
use super::state::{PartitionState, TaskManager};
use crate::codec::Codec;
use crate::error::Error;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::stage::EntityKey;
use crate::stage::EventSourced;
use eventstage_journal::{printable_key, Envelope};
use eventstage_journal::{SeqNo, SourcePosition};
use std::collections::BTreeMap;

/// Produces a storage's Kafka records (journal records) in the open transaction or, at least
/// once, counted under the batch being filled.
#[derive(Clone, Copy)]
pub(super) struct Out<'a> {
    pub(super) sink: &'a Sink,
    pub(super) batch: usize,
}

impl Out<'_> {
    pub(super) fn produce(&self, topic: &str, p: i32, key: &[u8], value: Option<&[u8]>) -> Result<(), FlowError> {
        self.sink.produce(self.batch, topic, Some(p), Some(key), value, None)
    }
}

/// What one command changed: it applied `events` to `key` (at sequence `before`) in partition `p`,
/// leaving `state`; `ts` is the journal's timestamp (ms since the epoch).
pub(super) struct Change<'a, S: EventSourced> {
    pub(super) p: i32,
    pub(super) key: &'a S::Key,
    pub(super) before: SeqNo,
    pub(super) events: &'a [S::Event],
    pub(super) state: &'a S::State,
    pub(super) ts: u64,
}

/// What [`Storage::record`] did with a change.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Recorded {
    /// The open work should end soon (a key holds the most events one journal record takes and
    /// the record waits for the end of the batch).
    pub(super) end_soon: bool,
    /// The key was forgotten: its deletion is journaled as a tombstone, and it starts again from
    /// the default state and sequence 0 (a storage that keeps a deleted entity's events does not).
    pub(super) forgotten: bool,
}

/// The engine's consumer positions while a storage restores partitions: a storage that keeps
/// input positions of its own (sled) reconciles them with the group's committed offsets.
pub(super) struct Restoring<'a, S: EventSourced> {
    /// The tasks: their offsets per input topic, and the seeks to make once librdkafka has made
    /// the assignment.
    pub(super) tasks: &'a mut TaskManager<S>,
}

/// A restored partition.
pub(super) struct Restored<S: EventSourced> {
    pub(super) state: PartitionState<S>,
    /// Inputs were applied before a crash but their transaction did not commit in Kafka (sled):
    /// the outputs to produce again, and the consumed offsets must be committed again.
    pub(super) redo: Option<Vec<OutputRecord>>,
}

/// Makes a sealed transaction's write durable (see [`Storage::durable`]).
pub(super) type Durable = Box<dyn FnOnce() -> Result<(), FlowError> + Send>;

/// The journal positions of a transaction or batch: per partition, the next input offsets.
pub(super) type Positions = BTreeMap<i32, Vec<SourcePosition>>;

/// How a flow's state is restored, recorded and sealed (see the module documentation).
pub(super) trait Storage<S: EventSourced>: Send {
    /// What the flow's start-up line calls it.
    fn name(&self) -> String;

    /// Restores the committed state of partitions `wanted`.
    fn restore(&mut self, wanted: &[i32], at: Restoring<'_, S>) -> Result<Vec<(i32, Restored<S>)>, FlowError>;

    /// Makes `key`'s committed state part of `part` before the key is first used (a storage that
    /// restores partitions in full has nothing to do).
    fn fault_in(&mut self, p: i32, part: &mut PartitionState<S>, key: &S::Key) -> Result<(), FlowError>;

    /// Records what one command changed (`part`: its partition's state before the change).
    /// Produces nothing: what must be written is written when the open work is sealed.
    fn record(&mut self, change: Change<'_, S>, part: &PartitionState<S>) -> Result<Recorded, FlowError>;

    /// Keeps an output record of the open transaction with its state (the sled journal's outbox,
    /// exactly once: the emitter hands its records over only then).
    fn keep_output(&mut self, p: i32, record: OutputRecord);

    /// Exactly-once, before the Kafka commit: writes what the open transaction changed (`parts`:
    /// the partitions' state with the transaction's changes; `positions`: the offsets it consumed
    /// up to). Returns true when the storage is the state of record and holds the transaction now:
    /// the Kafka transaction must then commit the same outputs (see [`outbox`](Self::outbox)).
    fn seal_transaction(
        &mut self,
        tasks: &TaskManager<S>,
        positions: Positions,
        out: Out<'_>,
    ) -> Result<bool, FlowError>;

    /// Exactly-once: what makes the sealed transaction's write durable, run on the commit's
    /// thread right before the Kafka commit (the sled journal's fsync runs from the seal on, while
    /// the transaction's offsets travel and its last records are acknowledged).
    fn durable(&mut self) -> Durable;

    /// The outputs of the last sealed transaction, to produce again after a failed Kafka commit.
    fn outbox(&self) -> Vec<OutputRecord>;

    /// At-least-once: takes what batch `id` changed; it is written by
    /// [`write_batch`](Self::write_batch) once the batch's outputs are acknowledged.
    fn seal_batch(&mut self, id: usize, tasks: &TaskManager<S>, positions: Positions) -> Result<(), FlowError>;

    /// Writes the oldest sealed batch, `id`.
    fn write_batch(&mut self, id: usize, out: Out<'_>) -> Result<(), FlowError>;

    /// Forgets the sealed batches not written yet (their partitions were lost).
    fn drop_batches(&mut self);

    /// Forgets what the open transaction or batch recorded (it was aborted).
    fn discard(&mut self);

    /// Partition `p` went to another instance.
    fn release(&mut self, p: i32);

    /// The flow stopped cleanly: anything kept beside the journal is brought up to date.
    fn close(&mut self);
}

/// No storage: state lives in memory only and starts empty.
pub(super) struct NoStorage;

impl<S: EventSourced> Storage<S> for NoStorage {
    fn name(&self) -> String {
        "none".into()
    }

    fn restore(&mut self, wanted: &[i32], _: Restoring<'_, S>) -> Result<Vec<(i32, Restored<S>)>, FlowError> {
        Ok(wanted.iter().map(|&p| (p, Restored { state: PartitionState::default(), redo: None })).collect())
    }

    fn fault_in(&mut self, _: i32, _: &mut PartitionState<S>, _: &S::Key) -> Result<(), FlowError> {
        Ok(())
    }

    fn record(&mut self, _: Change<'_, S>, _: &PartitionState<S>) -> Result<Recorded, FlowError> {
        Ok(Recorded::default())
    }

    fn keep_output(&mut self, _: i32, _: OutputRecord) {}

    fn seal_transaction(&mut self, _: &TaskManager<S>, _: Positions, _: Out<'_>) -> Result<bool, FlowError> {
        Ok(false)
    }

    fn durable(&mut self) -> Durable {
        Box::new(|| Ok(()))
    }

    fn outbox(&self) -> Vec<OutputRecord> {
        Vec::new()
    }

    fn seal_batch(&mut self, _: usize, _: &TaskManager<S>, _: Positions) -> Result<(), FlowError> {
        Ok(())
    }

    fn write_batch(&mut self, _: usize, _: Out<'_>) -> Result<(), FlowError> {
        Ok(())
    }

    fn drop_batches(&mut self) {}

    fn discard(&mut self) {}

    fn release(&mut self, _: i32) {}

    fn close(&mut self) {}
}

/// Encodes `state` (of `key`) with the flow's codec; a state restores could not read is refused.
pub(super) fn encode_state<S: EventSourced>(
    codec: Codec,
    key: &S::Key,
    state: &S::State,
) -> Result<Vec<u8>, FlowError> {
    crate::stage::encode_state::<S>(codec, state).map_err(|source| encode_error::<S>(key, source))
}

fn encode_error<S: EventSourced>(key: &S::Key, source: crate::CodecError) -> FlowError {
    Error::Encode { stage: S::NAME.into(), key: printable_key(&key.to_bytes()), source }.into()
}

/// The journal envelopes of `events` of `key`, stamped `ts`.
pub(super) fn encode_events<S: EventSourced>(
    codec: Codec,
    key: &S::Key,
    events: &[S::Event],
    ts: u64,
) -> Result<Vec<Envelope>, FlowError> {
    events
        .iter()
        .map(|e| {
            let payload = crate::stage::encode_event::<S>(codec, e).map_err(|source| encode_error::<S>(key, source))?;
            Ok(Envelope::event(codec.id(), S::EVENT_VERSION, ts, payload))
        })
        .collect()
}
