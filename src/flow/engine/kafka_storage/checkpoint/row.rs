//! The row the local store keeps of a key: what a read from the store uses of the key's newest
//! journal record (its state, with its sequence number, codec and version, and the input positions
//! it includes), in a compact encoding of its own.
//!
//! A journal record is built to travel alone: two 24-byte envelope headers (magic, format, kind,
//! codec, version, timestamp, length, CRC), its events, fixed-width integers. A bank account's
//! record after one deposit takes 98 bytes; its row 11 (the journal record without its events took
//! 67, with both headers). fjall checksums every block it writes and reads, so the row needs no CRC
//! of its own; the rows' timestamps and events are read by nothing. Fewer bytes per row is less of
//! everything the store does: its flushes and merges copy less, a data block holds several times
//! as many rows (more of them in fjall's block cache and the page cache) and fewer blocks are
//! indexed. Kafka Streams' RocksDB stores keep the bare serialized value in the same way.
//!
//! ```text
//! 0x01                     the row format (a journal record starts with the envelope's magic "ES")
//! bincode (standard: variable-length integers) of Row: last_seq, codec, version, state, sources
//! ```
//!
//! Rows written before this format (the journal record without its events) are read as before.

use eventstage_journal::{CodecId, Envelope, JournalEntry, SeqNo, SourcePosition, MAGIC};

/// The first byte of a row in this format.
const ROW_FORMAT: u8 = 0x01;

const CONFIG: bincode::config::Configuration = bincode::config::standard();

#[derive(bincode::Encode, bincode::BorrowDecode)]
struct Row<'a> {
    last_seq: u64,
    codec: u8,
    version: u16,
    /// The state's encoding; `None` for an at-least-once deletion marker, whose input positions
    /// hold.
    state: Option<&'a [u8]>,
    /// Input positions (at least once): topic, partition, next offset.
    sources: Vec<(&'a str, i32, i64)>,
}

/// The row of a journal record `value`. A record that does not decode is kept as it is: reading
/// it back reports the damage.
pub(super) fn stored_row(value: &[u8]) -> Vec<u8> {
    let Ok(entry) = JournalEntry::decode(value) else { return value.to_vec() };
    let (codec, version) = entry.state.as_ref().map_or((0, 0), |s| (s.codec.0, s.type_version));
    let row = Row {
        last_seq: entry.last_seq.0,
        codec,
        version,
        state: entry.state.as_ref().map(|s| s.payload.as_slice()),
        sources: entry.sources.iter().map(|s| (s.topic.as_str(), s.partition, s.next_offset)).collect(),
    };
    let mut out = Vec::with_capacity(16 + row.state.map_or(0, <[u8]>::len));
    out.push(ROW_FORMAT);
    match bincode::encode_into_std_write(&row, &mut out, CONFIG) {
        Ok(_) => out,
        // Never expected (writing to a Vec does not fail): the record is kept as it is.
        Err(_) => value.to_vec(),
    }
}

