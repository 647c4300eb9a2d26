//! The history archive of a sled journal: event records a snapshot covers, moved out of sled.
//!
//! sled keeps about 190 bytes in memory per page of its trees for as long as a store is open (8 to
//! 16 records a page), and up to ~16k pages of whatever was read last. A journal whose whole
//! history stays in sled therefore costs memory, and time to open, that grow with its history,
//! although a restart reads only snapshots and the events after them. Events a key's snapshot
//! covers are read again only by point-in-time queries, dumps, replays and `verify`, so they are
//! moved, as stored, into an append-only file that those read sequentially through a fixed buffer.
//!
//! `PATH/archive/<hex journal name>.log` holds frames:
//!
//! ```text
//! u32 LE body length | u32 LE CRC-32 of the body | body: u32 LE key length | key | u64 LE seq | value
//! ```
//!
//! `value` is the record as sled held it under `e|key|seq`: an event envelope or an `Events` group,
//! each with its own CRC. The committed length of the file is kept in the journal's tree, written
//! by the same sled batch that removes the moved records: bytes past it belong to a move that did
//! not commit (a crash between the file's fsync and sled's), and are cut off when the journal opens.
//! A key's frames are in seq order and all older than its records still in sled.

use super::{
    be_u64, decode_key, event_key, group_len, lock, parse_event_key, prefixed_key, write, JournalInner, Raw,
    ARCHIVABLE_KEY, ARCHIVE_KEY, ARCHIVE_STEP, REMOVALS_PER_BATCH, S,
};
use crate::error::{JournalError, Result};
use crate::stream::Chunker;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// Bytes of a frame before its body.
const FRAME_HEADER: usize = 8;

/// The read buffer of archive scans: their memory does not depend on the archive's size.
const READ_BUFFER: usize = 1 << 20;

/// One archived record.
pub(super) struct Frame {
    pub key: Vec<u8>,
    pub seq: u64,
    pub value: Vec<u8>,
}

/// Appends the frame of one record to `out`.
pub(super) fn encode_frame(key: &[u8], seq: u64, value: &[u8], out: &mut Vec<u8>) {
    let body_len = 4 + key.len() + 8 + value.len();
    out.reserve(FRAME_HEADER + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let body_at = out.len();
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(value);
    let crc = crc32fast::hash(&out[body_at..]);
    out[crc_at..body_at].copy_from_slice(&crc.to_le_bytes());
}

/// The archive file of one journal and its committed length.
#[derive(Debug)]
pub(super) struct Archive {
    path: PathBuf,
    committed: u64,
    /// The committed length is longer than the file: bytes were lost (reported by reads and verify).
    short: Option<u64>,
}

impl Archive {
    /// The archive of the journal whose file is `path`, `committed` bytes long as its tree says.
    /// Bytes past `committed` (a move that did not commit) are cut off.
    pub(super) fn open(path: PathBuf, committed: u64) -> Result<Self> {
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        if len > committed {
            let file = OpenOptions::new().write(true).open(&path).map_err(|source| io(&path, source))?;
            file.set_len(committed).and_then(|()| file.sync_all()).map_err(|source| io(&path, source))?;
            tracing::info!(archive = %path.display(), bytes = len - committed,
                "cut off the part of the history archive a move did not commit");
        }
        let short = (len < committed).then_some(len);
        Ok(Self { path, committed, short })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `frames` after the committed bytes and syncs them; returns the length to commit
    /// (in sled, with the removal of the moved records), then [`Archive::committed`]. Until then,
    /// a later write starts again at the committed length.
    pub(super) fn write(&mut self, frames: &[u8]) -> Result<u64> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
        }
        let created = !self.path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| io(&self.path, e))?;
        // A failed earlier move may have left bytes past the committed length.
        file.set_len(self.committed).map_err(|e| io(&self.path, e))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(self.committed)).map_err(|e| io(&self.path, e))?;
        file.write_all(frames).and_then(|()| file.sync_data()).map_err(|e| io(&self.path, e))?;
        if created {
            if let Some(dir) = self.path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(|source| io(dir, source))?;
            }
        }
        Ok(self.committed + frames.len() as u64)
    }

    /// Committed bytes.
    pub(super) fn committed_len(&self) -> u64 {
        self.committed
    }

    /// The move that wrote up to `len` committed in sled.
    pub(super) fn committed(&mut self, len: u64) {
        self.committed = len;
    }

    /// The committed frames, read in order through a fixed buffer.
    pub(super) fn frames(&self) -> Result<Frames<File>> {
        if let Some(found) = self.short {
            return Err(JournalError::Damaged {
                journal: self.path.display().to_string(),
                what: format!(
                    "the history archive {} holds {found} bytes, {} were committed: restore it from a backup",
                    self.path.display(),
                    self.committed
                ),
            });
        }
        if self.committed == 0 {
            return Ok(Frames::new(None, 0));
        }
        let file = File::open(&self.path).map_err(|e| io(&self.path, e))?;
        Ok(Frames::new(Some(BufReader::with_capacity(READ_BUFFER, file)), self.committed))
    }
}

