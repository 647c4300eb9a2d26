//! Fuzz harness of the journal crate's decoders of bytes from disk (issue 13): the envelope, the
//! sled store's records, storage keys, head index, positions and batch counter, its commit mark and
//! its header file. Each runs `EVENTSTAGE_FUZZ_CASES` cases (see `testkit::fuzz`); on any input a
//! decoder returns `Ok` or `Err` without panicking, hanging or allocating absurdly, and on valid
//! records it gives back what was written.
//!
//! The Kafka journal's `JournalEntry` is fuzzed by the main crate's `tests/fuzz.rs`: reaching it
//! here needs the `kafka` feature, which links librdkafka into this binary.

use eventstage_journal::testkit::fuzz::{mutated_with, mutations, Field, Fuzz, Mutations, Tracking};
use eventstage_journal::{
    printable_key, Batch, CodecId, Envelope, EventQuery, EventRecord, Journal, JournalError, Progress, RecordKind,
    SeqNo, SledStore, SnapshotRecord, SourcePosition, HEADER_LEN,
};
use futures::TryStreamExt;
use proptest::prelude::*;
use proptest::sample::Index;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

#[global_allocator]
static ALLOC: Tracking = Tracking;

fn kind() -> impl Strategy<Value = RecordKind> {
    prop::sample::select(vec![RecordKind::Event, RecordKind::Snapshot, RecordKind::Entry, RecordKind::Events])
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (kind(), any::<u8>(), any::<u16>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..200)).prop_map(
        |(kind, codec, type_version, timestamp_ms, payload)| Envelope {
            kind,
            codec: CodecId(codec),
            type_version,
            timestamp_ms,
            payload,
        },
    )
}

/// The header fields of an envelope starting at `at`.
fn header_fields(at: usize) -> Vec<Field> {
    vec![
        Field::le(at + 2, 1),
        Field::le(at + 3, 1),
        Field::le(at + 4, 1),
        Field::le(at + 5, 1),
        Field::le(at + 6, 2),
        Field::le(at + 8, 8),
        Field::le(at + 16, 4),
    ]
}

#[test]
fn fuzz_envelope_decode() {
    let cases = envelope().prop_flat_map(|env| {
        let seed = env.encode();
        (Just(env), mutated_with(seed, header_fields(0), Some(0)))
    });
    Fuzz::new("Envelope::decode").run(cases, |(env, bytes)| {
        prop_assert_eq!(Envelope::decode(&env.encode()), Ok(env.clone()));
        let checked = Envelope::check(&bytes);
        match Envelope::decode(&bytes) {
            Ok(decoded) => {
                // The format has one encoding per envelope: what decodes, encodes to the same bytes.
                prop_assert_eq!(decoded.encode(), bytes);
                prop_assert_eq!(checked.map(|h| (h.kind, h.codec)), Ok((decoded.kind, decoded.codec)));
            }
            Err(e) => prop_assert_eq!(checked.err(), Some(e)),
        }
        Ok(())
    });
}

#[test]
fn fuzz_envelope_seal() {
    // Any buffer of at least a header: sealing gives an envelope that decodes to its payload.
    let cases = (envelope(), mutations()).prop_map(|(env, m)| {
        let mut buf = env.encode();
        buf = m.apply(&buf, &[], None);
        buf.resize(buf.len().max(HEADER_LEN), 0);
        (env, buf)
    });
    Fuzz::new("Envelope::seal").run(cases, |(env, buf)| {
        let payload = buf[HEADER_LEN..].to_vec();
        let sealed = Envelope::seal(env.kind, env.codec, env.type_version, env.timestamp_ms, buf);
        prop_assert_eq!(Envelope::decode(&sealed), Ok(Envelope { payload, ..env }));
        Ok(())
    });
}

