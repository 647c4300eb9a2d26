//! The sled journal as a flow's storage (one instance): events and due snapshots are staged per
//! transaction and written with the input positions and the outbox before the Kafka commit (see
//! `backend`), and a restored partition reconciles sled's positions with the group's
//! committed offsets.

mod backend;

use backend::SledBackend;

use super::state::{PartitionState, TaskManager};
use super::storage::{encode_events, encode_state};
use super::storage::{Change, Durable, Out, Positions, Recorded, Restored, Restoring, Storage};
use crate::codec::Codec;
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::stage::{EntityKey, EventSourced};
use backend::Staged;
use eventstage_journal::{EventRecord, SeqNo, SnapshotRecord};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) struct SledStorage {
    backend: SledBackend,
    /// Runs the sled journal's async calls.
    rt: tokio::runtime::Runtime,
    codec: Codec,
    snapshot_every: u64,
    metrics: Arc<Metrics>,
    /// At-least-once: what sealed batches will write, oldest first.
    batches: VecDeque<(usize, Staged, Positions)>,
    /// Exactly-once: the fsync of the sealed transaction, running until the Kafka commit.
    flushing: Option<std::thread::JoinHandle<Result<(), FlowError>>>,
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
        let backend = SledBackend::open(dir)?;
        Ok(Self { backend, rt, codec, snapshot_every, metrics, batches: VecDeque::new(), flushing: None })
    }

    /// Restores partition `p` from sled and reconciles sled's positions with the group's committed
    /// offsets: positions behind them mean the store is not this group's (an error); positions
    /// ahead mean a crash between the sled write and the Kafka commit (the outbox is produced again).
    fn restore_partition<S: EventSourced>(
        &mut self,
        p: i32,
        at: &mut Restoring<'_, S>,
    ) -> Result<Restored<S>, FlowError> {
        let restored = self.backend.restore::<S>(&self.rt, p)?;
        let stored: HashMap<(String, i32), i64> =
            restored.positions.iter().map(|pos| ((pos.topic.clone(), pos.partition), pos.next_offset)).collect();
        let mut ahead = false;
        let mut seeks = Vec::new();
        let dir = self.backend.dir().display().to_string();
        for (topic, o) in at.tasks.task_offsets_mut(p).into_iter().flatten() {
            let sled_next = stored.get(&(topic.clone(), p)).copied().unwrap_or(-1);
            if sled_next < o.committed {
                return Err(FlowError::Config(format!(
                    "the sled journal at {} is behind the group's committed offset of {topic}[{p}] ({sled_next} < {}): its state was lost or belongs to another instance; a sled journal must stay with the instance that wrote it (use a Kafka journal to move partitions between instances)",
                    dir,
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
        let state = PartitionState::new(restored.entities.into_iter().collect());
        Ok(Restored { state, redo: ahead.then_some(restored.outbox) })
    }
}

impl<S: EventSourced> Storage<S> for SledStorage {
    fn name(&self) -> String {
        format!("sled:{}", self.backend.dir().display())
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

    /// Partitions are restored in full: nothing to read.
    fn fault_in(&mut self, _: i32, _: &mut PartitionState<S>, _: &S::Key) -> Result<(), FlowError> {
        Ok(())
    }

    /// Stages the command's events, and a snapshot when the sequence crosses a multiple of the
    /// snapshot interval.
    fn record(&mut self, c: Change<'_, S>, _: &PartitionState<S>) -> Result<Recorded, FlowError> {
        let envelopes = encode_events::<S>(self.codec, c.key, c.events, c.ts)?;
        let seq = SeqNo(c.before.0 + envelopes.len() as u64);
        let raw_key = c.key.to_bytes().into_owned();
        let every = self.snapshot_every;
        let snapshot = if every > 0 && seq.0 / every > c.before.0 / every {
            let envelope = eventstage_journal::Envelope::snapshot(
                self.codec.id(),
                S::STATE_VERSION,
                c.ts,
                encode_state::<S>(self.codec, c.key, c.state)?,
            );
            Some(SnapshotRecord { key: raw_key.clone(), seq, envelope })
        } else {
            None
        };
        let records = (c.before.0 + 1..)
            .zip(envelopes)
            .map(|(n, envelope)| EventRecord { key: raw_key.clone(), seq: SeqNo(n), envelope })
            .collect();
        self.backend.stage(c.p, records, snapshot);
        // A deleted entity keeps its events (and its sequence) in the sled journal.
        Ok(Recorded::default())
    }

    fn keep_output(&mut self, p: i32, record: OutputRecord) {
        self.backend.stage_output(p, record);
    }

    /// sled is the state of record: the transaction's events, positions and outbox are written,
    /// and fsynced on a thread of their own while the transaction's offsets travel and its last
    /// records are acknowledged; [`durable`](Storage::durable) waits for it, on the commit's
    /// thread, before the Kafka commit. A failed write stops the flow: the restart recovers from
    /// whatever sled holds.
    fn seal_transaction(&mut self, _: &TaskManager<S>, positions: Positions, _: Out<'_>) -> Result<bool, FlowError> {
        Storage::<S>::durable(self)()?;
        self.backend.write_unflushed::<S>(&self.rt, positions)?;
        self.flushing = Some(self.backend.flush_in_background()?);
        Ok(true)
    }

    fn durable(&mut self) -> Durable {
        let flushing = self.flushing.take();
        Box::new(move || {
            let Some(flushing) = flushing else { return Ok(()) };
            flushing.join().map_err(|_| FlowError::Crashed("the sled flush thread panicked".into()))??;
            crash_point_after_sled_write();
            Ok(())
        })
    }

    fn outbox(&self) -> Vec<OutputRecord> {
        self.backend.written().to_vec()
    }

    fn seal_batch(&mut self, id: usize, _: &TaskManager<S>, positions: Positions) -> Result<(), FlowError> {
        self.batches.push_back((id, self.backend.take_staged(), positions));
        Ok(())
    }

    /// One sled write (and fsync) with the batch's events and positions.
    fn write_batch(&mut self, id: usize, _: Out<'_>) -> Result<(), FlowError> {
        let Some((sealed, staged, positions)) = self.batches.pop_front() else { return Ok(()) };
        debug_assert_eq!(sealed, id, "batches are written in the order they were sealed");
        self.backend.write_staged::<S>(&self.rt, staged, positions, true)
    }

    fn drop_batches(&mut self) {
        self.batches.clear();
    }

    fn discard(&mut self) {
        self.backend.discard();
    }

    fn release(&mut self, p: i32) {
        self.backend.release(p);
    }

    /// Every commit was flushed: nothing is left to write.
    fn close(&mut self) {}
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
