//! Every backend passes the conformance suite and the model-based property tests.

use eventstage_journal::testkit::{
    self, fold_model, fold_recovered, fold_recovered_keys, model_batches, to_batches, Model,
};
use eventstage_journal::{Journal, JournalError, MemoryJournal, SledJournal, SledStore};
use proptest::prelude::*;
use std::path::Path;
use tempfile::TempDir;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[tokio::test]
async fn memory_conformance() {
    testkit::conformance(|| async { MemoryJournal::new("conformance") }).await;
}

#[tokio::test]
async fn sled_conformance() {
    let dir = TempDir::new().unwrap();
    let mut n = 0;
    testkit::conformance(|| {
        n += 1;
        let path = dir.path().join(format!("store-{n}"));
        async move { SledJournal::open(path, "conformance").unwrap() }
    })
    .await;
}

/// A sled journal whose appends store each key's events of a batch as one record
/// (`SledJournal::append_grouped`, what flows use): the same contract as plain appends. With
/// `archive`, every append is followed by a move of the history snapshots cover into the archive.
#[derive(Clone)]
struct Grouped(SledJournal, bool);

/// A grouped sled journal whose history moves to the archive after every append.
fn archived(j: SledJournal) -> Grouped {
    Grouped(j, true)
}

impl Journal for Grouped {
    fn name(&self) -> &str {
        self.0.name()
    }
    async fn append(
        &self,
        batch: eventstage_journal::Batch,
    ) -> eventstage_journal::Result<eventstage_journal::Committed> {
        let committed = self.0.append_grouped(batch).await?;
        if self.1 {
            self.0.archive_history().await?;
        }
        Ok(committed)
    }
    fn flush(&self) -> impl std::future::Future<Output = eventstage_journal::Result<()>> + Send {
        self.0.flush()
    }
    fn events(
        &self,
        query: eventstage_journal::EventQuery,
    ) -> impl futures::Stream<Item = eventstage_journal::Result<Vec<eventstage_journal::EventRecord>>> + Send + 'static
    {
        self.0.events(query)
    }
    fn recover(
        &self,
    ) -> impl futures::Stream<Item = eventstage_journal::Result<Vec<eventstage_journal::Recovered>>> + Send + 'static
    {
        self.0.recover()
    }
    fn recover_keys(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> impl futures::Stream<Item = eventstage_journal::Result<Vec<eventstage_journal::Recovered>>> + Send + 'static
    {
        self.0.recover_keys(keys)
    }
    fn key_count(&self) -> impl std::future::Future<Output = eventstage_journal::Result<u64>> + Send {
        self.0.key_count()
    }
    fn positions(
        &self,
    ) -> impl std::future::Future<Output = eventstage_journal::Result<Vec<eventstage_journal::SourcePosition>>> + Send
    {
        self.0.positions()
    }
    fn meta(
        &self,
        key: &[u8],
    ) -> impl std::future::Future<Output = eventstage_journal::Result<Option<Vec<u8>>>> + Send {
        self.0.meta(key)
    }
    fn stats(
        &self,
    ) -> impl std::future::Future<Output = eventstage_journal::Result<eventstage_journal::JournalStats>> + Send {
        self.0.stats()
    }
    fn verify(
        &self,
        progress: eventstage_journal::Progress,
    ) -> impl std::future::Future<Output = eventstage_journal::Result<eventstage_journal::VerifyReport>> + Send {
        self.0.verify(progress)
    }
}

#[tokio::test]
async fn sled_grouped_conformance() {
    let dir = TempDir::new().unwrap();
    let mut n = 0;
    testkit::conformance(|| {
        n += 1;
        let path = dir.path().join(format!("store-{n}"));
        async move { Grouped(SledJournal::open(path, "conformance").unwrap(), false) }
    })
    .await;
}

#[tokio::test]
async fn sled_archived_conformance() {
    let dir = TempDir::new().unwrap();
    let mut n = 0;
    testkit::conformance(|| {
        n += 1;
        let path = dir.path().join(format!("store-{n}"));
        async move { archived(SledJournal::open(path, "conformance").unwrap()) }
    })
    .await;
}

/// The archive file of journal `name` in the store at `path`.
fn archive_file(path: &Path, name: &str) -> std::path::PathBuf {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    path.join("archive").join(format!("{hex}.log"))
}

/// History moves to the archive in the background, as snapshots are written; a move that wrote the
/// archive but did not commit in sled is cut off on open; an archive shorter than committed, or
/// with a damaged frame, is an error for reads that need it and a problem for verify, never a
/// shorter history; recovery (snapshots and tails) does not read it.
#[tokio::test]
async fn history_moves_to_the_archive_and_damage_to_it_is_reported() {
    use eventstage_journal::{Batch, EventQuery, Progress};
    let dir = TempDir::new().unwrap();
    let file = archive_file(dir.path(), "h");
    let events = |from: u64, n: u64| (from..from + n).map(|s| testkit::event(b"k", s, b"e", s)).collect::<Vec<_>>();
    let j = SledJournal::open(dir.path(), "h").unwrap();
    j.append(Batch { events: events(1, 10), snapshots: vec![testkit::snapshot(b"k", 8, b"s8")], ..Default::default() })
        .await
        .unwrap();
    // The background archiver moves events 1..=8 (it runs every second).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while j.stats().await.unwrap().archived < 8 {
        assert!(std::time::Instant::now() < deadline, "history was not archived: {:?}", j.stats().await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(j.stats().await.unwrap().archived, 8);
    let all = testkit::collect_events(&j, EventQuery::default()).await;
    assert_eq!(all.iter().map(|e| e.seq.0).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    let committed = std::fs::metadata(&file).unwrap().len();
    assert!(committed > 0);
    j.flush().await.unwrap();
    drop(j);

    // A move that did not commit: bytes past the committed length are cut off on open.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(&bytes.clone()[..40]);
    std::fs::write(&file, &bytes).unwrap();
    let j = SledJournal::open(dir.path(), "h").unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), committed);
    assert_eq!(testkit::collect_events(&j, EventQuery::default()).await, all);
    drop(j);

    // A damaged frame: reads that need the archive fail naming it, recovery works, verify reports.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[20] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let j = SledJournal::open(dir.path(), "h").unwrap();
    let err = {
        let mut stream = std::pin::pin!(j.events(EventQuery::default()));
        loop {
            match futures::StreamExt::next(&mut stream).await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e.to_string(),
                None => panic!("a damaged archive read as a whole history"),
            }
        }
    };
    assert!(err.contains("history archive") && err.contains("checksum"), "{err}");
    assert_eq!(fold_recovered(&j).await.len(), 1);
    let report = j.verify(Progress::none()).await.unwrap();
    assert!(
        report.problems.iter().any(|p| p.what.contains("history archive") && p.what.contains("checksum")),
        "{report:?}"
    );
    drop(j);

