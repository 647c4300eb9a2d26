//! Reading a sled journal: events, recovery (all keys, or the keys asked for), positions and
//! stats. Storage is iterated on a blocking thread that sends records undecoded ([`Raw`]); the
//! reader's side of the channel decodes them, so iteration and decoding run on two cores.

use super::{
    be_u64, decode_group, event_key, group_len, lock, parse_event_key, parse_position, prefixed_key, read,
    JournalInner, SledJournal, E, K, P, S,
};
use crate::error::{JournalError, Result};
use crate::keys::{decode_key, printable_key};
use crate::stream::{blocking_stream, Chunker};
use crate::types::{EventQuery, EventRecord, JournalStats, Recovered, SeqNo, SnapshotRecord, SourcePosition};
use crate::{Envelope, RecordKind};
use futures::{Stream, StreamExt};

/// A record as read from sled; the reader decodes it. An event record's events before the seq it
/// holds are skipped (the part of a group a snapshot already covers).
pub(super) enum Raw {
    Event(sled::IVec, sled::IVec, u64),
    Snapshot(Vec<u8>, sled::IVec),
}

impl SledJournal {
    /// What `read` sends (a recovery's records), decoded on the reader's side.
    pub(super) fn recovered(
        &self,
        read: impl FnOnce(&JournalInner, &mut Chunker<Raw, JournalError>) -> Result<()> + Send + 'static,
    ) -> impl Stream<Item = Result<Vec<Recovered>>> + Send + 'static {
        let (inner, reader) = (self.inner.clone(), self.inner.clone());
        blocking_stream(4, move |tx| {
            let mut out = Chunker::new(tx);
            match read(&inner, &mut out) {
                Ok(()) => out.finish(),
                Err(e) => out.fail(e),
            }
        })
        .map(move |chunk| reader.decode_recovered(chunk?))
    }
}

impl JournalInner {
    /// The events of one event record (one, or a group), from seq `from` on.
    pub(super) fn decode_events(&self, storage_key: &[u8], value: &[u8], from: u64) -> Result<Vec<EventRecord>> {
        let (key, seq) = parse_event_key(storage_key)
            .ok_or_else(|| self.damaged(format!("unparseable event key {}", printable_key(storage_key))))?;
        let corrupt =
            |source| JournalError::Corrupt { journal: self.name.clone(), key: printable_key(&key), seq, source };
        let header = Envelope::check(value).map_err(corrupt)?;
        if header.kind == RecordKind::Events {
            let group = decode_group(value, seq)
                .map_err(|what| self.damaged(format!("key {} seq {seq}: {what}", printable_key(&key))))?;
            return Ok(group
                .into_iter()
                .filter(|(s, _)| *s >= from)
                .map(|(s, envelope)| EventRecord { key: key.clone(), seq: SeqNo(s), envelope })
                .collect());
        }
        let envelope = Envelope::decode(value).map_err(corrupt)?;
        if envelope.kind != RecordKind::Event {
            return Err(
                self.damaged(format!("key {} seq {seq}: a snapshot record stored as an event", printable_key(&key)))
            );
        }
        Ok(if seq >= from { vec![EventRecord { key, seq: SeqNo(seq), envelope }] } else { Vec::new() })
    }

    pub(super) fn decode_snapshot(&self, key: &[u8], value: &[u8]) -> Result<SnapshotRecord> {
        let seq = value
            .get(..8)
            .and_then(be_u64)
            .ok_or_else(|| self.damaged(format!("snapshot of key {} is truncated", printable_key(key))))?;
        let envelope = Envelope::decode(&value[8..]).map_err(|source| JournalError::Corrupt {
            journal: self.name.clone(),
            key: printable_key(key),
            seq,
            source,
        })?;
        Ok(SnapshotRecord { key: key.to_vec(), seq: SeqNo(seq), envelope })
    }

