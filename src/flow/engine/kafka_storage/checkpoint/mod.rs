//! A local state store over the Kafka journal: per journal partition, the newest journal entry of
//! each key and the journal offset the rows are complete up to. The compacted topic stays the
//! state of record; the store is a checkpoint of it, so that a restart or an assignment reads only
//! the journal's tail beyond the checkpoint instead of the whole partition.
//!
//! The store is written by a follower thread of its own, and only ever holds committed
//! transactions; the flow thread never waits for it. Exactly once, the flow hands the follower the
//! journal records of each transaction it commits (`Command::Rows`, stamped with the offset they
//! are all below: the partition's newest acknowledged record), so that what the flow just wrote is
//! not read back from the broker; the follower reads the journal with `read_committed` only where
//! the flow's own records do not reach: a restored partition's tail up to where the flow's writes
//! start (`Command::Own`), standbys, partitions given away, and every partition at least once.
//! Rows are written in chunks and a partition's offset last, then flushed. A crash in between
//! leaves rows newer than the stored offset; a restore reads the journal again from that offset
//! and applies the same records in the same order, which ends in the same state (the newest record
//! per key wins), so the offset never runs ahead of the rows it describes. A SIGKILL wipes nothing:
//! the checkpoint is older, and the tail makes it current.
//!
//! A store that is not what it claims to be is never trusted: a store of another journal topic or
//! stage, one sled cannot open, a row that does not decode, or a checkpoint ahead of the topic (the
//! topic was deleted and created again) drops the partition's rows (or the whole store) with a
//! warning that names the cause, and the partition is restored from the journal in full.
//!
//! ```text
//! DIR/eventstage-state.json   identifies the directory: format version, journal topic, stage
//! DIR/sled/                   the sled database:
//!     tree `offsets`: partition (i32 BE) -> next journal offset (i64 BE) | released at (u64 BE ms, 0: held)
//!     keyspace `p<partition>`: entity key -> the row of the key's newest journal record (see `row`)
//! ```

mod common;
mod follower;
mod row;
mod store;

pub(super) use common::JournalRecord;
pub use common::Standby;
pub(crate) use common::{StoreMemory, StoreSettings};
pub(super) use row::read_row;
pub(super) use store::Rows;

use super::super::cache::StoreProgress;
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::shared::{kafka, lock};
use common::{config_err, Command, Loaded, Owned, CLOSE_TIMEOUT};
use eventstage_journal::kafka::ReaderContext;
use eventstage_journal::KafkaJournal;
use follower::Follower;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;
use store::LocalStore;

/// Reads the store's partitions for stale queries, from their threads.
pub(super) struct StandbyReader {
    store: LocalStore,
    topic: String,
    common: ClientConfig,
    /// The client that asks the journal's ends: made by the first stale query, not at the flow's
    /// start (`None`: it could not be made).
    marks: std::sync::OnceLock<Option<BaseConsumer<ReaderContext>>>,
}

impl StandbyReader {
    /// `key`'s row in partition `p` (or in any partition the store keeps) not in `owned`: its
    /// partition, row, the store's next offset and the journal partition's end.
    #[allow(clippy::type_complexity)]
    pub(super) fn get(
        &self,
        p: Option<i32>,
        key: &[u8],
        owned: &[i32],
    ) -> Result<Option<(i32, Vec<u8>, i64, Option<i64>)>, String> {
        let candidates = match p {
            Some(p) => vec![p],
            None => self.store.partitions().map_err(|e| e.to_string())?,
        };
        for p in candidates.into_iter().filter(|p| !owned.contains(p)) {
            let Some((next, _)) = self.store.position(p)? else { continue };
            let rows = self.store.rows(p).map_err(|e| e.to_string())?;
            if let Some(row) = rows.get(key).map_err(|e| format!("the local store: {e}"))? {
                let marks = self.marks.get_or_init(|| {
                    self.common
                        .create_with_context(ReaderContext { what: "standby query watermarks" })
                        .inspect_err(|e| tracing::warn!(error = %e, "cannot ask the journal's ends for stale queries"))
                        .ok()
                });
                let end = marks
                    .as_ref()
                    .and_then(|m| m.fetch_watermarks(&self.topic, p, Duration::from_secs(2)).ok())
                    .map(|(_, high)| high);
                return Ok(Some((p, row.to_vec(), next, end)));
            }
        }
        Ok(None)
    }
}

