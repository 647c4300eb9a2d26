//! The fjall store of a state directory: its marker file, rows and checkpoints (see the module
//! docs of `checkpoint`). fjall (an LSM tree) keeps its memory within a block cache and memtables
//! of a set size, whatever the number of keys; sled, used before, kept about 30 bytes per key in
//! memory while open (`benches/RESULTS.md`, "The local store at 10^7 keys").

use super::common::{config_err, Loaded};
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::shared::now_ms;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

const MARKER: &str = "eventstage-state.json";
/// 1: sled (before 2026-12-05); 2: fjall.
const FORMAT_VERSION: u32 = 2;
/// The database's directory in the state directory.
const DATA: &str = "fjall";
/// The directory format 1 kept its sled database in.
const OLD_DATA: &str = "sled";
/// Rows per write batch.
const CHUNK: usize = 10_000;

/// A partition's rows: entity key -> the row of the key's newest journal record (`row`).
pub(crate) type Rows = fjall::Keyspace;

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq, Debug)]
struct Marker {
    format: u32,
    journal: String,
    stage: String,
}

/// The fjall store of a flow's state directory.
#[derive(Clone)]
pub(super) struct LocalStore {
    pub(super) dir: PathBuf,
    db: fjall::Database,
    offsets: fjall::Keyspace,
    /// The memtable size of each partition's rows.
    memtable: u64,
}

/// What the store may hold in memory: its block cache, and its memtables (split over the
/// journal's partitions, each at least 1 MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoreMemory {
    pub(crate) cache: u64,
    pub(crate) memtables: u64,
}