#[test]
fn fuzz_printable_key() {
    Fuzz::new("printable_key").run(mutated_with(b"acct-1".to_vec(), Vec::new(), None), |key| {
        let shown = printable_key(&key);
        prop_assert!(!shown.is_empty());
        Ok(())
    });
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn store(dir: &Path) -> SledStore {
    SledStore::builder(dir).flush_every(None).open().unwrap()
}

/// A key, its events' payloads, and maybe a snapshot after one of them.
type KeyHistory = (Vec<u8>, Vec<Vec<u8>>, Option<usize>);

/// One journal's records.
#[derive(Debug, Clone)]
struct Written {
    grouped: bool,
    keys: Vec<KeyHistory>,
    offset: i64,
}

fn written() -> impl Strategy<Value = Written> {
    // Keys with the bytes the storage-key escaping treats specially.
    let pool: Vec<Vec<u8>> =
        vec![b"a".to_vec(), b"acct-2".to_vec(), vec![0], vec![0, 0xff, 0], vec![0xff, 0xff], vec![]];
    let key = (prop::sample::select(pool), prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6))
        .prop_flat_map(|(k, events)| (Just(k), Just(events), prop::option::of(any::<usize>())));
    (any::<bool>(), prop::collection::vec(key, 1..4), any::<i64>()).prop_map(|(grouped, mut keys, offset)| {
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        keys.dedup_by(|a, b| a.0 == b.0);
        Written { grouped, keys, offset }
    })
}

impl Written {
    fn batch(&self) -> Batch {
        let mut batch = Batch::default();
        for (key, payloads, snapshot) in &self.keys {
            for (i, p) in payloads.iter().enumerate() {
                let seq = i as u64 + 1;
                let envelope = Envelope::event(CodecId::RAW, 1, 1_700_000_000_000 + seq, p.clone());
                batch.events.push(EventRecord { key: key.clone(), seq: SeqNo(seq), envelope });
            }
            if let Some(at) = snapshot {
                let seq = (at % payloads.len()) as u64 + 1;
                let envelope = Envelope::snapshot(CodecId::JSON, 2, 7, payloads.concat());
                batch.snapshots.push(SnapshotRecord { key: key.clone(), seq: SeqNo(seq), envelope });
            }
        }
        batch.positions.push(SourcePosition { topic: "in-ü".into(), partition: -3, next_offset: self.offset });
        batch.meta.push((b"outbox".to_vec(), Some(vec![1, 2, 3])));
        batch
    }
}

/// Where a storage key's trailing number and a value's fields are, by the key's prefix (see the
/// layout in `sled_store/mod.rs`).
fn fields(key: &[u8], value: &[u8]) -> (Vec<Field>, Vec<Field>, Option<usize>) {
    let n = key.len();
    match key.first() {
        Some(b'e') => {
            let mut value_fields = header_fields(0);
            if value.get(3) == Some(&(RecordKind::Events as u8)) {
                // first seq, count, then each event's length.
                value_fields.extend([Field::le(HEADER_LEN, 8), Field::le(HEADER_LEN + 8, 4)]);
                let mut at = HEADER_LEN + 12;
                while let Some(len) = value.get(at..at + 4) {
                    value_fields.push(Field::le(at, 4));
                    at += 4 + u32::from_le_bytes(len.try_into().unwrap()) as usize;
                }
            }
            (vec![Field::be(n.saturating_sub(8), 8)], value_fields, Some(0))
        }
        Some(b's') => {
            let mut value_fields = header_fields(8);
            value_fields.push(Field::be(0, 8));
            (Vec::new(), value_fields, Some(8))
        }
        Some(b'p') => (vec![Field::be(n.saturating_sub(4), 4)], vec![Field::be(0, 8)], None),
        _ => (Vec::new(), vec![Field::be(0, 8)], None),
    }
}

/// A group record re-keyed under the seq its header says it ends at, so a group whose count was
/// changed still passes that check and reaches the rest of the parser.
fn rekey_group(key: &mut [u8], value: &[u8]) {
    if key.first() != Some(&b'e') || key.len() < 9 || value.get(3) != Some(&(RecordKind::Events as u8)) {
        return;
    }
    let (Some(first), Some(count)) =
        (value.get(HEADER_LEN..HEADER_LEN + 8), value.get(HEADER_LEN + 8..HEADER_LEN + 12))
    else {
        return;
    };
    let first = u64::from_le_bytes(first.try_into().unwrap());
    let count = u64::from(u32::from_le_bytes(count.try_into().unwrap()));
    if let Some(last) = first.checked_add(count.saturating_sub(1)) {
        let n = key.len();
        key[n - 8..].copy_from_slice(&last.to_be_bytes());
    }
}

#[derive(Debug, Clone)]
struct Damage {
    target: Index,
    in_key: bool,
    rekey: bool,
    mutations: Mutations,
}

