//! A table's local store: fjall (an LSM tree, with a block cache and memtables of a set size),
//! holding the newest row per key, the consumed offsets and, per partition, how many rows and
//! bytes it holds.
//!
//! Two ways to write it:
//! - **Checkpoints** (a table that holds every row in memory): the changed rows in batches of
//!   [`CHUNK`], the offsets last, then a flush. A crash in between leaves rows newer than the
//!   stored offsets; the restart reads the topic again from those offsets and applies the same
//!   records in the same order, which ends in the same rows (last write wins is idempotent). So
//!   the store is never ahead of what a restart can repair.
//! - **Applied batches** (a table with a row cache, [`TableBuilder::cache`](super::TableBuilder::cache)):
//!   the store is where the rows are. Each batch of records the follower applies is one atomic
//!   write of its rows, the offsets and the partitions' counts, so the store (and every snapshot
//!   of it) always holds whole batches; a flush makes them durable once per checkpoint interval.
//!
//! ```text
//! DIR/eventstage-table.json   identifies the directory: format version and topic
//! DIR/fjall/                  the database:
//!     keyspace `rows`:    record key -> partition (i32 BE) | record value
//!     keyspace `offsets`: partition (i32 BE) -> next offset to read (i64 BE)
//!                         [| rows (u64 BE) | bytes (u64 BE): written with applied batches]
//! ```
//!
//! Format 1 kept the same entries in sled (`DIR/sled/`); a store of format 1 is dropped with a
//! warning and the table is read again from its topic.

use super::TableError;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const MARKER: &str = "eventstage-table.json";
/// 1: sled (before 2026-12-05); 2: fjall.
const FORMAT_VERSION: u32 = 2;
const DATA: &str = "fjall";
const OLD_DATA: &str = "sled";
/// Rows per write batch of a checkpoint.
const CHUNK: usize = 10_000;

#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    format: u32,
    topic: String,
}

/// A row to write: `Some((partition, value))`, or `None` to delete the key.
pub(super) type PendingRow = Option<(i32, Vec<u8>)>;

/// How many rows of a partition the store holds, and their bytes (keys and values as read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Count {
    pub(super) rows: u64,
    pub(super) bytes: u64,
}

/// A partition's entry in the `offsets` keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Position {
    pub(super) next: i64,
    /// Written with applied batches only.
    pub(super) count: Option<Count>,
}

/// What the store may hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StoreMemory {
    pub(super) cache: u64,
    pub(super) memtable: u64,
}

impl StoreMemory {
    /// For a table that holds its rows in memory (the store is written once a second).
    pub(super) const CHECKPOINTS: Self = Self { cache: 8 << 20, memtable: 16 << 20 };
}

#[derive(Clone)]
pub(super) struct TableStore {
    path: PathBuf,
    db: fjall::Database,
    rows: fjall::Keyspace,
    offsets: fjall::Keyspace,
}

