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
use crate::flow::shared::lock;
use crate::replay::{recover, Entity};
use crate::stage::EventSourced;
use eventstage_journal::{
    Batch, EventRecord, Journal, Progress, SledJournal, SledStore, SnapshotRecord, SourcePosition,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// What one partition's open transaction or batch will write.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) events: Vec<EventRecord>,
    pub(super) snapshots: Vec<SnapshotRecord>,
    pub(super) outbox: Vec<OutputRecord>,
}

/// One partition's sled journal (`<stage>/p<partition>`), as a flow reads and writes it.
pub(super) struct PartitionJournal {
    p: i32,
    stage: &'static str,
    journal: SledJournal,
    /// Runs the sled journal's async calls.
    rt: Arc<tokio::runtime::Runtime>,
    /// The outbox chunks stored (those beyond a new outbox are deleted), and whether the
    /// partition still holds an outbox in the format before.
    chunks: Mutex<(u32, bool)>,
}

/// A partition restored from sled.
pub(super) struct Restored<S: EventSourced> {
    pub(super) entities: HashMap<S::Key, Entity<S>>,
    pub(super) positions: Vec<SourcePosition>,
    pub(super) outbox: Vec<OutputRecord>,
}

impl PartitionJournal {
    /// Restores partition `p` of `S`'s journal in `store`: its entities, the input positions they
    /// include and the outbox of its last write.
    pub(super) fn restore<S: EventSourced>(
        store: &SledStore,
        rt: Arc<tokio::runtime::Runtime>,
        p: i32,
    ) -> Result<(Self, Restored<S>), FlowError> {
        let journal = store.journal(&format!("{}/p{p}", S::NAME))?;
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
        tracing::info!(
            partition = p,
            keys = stats.keys,
            snapshots = stats.snapshots,
            events = stats.events,
            "restored partition state from sled"
        );
        let restored = Restored { entities: map.into_iter().collect(), positions, outbox };
        let journal = Self { p, stage: S::NAME, journal, rt, chunks: Mutex::new((count, legacy.is_some())) };
        Ok((journal, restored))
    }

    /// Writes one sled batch with the partition's `events`, `snapshots`, the input `positions`
    /// they include and its `outbox`, without waiting for the disk: the caller makes it durable
    /// (one fsync of the sled database for every partition) before anything depends on it.
    pub(super) fn write(
        &self,
        events: Vec<EventRecord>,
        snapshots: Vec<SnapshotRecord>,
        positions: Vec<SourcePosition>,
        outbox: &[OutputRecord],
    ) -> Result<(), FlowError> {
        let p = self.p;
        let outbox = Codec::Bincode.encode(outbox).map_err(|source| crate::Error::Encode {
            stage: self.stage.into(),
            key: format!("(outbox of partition {p})"),
            source,
        })?;
        let mut chunks = lock(&self.chunks);
        let (before, legacy) = *chunks;
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
        let batch = Batch { events, snapshots, positions, meta };
        // One sled value per key and transaction (see `SledJournal::append_grouped`).
        self.rt.block_on(self.journal.append_grouped(batch))?;
        *chunks = (count, false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::bank::Bank;
    use std::path::Path;

    fn records(n: usize) -> Vec<OutputRecord> {
        (0..n).map(|i| OutputRecord::new("replies", format!("k{i}"), vec![7u8; 20])).collect()
    }

    fn reopened(dir: &Path, rt: &Arc<tokio::runtime::Runtime>) -> (PartitionJournal, Vec<OutputRecord>) {
        let store = SledStore::open(dir).unwrap();
        let (journal, restored) = PartitionJournal::restore::<Bank>(&store, rt.clone(), 0).unwrap();
        (journal, restored.outbox)
    }

    fn write(journal: &PartitionJournal, rt: &tokio::runtime::Runtime, outbox: &[OutputRecord]) {
        journal.write(Vec::new(), Vec::new(), Vec::new(), outbox).unwrap();
        rt.block_on(journal.journal.flush()).unwrap();
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
        let rt = Arc::new(rt);
        let (journal, outbox) = reopened(dir.path(), &rt);
        assert_eq!(outbox, records(3));

        let big = records(5000);
        write(&journal, &rt, &big);
        drop(journal);
        let (journal, outbox) = reopened(dir.path(), &rt);
        assert_eq!(outbox, big);
        let meta = |journal: &PartitionJournal, key: &[u8]| rt.block_on(journal.journal.meta(key)).unwrap();
        assert_eq!(meta(&journal, OUTBOX_LEGACY), None, "the old value is gone");
        let chunks = u32::from_be_bytes(meta(&journal, OUTBOX_CHUNKS).unwrap().try_into().unwrap());
        assert!(chunks > 2, "{chunks} chunks");

        write(&journal, &rt, &records(1));
        drop(journal);
        let (journal, outbox) = reopened(dir.path(), &rt);
        assert_eq!(outbox, records(1));
        for i in 1..chunks {
            assert_eq!(meta(&journal, &outbox_chunk_key(i)), None, "chunk {i} is gone");
        }
    }
}
