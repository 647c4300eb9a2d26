//! A table's local store: sled, holding the newest row per key and the consumed offsets, so a
//! restart reads only the topic's tail.
//!
//! A checkpoint writes the changed rows in batches of [`CHUNK`] and the offsets last, then flushes.
//! A crash in between leaves rows newer than the stored offsets; the restart reads the topic again
//! from those offsets and applies the same records in the same order, which ends in the same rows
//! (last write wins is idempotent). So the store is never ahead of what a restart can repair.
//! (One sled batch for a whole catch-up would pin sled's epoch and log for millions of writes.)
//!
//! ```text
//! DIR/eventstage-table.json   identifies the directory: format version and topic
//! DIR/sled/                   the sled database, tree `table`:
//!     o | partition (i32 BE)  -> next offset to read (i64 BE)
//!     r | record key          -> partition (i32 BE) | record value
//! ```

use super::TableError;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const MARKER: &str = "eventstage-table.json";
const FORMAT_VERSION: u32 = 1;
const OFFSET: u8 = b'o';
const ROW: u8 = b'r';
/// Rows per sled batch.
const CHUNK: usize = 10_000;

#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    format: u32,
    topic: String,
}

/// A row to write at the next checkpoint: `Some((partition, value))`, or `None` to delete the key.
pub(super) type PendingRow = Option<(i32, Vec<u8>)>;

#[derive(Clone)]
pub(super) struct TableStore {
    path: PathBuf,
    tree: sled::Tree,
    // Kept open for the tree's lifetime; flushed at each checkpoint.
    db: sled::Db,
}

impl TableStore {
    /// Opens (or creates) the store at `path` for `topic`.
    pub(super) fn open(path: &Path, topic: &str) -> Result<Self, TableError> {
        let err = |message: String| TableError::Store { path: path.display().to_string(), message };
        let marker_path = path.join(MARKER);
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
            let marker = serde_json::to_vec_pretty(&Marker { format: FORMAT_VERSION, topic: topic.into() })
                .map_err(|e| err(e.to_string()))?;
            std::fs::write(&marker_path, marker).map_err(|e| err(format!("cannot write {MARKER}: {e}")))?;
        }
        let db = sled::Config::new().path(path.join("sled")).open().map_err(|e| {
            let hint = if e.to_string().contains("lock") {
                " (is another process using this store? one table per store directory)"
            } else {
                ""
            };
            err(format!("sled: {e}{hint}"))
        })?;
        let tree = db.open_tree("table").map_err(|e| err(format!("sled: {e}")))?;
        Ok(Self { path: path.to_path_buf(), tree, db })
    }

    /// The store's directory, for messages.
    pub(super) fn path(&self) -> String {
        self.path.display().to_string()
    }

    fn storage(&self, e: impl std::fmt::Display) -> TableError {
        TableError::Store { path: self.path.display().to_string(), message: e.to_string() }
    }

    fn damaged(&self, what: String) -> TableError {
        TableError::Store {
            path: self.path.display().to_string(),
            message: format!("damaged: {what}; delete the directory to rebuild the table from its topic"),
        }
    }

    /// The checkpointed next offset of each partition.
    pub(super) fn offsets(&self) -> Result<BTreeMap<i32, i64>, TableError> {
        let mut out = BTreeMap::new();
        for item in self.tree.scan_prefix([OFFSET]) {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let p = k.get(1..5).and_then(|b| b.try_into().ok()).map(i32::from_be_bytes);
            let o = v.as_ref().try_into().ok().map(i64::from_be_bytes);
            match (p, o) {
                (Some(p), Some(o)) => out.insert(p, o),
                _ => return Err(self.damaged("an offset entry has the wrong size".into())),
            };
        }
        Ok(out)
    }

    /// Every stored row: `(key, partition, value)`, in key order.
    pub(super) fn rows(&self) -> impl Iterator<Item = Result<(Vec<u8>, i32, Vec<u8>), TableError>> + '_ {
        self.tree.scan_prefix([ROW]).map(move |item| {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let partition = v
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_be_bytes)
                .ok_or_else(|| self.damaged("a row is shorter than its partition header".into()))?;
            Ok((k[1..].to_vec(), partition, v[4..].to_vec()))
        })
    }

    /// Writes `rows`, then `offsets`, and flushes them to disk (see the module docs).
    pub(super) fn checkpoint(
        &self,
        rows: HashMap<Vec<u8>, PendingRow>,
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<(), TableError> {
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        let mut key = Vec::new();
        for (k, row) in rows {
            if in_batch == CHUNK {
                self.tree.apply_batch(std::mem::take(&mut batch)).map_err(|e| self.storage(e))?;
                in_batch = 0;
            }
            in_batch += 1;
            key.clear();
            key.push(ROW);
            key.extend_from_slice(&k);
            match row {
                Some((partition, value)) => {
                    let mut v = Vec::with_capacity(4 + value.len());
                    v.extend_from_slice(&partition.to_be_bytes());
                    v.extend_from_slice(&value);
                    batch.insert(key.as_slice(), v);
                }
                None => batch.remove(key.as_slice()),
            }
        }
        for (p, o) in offsets {
            let mut k = vec![OFFSET];
            k.extend_from_slice(&p.to_be_bytes());
            batch.insert(k, &o.to_be_bytes());
        }
        self.tree.apply_batch(batch).map_err(|e| self.storage(e))?;
        self.db.flush().map_err(|e| self.storage(e))?;
        Ok(())
    }
}

/// A checkpoint to write: the changed rows and the offsets they reach.
type Job = (HashMap<Vec<u8>, PendingRow>, BTreeMap<i32, i64>);

/// Writes checkpoints on a thread of its own, one at a time, so that reading the topic never
/// waits for sled (a sled insert costs several µs; reading a record, well under one).
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