fn damage() -> impl Strategy<Value = Damage> {
    (any::<Index>(), prop::bool::weighted(0.2), any::<bool>(), mutations())
        .prop_map(|(target, in_key, rekey, mutations)| Damage { target, in_key, rekey, mutations })
}

/// A reader of a damaged journal returns its records or says it is damaged: nothing else (a
/// journal's blocking task that panicked returns `Closed`).
fn ok_or_damage<T>(what: &str, r: &Result<T, JournalError>) -> Result<(), TestCaseError> {
    match r {
        Err(e) if !e.is_damage() => Err(TestCaseError::fail(format!("{what}: {e}"))),
        _ => Ok(()),
    }
}

/// Every reader of the sled journal over one damaged record: events (all, one key, a range),
/// recover, verify, stats, positions and meta.
#[test]
fn fuzz_sled_records() {
    let dir = TempDir::new().unwrap();
    let journal = store(dir.path()).journal("fuzz").unwrap();
    let rt = rt();
    Fuzz::new("sled journal records").watch_other_threads(true).run((written(), damage()), move |(w, d)| {
        let tree = journal.sled_tree();
        tree.clear().unwrap();
        let batch = w.batch();
        let expected = batch.events.clone();
        if w.grouped {
            rt.block_on(journal.append_grouped(batch)).unwrap();
        } else {
            rt.block_on(journal.append(batch)).unwrap();
        }
        let records: Vec<(Vec<u8>, Vec<u8>)> =
            tree.iter().map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec()))).collect::<Result<_, _>>().unwrap();
        let (key, value) = &records[d.target.index(records.len())];
        let (key_fields, value_fields, envelope) = fields(key, value);
        let (mut new_key, new_value) = if d.in_key {
            (d.mutations.apply(key, &key_fields, None), value.clone())
        } else {
            (key.clone(), d.mutations.apply(value, &value_fields, envelope))
        };
        if d.rekey {
            rekey_group(&mut new_key, &new_value);
        }
        tree.remove(key).unwrap();
        tree.insert(new_key, new_value).unwrap();

        let one = EventQuery {
            key: Some(w.keys[0].0.clone()),
            from_seq: SeqNo(2),
            until_seq: Some(SeqNo(4)),
            until_time_ms: None,
        };
        let (ranged, events, recovered, report, stats, positions, meta) = rt.block_on(async {
            (
                journal.events(one).try_concat().await,
                journal.events(EventQuery::all()).try_concat().await,
                journal.recover().try_concat().await,
                journal.verify(Progress::none()).await,
                journal.stats().await,
                journal.positions().await,
                journal.meta(b"outbox").await,
            )
        });
        ok_or_damage("events of one key", &ranged)?;
        ok_or_damage("events", &events)?;
        ok_or_damage("recover", &recovered)?;
        ok_or_damage("stats", &stats)?;
        ok_or_damage("positions", &positions)?;
        let report = report.map_err(|e| TestCaseError::fail(format!("verify failed instead of reporting: {e}")))?;
        meta.map_err(|e| TestCaseError::fail(format!("meta: {e}")))?;
        if d.mutations.is_none() && !(d.rekey && w.grouped) {
            prop_assert!(report.is_ok(), "{:?}", report.problems);
            prop_assert_eq!(events.unwrap(), expected);
        }
        Ok(())
    });
}