fn io(path: &Path, source: std::io::Error) -> JournalError {
    JournalError::Io { path: path.to_path_buf(), source }
}

/// The frames of an archive, each checked against its CRC; an error ends the iteration.
pub(super) struct Frames<R> {
    reader: Option<BufReader<R>>,
    at: u64,
    end: u64,
}

impl<R: Read> Frames<R> {
    pub(super) fn new(reader: Option<BufReader<R>>, end: u64) -> Self {
        Self { reader, at: 0, end }
    }

    fn next_frame(&mut self, reader: &mut BufReader<R>) -> std::result::Result<Frame, String> {
        let mut header = [0u8; FRAME_HEADER];
        reader.read_exact(&mut header).map_err(|e| format!("frame header unreadable: {e}"))?;
        let body_len = u64::from(u32::from_le_bytes([header[0], header[1], header[2], header[3]]));
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        // The length is read from the file: bound it by the committed bytes before allocating.
        let left = self.end - self.at - FRAME_HEADER as u64;
        if body_len > left || body_len < 12 {
            return Err(format!("a frame of {body_len} bytes where {left} bytes are left"));
        }
        let mut body = vec![0u8; body_len as usize];
        reader.read_exact(&mut body).map_err(|e| format!("frame unreadable: {e}"))?;
        if crc32fast::hash(&body) != crc {
            return Err("frame checksum mismatch".into());
        }
        let key_len = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
        let Some(seq_at) = key_len.checked_add(4).filter(|&at| at + 8 <= body.len()) else {
            return Err(format!("a key of {key_len} bytes in a frame of {body_len}"));
        };
        let key = body[4..seq_at].to_vec();
        let seq = u64::from_le_bytes(body[seq_at..seq_at + 8].try_into().unwrap_or_default());
        body.drain(..seq_at + 8);
        Ok(Frame { key, seq, value: body })
    }
}

impl<R: Read> Iterator for Frames<R> {
    /// A frame, or what is wrong at the frame's offset.
    type Item = std::result::Result<Frame, (u64, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut reader = self.reader.take()?;
        if self.at >= self.end {
            return None;
        }
        if self.end - self.at < FRAME_HEADER as u64 {
            return Some(Err((self.at, format!("{} bytes after the last frame", self.end - self.at))));
        }
        let at = self.at;
        match self.next_frame(&mut reader) {
            Ok(frame) => {
                self.at += (FRAME_HEADER + 12 + frame.key.len() + frame.value.len()) as u64;
                self.reader = Some(reader);
                Some(Ok(frame))
            }
            // The frame boundaries after a damaged length are unknown: stop here.
            Err(what) => Some(Err((at, what))),
        }
    }
}

/// Moving history into the archive, and reading it back for scans.
impl JournalInner {
    /// Moves the event records that the snapshots of keys written since the last move cover into
    /// the archive; returns how many records moved. Called every second by the store's archiver: history moves once the store's threshold of
    /// records written since the last move is reached, or when no batch was appended since the
    /// previous call (idle time); the first move of a process covers every key. A move stops
    /// after the step at which `stop` says the journal is being closed (the next open's first move
    /// covers what is left).
    pub(super) fn archive_pending(&self, stop: &dyn Fn() -> bool) -> Result<u64> {
        let Some(after) = self.store.archive_history else { return Ok(0) };
        let applied = self.applied.load(Ordering::Acquire);
        let idle = self.archiver_seen.swap(applied, Ordering::AcqRel) == applied;
        let unarchived = self.unarchived.load(Ordering::Acquire);
        if unarchived == 0 || (unarchived < after && !idle) {
            return Ok(0);
        }
        if !self.swept.load(Ordering::Acquire) {
            return self.archive_all(stop);
        }
        let keys: Vec<Vec<u8>> = lock(&self.to_archive).drain().collect();
        Ok(self.archive_keys(keys, stop)?.0)
    }

    /// Moves the event records every snapshot covers into the archive (for stores written before
    /// archiving, or without it); returns how many records moved.
    pub(super) fn archive_all(&self, stop: &dyn Fn() -> bool) -> Result<u64> {
        lock(&self.to_archive).clear();
        let mut keys = Vec::new();
        for item in self.tree.scan_prefix([S]) {
            let (k, _) = item.map_err(|e| self.storage(e))?;
            if let Some((key, _)) = decode_key(&k[1..]) {
                keys.push(key);
            }
        }
        let (moved, whole) = self.archive_keys(keys, stop)?;
        if whole {
            self.swept.store(true, Ordering::Release);
        }
        Ok(moved)
    }