    /// Sends the records of `range` undecoded (their events from seq `from` on); false when the
    /// reader went away.
    pub(super) fn send_raw(&self, range: sled::Iter, from: u64, out: &mut Chunker<Raw, JournalError>) -> Result<bool> {
        for item in range {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let weight = group_len(&v);
            if !out.push_weighted(Raw::Event(k, v, from), weight) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub(super) fn events_blocking(&self, query: &EventQuery, out: &mut Chunker<Raw, JournalError>) -> Result<()> {
        let archive = read(&self.archive);
        // Archived records first: they are older than every record of their key still in sled.
        if !self.send_archived(&archive, query.key.as_deref(), out)? {
            return Ok(());
        }
        let range = match &query.key {
            Some(key) => {
                let from = query.from_seq.0.max(1);
                let until = query.until_seq.map_or(u64::MAX, |s| s.0);
                if from > until {
                    return Ok(());
                }
                // A group holding `until` is stored under a later seq: the reader stops the key
                // at `until`.
                self.tree.range(event_key(key, from)..=event_key(key, u64::MAX))
            }
            None => self.tree.scan_prefix([E]),
        };
        self.send_raw(range, 0, out).map(|_| ())
    }

    pub(super) fn recover_blocking(&self, out: &mut Chunker<Raw, JournalError>) -> Result<()> {
        // Recovery reads no archived record (they are all covered by snapshots), but the move of
        // records it is reading must wait.
        let _archive = read(&self.archive);
        let has_snapshots = self.tree.scan_prefix([S]).next().is_some();
        if !has_snapshots {
            return self.send_raw(self.tree.scan_prefix([E]), 0, out).map(|_| ());
        }
        // Snapshots exist: seek per key, so restart cost follows keys + tails, not total events.
        for item in self.tree.scan_prefix([K]) {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let (key, _) = decode_key(&k[1..])
                .ok_or_else(|| self.damaged(format!("unparseable head key {}", printable_key(&k))))?;
            if !self.recover_key_blocking(key, &v, out)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Sends `key`'s latest snapshot, then its events after it; `head` is its head record (its last
    /// seq). False when the reader went away.
    pub(super) fn recover_key_blocking(
        &self,
        key: Vec<u8>,
        head: &[u8],
        out: &mut Chunker<Raw, JournalError>,
    ) -> Result<bool> {
        let last =
            be_u64(head).ok_or_else(|| self.damaged(format!("head of key {} is not 8 bytes", printable_key(&key))))?;
        let mut from = 1;
        if let Some(snap) = self.tree.get(prefixed_key(S, &key)).map_err(|e| self.storage(e))? {
            // Saturating: the seq is read from the record (a damaged one may say u64::MAX).
            from = snap.get(..8).and_then(be_u64).map_or(1, |seq| seq.saturating_add(1));
            if !out.push(Raw::Snapshot(key.clone(), snap)) {
                return Ok(false);
            }
        }
        if from > last {
            return Ok(true);
        }
        // A group stored under `from` or later may begin before it: its events before `from` are in
        // the snapshot.
        self.send_raw(self.tree.range(event_key(&key, from)..=event_key(&key, last)), from, out)
    }

    pub(super) fn recover_keys_blocking(&self, keys: Vec<Vec<u8>>, out: &mut Chunker<Raw, JournalError>) -> Result<()> {
        // As recover: the move of records being read to the archive must wait.
        let _archive = read(&self.archive);
        for key in keys {
            let Some(head) = self.tree.get(prefixed_key(K, &key)).map_err(|e| self.storage(e))? else { continue };
            if !self.recover_key_blocking(key, &head, out)? {
                return Ok(());
            }
        }
        Ok(())
    }

    pub(super) fn key_count_blocking(&self) -> Result<u64> {
        let mut n = 0;
        for item in self.tree.scan_prefix([K]).keys() {
            item.map_err(|e| self.storage(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Decodes a chunk of raw records on the reader's side of the channel, so storage iteration and
    /// decoding (CRC, copies) run on two cores.
    pub(super) fn decode_recovered(&self, chunk: Vec<Raw>) -> Result<Vec<Recovered>> {
        let mut out = Vec::with_capacity(chunk.len());
        for raw in chunk {
            match raw {
                Raw::Event(k, v, from) => {
                    out.extend(self.decode_events(&k, &v, from)?.into_iter().map(Recovered::Event))
                }
                Raw::Snapshot(key, v) => out.push(self.decode_snapshot(&key, &v).map(Recovered::Snapshot)?),
            }
        }
        Ok(out)
    }

    pub(super) fn positions_blocking(&self) -> Result<Vec<SourcePosition>> {
        self.tree
            .scan_prefix([P])
            .map(|item| {
                let (k, v) = item.map_err(|e| self.storage(e))?;
                parse_position(&k, &v)
                    .ok_or_else(|| self.damaged(format!("unparseable position record {}", printable_key(&k))))
            })
            .collect()
    }

    pub(super) fn stats_blocking(&self) -> Result<JournalStats> {
        let mut stats =
            JournalStats { name: self.name.clone(), batches: *lock(&self.write), ..JournalStats::default() };
        let archive = read(&self.archive);
        for frame in archive.frames()? {
            let frame = frame.map_err(|(at, what)| self.archive_damage(&archive, at, &what))?;
            let before = stats.events;
            count_event(&mut stats, &frame.value);
            stats.archived += stats.events - before;
        }
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            match k.first() {
                Some(&E) => count_event(&mut stats, &v),
                Some(&K) => stats.keys += 1,
                Some(&S) => {
                    stats.snapshots += 1;
                    stats.bytes += v.len() as u64;
                }
                _ => {}
            }
        }
        stats.positions = self.positions_blocking()?;
        Ok(stats)
    }
}

/// Counts a stored event record (one event, or a group) into `stats`.
pub(super) fn count_event(stats: &mut JournalStats, v: &[u8]) {
    stats.events += match Envelope::check(v) {
        Ok(h) if h.kind == RecordKind::Events => v
            .get(crate::HEADER_LEN + 8..crate::HEADER_LEN + 12)
            .and_then(|b| b.try_into().ok())
            .map_or(1, |b| u64::from(u32::from_le_bytes(b))),
        _ => 1,
    };
    stats.bytes += v.len() as u64;
    if let Ok(h) = Envelope::check(v) {
        let t = h.timestamp_ms;
        stats.first_event_ms = Some(stats.first_event_ms.map_or(t, |f| f.min(t)));
        stats.last_event_ms = Some(stats.last_event_ms.map_or(t, |l| l.max(t)));
    }
}
