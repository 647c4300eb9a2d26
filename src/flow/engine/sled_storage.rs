//! The sled journal as a flow's storage (one instance): each task stages its partition's events
//! and due snapshots, and its seal writes them with the input positions and the outbox in one
//! sled batch before the Kafka commit (see `backend`); a restored partition reconciles sled's
//! positions with the group's committed offsets.

mod backend;

use backend::{PartitionJournal, Pending};

use super::state::PartitionState;
use super::storage::{encode_events, encode_state};
use super::storage::{Change, Durable, Recorded, Restored, Restoring, Sealed, Storage, TaskStore};
use crate::codec::Codec;
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::stage::{EntityKey, EventSourced};
use eventstage_journal::{EventRecord, SeqNo, SledStore, SnapshotRecord, SourcePosition};
use std::collections::HashMap;
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
    metrics: Arc<Metrics>,
}

impl SledStorage {
    /// Opens the sled journal at `dir`; `rt` runs its async calls.
    pub(super) fn open(
        dir: &Path,
        rt: tokio::runtime::Runtime,
        codec: Codec,
        snapshot_every: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FlowError> {
        let store = SledStore::open(dir)?;
        Ok(Self { dir: dir.to_path_buf(), store, rt: Arc::new(rt), codec, snapshot_every, metrics })
    }

    /// Restores partition `p` from sled and reconciles sled's positions with the group's committed
    /// offsets: positions behind them mean the store is not this group's (an error); positions
    /// ahead mean a crash between the sled write and the Kafka commit (the outbox is produced again).
    fn restore_partition<S: EventSourced>(
        &mut self,
        p: i32,
        at: &mut Restoring<'_, S>,
    ) -> Result<Restored<S>, FlowError> {
        let (journal, restored) = PartitionJournal::restore::<S>(&self.store, self.rt.clone(), p)?;
        let stored: HashMap<(String, i32), i64> =
            restored.positions.iter().map(|pos| ((pos.topic.clone(), pos.partition), pos.next_offset)).collect();
        let mut ahead = false;
        let mut seeks = Vec::new();
        for (topic, o) in at.tasks.task_offsets_mut(p).into_iter().flatten() {
            let sled_next = stored.get(&(topic.clone(), p)).copied().unwrap_or(-1);
            if sled_next < o.committed {
                return Err(FlowError::Config(format!(
                    "the sled journal at {} is behind the group's committed offset of {topic}[{p}] ({sled_next} < {}): its state was lost or belongs to another instance; a sled journal must stay with the instance that wrote it (use a Kafka journal to move partitions between instances)",
                    self.dir.display(),
                    o.committed
                )));
            }
            o.applied_until = sled_next;
            if sled_next > o.committed {
                tracing::warn!(topic = %topic, partition = p, kafka = o.committed, sled = sled_next,
                    "inputs were applied before a crash but not committed to Kafka: producing their outputs again from the outbox");
                o.next = sled_next;
                seeks.push((topic.clone(), p, sled_next));
                ahead = true;
            }
        }
        at.tasks.pending_seeks.extend(seeks);
        let store = SledTask::<S> {
            journal: Arc::new(journal),
            codec: self.codec,
            snapshot_every: self.snapshot_every,
            pending: Pending::default(),
            stage: PhantomData,
        };
        Ok(Restored {
            state: PartitionState::new(restored.entities.into_iter().collect()),
            store: Box::new(store),
            redo: ahead.then_some(restored.outbox),
        })
    }
}

impl<S: EventSourced> Storage<S> for SledStorage {
    fn name(&self) -> String {
        format!("sled:{}", self.dir.display())
    }

    fn restore(&mut self, wanted: &[i32], mut at: Restoring<'_, S>) -> Result<Vec<(i32, Restored<S>)>, FlowError> {
        let mut restored = Vec::new();
        for &p in wanted {
            self.metrics.restoring_partitions.fetch_add(1, Ordering::Relaxed);
            let partition = self.restore_partition::<S>(p, &mut at);
            self.metrics.restoring_partitions.fetch_sub(1, Ordering::Relaxed);
            restored.push((p, partition?));
        }
        Ok(restored)
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
    fn fault_in(&mut self, _: &mut PartitionState<S>, _: &S::Key) -> Result<(), FlowError> {
        Ok(())
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