/// The history archive: a journal's covered events moved to its archive file, the file damaged
/// (with the first frame's fields as targets and, when `reseal`, its frame checksum recomputed so
/// that the frame parser and the records behind it are reached), then every reader.
#[test]
fn fuzz_archive_frames() {
    let rt = rt();
    let cases = (written(), mutations(), any::<bool>())
        .prop_filter("a snapshot, so that something is archived", |(w, _, _)| w.keys.iter().any(|k| k.2.is_some()));
    Fuzz::new("sled history archive").watch_other_threads(true).run(cases, move |(w, m, reseal)| {
        let dir = TempDir::new().unwrap();
        let file = archive_path(dir.path(), "fuzz");
        let batch = w.batch();
        let mut expected = batch.events.clone();
        expected.sort_by(|a, b| (&a.key, a.seq).cmp(&(&b.key, b.seq)));
        {
            let journal = store(dir.path()).journal("fuzz").unwrap();
            rt.block_on(async {
                if w.grouped {
                    journal.append_grouped(batch).await.unwrap();
                } else {
                    journal.append(batch).await.unwrap();
                }
                journal.archive_history().await.unwrap();
                journal.flush().await.unwrap();
            });
        }
        // A snapshot inside a group covers only part of it: the group stays in sled.
        let Ok(bytes) = std::fs::read(&file) else {
            prop_assert!(w.grouped, "nothing was archived");
            return Ok(());
        };
        // The first frame: body length, checksum, key length, key, seq, then the stored record.
        let key_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let fields = vec![Field::le(0, 4), Field::le(8, 4), Field::le(12 + key_len, 8)];
        let mut damaged = m.apply(&bytes, &fields, Some(20 + key_len));
        let body_len = damaged.get(..4).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
        if reseal && damaged.len() >= 8 + body_len {
            let crc = crc32fast::hash(&damaged[8..8 + body_len]);
            damaged[4..8].copy_from_slice(&crc.to_le_bytes());
        }
        std::fs::write(&file, &damaged).unwrap();

        let journal = store(dir.path()).journal("fuzz").unwrap();
        let one = EventQuery {
            key: Some(w.keys[0].0.clone()),
            from_seq: SeqNo(2),
            until_seq: Some(SeqNo(4)),
            until_time_ms: None,
        };
        let (ranged, events, recovered, report, stats) = rt.block_on(async {
            (
                journal.events(one).try_concat().await,
                journal.events(EventQuery::all()).try_concat().await,
                journal.recover().try_concat().await,
                journal.verify(Progress::none()).await,
                journal.stats().await,
            )
        });
        ok_or_damage("events of one key", &ranged)?;
        ok_or_damage("events", &events)?;
        ok_or_damage("recover", &recovered)?;
        ok_or_damage("stats", &stats)?;
        let report = report.map_err(|e| TestCaseError::fail(format!("verify failed instead of reporting: {e}")))?;
        if damaged == bytes {
            prop_assert!(report.is_ok(), "{:?}", report.problems);
            let mut events = events.unwrap();
            events.sort_by(|a, b| (&a.key, a.seq).cmp(&(&b.key, b.seq)));
            prop_assert_eq!(events, expected);
        }
        Ok(())
    });
}

fn archive_path(dir: &Path, name: &str) -> PathBuf {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    dir.join("archive").join(format!("{hex}.log"))
}

fn mark_path(dir: &Path, name: &str) -> PathBuf {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    dir.join("marks").join(format!("{hex}.mark"))
}