    // An archive shorter than committed: the same, naming the missing bytes.
    std::fs::write(&file, &bytes[..10]).unwrap();
    let j = SledJournal::open(dir.path(), "h").unwrap();
    let report = j.verify(Progress::none()).await.unwrap();
    assert!(
        report.problems.iter().any(|p| p.what.contains(&format!("holds 10 bytes, {committed} were committed"))),
        "{report:?}"
    );
    assert!(j.stats().await.is_err());
}

/// Grouped records: each key's events of a batch are one record; queries from and up to a seq
/// inside a group, recovery after a snapshot inside a group, stats and verify see every event;
/// a damaged group is reported, and an old store is marked as of the new format when the first
/// group is written to it.
#[tokio::test]
async fn grouped_events_read_back_event_by_event() {
    use eventstage_journal::{Batch, EventQuery, Recovered, SeqNo};
    let dir = TempDir::new().unwrap();
    let header = dir.path().join("eventstage-journal.json");
    {
        let j = SledJournal::open(dir.path(), "g").unwrap();
        j.append(Batch { events: vec![testkit::event(b"a", 1, b"a1", 1)], ..Default::default() }).await.unwrap();
        j.flush().await.unwrap();
    }
    std::fs::write(&header, r#"{"format":"eventstage-journal","format_version":1}"#).unwrap();
    let j = SledJournal::open(dir.path(), "g").unwrap();
    let events = (2..=6)
        .map(|s| testkit::event(b"a", s, format!("a{s}").as_bytes(), s))
        .chain((1..=3).map(|s| testkit::event(b"b", s, format!("b{s}").as_bytes(), s)));
    let batch =
        Batch { events: events.collect(), snapshots: vec![testkit::snapshot(b"a", 4, b"A4")], ..Default::default() };
    j.append_grouped(batch).await.unwrap();
    assert!(std::fs::read_to_string(&header).unwrap().contains("\"format_version\": 2"), "the header is upgraded");
    let payloads = |evs: Vec<eventstage_journal::EventRecord>| -> Vec<Vec<u8>> {
        evs.into_iter().map(|e| e.envelope.payload).collect()
    };
    let all = testkit::collect_events(&j, EventQuery::all()).await;
    assert_eq!(
        all.iter().map(|e| (e.key.clone(), e.seq.0)).collect::<Vec<_>>(),
        [
            (b"a".to_vec(), 1),
            (b"a".to_vec(), 2),
            (b"a".to_vec(), 3),
            (b"a".to_vec(), 4),
            (b"a".to_vec(), 5),
            (b"a".to_vec(), 6),
            (b"b".to_vec(), 1),
            (b"b".to_vec(), 2),
            (b"b".to_vec(), 3)
        ]
    );
    let mut q = EventQuery::key(b"a".to_vec());
    q.from_seq = SeqNo(3);
    q.until_seq = Some(SeqNo(4));
    assert_eq!(payloads(testkit::collect_events(&j, q).await), [b"a3".to_vec(), b"a4".to_vec()]);
    let recovered = testkit::collect_recovered(&j).await;
    let after_snapshot: Vec<u64> = recovered
        .iter()
        .filter_map(|r| match r {
            Recovered::Event(e) if e.key == b"a" => Some(e.seq.0),
            _ => None,
        })
        .collect();
    assert_eq!(after_snapshot, [5, 6], "recovery: the snapshot at 4, then the events after it");
    assert_eq!(j.stats().await.unwrap().events, 9);
    let report = j.verify(eventstage_journal::Progress::none()).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.events, 9);
    drop(j);

    // Damage inside the group of `b` (stored under seq 3). The dropped journal's last reader
    // threads may hold sled's file lock for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let db = loop {
        match sled::open(dir.path().join("sled")) {
            Ok(db) => break db,
            Err(e) if e.to_string().contains("lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("open the store's sled: {e}"),
        }
    };
    let tree = db.open_tree(db.tree_names().into_iter().find(|n| n.starts_with(b"journal:")).unwrap()).unwrap();
    let (k, mut v) = tree.scan_prefix(b"e").last().unwrap().map(|(k, v)| (k, v.to_vec())).unwrap();
    let at = v.len() - 3;
    v[at] ^= 0xff;
    tree.insert(k, v).unwrap();
    tree.flush().unwrap();
    drop((tree, db));
    let j = SledJournal::open(dir.path(), "g").unwrap();
    let report = j.verify(eventstage_journal::Progress::none()).await.unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let mut q = EventQuery::key(b"b".to_vec());
    q.from_seq = SeqNo(1);
    let mut stream = Box::pin(j.events(q));
    let mut failed = false;
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        failed |= chunk.is_err();
    }
    assert!(failed, "reading a damaged group fails");
}

