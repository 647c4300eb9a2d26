//! The commit mark: a tiny file outside the storage engine that records the last durable batch.
//!
//! sled recovers from a damaged log by dropping everything after the damage. That keeps sled
//! consistent but would silently shorten our history. The mark is written after every successful
//! flush, so on open "mark > batches in the store" proves committed batches were lost.
//!
//! Layout (20 bytes): `b"ESMK"`, version u32 LE, batch u64 LE, CRC32 u32 LE of the first 16 bytes.
//! It is rewritten in place without fsync: it is only written after the store's own fsync finished,
//! so after an OS crash it can only be older than the store (no false alarm), and a torn mark fails
//! its CRC and is ignored with a warning.

use crate::error::{JournalError, Result};
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"ESMK";
const LEN: usize = 20;

fn io(path: &Path, source: std::io::Error) -> JournalError {
    JournalError::Io { path: path.to_path_buf(), source }
}

/// Reads the mark: `None` when there is none or it is unreadable (with a warning).
pub(crate) fn read_mark(path: &Path) -> Result<Option<u64>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path, e)),
    };
    match decode(&bytes) {
        Some(batch) => Ok(Some(batch)),
        None => {
            tracing::warn!(path = %path.display(), "commit mark is unreadable (torn write?); ignoring it, it is rewritten at the next flush");
            Ok(None)
        }
    }
}

fn decode(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != LEN || &bytes[0..4] != MAGIC || bytes[4..8] != 1u32.to_le_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    (crc32fast::hash(&bytes[0..16]) == crc).then(|| u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default()))
}

fn encode(batch: u64) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[0..4].copy_from_slice(MAGIC);
    out[4..8].copy_from_slice(&1u32.to_le_bytes());
    out[8..16].copy_from_slice(&batch.to_le_bytes());
    let crc = crc32fast::hash(&out[0..16]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out
}

/// An open mark file and the last batch written to it.
#[derive(Debug)]
pub(crate) struct MarkFile {
    path: PathBuf,
    file: Option<File>,
    pub(crate) last: u64,
}

impl MarkFile {
    pub(crate) fn new(path: PathBuf, last: u64) -> Self {
        Self { path, file: None, last }
    }

    pub(crate) fn write(&mut self, batch: u64) -> Result<()> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&self.path)
                .map_err(|e| io(&self.path, e))?;
            self.file = Some(f);
        }
        if let Some(f) = &self.file {
            f.write_all_at(&encode(batch), 0).map_err(|e| io(&self.path, e))?;
        }
        self.last = batch;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mark");
        assert_eq!(read_mark(&path).unwrap(), None);
        let mut m = MarkFile::new(path.clone(), 0);
        m.write(41).unwrap();
        m.write(42).unwrap();
        assert_eq!(read_mark(&path).unwrap(), Some(42));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_mark(&path).unwrap(), None);
    }
}
