//! A journal record's value: a key's new events and its state after them (the layout is in the
//! module documentation of `kafka`).

use crate::envelope::HEADER_LEN;
use crate::error::EnvelopeError;
use crate::{CodecId, Envelope, RecordKind, SeqNo, SourcePosition};

/// One journal record's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// Sequence number of the last event in `events` (or of the state, when `events` is empty).
    pub last_seq: SeqNo,
    /// The events, in order; the first has seq `last_seq - events.len() + 1`.
    pub events: Vec<Envelope>,
    /// The key's state after the events, as a snapshot envelope.
    pub state: Option<Envelope>,
    /// The inputs the state includes: per input topic partition, the next offset after the last
    /// input applied to this key (written by at-least-once flows; empty otherwise).
    pub sources: Vec<SourcePosition>,
}

impl JournalEntry {
    /// The record value.
    pub fn encode(&self) -> Vec<u8> {
        let events: usize = self.events.iter().map(|e| 4 + e.encoded_len()).sum();
        let state = 4 + self.state.as_ref().map_or(0, Envelope::encoded_len);
        let sources: usize = self.sources.iter().map(|s| 14 + s.topic.len()).sum();
        // The entry's own header is written over the first bytes once the payload is complete.
        let mut payload = Vec::with_capacity(HEADER_LEN + 12 + events + state + 4 + sources);
        payload.resize(HEADER_LEN, 0);
        payload.extend_from_slice(&self.last_seq.0.to_le_bytes());
        payload.extend_from_slice(&(self.events.len() as u32).to_le_bytes());
        for e in &self.events {
            payload.extend_from_slice(&(e.encoded_len() as u32).to_le_bytes());
            e.encode_into(&mut payload);
        }
        match &self.state {
            Some(s) => {
                payload.extend_from_slice(&(s.encoded_len() as u32).to_le_bytes());
                s.encode_into(&mut payload);
            }
            None => payload.extend_from_slice(&0u32.to_le_bytes()),
        }
        let type_version = if self.sources.is_empty() {
            1
        } else {
            payload.extend_from_slice(&(self.sources.len() as u32).to_le_bytes());
            for s in &self.sources {
                let topic = &s.topic.as_bytes()[..s.topic.len().min(u16::MAX as usize)];
                payload.extend_from_slice(&(topic.len() as u16).to_le_bytes());
                payload.extend_from_slice(topic);
                payload.extend_from_slice(&s.partition.to_le_bytes());
                payload.extend_from_slice(&s.next_offset.to_le_bytes());
            }
            2
        };
        let ts = self.events.last().or(self.state.as_ref()).map_or(0, |e| e.timestamp_ms);
        Envelope::seal(RecordKind::Entry, CodecId::RAW, type_version, ts, payload)
    }

    /// Decodes a record value.
    ///
    /// # Errors
    /// When the bytes are not a valid entry (the message says what is wrong).
    pub fn decode(value: &[u8]) -> Result<Self, EnvelopeError> {
        let outer = Envelope::decode(value)?;
        if outer.kind != RecordKind::Entry {
            return Err(EnvelopeError::UnknownKind(outer.kind as u8));
        }
        let p = &outer.payload;
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], EnvelopeError> {
            let s = p.get(at..at + n).ok_or(EnvelopeError::Truncated { len: p.len(), needed: at + n })?;
            at += n;
            Ok(s)
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let last_seq = SeqNo(u64::from_le_bytes(take(8)?.try_into().unwrap_or_default()));
        let n = u32_at(take(4)?);
        let mut events = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let len = u32_at(take(4)?);
            events.push(Envelope::decode(take(len)?)?);
        }
        let len = u32_at(take(4)?);
        let state = if len == 0 { None } else { Some(Envelope::decode(take(len)?)?) };
        let mut sources = Vec::new();
        if outer.type_version >= 2 {
            let m = u32_at(take(4)?);
            for _ in 0..m {
                let b = take(2)?;
                let len = u16::from_le_bytes([b[0], b[1]]) as usize;
                let topic = String::from_utf8_lossy(take(len)?).into_owned();
                let b = take(4)?;
                let partition = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let next_offset = i64::from_le_bytes(take(8)?.try_into().unwrap_or_default());
                sources.push(SourcePosition { topic, partition, next_offset });
            }
        }
        Ok(Self { last_seq, events, state, sources })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_detected() {
        let entry = JournalEntry {
            last_seq: SeqNo(7),
            events: vec![
                Envelope::event(CodecId::BINCODE, 1, 5, b"e6".to_vec()),
                Envelope::event(CodecId::BINCODE, 1, 6, b"e7".to_vec()),
            ],
            state: Some(Envelope::snapshot(CodecId::BINCODE, 1, 6, b"state".to_vec())),
            sources: Vec::new(),
        };
        let positioned = JournalEntry {
            sources: vec![SourcePosition { topic: "cmds".into(), partition: 3, next_offset: 42 }],
            ..entry.clone()
        };
        for entry in [entry, positioned] {
            let bytes = entry.encode();
            assert_eq!(JournalEntry::decode(&bytes).unwrap(), entry);
            for i in 0..bytes.len() {
                let mut d = bytes.clone();
                d[i] ^= 1;
                assert!(JournalEntry::decode(&d).is_err(), "flip at {i}");
            }
        }
        let empty = JournalEntry { last_seq: SeqNo(1), events: vec![], state: None, sources: Vec::new() };
        assert_eq!(JournalEntry::decode(&empty.encode()).unwrap(), empty);
    }
}