#[tokio::test]
async fn sled_reopen_keeps_everything_and_names_are_separate() {
    let dir = TempDir::new().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        let a = store.journal("a").unwrap();
        let b = store.journal("b").unwrap();
        a.append(eventstage_journal::Batch { events: vec![testkit::event(b"k", 1, b"a", 1)], ..Default::default() })
            .await
            .unwrap();
        b.append(eventstage_journal::Batch { events: vec![testkit::event(b"k", 1, b"b", 1)], ..Default::default() })
            .await
            .unwrap();
        a.flush().await.unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.journal_names(), vec!["a".to_string(), "b".to_string()]);
    let a = store.existing_journal("a").unwrap();
    assert_eq!(testkit::collect_events(&a, Default::default()).await[0].envelope.payload, b"a");
    assert_eq!(a.stats().await.unwrap().batches, 1);
    assert!(matches!(store.existing_journal("c"), Err(JournalError::UnknownJournal { .. })));
}

#[test]
fn not_a_journal_and_newer_format_are_refused() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let err = SledStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, JournalError::NotAJournal { .. }), "{err}");
    assert!(err.to_string().contains("eventstage-journal.json"), "{err}");
    let err = SledStore::builder(dir.path().join("missing")).create(false).open().unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let newer = dir.path().join("newer");
    SledStore::open(&newer).unwrap();
    std::fs::write(newer.join("eventstage-journal.json"), r#"{"format":"eventstage-journal","format_version":99}"#)
        .unwrap();
    let err = SledStore::open(&newer).unwrap_err();
    assert!(matches!(err, JournalError::NewerFormat { found: 99, .. }), "{err}");
    assert!(err.to_string().contains("upgrade eventstage"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Opens a copy of a store and returns the number of whole batches it holds, checking that its
/// content is exactly the model's prefix of that many batches.
async fn prefix_len(path: &Path, prefixes: &[Model]) -> Result<usize, JournalError> {
    let j = SledStore::open(path)?.journal("model")?;
    let batches = j.stats().await?.batches as usize;
    let state = fold_recovered(&j).await;
    assert_eq!(
        state,
        fold_model(&prefixes[batches]),
        "a reopened journal holds exactly its first {batches} whole batches"
    );
    Ok(batches)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Replay (snapshots + tails) equals the fold of all events, for both backends and grouped
    /// sled appends.
    #[test]
    fn replay_equals_fold(batches in model_batches(6, 30)) {
        rt().block_on(async {
            let dir = TempDir::new().unwrap();
            let sled = SledJournal::open(dir.path(), "model").unwrap();
            let grouped_dir = TempDir::new().unwrap();
            let grouped = Grouped(SledJournal::open(grouped_dir.path(), "model").unwrap(), false);
            let archive_dir = TempDir::new().unwrap();
            let arch = archived(SledJournal::open(archive_dir.path(), "model").unwrap());
            let mem = MemoryJournal::new("model");
            let mut model = Model::new();
            for b in to_batches(&batches, &mut model) {
                sled.append(b.clone()).await.unwrap();
                grouped.append(b.clone()).await.unwrap();
                arch.append(b.clone()).await.unwrap();
                mem.append(b).await.unwrap();
            }
            let expected = fold_model(&model);
            assert_eq!(fold_recovered(&mem).await, expected);
            assert_eq!(fold_recovered(&sled).await, expected);
            assert_eq!(fold_recovered(&grouped).await, expected);
            // Keys read one by one (and one never written) rebuild the same state.
            let mut keys: Vec<Vec<u8>> = model.keys().rev().cloned().collect();
            keys.push(b"never".to_vec());
            assert_eq!(fold_recovered_keys(&mem, keys.clone()).await, expected);
            assert_eq!(fold_recovered_keys(&sled, keys.clone()).await, expected);
            assert_eq!(fold_recovered_keys(&grouped, keys.clone()).await, expected);
            assert_eq!(fold_recovered_keys(&arch, keys).await, expected);
            assert_eq!(
                testkit::collect_events(&grouped, Default::default()).await,
                testkit::collect_events(&sled, Default::default()).await
            );
            assert!(grouped.verify(eventstage_journal::Progress::none()).await.unwrap().problems.is_empty());
            // History in the archive: the same events (archived ones first, each key in order),
            // the same state, a clean verify, before and after a reopen.
            let by_key = |mut events: Vec<eventstage_journal::EventRecord>| {
                events.sort_by(|a, b| (&a.key, a.seq).cmp(&(&b.key, b.seq)));
                events
            };
            let all = testkit::collect_events(&sled, Default::default()).await;
            assert_eq!(fold_recovered(&arch).await, expected);
            assert_eq!(by_key(testkit::collect_events(&arch, Default::default()).await), all);
            let report = arch.verify(eventstage_journal::Progress::none()).await.unwrap();
            assert!(report.problems.is_empty(), "{:?}", report.problems);
            let (arch_stats, sled_stats) = (arch.stats().await.unwrap(), sled.stats().await.unwrap());
            assert_eq!((arch_stats.events, arch_stats.keys, arch_stats.snapshots), (sled_stats.events, sled_stats.keys, sled_stats.snapshots));
            // Every snapshot covers at least its own seq's event.
            assert_eq!(arch_stats.archived > 0, sled_stats.snapshots > 0, "{arch_stats:?}");
            arch.flush().await.unwrap();
            drop(arch);
            let arch = SledJournal::open(archive_dir.path(), "model").unwrap();
            assert_eq!(fold_recovered(&arch).await, expected);
            assert_eq!(by_key(testkit::collect_events(&arch, Default::default()).await), all);
            sled.flush().await.unwrap();
            drop(sled);
            let reopened = SledJournal::open(dir.path(), "model").unwrap();
            assert_eq!(fold_recovered(&reopened).await, expected);
            assert_eq!(reopened.positions().await.unwrap(), mem.positions().await.unwrap());
        });
    }

    /// A crash at any point leaves a prefix of whole batches: copy the files while the store is live
    /// (what a SIGKILL or power cut leaves), optionally cut the copy's log short, reopen.
    #[test]
    fn crash_leaves_a_prefix_of_whole_batches(batches in model_batches(5, 25), flush_at in 0usize..25,
                                              copy_at in 0usize..25, cut in proptest::option::of(0.0f64..1.0)) {
        rt().block_on(async {
            let dir = TempDir::new().unwrap();
            let live = dir.path().join("live");
            let store = SledStore::builder(&live).flush_every(None).open().unwrap();
            let j = store.journal("model").unwrap();
            let mut model = Model::new();
            let mut prefixes = vec![Model::new()];
            let all = to_batches(&batches, &mut model);
            let mut replay_model = Model::new();
            for mb in &batches {
                to_batches(std::slice::from_ref(mb), &mut replay_model);
                prefixes.push(replay_model.clone());
            }
            let copy = dir.path().join("copy");
            let mut durable = 0;
            for (i, b) in all.into_iter().enumerate() {
                j.append(b).await.unwrap();
                if i == flush_at { j.flush().await.unwrap(); durable = i + 1; }
                if i == copy_at { break; }
            }
            copy_dir(&live, &copy);
            if let Some(cut) = cut {
                let db = copy.join("sled").join("db");
                let len = std::fs::metadata(&db).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
                f.set_len((len as f64 * cut) as u64).unwrap();
            }
            match prefix_len(&copy, &prefixes).await {
                Ok(n) => assert!(n >= durable, "a reopened journal never silently drops flushed batches ({n} < {durable})"),
                Err(e) => {
                    assert!(cut.is_some(), "only damaged files may refuse to open: {e}");
                    assert!(e.is_damage() || matches!(e, JournalError::Storage { .. } | JournalError::Io { .. }), "{e}");
                }
            }
        });
    }
}
