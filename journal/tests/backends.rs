//! Every backend passes the conformance suite and the model-based property tests.

use eventstage_journal::testkit::{self, fold_model, fold_recovered, model_batches, to_batches, Model};
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

    /// Replay (snapshots + tails) equals the fold of all events, for both backends.
    #[test]
    fn replay_equals_fold(batches in model_batches(6, 30)) {
        rt().block_on(async {
            let dir = TempDir::new().unwrap();
            let sled = SledJournal::open(dir.path(), "model").unwrap();
            let mem = MemoryJournal::new("model");
            let mut model = Model::new();
            for b in to_batches(&batches, &mut model) {
                sled.append(b.clone()).await.unwrap();
                mem.append(b).await.unwrap();
            }
            let expected = fold_model(&model);
            assert_eq!(fold_recovered(&mem).await, expected);
            assert_eq!(fold_recovered(&sled).await, expected);
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