/// The local state store and its follower thread.
pub(super) struct Checkpoints {
    store: LocalStore,
    topic: String,
    /// The partitions this instance owns: their rows are read by the flow and never dropped
    /// behind its back (the follower drops a partition only when asked, or one not owned).
    owned: Owned,
    commands: Sender<Command>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// Without standbys, for a flow that does not hand over its rows: asks for a released
    /// partition's end offset.
    marks: Option<BaseConsumer<ReaderContext>>,
}

impl Checkpoints {
    /// Opens the store in `settings.dir` and starts its follower (`handed_over`: the flow hands
    /// it the rows of what it commits, see [`Self::own`]).
    pub(super) fn start(
        settings: &StoreSettings,
        journal: &KafkaJournal,
        common: &ClientConfig,
        stage: &str,
        metrics: Arc<Metrics>,
        progress: Arc<StoreProgress>,
        handed_over: bool,
    ) -> Result<Self, FlowError> {
        let store =
            LocalStore::open(&settings.dir, journal.topic(), stage, journal.partitions(), settings.memory, &metrics)?;
        store.expire(settings.retention)?;
        let mut config = common.clone();
        config
            .set("group.id", format!("eventstage-checkpoint-{}", journal.topic()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            // librdkafka prefetches up to 64 MiB by default; 16 MiB (about 100 000 journal records)
            // keeps the follower busy and the process smaller.
            .set("queued.max.messages.kbytes", "16384");
        let consumer: BaseConsumer<ReaderContext> = config
            .create_with_context(ReaderContext { what: "checkpoint follower" })
            .map_err(|e| kafka("checkpoint consumer", e))?;
        let (commands, rx) = std::sync::mpsc::channel();
        let owned = Owned::default();
        let follower =
            Follower::new(owned.clone(), store.clone(), journal.topic(), consumer, settings, progress, metrics.clone());
        // Standbys from the start: every partition, or those this store kept after they went.
        let standbys = match settings.standby {
            Standby::All => (0..journal.partitions()).collect(),
            Standby::Recent => store.partitions()?,
            Standby::None => Vec::new(),
        };
        for p in standbys {
            let _ = commands.send(Command::Standby(p));
        }
        let thread = std::thread::Builder::new()
            .name("eventstage-checkpoint".into())
            .spawn(move || follower.run(&rx))
            .map_err(|e| config_err(&settings.dir, format!("cannot start the checkpoint thread: {e}")))?;
        // A flow that hands over its rows has handed over everything it committed when it releases
        // a partition: the follower needs no end offset (and asks itself for one of a partition it
        // was still catching up with).
        let marks = match settings.standby {
            Standby::None if !handed_over => Some(
                common
                    .create_with_context(ReaderContext { what: "checkpoint watermarks" })
                    .map_err(|e| kafka("checkpoint watermarks client", e))?,
            ),
            Standby::None | Standby::Recent | Standby::All => None,
        };
        Ok(Self {
            store,
            topic: journal.topic().to_string(),
            owned,
            commands,
            thread: std::sync::Mutex::new(Some(thread)),
            metrics,
            marks,
        })
    }

    /// Partition `p`'s checkpoint, for a restore on its assignment (`marks`: the journal
    /// partition's low and high watermarks now). A checkpoint that cannot be used is dropped with
    /// a warning, and the partition is restored from the journal in full.
    pub(super) fn load(&self, p: i32, marks: (i64, i64)) -> Result<Loaded, FlowError> {
        lock(&self.owned).insert(p);
        match self.store.load(p, marks)? {
            Ok(loaded) => Ok(loaded),
            Err(why) => {
                self.drop_partition(p, &why);
                Ok(Loaded::empty())
            }
        }
    }

    /// A reader of the partitions the store keeps besides the owned ones, for stale queries
    /// (`common`: the client settings to ask the journal's ends with).
    pub(super) fn standby_reader(&self, common: &ClientConfig) -> StandbyReader {
        StandbyReader {
            store: self.store.clone(),
            topic: self.topic.clone(),
            common: common.clone(),
            marks: std::sync::OnceLock::new(),
        }
    }

    /// Partition `p`'s rows (an empty tree when the store has none).
    pub(super) fn rows(&self, p: i32) -> Result<Rows, FlowError> {
        self.store.rows(p)
    }

    /// Drops partition `p`'s rows and checkpoint because of `why` (the follower does it, so that
    /// it does not write on top of the emptied partition), with a warning.
    pub(super) fn drop_partition(&self, p: i32, why: &str) {
        tracing::warn!(dir = %self.store.dir.display(), journal = %self.topic, partition = p, "local state store: {why}; restoring the partition from the journal in full");
        self.metrics.store_dropped.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        if self.commands.send(Command::Reset(p, tx)).is_ok() {
            let _ = rx.recv_timeout(CLOSE_TIMEOUT);
        }
    }

    /// Keeps partition `p`'s checkpoint current from now on, for a restore that waits for the
    /// store to have it up to its end (its rows are written as soon as they are read).
    pub(super) fn restore(&self, p: i32) {
        let _ = self.commands.send(Command::Restore(p));
    }

    /// Keeps partition `p`'s checkpoint current from now on.
    pub(super) fn follow(&self, p: i32) {
        let _ = self.commands.send(Command::Follow(p));
    }

    /// Keeps partition `p`'s checkpoint current from now on with the rows of each transaction the
    /// flow commits ([`Self::committed`]): the journal is read only up to `from`, where the
    /// flow's own records start. The follower does not read back what the flow just wrote.
    pub(super) fn own(&self, p: i32, from: i64) {
        let _ = self.commands.send(Command::Own(p, from));
    }

    /// A transaction the flow committed wrote `records` to partition `p`, all below journal offset
    /// `next`: they go to the store as the follower would have read them.
    pub(super) fn committed(&self, p: i32, records: Arc<Vec<JournalRecord>>, next: i64) {
        let _ = self.commands.send(Command::Rows(p, records, next));
    }

    /// Partition `p` was revoked: its checkpoint is brought up to the end of what was committed,
    /// and kept (until the retention drops it).
    pub(super) fn release(&self, p: i32) {
        lock(&self.owned).remove(&p);
        // Without standbys the follower stops at the partition's end as of now (this instance's
        // last commit), taken here: the follower may be busy reading, and by the time it asked,
        // the new owner could have written (not for a flow that hands over its rows: `marks`).
        let end = self.marks.as_ref().and_then(|marks| match marks.fetch_watermarks(&self.topic, p, Duration::from_secs(5)) {
            Ok((_, high)) => Some(high),
            Err(e) => {
                tracing::warn!(error = %e, journal = %self.topic, partition = p, "cannot read the end of a released journal partition; the local store follows it a little longer");
                None
            }
        });
        let _ = self.commands.send(Command::Release(p, end));
    }

    /// Brings every checkpoint up to the journal's end and stops the follower (waits up to
    /// [`CLOSE_TIMEOUT`]).
    pub(super) fn close(&self) {
        self.stop(true);
    }

    fn stop(&self, catch_up: bool) {
        let Some(thread) = lock(&self.thread).take() else { return };
        let (tx, rx) = std::sync::mpsc::channel();
        let command = if catch_up { Command::Close(tx) } else { Command::Quit };
        if self.commands.send(command).is_ok() && catch_up {
            let _ = rx.recv_timeout(CLOSE_TIMEOUT + Duration::from_secs(5));
        }
        let _ = thread.join();
    }
}

impl Drop for Checkpoints {
    /// Without [`close`](Self::close) (the flow failed or was aborted), the follower writes what it
    /// has read and stops, without reading on to the journal's end.
    fn drop(&mut self) {
        self.stop(false);
    }
}
