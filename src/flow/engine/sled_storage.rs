//! The sled journal as a flow's storage (one instance): each task stages its partition's events
//! and due snapshots, and its seal writes them with the input positions and the outbox in one
//! sled batch before the Kafka commit (see `backend`); a restored partition's positions are
//! reconciled with the group's committed offsets by the task that takes it.

mod backend;

use backend::{PartitionJournal, Pending};

use super::cache::Committed;
use super::state::PartitionState;
use super::storage::{encode_events, encode_state};
use super::storage::{Applied, Change, Durable, Recorded, RestoreJob, Restored, Sealed, Storage, TaskStore};
use crate::codec::Codec;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::replay::Entity;
use crate::stage::{EntityKey, EventSourced};
use eventstage_journal::{EventRecord, SeqNo, SledStore, SnapshotRecord, SourcePosition};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The sled journal (see the module documentation); each task's store is a [`SledTask`].
pub(super) struct SledStorage {
    dir: PathBuf,
    store: SledStore,
    /// Runs the sled journal's async calls.
    rt: Arc<tokio::runtime::Runtime>,
    codec: Codec,
    snapshot_every: u64,
}

impl SledStorage {
    /// Opens the sled journal at `dir`; `rt` runs its async calls.
    pub(super) fn open(
        dir: &Path,
        rt: tokio::runtime::Runtime,
        codec: Codec,
        snapshot_every: u64,
    ) -> Result<Self, FlowError> {
        let store = SledStore::open(dir)?;
        Ok(Self { dir: dir.to_path_buf(), store, rt: Arc::new(rt), codec, snapshot_every })
    }
}

impl<S: EventSourced> Storage<S> for SledStorage {
    fn name(&self) -> String {
        format!("sled:{}", self.dir.display())
    }

    /// Reads each partition's journal (snapshots, then the events after them), its input
    /// positions and the outbox of its last write: the engine reconciles the positions with the
    /// group's committed offsets (see [`Applied`]).
    fn restore(&mut self, wanted: &[i32]) -> RestoreJob<S> {
        let (store, rt, wanted) = (self.store.clone(), self.rt.clone(), wanted.to_vec());
        let (codec, snapshot_every) = (self.codec, self.snapshot_every);
        Box::new(move || {
            let mut restored = Vec::new();
            for p in wanted {
                let (journal, partition) = PartitionJournal::restore::<S>(&store, rt.clone(), p)?;
                let task = SledTask::<S> {
                    journal: Arc::new(journal),
                    codec,
                    snapshot_every,
                    pending: Pending::default(),
                    stage: PhantomData,
                };
                let applied = Applied { positions: partition.positions, outbox: partition.outbox };
                let state = PartitionState::new(Committed::All(partition.entities.into_iter().collect()));
                restored.push((p, Restored { state, store: Box::new(task), applied: Some(applied) }));
            }
            Ok(restored)
        })
    }

    /// One fsync of the sled database (every partition's journal is in it), on a thread of its
    /// own from now on. A failed write stops the flow: the restart recovers from whatever sled
    /// holds.
    fn durable(&mut self) -> Result<Durable, FlowError> {
        let store = self.store.clone();
        let flushing = std::thread::Builder::new()
            .name("eventstage-sled-flush".into())
            .spawn(move || store.flush().map_err(FlowError::from))
            .map_err(|e| FlowError::Config(format!("cannot start the sled flush thread: {e}")))?;
        Ok(Box::new(move || {
            flushing.join().map_err(|_| FlowError::Crashed("the sled flush thread panicked".into()))??;
            crash_point_after_sled_write();
            Ok(())
        }))
    }

    /// The task's journal handle goes with its task.
    fn release(&mut self, _: i32) {}

    /// Every commit was flushed: nothing is left to write.
    fn close(&mut self) {}
}

/// A task's part of the sled journal: its partition's journal, and what its open transaction or
/// batch will write there.
struct SledTask<S: EventSourced> {
    journal: Arc<PartitionJournal>,
    codec: Codec,
    snapshot_every: u64,
    pending: Pending,
    stage: PhantomData<fn() -> S>,
}

impl<S: EventSourced> TaskStore<S> for SledTask<S> {
    /// Partitions are restored in full: nothing to read.
    fn fault_in(&mut self, _: &mut PartitionState<S>, _: &S::Key) -> Result<Option<Entity<S>>, FlowError> {
        Ok(None)
    }

    /// Stages the command's events, and a snapshot when the sequence crosses a multiple of the
    /// snapshot interval.
    fn record(&mut self, c: Change<'_, S>, _: &PartitionState<S>) -> Result<Recorded, FlowError> {
        let envelopes = encode_events::<S>(self.codec, c.key, c.events, c.ts)?;
        let seq = SeqNo(c.before.0 + envelopes.len() as u64);
        let raw_key = c.key.to_bytes().into_owned();
        let every = self.snapshot_every;
        if every > 0 && seq.0 / every > c.before.0 / every {
            let envelope = eventstage_journal::Envelope::snapshot(
                self.codec.id(),
                S::STATE_VERSION,
                c.ts,
                encode_state::<S>(self.codec, c.key, c.state)?,
            );
            self.pending.snapshots.push(SnapshotRecord { key: raw_key.clone(), seq, envelope });
        }
        let records = (c.before.0 + 1..).zip(envelopes).map(|(n, envelope)| EventRecord {
            key: raw_key.clone(),
            seq: SeqNo(n),
            envelope,
        });
        self.pending.events.extend(records);
        // A deleted entity keeps its events (and its sequence) in the sled journal.
        Ok(Recorded::default())
    }

    fn keep_output(&mut self, record: OutputRecord) {
        self.pending.outbox.push(record);
    }

    /// sled is the state of record: once written, the partition's batch (events, snapshots,
    /// positions, outbox) holds the transaction, and the Kafka transaction must commit the same
    /// outputs.
    fn seal(&mut self, _: &PartitionState<S>, positions: Vec<SourcePosition>) -> Result<Sealed, FlowError> {
        let Pending { events, snapshots, outbox } = std::mem::take(&mut self.pending);
        let outbox = Arc::new(outbox);
        let (journal, kept) = (self.journal.clone(), outbox.clone());
        let write = Box::new(move |_: super::storage::Out<'_>| journal.write(events, snapshots, positions, &kept));
        Ok(Sealed { write, outbox: Some(outbox) })
    }

    fn discard(&mut self) {
        self.pending = Pending::default();
    }
}

/// Fault injection for the crash tests: with `EVENTSTAGE_CRASH_AFTER_SLED_WRITES=n` in the
/// environment, the process aborts right after its n-th sled write, before the Kafka commit: the
/// window the outbox exists for. Unset, this costs one atomic load per commit.
fn crash_point_after_sled_write() {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let limit =
        LIMIT.get_or_init(|| std::env::var("EVENTSTAGE_CRASH_AFTER_SLED_WRITES").ok().and_then(|v| v.parse().ok()));
    if let Some(limit) = limit {
        if WRITES.fetch_add(1, Ordering::SeqCst) + 1 >= *limit {
            eprintln!("EVENTSTAGE_CRASH_AFTER_SLED_WRITES: aborting after sled write {limit}");
            std::process::abort();
        }
    }
}
