//! Damaged journals: every kind of damage is reported with its location, never a panic, never a
//! silently shorter history, and nothing is lost by reading.

use crate::util::{copy_dir, run_cli};
use eventstage::journal::{EventQuery, Journal, JournalError, Progress, SledJournal, SledStore};
use eventstage::stages::bank::{Account, Bank, BankCommand};
use eventstage::{Error, RuntimeConfig, StageRuntime};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use tempfile::TempDir;

/// Writes a bank journal at `path` with `commands` commands over 20 accounts; returns the live state.
pub(crate) async fn bank_journal(path: &Path, commands: usize, seed: u64) -> BTreeMap<String, Account> {
    let config = RuntimeConfig::default().snapshot_every(10).max_batch(8);
    // History stays in sled (the tests damage its records where they know them to be); the CLI
    // tests move it to the archive with `journal archive`.
    let journal = SledStore::builder(path).archive_history(None).open().unwrap().journal("bank").unwrap();
    let stage = StageRuntime::open(Bank, journal, config).await.unwrap();
    let h = stage.handle();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..20 {
        // Already open when the journal is reused: fine.
        h.ask(format!("acct-{i:02}"), BankCommand::Open).await.unwrap().ok();
    }
    let mut tasks = Vec::new();
    for t in 0..4 {
        let h = h.clone();
        let mut rng = StdRng::seed_from_u64(rng.random::<u64>() + t);
        tasks.push(tokio::spawn(async move {
            for _ in 0..commands / 4 {
                let key = format!("acct-{:02}", rng.random_range(0..20));
                let cmd = if rng.random_bool(0.6) {
                    BankCommand::Deposit(rng.random_range(1..100))
                } else {
                    BankCommand::Withdraw(rng.random_range(1..100))
                };
                h.ask(key, cmd).await.unwrap().ok();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let live = h.snapshot().await.unwrap().into_iter().map(|(k, v)| (k, Account::clone(&v))).collect();
    stage.shutdown().await.unwrap();
    live
}

fn event_storage_key(key: &str, seq: u64) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(key.as_bytes());
    k.extend_from_slice(&[0, 0]);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Rewrites one stored record through raw sled (the journal must be closed).
fn damage_record(path: &Path, key: &str, seq: u64, damage: impl FnOnce(&mut Vec<u8>)) {
    // A just-dropped journal's reader threads may hold sled's file lock for a moment.
    let deadline = std::time::Instant::now() + crate::util::DEADLINE;
    let db = loop {
        match sled::open(path.join("sled")) {
            Ok(db) => break db,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("waiting for the lock: {e}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let tree = db.open_tree("journal:bank").unwrap();
    let storage_key = event_storage_key(key, seq);
    let mut value = tree.get(&storage_key).unwrap().expect("record exists").to_vec();
    damage(&mut value);
    tree.insert(storage_key, value).unwrap();
    db.flush().unwrap();
}

#[tokio::test]
async fn damaged_records_are_reported_with_key_and_seq_and_all_damage_is_listed() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("j");
    bank_journal(&path, 400, 1).await;
    // One record inside a snapshotted prefix (only verify reads it) and one in a tail (recovery reads it).
    let tail = {
        let journal = SledJournal::open(&path, "bank").unwrap();
        let mut tail = None;
        for i in 0..20 {
            let key = format!("acct-{i:02}");
            let last = eventstage_journal::testkit::collect_events(&journal, EventQuery::key(key.as_bytes().to_vec()))
                .await
                .len() as u64;
            if last % 10 != 0 && key != "acct-03" {
                tail = Some((key, last));
                break;
            }
        }
        tail.expect("some key ends in a tail")
    };
    damage_record(&path, "acct-03", 5, |v| {
        let mid = v.len() - 1;
        v[mid] ^= 0x40;
    });
    damage_record(&path, &tail.0, tail.1, |v| v.truncate(10));
    let mut expected = vec![(Some("acct-03".to_string()), Some(5)), (Some(tail.0.clone()), Some(tail.1))];
    expected.sort();

    let store = SledStore::open(&path).unwrap();
    let journal = store.existing_journal("bank").unwrap();
    let report = journal.verify(Progress::none()).await.unwrap();
    let found: Vec<(Option<String>, Option<u64>)> = report.problems.iter().map(|p| (p.key.clone(), p.seq)).collect();
    assert_eq!(found, expected, "{:?}", report.problems);
    for p in &report.problems {
        let what = if p.key.as_deref() == Some("acct-03") { "checksum" } else { "truncated" };
        assert!(p.what.contains(what), "{p}");
    }

    let err = StageRuntime::open(Bank, journal.clone(), RuntimeConfig::default()).await.unwrap_err();
    match &err {
        Error::Journal(JournalError::Corrupt { key, seq, .. }) => assert_eq!((key, *seq), (&tail.0, tail.1)),
        other => panic!("expected a corrupt-record error, got {other}"),
    }
    assert!(err.to_string().contains("eventstage journal verify"), "the error says what to do: {err}");
    drop(journal);
    drop(store);

    let p = path.to_str().unwrap();
    let (code, out, _) = run_cli(&["journal", "verify", "--journal", p]);
    assert_eq!(code, 1, "verify exits 1 on damage: {out}");
    assert!(out.contains("DAMAGED: 2 problems") && out.contains("key acct-03 seq 5"), "{out}");
    assert!(out.contains(&format!("key {} seq {}", tail.0, tail.1)), "{out}");
    // Undamaged keys stay fully readable.
    let (code, out, err) = run_cli(&["journal", "dump", "--journal", p, "--key", "acct-04", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().count() > 5);
    // Reading changed nothing: the same damage is still there, exactly.
    let (_, again, _) = run_cli(&["journal", "verify", "--journal", p]);
    assert!(again.contains("DAMAGED: 2 problems"));
}

#[tokio::test]
async fn lost_committed_batches_are_detected() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("j");
    bank_journal(&path, 40, 2).await;
    let older = dir.path().join("older");
    copy_dir(&path, &older);
    bank_journal(&path, 40, 3).await;
    // The store files of `older` miss the last batches, but its commit mark says they were committed:
    // what sled leaves after dropping a damaged log tail.
    std::fs::remove_dir_all(older.join("marks")).unwrap();
    copy_dir(&path.join("marks"), &older.join("marks"));

    let err = SledStore::open(&older).unwrap().journal("bank").unwrap_err();
    assert!(matches!(err, JournalError::MissingBatches { marked, found, .. } if marked > found), "{err}");
    assert!(err.to_string().contains("restore them from a backup"), "{err}");

    let p = older.to_str().unwrap();
    let (code, _, err) = run_cli(&["journal", "replay", "--journal", p]);
    assert_eq!(code, 2);
    assert!(err.contains("lost committed batches"), "{err}");
    let (code, out, _) = run_cli(&["journal", "verify", "--journal", p]);
    assert_eq!(code, 1);
    assert!(out.contains("are missing"), "{out}");
}

/// A way to damage a copy of a journal directory.
type Damage = Box<dyn Fn(&Path)>;

/// Damage sled's own files at several places: the CLI either reads the whole history (equal to the
/// live state) or fails with a clear error; it never panics and never shows a shorter history.
#[tokio::test]
async fn damaged_sled_files_never_panic_or_shorten_history() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("j");
    let live = bank_journal(&path, 1200, 4).await;
    let db_len = std::fs::metadata(path.join("sled").join("db")).unwrap().len();
    // Where the data lives: sled preallocates, so aim at the written part as well as the rest.
    let mut cases: Vec<(String, Damage)> = Vec::new();
    for frac in [0.0005, 0.002, 0.01, 0.05, 0.3, 0.7] {
        let at = (db_len as f64 * frac) as u64;
        cases.push((
            format!("flip 64 bytes at {at}"),
            Box::new(move |p: &Path| {
                let db = p.join("sled").join("db");
                let mut bytes = std::fs::read(&db).unwrap();
                for b in &mut bytes[at as usize..(at as usize + 64).min(db_len as usize)] {
                    *b ^= 0x5a;
                }
                std::fs::write(&db, bytes).unwrap();
            }),
        ));
    }
    for frac in [0.001, 0.01, 0.2, 0.9] {
        let len = (db_len as f64 * frac) as u64;
        cases.push((
            format!("truncate to {len}"),
            Box::new(move |p: &Path| {
                let f = std::fs::OpenOptions::new().write(true).open(p.join("sled").join("db")).unwrap();
                f.set_len(len).unwrap();
            }),
        ));
    }
    cases.push((
        "remove the commit marks".into(),
        Box::new(|p: &Path| std::fs::remove_dir_all(p.join("marks")).unwrap()),
    ));
    let mut refused = 0;
    for (i, (what, damage)) in cases.iter().enumerate() {
        let copy = dir.path().join(format!("case-{i}"));
        copy_dir(&path, &copy);
        damage(&copy);
        let (code, out, err) = run_cli(&["journal", "replay", "--journal", copy.to_str().unwrap(), "--format", "json"]);
        match code {
            0 => {
                let replayed: BTreeMap<String, Account> = out
                    .lines()
                    .map(|l| {
                        let v: serde_json::Value = serde_json::from_str(l).unwrap();
                        (v["key"].as_str().unwrap().to_string(), serde_json::from_value(v["state"].clone()).unwrap())
                    })
                    .collect();
                assert_eq!(replayed, live, "{what}: a readable journal holds the whole history");
            }
            2 => {
                refused += 1;
                assert!(err.starts_with("error: "), "{what}: {err}");
                assert!(
                    ["damaged", "lost committed batches", "unreadable", "storage engine"]
                        .iter()
                        .any(|w| err.contains(w)),
                    "{what}: the error says what happened: {err}"
                );
            }
            other => panic!("{what}: exit {other} (a crash?): {err}"),
        }
        // `verify` reports what it finds, on stdout as JSON, and exits 1 for damage (0: none).
        let (verify, out, err) =
            run_cli(&["journal", "verify", "--journal", copy.to_str().unwrap(), "--format", "json"]);
        let reports: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let problems = reports.iter().map(|r| r["problems"].as_array().map_or(0, Vec::len)).sum::<usize>();
        match verify {
            0 => assert!(code == 0 && !reports.is_empty() && problems == 0, "{what}: verify ok: {out} {err}"),
            1 => assert!(problems > 0, "{what}: verify lists the damage: {out} {err}"),
            other => panic!("{what}: verify exits {other}, not 0 or 1: {out} {err}"),
        }
        assert!(!(code == 2 && verify == 0), "{what}: damage that stops a replay is found by verify");
    }
    assert!(refused >= 3, "the damage cases that hit data are refused ({refused})");

    // The commit marks are gone: verify says so (sled dropping a log tail could not be detected),
    // unless told they are known to be gone; reading works, with a warning.
    let copy = dir.path().join("no-marks");
    copy_dir(&path, &copy);
    std::fs::remove_dir_all(copy.join("marks")).unwrap();
    let (code, out, _) = run_cli(&["journal", "verify", "--journal", copy.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("commit mark is missing"), "{out}");
    let (code, out, _) = run_cli(&["journal", "verify", "--journal", copy.to_str().unwrap(), "--mark-lost"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = run_cli(&["journal", "stats", "--journal", copy.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("commit mark is missing"), "a warning on stderr: {err}");

    // sled lost every file, the commit marks remain: the journal lost committed batches (not "a
    // store with no journals").
    let copy = dir.path().join("lost-everything");
    copy_dir(&path, &copy);
    std::fs::remove_dir_all(copy.join("sled")).unwrap();
    let (code, _, err) = run_cli(&["journal", "dump", "--journal", copy.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("lost committed batches"), "{err}");
    let (code, out, _) = run_cli(&["journal", "verify", "--journal", copy.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing"), "{out}");
}

/// Damage that sled reports only when it reads the page (the store opens): `verify` reports it
/// itself (exit 1, the place it stopped, JSON with `--format json`) instead of failing with the
/// advice to run `verify`. A journal of the demo's 200 000 commands, 8 bytes overwritten at
/// places near the end of sled's file, where its newest pages are. Where sled's pages lie differs
/// from run to run (the demo's tasks run concurrently): the places are 0.025 % of the file apart,
/// tried until three were found that sled reads.
#[test]
fn damage_sled_finds_while_reading_is_reported_by_verify() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("j");
    let (code, _, err) = run_cli(&["demo", "--data", path.to_str().unwrap(), "--commands", "200000"]);
    assert_eq!(code, 0, "{err}");
    let db_len = std::fs::metadata(path.join("sled").join("db")).unwrap().len();
    let mut found_while_reading = 0;
    for step in 0..200u64 {
        if found_while_reading == 3 {
            break;
        }
        let at = (db_len as f64 * (0.95 + 0.00025 * step as f64)) as usize;
        let copy = dir.path().join("case");
        let _ = std::fs::remove_dir_all(&copy);
        copy_dir(&path, &copy);
        let db = copy.join("sled").join("db");
        let mut bytes = std::fs::read(&db).unwrap();
        bytes[at..at + 8].copy_from_slice(&0xdead_beef_dead_beef_u64.to_be_bytes());
        std::fs::write(&db, bytes).unwrap();
        let (verify, out, err) =
            run_cli(&["journal", "verify", "--journal", copy.to_str().unwrap(), "--format", "json"]);
        let what = format!("8 bytes at {at} of {db_len}");
        assert!(verify == 0 || verify == 1, "{what}: verify exits 0 or 1, not {verify}: {out} {err}");
        let reports: Vec<serde_json::Value> =
            out.lines().map(|l| serde_json::from_str(l).expect("one JSON report per line")).collect();
        let problems: Vec<&str> = reports
            .iter()
            .flat_map(|r| r["problems"].as_array().into_iter().flatten())
            .filter_map(|p| p["what"].as_str())
            .collect();
        assert_eq!(verify == 1, !problems.is_empty(), "{what}: exit 1 exactly when it lists damage: {out}");
        if let Some(p) = problems.iter().find(|p| p.contains("sled cannot read the records")) {
            found_while_reading += 1;
            assert!(p.contains("after key acct-") || p.contains("from the first on"), "{what}: says where: {p}");
            // A replay reads snapshots and the events after them, not every page verify walks: it
            // either does not need the damaged page, or refuses with the same diagnosis.
            let (replay, _, err) = run_cli(&["journal", "replay", "--journal", copy.to_str().unwrap()]);
            assert!(replay == 0 || (replay == 2 && err.contains("damaged")), "{what}: replay exits {replay}: {err}");
        }
    }
    assert!(found_while_reading > 0, "some of the places hold pages sled reads and finds damaged");
}

/// Sets every file and directory under `dir` read-only (or back to writable).
fn set_readonly(dir: &Path, readonly: bool) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            set_readonly(&path, readonly);
        }
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(readonly);
        std::fs::set_permissions(&path, perms).unwrap();
    }
    let mut perms = std::fs::metadata(dir).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(readonly);
    std::fs::set_permissions(dir, perms).unwrap();
}

/// Every file under `dir` with its size and modification time.
fn files(dir: &Path) -> BTreeMap<std::path::PathBuf, (u64, std::time::SystemTime)> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            let m = std::fs::metadata(&path).unwrap();
            found.insert(path, (m.len(), m.modified().unwrap()));
        }
    }
    found
}

/// A write-protected journal (a backup, another user's files) is inspected through a copy: every
/// command works and nothing of it is written.
#[tokio::test]
async fn a_write_protected_journal_is_inspected_without_writing() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("j");
    bank_journal(&path, 200, 6).await;
    set_readonly(&path, true);
    let before = files(&path);
    let p = path.to_str().unwrap();
    for args in [
        vec!["journal", "stats", "--journal", p],
        vec!["journal", "verify", "--journal", p],
        vec!["journal", "dump", "--journal", p, "--format", "json"],
        vec!["journal", "replay", "--journal", p],
    ] {
        let (code, out, err) = run_cli(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(!out.is_empty(), "{args:?}");
        assert!(err.contains("write-protected: inspecting a copy"), "{args:?}: {err}");
        // --quiet: the same data, and nothing on stderr.
        let (code, quiet_out, err) = run_cli(&[&args[..], &["--quiet"]].concat());
        assert_eq!((code, quiet_out, err.as_str()), (0, out, ""), "{args:?}");
    }
    assert_eq!(files(&path), before, "nothing of a write-protected journal is written");
    set_readonly(&path, false);
}

#[test]
fn bad_paths_names_and_flags_get_clear_errors() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing");
    let (code, _, err) = run_cli(&["journal", "stats", "--journal", missing.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("does not exist"), "{err}");

    let not_journal = dir.path().join("photos");
    std::fs::create_dir(&not_journal).unwrap();
    std::fs::write(not_journal.join("cat.jpg"), b"meow").unwrap();
    let (code, _, err) = run_cli(&["journal", "verify", "--journal", not_journal.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("is not an eventstage journal"), "{err}");

    let newer = dir.path().join("newer");
    SledStore::open(&newer).unwrap().journal("bank").unwrap();
    std::fs::write(newer.join("eventstage-journal.json"), r#"{"format":"eventstage-journal","format_version":7}"#)
        .unwrap();
    let (code, _, err) = run_cli(&["journal", "stats", "--journal", newer.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("format version 7") && err.contains("upgrade eventstage"), "{err}");

    let ok = dir.path().join("ok");
    SledStore::open(&ok).unwrap().journal("bank").unwrap();
    let (code, _, err) = run_cli(&["journal", "dump", "--journal", ok.to_str().unwrap(), "--stage", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("no journal named `nope`") && err.contains("bank"), "{err}");

    let (code, _, err) = run_cli(&["journal", "stats"]);
    assert_eq!(code, 2);
    assert!(err.contains("--journal"), "{err}");
    let (code, _, err) = run_cli(&["journal", "dump", "--journal", ok.to_str().unwrap(), "--until-time", "yesterday"]);
    assert_eq!(code, 2);
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, _) = run_cli(&["journal", "frobnicate"]);
    assert_eq!(code, 2);
}
