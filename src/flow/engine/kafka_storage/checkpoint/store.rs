//! The sled store of a state directory: its marker file, rows and checkpoints (see the module
//! docs of `checkpoint`).

use super::common::{config_err, Loaded};
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::shared::now_ms;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

const MARKER: &str = "eventstage-state.json";
const FORMAT_VERSION: u32 = 1;
/// Rows per sled batch.
const CHUNK: usize = 10_000;

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq, Debug)]
struct Marker {
    format: u32,
    journal: String,
    stage: String,
}

/// The sled store of a flow's state directory.
#[derive(Clone)]
pub(super) struct LocalStore {
    pub(super) dir: PathBuf,
    db: sled::Db,
    offsets: sled::Tree,
}

impl LocalStore {
    /// Opens (or creates) the store in `dir` for the journal `topic` of stage `stage`. A store of
    /// another topic or stage, or one sled cannot open, is emptied with a warning (it is a cache of
    /// the journal); a directory holding anything else, or a store another process has open, is
    /// an error.
    pub(super) fn open(
        dir: &Path,
        topic: &str,
        stage: &str,
        page_cache: Option<u64>,
        metrics: &Metrics,
    ) -> Result<Self, FlowError> {
        let expected = Marker { format: FORMAT_VERSION, journal: topic.into(), stage: stage.into() };
        let marker_path = dir.join(MARKER);
        let sled_dir = dir.join("sled");
        let mut stale: Option<String> = None;
        if marker_path.exists() {
            let found = std::fs::read(&marker_path)
                .map_err(|e| config_err(dir, format!("cannot read {MARKER}: {e}")))
                .map(|raw| serde_json::from_slice::<Marker>(&raw));
            match found? {
                Ok(m) if m == expected => {}
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
            remove_dir(&sled_dir).map_err(|e| config_err(dir, format!("cannot remove {}: {e}", sled_dir.display())))?;
        }
        if stale.is_some() || !marker_path.exists() {
            std::fs::create_dir_all(dir).map_err(|e| config_err(dir, format!("cannot create the directory: {e}")))?;
            let raw = serde_json::to_vec_pretty(&expected).map_err(|e| config_err(dir, e))?;
            std::fs::write(&marker_path, raw).map_err(|e| config_err(dir, format!("cannot write {MARKER}: {e}")))?;
        }
        let config = || {
            let config = sled::Config::new().path(&sled_dir);
            match page_cache {
                Some(bytes) => config.cache_capacity(bytes),
                None => config,
            }
        };
        let db = match config().open() {
            Ok(db) => db,
            Err(e) if e.to_string().contains("lock") => {
                return Err(config_err(
                    dir,
                    format!("sled: {e} (another process has this state directory open: give every instance a directory of its own)"),
                ))
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "the local state store is damaged (sled cannot open it); dropping it and restoring every partition from the journal");
                metrics.store_dropped.fetch_add(1, Ordering::Relaxed);
                remove_dir(&sled_dir)
                    .map_err(|e| config_err(dir, format!("cannot remove {}: {e}", sled_dir.display())))?;
                config().open().map_err(|e| config_err(dir, format!("sled: {e}")))?
            }
        };
        let offsets = db.open_tree("offsets").map_err(|e| config_err(dir, format!("sled: {e}")))?;
        Ok(Self { dir: dir.to_path_buf(), db, offsets })
    }

    pub(super) fn storage(&self, e: impl std::fmt::Display) -> FlowError {
        config_err(&self.dir, format!("sled: {e}"))
    }

    pub(super) fn rows(&self, p: i32) -> Result<sled::Tree, FlowError> {
        self.db.open_tree(format!("p{p}")).map_err(|e| self.storage(e))
    }

    /// Partition `p`'s checkpoint: (next offset, released at).
    pub(super) fn position(&self, p: i32) -> Result<Option<(i64, u64)>, String> {
        let Some(v) = self.offsets.get(p.to_be_bytes()).map_err(|e| e.to_string())? else { return Ok(None) };
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
            let (k, _) = item.map_err(|e| self.storage(e))?;
            if let Some(p) = k.as_ref().try_into().ok().map(i32::from_be_bytes) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Drops partition `p`'s rows and checkpoint.
    pub(super) fn clear(&self, p: i32) -> Result<(), FlowError> {
        self.offsets.remove(p.to_be_bytes()).map_err(|e| self.storage(e))?;
        self.db.drop_tree(format!("p{p}")).map_err(|e| self.storage(e))?;
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
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for (k, v) in rows {
            if in_batch == CHUNK {
                tree.apply_batch(std::mem::take(&mut batch)).map_err(|e| self.storage(e))?;
                in_batch = 0;
            }
            in_batch += 1;
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        tree.apply_batch(batch).map_err(|e| self.storage(e))?;
        let mut value = Vec::with_capacity(16);
        value.extend_from_slice(&next.to_be_bytes());
        value.extend_from_slice(&released.to_be_bytes());
        self.offsets.insert(p.to_be_bytes(), value).map_err(|e| self.storage(e))?;
        Ok(())
    }

    pub(super) fn flush(&self) -> Result<(), FlowError> {
        self.db.flush().map(|_| ()).map_err(|e| self.storage(e))
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
