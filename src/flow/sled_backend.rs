//! The sled journal in flows: events and consumed positions are stored together, with an outbox.
//!
//! At each commit the flow first writes, per input partition, one sled batch holding the
//! transaction's events (and due snapshots), the input positions it consumed up to, and its
//! **outbox** (the output records of the transaction), and fsyncs it; only then does it commit the
//! Kafka transaction with the outputs and offsets. sled is the state of record:
//!
//! - If the Kafka commit fails after the sled write, the flow aborts and produces the outbox again in
//!   a new transaction with the same offsets, until it commits.
//! - If the process dies between the two, the restarted flow finds sled positions ahead of the
//!   group's committed offsets: the inputs in between are not applied again (they are skipped), and
//!   their outputs are produced again from the outbox (invariant 2 with sled).

use super::{FlowError, OutputRecord};
use crate::codec::Codec;
use crate::replay::{recover, Entity};
use crate::stage::EventSourced;
use eventstage_journal::{
    Batch, EventRecord, Journal, Progress, SledJournal, SledStore, SnapshotRecord, SourcePosition,
};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const OUTBOX: &[u8] = b"flow/outbox";

/// What one partition's open transaction will write.
#[derive(Default)]
pub(super) struct Pending {
    events: Vec<EventRecord>,
    snapshots: Vec<SnapshotRecord>,
    outbox: Vec<OutputRecord>,
}

pub(super) struct SledBackend {
    dir: PathBuf,
    store: SledStore,
    journals: BTreeMap<i32, SledJournal>,
    pending: BTreeMap<i32, Pending>,
    /// The outbox of the last sled write, until Kafka commits it.
    written: Vec<OutputRecord>,
}

/// What a batch will write, taken out of the backend (at-least-once: written once the batch's
/// outputs are acknowledged, while later batches stage theirs).
pub(super) type Staged = BTreeMap<i32, Pending>;

/// A partition restored from sled.
pub(super) struct Restored<S: EventSourced> {
    pub(super) entities: HashMap<S::Key, Entity<S>>,
    pub(super) positions: Vec<SourcePosition>,
    pub(super) outbox: Vec<OutputRecord>,
}

impl SledBackend {
    pub(super) fn open(dir: &Path) -> Result<Self, FlowError> {
        Ok(Self {
            dir: dir.to_path_buf(),
            store: SledStore::open(dir)?,
            journals: BTreeMap::new(),
            pending: BTreeMap::new(),
            written: Vec::new(),
        })
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    fn journal<S: EventSourced>(&mut self, p: i32) -> Result<SledJournal, FlowError> {
        if let Some(j) = self.journals.get(&p) {
            return Ok(j.clone());
        }
        let j = self.store.journal(&format!("{}/p{p}", S::NAME))?;
        self.journals.insert(p, j.clone());
        Ok(j)
    }

    pub(super) fn restore<S: EventSourced>(
        &mut self,
        rt: &tokio::runtime::Runtime,
        p: i32,
    ) -> Result<Restored<S>, FlowError> {
        let journal = self.journal::<S>(p)?;
        let (map, stats) = rt.block_on(recover::<S, _>(&journal, &Progress::none()))?;
        let positions = rt.block_on(journal.positions())?;
        let outbox = match rt.block_on(journal.meta(OUTBOX))? {
            Some(bytes) => Codec::Bincode.decode(&bytes).map_err(|source| crate::Error::Decode {
                stage: S::NAME.into(),
                key: format!("(outbox of partition {p})"),
                seq: 0,
                source,
            })?,
            None => Vec::new(),
        };
        tracing::info!(
            partition = p,
            keys = stats.keys,
            snapshots = stats.snapshots,
            events = stats.events,
            "restored partition state from sled"
        );
        Ok(Restored { entities: map.into_iter().collect(), positions, outbox })
    }

    pub(super) fn stage(&mut self, p: i32, events: Vec<EventRecord>, snapshot: Option<SnapshotRecord>) {
        let pending = self.pending.entry(p).or_default();
        pending.events.extend(events);
        pending.snapshots.extend(snapshot);
    }

    pub(super) fn stage_output(&mut self, p: i32, record: OutputRecord) {
        self.pending.entry(p).or_default().outbox.push(record);
    }

    /// Forgets the open transaction (it was aborted before anything was written to sled).
    pub(super) fn discard(&mut self) {
        self.pending.clear();
    }

    pub(super) fn release(&mut self, p: i32) {
        self.pending.remove(&p);
        self.journals.remove(&p);
    }

    /// Writes and fsyncs every touched partition's batch (events, snapshots, positions, outbox).
    /// `positions` holds the positions to store per partition.
    pub(super) fn write<S: EventSourced>(
        &mut self,
        rt: &tokio::runtime::Runtime,
        positions: BTreeMap<i32, Vec<SourcePosition>>,
    ) -> Result<(), FlowError> {
        let staged = self.take_staged();
        self.write_staged::<S>(rt, staged, positions)
    }

    /// Takes what the open batch staged.
    pub(super) fn take_staged(&mut self) -> Staged {
        std::mem::take(&mut self.pending)
    }

    /// Writes and fsyncs `staged` with `positions` (see [`write`](Self::write)).
    pub(super) fn write_staged<S: EventSourced>(
        &mut self,
        rt: &tokio::runtime::Runtime,
        mut staged: Staged,
        positions: BTreeMap<i32, Vec<SourcePosition>>,
    ) -> Result<(), FlowError> {
        let mut written = Vec::new();
        for (p, positions) in positions {
            if !self.journals.contains_key(&p) && !staged.contains_key(&p) {
                continue; // released since: the partition is another instance's now
            }
            let pending = staged.remove(&p).unwrap_or_default();
            let outbox = Codec::Bincode.encode(&pending.outbox).map_err(|source| crate::Error::Encode {
                stage: S::NAME.into(),
                key: format!("(outbox of partition {p})"),
                source,
            })?;
            let batch = Batch {
                events: pending.events,
                snapshots: pending.snapshots,
                positions,
                meta: vec![(OUTBOX.to_vec(), Some(outbox))],
            };
            let journal = self.journal::<S>(p)?;
            rt.block_on(async {
                journal.append(batch).await?;
                journal.flush().await
            })?;
            written.extend(pending.outbox);
        }
        self.written = written;
        Ok(())
    }

    /// The outputs of the last write, for producing them again.
    pub(super) fn written(&self) -> &[OutputRecord] {
        &self.written
    }
}