    /// Moves the history the snapshots of `keys` cover, one step (about [`ARCHIVE_STEP`] bytes of
    /// frames) at a time: readers of a key's snapshot and tail wait for one step, not for the
    /// whole move. Returns the records moved, and false when `stop` ended it early.
    fn archive_keys(&self, keys: impl IntoIterator<Item = Vec<u8>>, stop: &dyn Fn() -> bool) -> Result<(u64, bool)> {
        let mut archive = write(&self.archive);
        let mut frames = Vec::new();
        // Each moved record's storage key, and where its frame ends in `frames`.
        let mut staged: Vec<(sled::IVec, usize)> = Vec::new();
        let mut moved = 0u64;
        for key in keys {
            let Some(snap) = self.tree.get(prefixed_key(S, &key)).map_err(|e| self.storage(e))? else { continue };
            // A snapshot whose seq is unreadable or ahead of the events is damage `verify` reports;
            // nothing is moved on its word.
            let Some(covered) = snap.get(..8).and_then(be_u64) else { continue };
            if covered > self.last_seq(&key)? {
                continue;
            }
            for item in self.tree.range(event_key(&key, 1)..=event_key(&key, covered)) {
                let (k, v) = item.map_err(|e| self.storage(e))?;
                let Some((_, seq)) = parse_event_key(&k) else { continue };
                encode_frame(&key, seq, &v, &mut frames);
                staged.push((k, frames.len()));
            }
            if frames.len() >= ARCHIVE_STEP {
                moved += self.commit_move(&mut archive, &mut frames, &mut staged)?;
                drop(archive);
                if stop() {
                    return Ok((moved, false));
                }
                archive = write(&self.archive);
            }
        }
        if !frames.is_empty() {
            moved += self.commit_move(&mut archive, &mut frames, &mut staged)?;
        }
        Ok((moved, true))
    }

    /// Writes `frames` to the archive (one fsync), then removes their records from sled in small
    /// batches, each committing the archive's length up to the last frame it removed. A sled batch
    /// holds sled's store-wide write lock, so small ones keep the writers' waits short; a crash
    /// between them leaves records removed exactly for the frames committed.
    fn commit_move(
        &self,
        archive: &mut Archive,
        frames: &mut Vec<u8>,
        staged: &mut Vec<(sled::IVec, usize)>,
    ) -> Result<u64> {
        self.store.require_version(3)?;
        let base = archive.committed_len();
        archive.write(frames)?;
        self.unarchived.store(0, Ordering::Release);
        for chunk in staged.chunks(REMOVALS_PER_BATCH) {
            let mut batch = sled::Batch::default();
            for (k, _) in chunk {
                batch.remove(k.clone());
            }
            let len = base + chunk.last().map_or(0, |(_, end)| *end as u64);
            batch.insert(ARCHIVE_KEY, &len.to_be_bytes());
            batch.insert(ARCHIVABLE_KEY, &0u64.to_be_bytes());
            self.tree.apply_batch(batch).map_err(|e| self.storage(e))?;
            archive.committed(len);
        }
        let moved = staged.len() as u64;
        staged.clear();
        frames.clear();
        Ok(moved)
    }

    pub(super) fn archive_damage(&self, archive: &Archive, at: u64, what: &str) -> JournalError {
        self.damaged(format!(
            "history archive {} at byte {at}: {what}; `eventstage journal verify` lists the damage",
            archive.path().display()
        ))
    }

    /// Sends the archived records (of `key` only, when given) undecoded; false when the reader went
    /// away.
    pub(super) fn send_archived(
        &self,
        archive: &Archive,
        key: Option<&[u8]>,
        out: &mut Chunker<Raw, JournalError>,
    ) -> Result<bool> {
        for frame in archive.frames()? {
            let frame = frame.map_err(|(at, what)| self.archive_damage(archive, at, &what))?;
            if key.is_some_and(|k| k != frame.key.as_slice()) {
                continue;
            }
            let weight = group_len(&frame.value);
            let raw = Raw::Event(event_key(&frame.key, frame.seq).into(), frame.value.into(), 0);
            if !out.push_weighted(raw, weight) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(bytes: &[u8]) -> Vec<std::result::Result<Frame, (u64, String)>> {
        Frames::new(Some(BufReader::new(bytes)), bytes.len() as u64).collect()
    }

    #[test]
    fn frames_read_back_and_damage_stops_the_scan() {
        let mut bytes = Vec::new();
        encode_frame(b"alice", 7, b"value one", &mut bytes);
        encode_frame(b"", 9, b"", &mut bytes);
        let read: Vec<_> = frames_of(&bytes).into_iter().map(|f| f.map_err(|e| e.1).unwrap()).collect();
        assert_eq!(read.len(), 2);
        assert_eq!(
            (read[0].key.as_slice(), read[0].seq, read[0].value.as_slice()),
            (&b"alice"[..], 7, &b"value one"[..])
        );
        assert_eq!((read[1].key.as_slice(), read[1].seq, read[1].value.as_slice()), (&b""[..], 9, &b""[..]));

        let first_len = 8 + 4 + 5 + 8 + 9;
        let mut flipped = bytes.clone();
        flipped[first_len + 10] ^= 1;
        let read = frames_of(&flipped);
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].as_ref().err(), Some(&(first_len as u64, "frame checksum mismatch".to_string())));

        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let read = frames_of(&huge);
        assert_eq!(read.len(), 1);
        assert!(
            read[0].as_ref().err().is_some_and(|(at, what)| *at == 0 && what.contains("bytes are left")),
            "{:?}",
            read[0].as_ref().err()
        );

        let read = frames_of(&bytes[..bytes.len() - 3]);
        assert!(read.last().is_some_and(|f| f.is_err()));
    }
}
