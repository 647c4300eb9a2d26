//! Where a flow keeps its state: one contract for the engine, three implementations.
//!
//! - `KafkaStorage`: the Kafka journal (a compacted topic,
//!   one record per key and transaction), with or without the local state store over it;
//! - `SledStorage`: the sled journal of one instance, with
//!   the input positions and the outbox of each commit;
//! - [`NoStorage`]: in memory only (stateless stages, tests).
//!
//! A storage comes in two parts. The [`Storage`] is shared by the flow: it restores the
//! partitions a flow is assigned, making each task's [`TaskStore`], and makes what was written
//! durable. A task's store is the task's own: it reads a key's state when first used, records
//! what a command changed, and seals the task's part of a transaction (exactly once) or batch
//! (at least once) into a [`Sealed`]: what must be written, which the guarantee runs when it
//! decides (into the transaction at once; once the batch's outputs are acknowledged).

use super::producer::Sink;
use super::state::PartitionState;
use crate::codec::Codec;
use crate::error::Error;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::replay::Entity;
use crate::stage::EntityKey;
use crate::stage::EventSourced;
use eventstage_journal::{printable_key, Envelope};
use eventstage_journal::{SeqNo, SourcePosition};
use std::sync::Arc;

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

/// What one command changed: it applied `events` to `key` (at sequence `before`), leaving
/// `state`; `ts` is the journal's timestamp (ms since the epoch).
pub(super) struct Change<'a, S: EventSourced> {
    pub(super) key: &'a S::Key,
    pub(super) before: SeqNo,
    pub(super) events: &'a [S::Event],
    pub(super) state: &'a S::State,
    pub(super) ts: u64,
}

/// What [`TaskStore::record`] did with a change.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Recorded {
    /// The open work should end soon (a key holds the most events one journal record takes and
    /// the record waits for the end of the batch).
    pub(super) end_soon: bool,
    /// The key was forgotten: its deletion is journaled as a tombstone, and it starts again from
    /// the default state and sequence 0 (a storage that keeps a deleted entity's events does not).
    pub(super) forgotten: bool,
}

/// A restored partition: its task's state and store.
pub(super) struct Restored<S: EventSourced> {
    pub(super) state: PartitionState<S>,
    pub(super) store: Box<dyn TaskStore<S>>,
    /// From a storage of record that keeps input positions of its own (sled): what its state
    /// includes, reconciled with the group's committed offsets when the task takes it.
    pub(super) applied: Option<Applied>,
}

/// A storage of record's input positions of a restored partition (see [`Restored::applied`]).
pub(super) struct Applied {
    /// The next input offset per topic its state includes.
    pub(super) positions: Vec<SourcePosition>,
    /// The outputs of its last write: produced again when its positions are ahead of the group's
    /// committed offsets (a crash between its write and the Kafka commit).
    pub(super) outbox: Vec<OutputRecord>,
}

/// Restores partitions: run on a thread of its own while the flow goes on with its other tasks
/// (Kafka Streams' state updater), the partitions paused until their tasks take the result.
pub(super) type RestoreJob<S> = Box<dyn FnOnce() -> Restoration<S> + Send>;

/// What a [`RestoreJob`] returns: the restored partitions.
pub(super) type Restoration<S> = Result<Vec<(i32, Restored<S>)>, FlowError>;

/// Makes what a storage wrote durable (see [`Storage::durable`]).
pub(super) type Durable = Box<dyn FnOnce() -> Result<(), FlowError> + Send>;