impl LocalStore {
    /// Opens (or creates) the store in `dir` for the journal `topic` (of `partitions` partitions)
    /// of stage `stage`. A store of another topic or stage, of an older format, or one fjall cannot
    /// open, is emptied with a warning (it is a cache of the journal); a directory holding anything
    /// else, or a store another process has open, is an error.
    pub(super) fn open(
        dir: &Path,
        topic: &str,
        stage: &str,
        partitions: i32,
        memory: StoreMemory,
        metrics: &Metrics,
    ) -> Result<Self, FlowError> {
        let expected = Marker { format: FORMAT_VERSION, journal: topic.into(), stage: stage.into() };
        let marker_path = dir.join(MARKER);
        let data_dir = dir.join(DATA);
        let mut stale: Option<String> = None;
        if marker_path.exists() {
            let found = std::fs::read(&marker_path)
                .map_err(|e| config_err(dir, format!("cannot read {MARKER}: {e}")))
                .map(|raw| serde_json::from_slice::<Marker>(&raw));
            match found? {
                Ok(m) if m == expected => {}
                Ok(m) if m.format < FORMAT_VERSION => {
                    stale = Some(format!(
                        "it is of format {} (sled), written by an older eventstage; this one keeps its store in fjall (format {FORMAT_VERSION})",
                        m.format
                    ))
                }
                Ok(m) if m.format > FORMAT_VERSION => {
                    return Err(config_err(
                        dir,
                        format!(
                            "store format {} is newer than this eventstage understands ({FORMAT_VERSION}): upgrade eventstage, or use another directory",
                            m.format
                        ),
                    ))
                }
                Ok(m) => {
                    stale = Some(format!(
                        "it holds the state of journal `{}` of stage `{}`, not of journal `{topic}` of stage `{stage}`",
                        m.journal, m.stage
                    ))
                }
                Err(e) => stale = Some(format!("{MARKER} does not parse ({e})")),
            }
        } else if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(config_err(
                dir,
                format!("the directory is not empty and has no {MARKER}: give the flow a directory of its own"),
            ));
        }
        if let Some(why) = &stale {
            tracing::warn!(dir = %dir.display(), "the local state store is not this flow's: {why}; dropping it and restoring every partition from the journal");
            metrics.store_dropped.fetch_add(1, Ordering::Relaxed);
            for data in [&data_dir, &dir.join(OLD_DATA)] {
                remove_dir(data).map_err(|e| config_err(dir, format!("cannot remove {}: {e}", data.display())))?;
            }
        }
        if stale.is_some() || !marker_path.exists() {
            std::fs::create_dir_all(dir).map_err(|e| config_err(dir, format!("cannot create the directory: {e}")))?;
            let raw = serde_json::to_vec_pretty(&expected).map_err(|e| config_err(dir, e))?;
            std::fs::write(&marker_path, raw).map_err(|e| config_err(dir, format!("cannot write {MARKER}: {e}")))?;
        }
        let open = || crate::local_store::database(&data_dir, memory.cache).open();
        let db = match open() {
            Ok(db) => db,
            Err(fjall::Error::Locked) => {
                return Err(config_err(
                    dir,
                    "fjall: the database is locked (another process has this state directory open: give every instance a directory of its own)",
                ))
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "the local state store is damaged (fjall cannot open it); dropping it and restoring every partition from the journal");
                metrics.store_dropped.fetch_add(1, Ordering::Relaxed);
                remove_dir(&data_dir)
                    .map_err(|e| config_err(dir, format!("cannot remove {}: {e}", data_dir.display())))?;
                open().map_err(|e| config_err(dir, format!("fjall: {e}")))?
            }
        };
        let memtable = (memory.memtables / partitions.max(1) as u64).max(1 << 20);
        let offsets = db
            .keyspace("offsets", || fjall::KeyspaceCreateOptions::default().max_memtable_size(1 << 20))
            .map_err(|e| config_err(dir, format!("fjall: {e}")))?;
        Ok(Self { dir: dir.to_path_buf(), db, offsets, memtable })
    }

    pub(super) fn storage(&self, e: impl std::fmt::Display) -> FlowError {
        config_err(&self.dir, format!("fjall: {e}"))
    }

    pub(super) fn rows(&self, p: i32) -> Result<Rows, FlowError> {
        let memtable = self.memtable;
        self.db
            .keyspace(&format!("p{p}"), || crate::local_store::flow_rows_keyspace(memtable))
            .map_err(|e| self.storage(e))
    }

    /// Partition `p`'s checkpoint: (next offset, released at).
    pub(super) fn position(&self, p: i32) -> Result<Option<(i64, u64)>, String> {
        let Some(v) = self.offsets.get(p.to_be_bytes()).map_err(|e| e.to_string())? else { return Ok(None) };
        let v: &[u8] = &v;
        match (v.get(..8), v.get(8..16)) {
            (Some(o), Some(r)) if v.len() == 16 => Ok(Some((
                i64::from_be_bytes(o.try_into().unwrap_or_default()),
                u64::from_be_bytes(r.try_into().unwrap_or_default()),
            ))),
            _ => Err(format!("the checkpoint entry of partition {p} has {} bytes, not 16", v.len())),
        }
    }

    /// The partitions the store has a checkpoint of.
    pub(super) fn partitions(&self) -> Result<Vec<i32>, FlowError> {
        let mut out = Vec::new();
        for item in self.offsets.iter() {
            let k = item.key().map_err(|e| self.storage(e))?;
            if let Some(p) = <[u8; 4]>::try_from(k.as_ref()).ok().map(i32::from_be_bytes) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Drops partition `p`'s rows and checkpoint.
    pub(super) fn clear(&self, p: i32) -> Result<(), FlowError> {
        self.offsets.remove(p.to_be_bytes()).map_err(|e| self.storage(e))?;
        let rows = self.rows(p)?;
        self.db.delete_keyspace(rows).map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// Partition `p`'s checkpoint for a restore (`Err`: why it cannot be used); `marks` are the
    /// journal partition's low and high watermarks now.
    pub(super) fn load(&self, p: i32, marks: (i64, i64)) -> Result<Result<Loaded, String>, FlowError> {
        let from = match self.position(p) {
            Ok(None) => return Ok(Ok(Loaded::empty())),
            Ok(Some((from, _))) => from,
            Err(why) => return Ok(Err(why)),
        };
        let (low, high) = marks;
        if from > high {
            return Ok(Err(format!(
                "the checkpoint is at offset {from}, ahead of the journal's end ({high}): the topic was deleted and created again, or the store belongs to another cluster"
            )));
        }
        if from < low {
            return Ok(Err(format!(
                "the checkpoint is at offset {from}, before the journal's start ({low}): records after it were deleted"
            )));
        }
        // The offset was read before the rows will be: rows written since are newer, never older
        // (see the module docs).
        Ok(Ok(Loaded { rows: Some(self.rows(p)?), from }))
    }

    /// Writes `rows` of partition `p`, then its checkpoint `next` (see the module docs).
    pub(super) fn write(
        &self,
        p: i32,
        rows: HashMap<Vec<u8>, Option<Vec<u8>>>,
        next: i64,
        released: u64,
    ) -> Result<(), FlowError> {
        let tree = self.rows(p)?;
        let mut batch = self.db.batch();
        for (k, v) in crate::local_store::in_key_order(rows) {
            if batch.len() == CHUNK {
                std::mem::replace(&mut batch, self.db.batch()).commit().map_err(|e| self.storage(e))?;
            }
            match v {
                Some(v) => batch.insert(&tree, k, v),
                None => batch.remove(&tree, k),
            }
        }
        let mut value = Vec::with_capacity(16);
        value.extend_from_slice(&next.to_be_bytes());
        value.extend_from_slice(&released.to_be_bytes());
        batch.commit().map_err(|e| self.storage(e))?;
        self.offsets.insert(p.to_be_bytes(), value).map_err(|e| self.storage(e))?;
        Ok(())
    }

    pub(super) fn flush(&self) -> Result<(), FlowError> {
        self.db.persist(fjall::PersistMode::SyncAll).map_err(|e| self.storage(e))
    }

    /// Drops the rows of partitions released longer than `retention` ago.
    pub(super) fn expire(&self, retention: Duration) -> Result<(), FlowError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut expired = Vec::new();
        for p in self.partitions()? {
            if let Ok(Some((_, released))) = self.position(p) {
                if released > 0 && released < cutoff {
                    expired.push(p);
                }
            }
        }
        for p in expired {
            tracing::info!(dir = %self.dir.display(), partition = p, "dropping the local rows of a partition released longer than the retention");
            self.clear(p)?;
        }
        Ok(())
    }
}

fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