/// A row read from the store, as the journal entry it was made of (without its events; the
/// state's envelope carries no timestamp).
///
/// # Errors
/// What is wrong with the bytes.
pub(in crate::flow::engine) fn read_row(bytes: &[u8]) -> Result<JournalEntry, String> {
    match bytes.first() {
        Some(&ROW_FORMAT) => {
            let (row, read): (Row<'_>, usize) =
                bincode::borrow_decode_from_slice(&bytes[1..], CONFIG).map_err(|e| format!("a bad row: {e}"))?;
            if read + 1 != bytes.len() {
                return Err(format!("a bad row: {} bytes after its end", bytes.len() - 1 - read));
            }
            let state = row.state.map(|s| Envelope::snapshot(CodecId(row.codec), row.version, 0, s.to_vec()));
            let sources = row
                .sources
                .into_iter()
                .map(|(topic, partition, next_offset)| SourcePosition {
                    topic: topic.to_string(),
                    partition,
                    next_offset,
                })
                .collect();
            Ok(JournalEntry { last_seq: SeqNo(row.last_seq), events: Vec::new(), state, sources })
        }
        // A row written before this format: the journal record without its events.
        Some(&b) if b == MAGIC[0] => JournalEntry::decode(bytes).map_err(|e| e.to_string()),
        Some(&b) => Err(format!("an unknown row format {b:#04x}")),
        None => Err("an empty row".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: Option<&[u8]>, sources: Vec<SourcePosition>) -> JournalEntry {
        JournalEntry {
            last_seq: SeqNo(7),
            events: vec![Envelope::event(CodecId::BINCODE, 1, 5, b"deposited 5".to_vec())],
            state: state.map(|s| Envelope::snapshot(CodecId::BINCODE, 3, 6, s.to_vec())),
            sources,
        }
    }

    /// What a read from the store keeps of `entry`.
    fn kept(entry: &JournalEntry) -> JournalEntry {
        let state = entry.state.as_ref().map(|s| Envelope { timestamp_ms: 0, ..s.clone() });
        JournalEntry { last_seq: entry.last_seq, events: Vec::new(), state, sources: entry.sources.clone() }
    }

    #[test]
    fn a_row_keeps_the_state_and_positions_and_is_far_smaller_than_the_record() {
        let sources = vec![SourcePosition { topic: "in".into(), partition: 2, next_offset: 40 }];
        let cases = [
            entry(Some(b"balance 12"), Vec::new()),
            entry(Some(b"balance 12"), sources.clone()),
            // An at-least-once deletion marker: no state, its positions hold.
            entry(None, sources),
        ];
        for e in cases {
            let raw = e.encode();
            let row = stored_row(&raw);
            assert!(row.len() * 3 < raw.len(), "{} bytes of {}", row.len(), raw.len());
            assert_eq!(read_row(&row).expect("reads"), kept(&e));
        }
    }

    #[test]
    fn a_bank_accounts_row_after_a_deposit_takes_a_few_bytes() {
        use crate::codec::Codec;
        use crate::stage::EventSourced;
        use crate::stages::bank::{Account, BankEvent, LimitedBank};
        let codec = Codec::default();
        let state =
            crate::stage::encode_state::<LimitedBank>(codec, &Account { open: true, balance: 1_205 }).expect("encodes");
        let event = codec.encode(&BankEvent::Deposited { amount: 5 }).expect("encodes");
        let record = JournalEntry {
            last_seq: SeqNo(2),
            events: vec![Envelope::event(codec.id(), LimitedBank::EVENT_VERSION, 1_764_950_400_000, event)],
            state: Some(Envelope::snapshot(codec.id(), LimitedBank::STATE_VERSION, 1_764_950_400_000, state)),
            sources: Vec::new(),
        }
        .encode();
        let row = stored_row(&record);
        assert_eq!((record.len(), row.len()), (98, 11));
    }

    #[test]
    fn rows_of_the_earlier_format_are_read_and_bad_rows_say_so() {
        let e = entry(Some(b"balance 12"), Vec::new());
        let earlier = JournalEntry { events: Vec::new(), ..e.clone() };
        assert_eq!(read_row(&earlier.encode()).expect("reads"), earlier);
        // A journal record that did not decode was kept as it is: reading it says what is wrong.
        assert_eq!(stored_row(b"not a journal record"), b"not a journal record");
        assert!(read_row(b"not a journal record").unwrap_err().contains("unknown row format"));
        let mut row = stored_row(&e.encode());
        row.push(0);
        assert!(read_row(&row).unwrap_err().contains("after its end"));
        assert!(read_row(&row[..4]).unwrap_err().contains("a bad row"));
        assert!(read_row(&[]).is_err());
        assert!(read_row(&[0x7f]).unwrap_err().contains("0x7f"));
    }
}
