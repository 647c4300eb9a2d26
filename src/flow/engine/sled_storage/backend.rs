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

use crate::codec::Codec;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::replay::{recover, Entity};
use crate::stage::EventSourced;
use eventstage_journal::{
    Batch, EventRecord, Journal, Progress, SledJournal, SledStore, SnapshotRecord, SourcePosition,
};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The outbox of the last write: the bincode of its records, in chunks of at most
/// [`OUTBOX_CHUNK`] bytes under `flow/outbox/<i>` (i: u32 BE) and their count (u32 BE) under
/// `flow/outbox.chunks`. As one value (the format before, still read), sled wrote a commit's
/// outbox to a file of its own per partition and serialized it again whenever its node changed.
const OUTBOX_CHUNKS: &[u8] = b"flow/outbox.chunks";
const OUTBOX_LEGACY: &[u8] = b"flow/outbox";
const OUTBOX_CHUNK: usize = 16 * 1024;

fn outbox_chunk_key(i: u32) -> Vec<u8> {
    let mut key = b"flow/outbox/".to_vec();
    key.extend_from_slice(&i.to_be_bytes());
    key
}

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
    /// Per partition, the outbox chunks stored (those beyond a new outbox are deleted), and
    /// whether the partition still holds an outbox in the format before.
    chunks: BTreeMap<i32, (u32, bool)>,
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
            chunks: BTreeMap::new(),
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
        let decode_err = |source| crate::Error::Decode {
            stage: S::NAME.into(),
            key: format!("(outbox of partition {p})"),
            seq: 0,
            source,
        };
        let legacy = rt.block_on(journal.meta(OUTBOX_LEGACY))?;
        let count = match rt.block_on(journal.meta(OUTBOX_CHUNKS))? {
            Some(b) => u32::from_be_bytes(b.as_slice().try_into().map_err(|_| {
                FlowError::from(crate::Error::from(eventstage_journal::JournalError::Damaged {
                    journal: format!("{}/p{p}", S::NAME),
                    what: format!("the outbox chunk count has {} bytes, not 4", b.len()),
                }))
            })?),
            None => 0,
        };
        let outbox = if count > 0 {
            let mut bytes = Vec::new();
            for i in 0..count {
                let chunk = rt.block_on(journal.meta(&outbox_chunk_key(i)))?.ok_or_else(|| {
                    FlowError::from(crate::Error::from(eventstage_journal::JournalError::Damaged {
                        journal: format!("{}/p{p}", S::NAME),
                        what: format!("outbox chunk {i} of {count} is missing"),
                    }))
                })?;
                bytes.extend_from_slice(&chunk);
            }
            Codec::Bincode.decode(&bytes).map_err(decode_err)?
        } else {
            match &legacy {
                Some(bytes) => Codec::Bincode.decode(bytes).map_err(decode_err)?,
                None => Vec::new(),
            }
        };
        self.chunks.insert(p, (count, legacy.is_some()));
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
        self.chunks.remove(&p);
    }

    /// Writes every touched partition's batch (events, snapshots, positions, outbox) with
    /// `positions` (the positions to store per partition), without waiting for the disk: the
    /// caller makes it durable with
    /// [`flush_in_background`](Self::flush_in_background) and waits for that before anything
    /// depends on it.
    pub(super) fn write_unflushed<S: EventSourced>(
        &mut self,
        rt: &tokio::runtime::Runtime,
        positions: BTreeMap<i32, Vec<SourcePosition>>,
    ) -> Result<(), FlowError> {
        let staged = self.take_staged();
        self.write_staged::<S>(rt, staged, positions, false)
    }

    /// Makes everything written so far durable (one fsync of the sled database) on a thread of
    /// its own.
    pub(super) fn flush_in_background(&self) -> Result<std::thread::JoinHandle<Result<(), FlowError>>, FlowError> {
        let store = self.store.clone();
        std::thread::Builder::new()
            .name("eventstage-sled-flush".into())
            .spawn(move || store.flush().map_err(FlowError::from))
            .map_err(|e| FlowError::Config(format!("cannot start the sled flush thread: {e}")))
    }

    /// Takes what the open batch staged.
    pub(super) fn take_staged(&mut self) -> Staged {
        std::mem::take(&mut self.pending)
    }

    /// Writes `staged` with `positions` (see [`write_unflushed`](Self::write_unflushed)), and
    /// fsyncs it if `flush`.
    pub(super) fn write_staged<S: EventSourced>(
        &mut self,
        rt: &tokio::runtime::Runtime,
        mut staged: Staged,
        positions: BTreeMap<i32, Vec<SourcePosition>>,
        flush: bool,
    ) -> Result<(), FlowError> {
        let mut written = Vec::new();
        let mut appended = Vec::new();
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
            let (before, legacy) = self.chunks.get(&p).copied().unwrap_or_default();
            let mut meta: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
            let mut count = 0u32;
            for chunk in outbox.chunks(OUTBOX_CHUNK) {
                meta.push((outbox_chunk_key(count), Some(chunk.to_vec())));
                count += 1;
            }
            meta.extend((count..before).map(|i| (outbox_chunk_key(i), None)));
            meta.push((OUTBOX_CHUNKS.to_vec(), Some(count.to_be_bytes().to_vec())));
            if legacy {
                meta.push((OUTBOX_LEGACY.to_vec(), None));
            }
            let batch = Batch { events: pending.events, snapshots: pending.snapshots, positions, meta };
            let journal = self.journal::<S>(p)?;
            // One sled value per key and transaction (see `SledJournal::append_grouped`).
            rt.block_on(journal.append_grouped(batch))?;
            self.chunks.insert(p, (count, false));
            appended.push(journal);
            written.extend(pending.outbox);
        }
        // One sled database under every partition: the first flush makes them all durable, the
        // others find nothing left to write.
        if flush {
            for journal in appended {
                rt.block_on(journal.flush())?;
            }
        }
        self.written = written;
        Ok(())
    }

    /// The outputs of the last write, for producing them again.
    pub(super) fn written(&self) -> &[OutputRecord] {
        &self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::bank::Bank;

    fn records(n: usize) -> Vec<OutputRecord> {
        (0..n).map(|i| OutputRecord::new("replies", format!("k{i}"), vec![7u8; 20])).collect()
    }

    fn reopened(dir: &Path, rt: &tokio::runtime::Runtime) -> (SledBackend, Vec<OutputRecord>) {
        let mut backend = SledBackend::open(dir).unwrap();
        let outbox = backend.restore::<Bank>(rt, 0).unwrap().outbox;
        (backend, outbox)
    }

    fn write(backend: &mut SledBackend, rt: &tokio::runtime::Runtime, outbox: &[OutputRecord]) {
        for o in outbox {
            backend.stage_output(0, o.clone());
        }
        let staged = backend.take_staged();
        backend.write_staged::<Bank>(rt, staged, BTreeMap::from([(0, Vec::new())]), true).unwrap();
    }

    /// An outbox stored as one value (the format before) is read, and replaced by chunks; a
    /// smaller outbox leaves no chunk of a bigger one behind.
    #[test]
    fn outboxes_are_chunked_and_the_format_before_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let journal = store.journal("bank/p0").unwrap();
            let legacy = Codec::Bincode.encode(&records(3)).unwrap();
            let batch = Batch { meta: vec![(OUTBOX_LEGACY.to_vec(), Some(legacy))], ..Batch::default() };
            rt.block_on(journal.append(batch)).unwrap();
            rt.block_on(journal.flush()).unwrap();
        }
        let (mut backend, outbox) = reopened(dir.path(), &rt);
        assert_eq!(outbox, records(3));

        let big = records(5000);
        write(&mut backend, &rt, &big);
        drop(backend);
        let (mut backend, outbox) = reopened(dir.path(), &rt);
        assert_eq!(outbox, big);
        let journal = backend.journal::<Bank>(0).unwrap();
        assert_eq!(rt.block_on(journal.meta(OUTBOX_LEGACY)).unwrap(), None, "the old value is gone");
        let chunks = rt.block_on(journal.meta(OUTBOX_CHUNKS)).unwrap().unwrap();
        let chunks = u32::from_be_bytes(chunks.try_into().unwrap());
        assert!(chunks > 2, "{chunks} chunks");

        write(&mut backend, &rt, &records(1));
        drop((backend, journal));
        let (backend, outbox) = reopened(dir.path(), &rt);
        assert_eq!(outbox, records(1));
        let mut backend = backend;
        let journal = backend.journal::<Bank>(0).unwrap();
        for i in 1..chunks {
            assert_eq!(rt.block_on(journal.meta(&outbox_chunk_key(i))).unwrap(), None, "chunk {i} is gone");
        }
    }
}