/// The commit mark: 20 bytes (magic, version, batch, CRC) read when a journal opens.
#[test]
fn fuzz_commit_mark() {
    let dir = TempDir::new().unwrap();
    let store = store(dir.path());
    {
        let journal = store.journal("m").unwrap();
        rt().block_on(async {
            journal.append(Batch { meta: vec![(b"x".to_vec(), Some(vec![1]))], ..Batch::default() }).await.unwrap();
            journal.flush().await.unwrap();
        });
    }
    let path = mark_path(dir.path(), "m");
    let seed = std::fs::read(&path).unwrap();
    let fields = vec![Field::le(4, 4), Field::le(8, 8)];
    let cases = (mutated_with(seed, fields, None), any::<bool>());
    Fuzz::new("commit mark").run(cases, move |(mut bytes, recrc)| {
        if recrc && bytes.len() == 20 {
            let crc = crc32fast::hash(&bytes[..16]);
            bytes[16..].copy_from_slice(&crc.to_le_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let valid = bytes.len() == 20
            && bytes[..8] == *b"ESMK\x01\0\0\0"
            && crc32fast::hash(&bytes[..16]).to_le_bytes() == bytes[16..];
        let marked = u64::from_le_bytes(bytes[8.min(bytes.len())..16.min(bytes.len())].try_into().unwrap_or_default());
        match store.journal("m") {
            Ok(_) => prop_assert!(!valid || marked <= 1, "a mark of batch {} over 1 stored went unnoticed", marked),
            Err(JournalError::MissingBatches { marked: m, found: 1, .. }) => {
                prop_assert!(valid && m == marked, "mark {:?} read as batch {}", bytes, m)
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error: {e}"))),
        }
        Ok(())
    });
}

/// The store's header file, `eventstage-journal.json`, read when a store opens.
#[test]
fn fuzz_store_header() {
    let dir = TempDir::new().unwrap();
    let first = dir.path().join("first");
    drop(store(&first));
    let seed = std::fs::read(first.join("eventstage-journal.json")).unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    let root = dir.path().to_path_buf();
    let cases = (mutated_with(seed.clone(), Vec::new(), None), Just(seed));
    Fuzz::new("store header").run(cases, move |(bytes, seed)| {
        let path = root.join(n.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_string());
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("eventstage-journal.json"), &bytes).unwrap();
        let opened = SledStore::builder(&path).flush_every(None).create(false).open();
        match &opened {
            Ok(_) | Err(JournalError::NotAJournal { .. } | JournalError::NewerFormat { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error: {e}"))),
        }
        if bytes == seed {
            prop_assert!(opened.is_ok());
        }
        drop(opened);
        std::fs::remove_dir_all(&path).unwrap();
        Ok(())
    });
}

/// Found by `fuzz_sled_records`: a group record whose count says 2^32-1 events, re-sealed and stored
/// under the seq that count ends at, made every reader allocate room for them all at once (the
/// process aborted: "memory allocation of 144803763264 bytes failed").
#[test]
fn a_group_claiming_four_billion_events_is_damage_not_an_allocation() {
    let dir = TempDir::new().unwrap();
    let journal = store(dir.path()).journal("g").unwrap();
    let rt = rt();
    let w = Written { grouped: true, keys: vec![(b"a".to_vec(), vec![b"x".to_vec(), b"y".to_vec()], None)], offset: 0 };
    rt.block_on(journal.append_grouped(w.batch())).unwrap();
    let tree = journal.sled_tree();
    let (key, value) = tree.scan_prefix(b"e").next().unwrap().unwrap();
    let (mut key, mut value) = (key.to_vec(), value.to_vec());
    value[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    eventstage_journal::testkit::fuzz::reseal(&mut value, 0);
    rekey_group(&mut key, &value);
    tree.insert(key, value).unwrap();
    let events = rt.block_on(journal.events(EventQuery::all()).try_concat());
    assert!(events.as_ref().is_err_and(JournalError::is_damage), "{events:?}");
    let report = rt.block_on(journal.verify(Progress::none())).unwrap();
    assert!(report.problems.iter().any(|p| p.what.contains("truncated")), "{:?}", report.problems);
}

/// Found by `fuzz_sled_records`: a snapshot whose seq prefix (outside its envelope's CRC) says
/// u64::MAX made recovery's reader thread panic on `seq + 1`, so `recover` ended early, without an
/// error, missing the keys after it.
#[test]
fn a_snapshot_at_seq_u64_max_does_not_end_recovery_early() {
    let dir = TempDir::new().unwrap();
    let journal = store(dir.path()).journal("s").unwrap();
    let rt = rt();
    let w = Written {
        grouped: false,
        keys: vec![(b"a".to_vec(), vec![b"x".to_vec()], Some(0)), (b"b".to_vec(), vec![b"y".to_vec()], None)],
        offset: 0,
    };
    rt.block_on(journal.append(w.batch())).unwrap();
    let tree = journal.sled_tree();
    let (key, value) = tree.scan_prefix(b"s").next().unwrap().unwrap();
    let mut value = value.to_vec();
    value[..8].copy_from_slice(&u64::MAX.to_be_bytes());
    tree.insert(key, value).unwrap();
    let recovered = rt.block_on(journal.recover().try_concat()).unwrap();
    let keys: Vec<&[u8]> = recovered.iter().map(|r| r.key()).collect();
    assert_eq!(keys, [&b"a"[..], b"b"], "{recovered:?}");
    let report = rt.block_on(journal.verify(Progress::none())).unwrap();
    assert!(report.problems.iter().any(|p| p.what.contains("ahead")), "{:?}", report.problems);
}

/// Found by `fuzz_store_header`: a header file that is not UTF-8 was reported as an I/O error
/// ("stream did not contain valid UTF-8") instead of "not a journal".
#[test]
fn a_header_that_is_not_utf8_is_not_a_journal() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("eventstage-journal.json"), b"\x80{}").unwrap();
    let opened = SledStore::builder(dir.path()).flush_every(None).create(false).open();
    assert!(matches!(opened, Err(JournalError::NotAJournal { .. })), "{opened:?}");
}