/// Removes `dir` and what it holds; a missing one is fine.
fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl TableStore {
    /// Opens (or creates) the store at `path` for `topic`.
    pub(super) fn open(path: &Path, topic: &str, memory: StoreMemory) -> Result<Self, TableError> {
        let err = |message: String| TableError::Store { path: path.display().to_string(), message };
        let marker_path = path.join(MARKER);
        let mut write_marker = !marker_path.exists();
        if marker_path.exists() {
            let raw = std::fs::read(&marker_path).map_err(|e| err(format!("cannot read {MARKER}: {e}")))?;
            let marker: Marker = serde_json::from_slice(&raw).map_err(|e| TableError::NotAStore {
                path: path.display().to_string(),
                why: format!("{MARKER} does not parse: {e}"),
            })?;
            if marker.format > FORMAT_VERSION {
                return Err(err(format!(
                    "store format {} is newer than this eventstage understands ({FORMAT_VERSION}): upgrade eventstage, or use another directory",
                    marker.format
                )));
            }
            if marker.topic != topic {
                return Err(TableError::StoreMismatch {
                    path: path.display().to_string(),
                    found: marker.topic,
                    expected: topic.into(),
                });
            }
            if marker.format < FORMAT_VERSION {
                tracing::warn!(path = %path.display(), format = marker.format, "the table store is of an older format (sled); dropping it and reading the table from its topic again");
                remove_dir(&path.join(OLD_DATA)).map_err(|e| err(format!("cannot remove the old store: {e}")))?;
                write_marker = true;
            }
        } else {
            let occupied = path.exists()
                && std::fs::read_dir(path)
                    .map_err(|e| err(format!("cannot list the directory: {e}")))?
                    .next()
                    .is_some();
            if occupied {
                return Err(TableError::NotAStore {
                    path: path.display().to_string(),
                    why: format!("the directory is not empty and has no {MARKER}"),
                });
            }
            std::fs::create_dir_all(path).map_err(|e| err(format!("cannot create the directory: {e}")))?;
        }
        if write_marker {
            let marker = serde_json::to_vec_pretty(&Marker { format: FORMAT_VERSION, topic: topic.into() })
                .map_err(|e| err(e.to_string()))?;
            std::fs::write(&marker_path, marker).map_err(|e| err(format!("cannot write {MARKER}: {e}")))?;
        }
        let db = crate::local_store::database(&path.join(DATA), memory.cache).open().map_err(|e| match e {
            fjall::Error::Locked => err(
                "fjall: the database is locked (is another process using this store? one table per store directory)"
                    .into(),
            ),
            e => err(format!("fjall: {e}; delete the directory to rebuild the table from its topic")),
        })?;
        let keyspace = |name: &str, memtable: u64| {
            db.keyspace(name, || crate::local_store::rows_keyspace(memtable)).map_err(|e| err(format!("fjall: {e}")))
        };
        let rows = keyspace("rows", memory.memtable)?;
        let offsets = keyspace("offsets", 1 << 20)?;
        Ok(Self { path: path.to_path_buf(), db, rows, offsets })
    }

    /// The store's directory, for messages.
    pub(super) fn path(&self) -> String {
        self.path.display().to_string()
    }

    pub(super) fn storage(&self, e: impl std::fmt::Display) -> TableError {
        TableError::Store { path: self.path.display().to_string(), message: format!("fjall: {e}") }
    }

    pub(super) fn damaged(&self, what: String) -> TableError {
        TableError::Store {
            path: self.path.display().to_string(),
            message: format!("damaged: {what}; delete the directory to rebuild the table from its topic"),
        }
    }

    /// The checkpointed position of each partition.
    pub(super) fn positions(&self) -> Result<BTreeMap<i32, Position>, TableError> {
        self.positions_in(&self.db.snapshot())
    }

    /// The positions as of `snapshot`.
    pub(super) fn positions_in(&self, snapshot: &fjall::Snapshot) -> Result<BTreeMap<i32, Position>, TableError> {
        use fjall::Readable;
        let mut out = BTreeMap::new();
        for item in snapshot.iter(&self.offsets) {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            let p = <[u8; 4]>::try_from(k.as_ref()).ok().map(i32::from_be_bytes);
            let word = |i: usize| v.get(i * 8..i * 8 + 8).and_then(|b| <[u8; 8]>::try_from(b).ok());
            let position = match (p, v.len()) {
                (Some(p), 8 | 24) => {
                    let next = word(0).map(i64::from_be_bytes).unwrap_or_default();
                    let count = match (word(1), word(2)) {
                        (Some(rows), Some(bytes)) => {
                            Some(Count { rows: u64::from_be_bytes(rows), bytes: u64::from_be_bytes(bytes) })
                        }
                        _ => None,
                    };
                    (p, Position { next, count })
                }
                _ => return Err(self.damaged(format!("an offset entry has {} bytes, not 8 or 24", v.len()))),
            };
            out.insert(position.0, position.1);
        }
        Ok(out)
    }

    /// Every stored row: `(key, partition, value)`, in key order.
    pub(super) fn rows(&self) -> impl Iterator<Item = Result<(Vec<u8>, i32, Vec<u8>), TableError>> + '_ {
        self.rows.iter().map(move |item| {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            let (partition, value) = self.split(&v)?;
            Ok((k.to_vec(), partition, value.to_vec()))
        })
    }

    /// A stored row's partition and value.
    pub(super) fn split<'a>(&self, row: &'a [u8]) -> Result<(i32, &'a [u8]), TableError> {
        match row.split_first_chunk::<4>() {
            Some((p, value)) => Ok((i32::from_be_bytes(*p), value)),
            None => Err(self.damaged("a row is shorter than its partition header".into())),
        }
    }

    /// The row of `key`: its partition and value.
    pub(super) fn get(&self, key: &[u8]) -> Result<Option<(i32, fjall::Slice)>, TableError> {
        match self.rows.get(key).map_err(|e| self.storage(e))? {
            Some(row) => Ok(Some((self.split(&row)?.0, row))),
            None => Ok(None),
        }
    }

    /// A consistent view of the store (whole applied batches).
    pub(super) fn snapshot(&self) -> fjall::Snapshot {
        self.db.snapshot()
    }

    /// The `rows` keyspace, to read through a snapshot.
    pub(super) fn rows_keyspace(&self) -> &fjall::Keyspace {
        &self.rows
    }

    /// Counts the rows and bytes of each partition (one pass over the store), for a store
    /// written by checkpoints, which do not keep counts.
    pub(super) fn count(&self) -> Result<BTreeMap<i32, Count>, TableError> {
        let mut out: BTreeMap<i32, Count> = BTreeMap::new();
        for item in self.rows.iter() {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            let (p, value) = self.split(&v)?;
            let c = out.entry(p).or_default();
            c.rows += 1;
            c.bytes += (k.len() + value.len()) as u64;
        }
        Ok(out)
    }

    fn put(batch: &mut fjall::OwnedWriteBatch, rows: &fjall::Keyspace, key: &[u8], row: Option<(i32, &[u8])>) {
        match row {
            Some((partition, value)) => {
                let mut v = Vec::with_capacity(4 + value.len());
                v.extend_from_slice(&partition.to_be_bytes());
                v.extend_from_slice(value);
                batch.insert(rows, key, v);
            }
            None => batch.remove(rows, key),
        }
    }

    /// Writes `rows`, then `offsets`, and flushes them to disk (see the module docs).
    pub(super) fn checkpoint(
        &self,
        rows: HashMap<Vec<u8>, PendingRow>,
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<(), TableError> {
        let mut batch = self.db.batch();
        for (k, row) in crate::local_store::in_key_order(rows) {
            if batch.len() == CHUNK {
                std::mem::replace(&mut batch, self.db.batch()).commit().map_err(|e| self.storage(e))?;
            }
            Self::put(&mut batch, &self.rows, &k, row.as_ref().map(|(p, v)| (*p, v.as_slice())));
        }
        batch.commit().map_err(|e| self.storage(e))?;
        let mut batch = self.db.batch();
        for (p, o) in offsets {
            batch.insert(&self.offsets, p.to_be_bytes(), o.to_be_bytes());
        }
        batch.commit().map_err(|e| self.storage(e))?;
        self.flush()
    }

    /// Writes an applied batch: `rows`, and the positions and counts of the partitions it
    /// changed, in one atomic write (not yet durable: see [`flush`](Self::flush)).
    pub(super) fn apply<'a>(
        &self,
        rows: impl IntoIterator<Item = (&'a [u8], Option<(i32, &'a [u8])>)>,
        positions: impl IntoIterator<Item = (i32, i64, Count)>,
    ) -> Result<(), TableError> {
        let mut batch = self.db.batch();
        for (k, row) in rows {
            Self::put(&mut batch, &self.rows, k, row);
        }
        for (p, next, count) in positions {
            let mut v = Vec::with_capacity(24);
            v.extend_from_slice(&next.to_be_bytes());
            v.extend_from_slice(&count.rows.to_be_bytes());
            v.extend_from_slice(&count.bytes.to_be_bytes());
            batch.insert(&self.offsets, p.to_be_bytes(), v);
        }
        batch.commit().map_err(|e| self.storage(e))
    }

    /// Makes what was written durable.
    pub(super) fn flush(&self) -> Result<(), TableError> {
        self.db.persist(fjall::PersistMode::SyncAll).map_err(|e| self.storage(e))
    }
}

