//! What the flow journals for each applied command. Kafka journal: one record per key and
//! transaction, written at commit (a tombstone at once); sled journal: events and due snapshots
//! staged for the transaction's sled write.

use super::*;

/// A key's journal record is written before commit once it holds this many events (bounds the
/// record size for a key that takes thousands of commands in one commit interval).
const MAX_EVENTS_PER_JOURNAL_RECORD: usize = 1000;

/// A Kafka journal record to write: partition, key, value.
pub(super) type JournalRecord = (i32, Vec<u8>, Vec<u8>);

impl<S: EventSourced> Core<S> {
    /// Journals `events`, which one command applied to `key` (at sequence `before`), leaving `state`.
    pub(super) fn journal(
        &mut self,
        p: i32,
        key: &S::Key,
        before: SeqNo,
        events: &[S::Event],
        state: &S::State,
    ) -> Result<(), FlowError> {
        if matches!(self.backend, Backend::None) {
            return Ok(());
        }
        let ts = self.wall_ms;
        let envelopes = events
            .iter()
            .map(|e| Ok(Envelope::event(self.codec.id(), S::EVENT_VERSION, ts, self.encode(key, e)?)))
            .collect::<Result<Vec<_>, FlowError>>()?;
        if matches!(self.backend, Backend::Kafka(_)) {
            self.journal_kafka(p, key, envelopes, SeqNo(before.0 + events.len() as u64), state)
        } else {
            self.stage_sled(p, key, envelopes, before, state, ts)
        }
    }

    fn journal_kafka(
        &mut self,
        p: i32,
        key: &S::Key,
        envelopes: Vec<Envelope>,
        seq: SeqNo,
        state: &S::State,
    ) -> Result<(), FlowError> {
        let Backend::Kafka(journal) = &self.backend else { return Ok(()) };
        let at_least_once = self.committer.is_some();
        if S::is_deleted(state) {
            let Some(part) = self.partitions.get_mut(&p) else { return Ok(()) };
            // Records of the key written later in this transaction or batch (a new entity under
            // the same key) must come after the deletion.
            part.unjournaled.remove(key);
            if at_least_once {
                // Not a tombstone: the deletion must keep the input positions it includes, so that
                // the deleting input, delivered again, is skipped rather than handled again.
                let sources = part.applied.get(key).cloned().unwrap_or_default();
                let marker = JournalEntry { last_seq: SeqNo::ZERO, events: Vec::new(), state: None, sources };
                part.deferred.push((key.to_bytes().into_owned(), marker.encode()));
                return Ok(());
            }
            return self.produce(journal.topic(), Some(p), Some(&key.to_bytes()), None);
        }
        let Some(part) = self.partitions.get_mut(&p) else { return Ok(()) };
        // No copy of the key for a key already pending (the common case for a busy key).
        let pending = match part.unjournaled.get_mut(key) {
            Some(pending) => {
                pending.extend(envelopes);
                pending.len()
            }
            None => {
                let n = envelopes.len();
                part.unjournaled.insert(key.clone(), envelopes);
                n
            }
        };
        if pending < MAX_EVENTS_PER_JOURNAL_RECORD {
            return Ok(());
        }
        if let Some(committer) = &mut self.committer {
            // At-least-once journals only after the batch's outputs are acknowledged: end the
            // batch instead.
            committer.full = true;
            return Ok(());
        }
        let events = part.unjournaled.remove(key).unwrap_or_default();
        self.write_journal_record(p, key, events, seq, state)
    }

    fn stage_sled(
        &mut self,
        p: i32,
        key: &S::Key,
        envelopes: Vec<Envelope>,
        before: SeqNo,
        state: &S::State,
        ts: u64,
    ) -> Result<(), FlowError> {
        let seq = SeqNo(before.0 + envelopes.len() as u64);
        let raw_key = key.to_bytes().into_owned();
        let every = self.snapshot_every;
        let snap = if every > 0 && seq.0 / every > before.0 / every {
            let envelope = Envelope::snapshot(self.codec.id(), S::STATE_VERSION, ts, self.encode(key, state)?);
            Some(SnapshotRecord { key: raw_key.clone(), seq, envelope })
        } else {
            None
        };
        let records = (before.0 + 1..)
            .zip(envelopes)
            .map(|(n, envelope)| EventRecord { key: raw_key.clone(), seq: SeqNo(n), envelope })
            .collect();
        if let Backend::Sled(sled) = &mut self.backend {
            sled.stage(p, records, snap);
        }
        Ok(())
    }

    fn encode<T: serde::Serialize>(&self, key: &S::Key, value: &T) -> Result<Vec<u8>, FlowError> {
        self.codec.encode(value).map_err(|source| {
            Error::Encode { stage: S::NAME.into(), key: printable_key(&key.to_bytes()), source }.into()
        })
    }

    /// A Kafka journal record's value: the key's `events`, its state after them (at `seq`) and the
    /// input positions that state includes.
    fn journal_value(
        &self,
        key: &S::Key,
        events: Vec<Envelope>,
        seq: SeqNo,
        state: &S::State,
        sources: Vec<SourcePosition>,
    ) -> Result<Vec<u8>, FlowError> {
        let snapshot = Envelope::snapshot(self.codec.id(), S::STATE_VERSION, self.wall_ms, self.encode(key, state)?);
        Ok(JournalEntry { last_seq: seq, events, state: Some(snapshot), sources }.encode())
    }

    /// Produces one Kafka journal record (exactly-once: no positions, the transaction has them).
    fn write_journal_record(
        &self,
        p: i32,
        key: &S::Key,
        events: Vec<Envelope>,
        seq: SeqNo,
        state: &S::State,
    ) -> Result<(), FlowError> {
        let Backend::Kafka(journal) = &self.backend else { return Ok(()) };
        let value = self.journal_value(key, events, seq, state, Vec::new())?;
        self.produce(journal.topic(), Some(p), Some(&key.to_bytes()), Some(&value))
    }

    /// The open transaction's or batch's journal records: deletion markers in order (at-least-once),
    /// then one record per key it changed, with its state now and, `with_sources`, the input
    /// positions that state includes (at-least-once; exactly-once records leave them to the
    /// transaction).
    pub(super) fn journal_records(&mut self, with_sources: bool) -> Result<Vec<JournalRecord>, FlowError> {
        let mut records = Vec::new();
        let dirty: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, part)| !part.unjournaled.is_empty() || !part.deferred.is_empty())
            .map(|(p, _)| *p)
            .collect();
        for p in dirty {
            let Some(part) = self.partitions.get_mut(&p) else { continue };
            let deferred = std::mem::take(&mut part.deferred);
            let keys = std::mem::take(&mut part.unjournaled);
            records.extend(deferred.into_iter().map(|(k, v)| (p, k, v)));
            for (key, events) in keys {
                let Some(part) = self.partitions.get(&p) else { continue };
                let Some(entity) = part.overlay.get(&key) else { continue };
                let sources =
                    if with_sources { part.applied.get(&key).cloned().unwrap_or_default() } else { Vec::new() };
                let value = self.journal_value(&key, events, entity.seq, &entity.state, sources)?;
                records.push((p, key.to_bytes().into_owned(), value));
            }
        }
        Ok(records)
    }

    /// Writes the open transaction's journal records (Kafka journal): one per key it changed.
    pub(super) fn flush_journal(&mut self) -> Result<(), FlowError> {
        let records = self.journal_records(false)?;
        let Backend::Kafka(journal) = &self.backend else { return Ok(()) };
        records.iter().try_for_each(|(p, k, v)| self.produce(journal.topic(), Some(*p), Some(k), Some(v)))
    }
}