/// Writes a task's sealed work: its journal records into the transaction or batch (`Out`), or a
/// local journal's batch.
pub(super) type Write = Box<dyn FnOnce(Out<'_>) -> Result<(), FlowError> + Send>;

/// What a task's sealed transaction or batch must write.
pub(super) struct Sealed {
    pub(super) write: Write,
    /// From a storage of record (sled), which holds the transaction once `write` ran: the
    /// transaction's outputs (its outbox), which the Kafka transaction must then commit, produced
    /// again after a failed commit. `None`: the Kafka transaction is the record, and a failed
    /// commit is made good by a rewind.
    pub(super) outbox: Option<Arc<Vec<OutputRecord>>>,
}

impl Sealed {
    /// Nothing to write.
    pub(super) fn nothing() -> Self {
        Self { write: Box::new(|_| Ok(())), outbox: None }
    }
}

/// The flow's storage, shared by its tasks (see the module documentation).
pub(super) trait Storage<S: EventSourced>: Send {
    /// What the flow's start-up line calls it.
    fn name(&self) -> String;

    /// What restores the committed state of partitions `wanted`, each with its task's store (see
    /// [`RestoreJob`]).
    fn restore(&mut self, wanted: &[i32]) -> RestoreJob<S>;

    /// What makes every [`Sealed::write`] so far durable: the sled journal's fsync starts here
    /// and runs while the transaction's offsets travel and its last records are acknowledged;
    /// the guarantee runs the result before the Kafka commit (exactly once) or the offset commit
    /// (at least once).
    fn durable(&mut self) -> Result<Durable, FlowError>;

    /// Partition `p`'s task closed: it went to another instance.
    fn release(&mut self, p: i32);

    /// The flow stopped cleanly: anything kept beside the journal is brought up to date.
    fn close(&mut self);
}

/// A task's part of the storage: its partition's keys as read and as changed by its open work.
pub(super) trait TaskStore<S: EventSourced>: Send {
    /// Makes `key`'s committed state part of `part` before the key is used (a storage that
    /// restores partitions in full has nothing to do). Returns the entity when it was read: a
    /// state cache may evict it again at once to make room, so the caller uses it from here.
    fn fault_in(&mut self, part: &mut PartitionState<S>, key: &S::Key) -> Result<Option<Entity<S>>, FlowError>;

    /// Records what one command changed (`part`: the partition's state before the change).
    /// Writes nothing: what must be written is handed over when the open work is sealed.
    fn record(&mut self, change: Change<'_, S>, part: &PartitionState<S>) -> Result<Recorded, FlowError>;

    /// Keeps an output record of the open transaction with its state (the sled journal's outbox,
    /// exactly once: the emitter hands its records over only then).
    fn keep_output(&mut self, record: OutputRecord);

    /// Seals the open transaction or batch, which consumed up to `positions` (`part`: the
    /// partition's state with its changes): returns what must be written.
    fn seal(&mut self, part: &PartitionState<S>, positions: Vec<SourcePosition>) -> Result<Sealed, FlowError>;

    /// The transaction sealed last committed (exactly once; called when its state becomes the
    /// state of record).
    fn committed(&mut self) {}

    /// A reader of the local store's rows for the committed view's queries (a task with one).
    fn query_reader(&self) -> Option<std::sync::Arc<dyn crate::flow::view::StoreRead<S>>> {
        None
    }

    /// Whether the task's committed state was rebuilt (its local store dropped) since the last
    /// call: the committed view takes it again.
    fn take_rebuilt(&mut self) -> bool {
        false
    }

    /// Forgets what the open transaction or batch recorded (it was aborted).
    fn discard(&mut self);
}

/// No storage: state lives in memory only and starts empty.
pub(super) struct NoStorage;

impl<S: EventSourced> Storage<S> for NoStorage {
    fn name(&self) -> String {
        "none".into()
    }

    fn restore(&mut self, wanted: &[i32]) -> RestoreJob<S> {
        let wanted = wanted.to_vec();
        Box::new(move || {
            let restored = |p: i32| {
                let store: Box<dyn TaskStore<S>> = Box::new(NoStorage);
                (p, Restored { state: PartitionState::default(), store, applied: None })
            };
            Ok(wanted.into_iter().map(restored).collect())
        })
    }

    fn durable(&mut self) -> Result<Durable, FlowError> {
        Ok(Box::new(|| Ok(())))
    }

    fn release(&mut self, _: i32) {}

    fn close(&mut self) {}
}

impl<S: EventSourced> TaskStore<S> for NoStorage {
    fn fault_in(&mut self, _: &mut PartitionState<S>, _: &S::Key) -> Result<Option<Entity<S>>, FlowError> {
        Ok(None)
    }

    fn record(&mut self, _: Change<'_, S>, _: &PartitionState<S>) -> Result<Recorded, FlowError> {
        Ok(Recorded::default())
    }

    fn keep_output(&mut self, _: OutputRecord) {}

    fn seal(&mut self, _: &PartitionState<S>, _: Vec<SourcePosition>) -> Result<Sealed, FlowError> {
        Ok(Sealed::nothing())
    }

    fn discard(&mut self) {}
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