/// A checkpoint to write: the changed rows and the offsets they reach.
type Job = (HashMap<Vec<u8>, PendingRow>, BTreeMap<i32, i64>);

/// Writes checkpoints on a thread of its own, one at a time, so that reading the topic never
/// waits for the store.
pub(super) struct Writer {
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    done: std::sync::mpsc::Receiver<Result<(), TableError>>,
    busy: bool,
    thread: Option<std::thread::JoinHandle<()>>,
    path: String,
}

impl Writer {
    pub(super) fn start(store: TableStore) -> Result<Self, TableError> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(1);
        let (tx, done) = std::sync::mpsc::channel();
        let path = store.path();
        let thread = std::thread::Builder::new()
            .name("eventstage-table-store".into())
            .spawn(move || {
                for (rows, offsets) in rx {
                    if tx.send(store.checkpoint(rows, &offsets)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| TableError::Store {
                path: path.clone(),
                message: format!("cannot start the store thread: {e}"),
            })?;
        Ok(Self { jobs: Some(jobs), done, busy: false, thread: Some(thread), path })
    }

    /// True while a checkpoint is being written.
    pub(super) fn busy(&self) -> bool {
        self.busy
    }

    /// Collects the checkpoint being written if it has finished (`wait`: waits for it). Returns
    /// whether one finished.
    pub(super) fn collect(&mut self, wait: bool) -> Result<bool, TableError> {
        if !self.busy {
            return Ok(false);
        }
        let finished = if wait { self.done.recv().ok() } else { self.done.try_recv().ok() };
        match finished {
            Some(result) => {
                self.busy = false;
                result.map(|()| true)
            }
            None if wait => Err(self.gone()),
            None => Ok(false),
        }
    }

    /// Starts writing a checkpoint; the previous one must have been collected.
    pub(super) fn submit(
        &mut self,
        rows: HashMap<Vec<u8>, PendingRow>,
        offsets: BTreeMap<i32, i64>,
    ) -> Result<(), TableError> {
        debug_assert!(!self.busy, "one checkpoint at a time");
        let sent = self.jobs.as_ref().map(|jobs| jobs.send((rows, offsets)));
        match sent {
            Some(Ok(())) => {
                self.busy = true;
                Ok(())
            }
            _ => Err(self.gone()),
        }
    }

    fn gone(&self) -> TableError {
        TableError::Store { path: self.path.clone(), message: "the store thread stopped".into() }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
