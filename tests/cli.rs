//! The `eventstage` binary: the demo, the journal commands against the library's own view, unknown
//! stages, and SIGKILL at random moments.

use crate::damage::bank_journal;
use crate::util::{eventstage, run_cli, DEADLINE};
use eventstage::journal::{EventQuery, Journal, Progress, SledJournal, SledStore};
use eventstage::stages::bank::{Account, Bank};
use eventstage::{rebuild, Effect, EventSourced, RuntimeConfig, StageRuntime};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tempfile::TempDir;

fn json_lines(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[test]
fn demo_runs_restarts_and_matches() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("demo");
    let args = ["demo", "--data", data.to_str().unwrap(), "--commands", "3000", "--accounts", "50", "--tasks", "8"];
    let (code, out, err) = run_cli(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("replayed state equals live state: yes"), "{out}");
    // Run again on the same data: it recovers first, then goes on.
    let (code, out, err) = run_cli(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("accounts from an earlier run"), "{out}");
    let (code, out, _) = run_cli(&["journal", "stats", "--journal", data.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 0);
    assert!(json_lines(&out)[0]["keys"].as_u64().unwrap() > 40);
    // With a state cache of a few accounts: nothing is recovered up front, accounts are read when
    // used (and evicted), and the replay still equals what the commands saw.
    let cached = [&args[..], &["--state-cache", "2KiB"]].concat();
    let (code, out, err) = run_cli(&cached);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("accounts are read from the journal when first used"), "{out}");
    assert!(!out.contains("accounts from an earlier run"), "{out}");
    let evicted = out.lines().find_map(|l| l.strip_prefix("cache:")?.split(", ").last()?.strip_suffix(" evicted"));
    assert!(evicted.and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0), "{out}");
    assert!(out.contains("replayed state equals live state: yes"), "{out}");
}

#[tokio::test]
async fn journal_commands_agree_with_the_library() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("j");
    let live = bank_journal(&path, 300, 9).await;
    let p = path.to_str().unwrap();

    let (code, out, err) = run_cli(&["journal", "stats", "--journal", p, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let stats = &json_lines(&out)[0];
    let journal_stats = SledJournal::open(&path, "bank").unwrap().stats().await.unwrap();
    assert_eq!(stats["events"], journal_stats.events);
    assert_eq!(stats["snapshots"], journal_stats.snapshots);
    assert_eq!(stats["keys"], 20);

    // Every command's JSON lines name the journal the same way, beside their own fields.
    for (args, field) in [
        (&["stats"][..], "events"),
        (&["verify"], "problems"),
        (&["dump", "--key", "acct-05"], "seq"),
        (&["replay"], "state"),
    ] {
        let (code, out, err) = run_cli(&[&["journal"][..], args, &["--journal", p, "--format", "json"]].concat());
        assert_eq!(code, 0, "{args:?}: {err}");
        for line in json_lines(&out) {
            assert!(line["journal"] == "bank" && !line[field].is_null() && line["name"].is_null(), "{args:?}: {line}");
        }
    }
    let (code, out, _) = run_cli(&["journal", "verify", "--journal", p, "--format", "json"]);
    assert_eq!((code, &json_lines(&out)[0]["ok"]), (0, &Value::Bool(true)));

    let (code, out, _) = run_cli(&["journal", "stats", "--journal", p]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("bytes on disk").count(), 1, "the store's size, once: {out}");
    let (code, out, _) = run_cli(&["journal", "verify", "--journal", p]);
    assert_eq!(code, 0);
    assert!(out.contains(": ok"), "{out}");

    // replay of everything = the live state
    let (code, out, _) = run_cli(&["journal", "replay", "--journal", p, "--format", "json"]);
    assert_eq!(code, 0);
    let replayed: BTreeMap<String, Account> = json_lines(&out)
        .into_iter()
        .map(|v| (v["key"].as_str().unwrap().to_string(), serde_json::from_value(v["state"].clone()).unwrap()))
        .collect();
    assert_eq!(replayed, live);

    // dump of one key, then replay at a point in its history
    let (code, out, _) = run_cli(&["journal", "dump", "--journal", p, "--key", "acct-05", "--format", "json"]);
    assert_eq!(code, 0);
    let events = json_lines(&out);
    assert!(events.len() >= 4);
    assert_eq!(
        events.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        (1..=events.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(events[0]["event"], "Opened");
    let mut account = Account::default();
    for e in &events[..3] {
        let ev: eventstage::stages::bank::BankEvent = serde_json::from_value(e["event"].clone()).unwrap();
        <Bank as EventSourced>::apply(&mut account, &ev);
    }
    let (code, out, _) =
        run_cli(&["journal", "replay", "--journal", p, "--key", "acct-05", "--until-seq", "3", "--format", "json"]);
    assert_eq!(code, 0);
    let at3 = &json_lines(&out)[0];
    assert_eq!(
        (at3["seq"].as_u64(), serde_json::from_value::<Account>(at3["state"].clone()).unwrap()),
        (Some(3), account)
    );
    // --until-time at the timestamp of event 2 includes events 1..=2 at least, never later seqs of other times
    let t2 = events[1]["timestamp_ms"].as_u64().unwrap();
    let (code, out, _) = run_cli(&[
        "journal",
        "dump",
        "--journal",
        p,
        "--key",
        "acct-05",
        "--until-time",
        &t2.to_string(),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0);
    let until: Vec<Value> = json_lines(&out);
    assert!(until.len() >= 2 && until.iter().all(|e| e["timestamp_ms"].as_u64().unwrap() <= t2));
    let (code, out, _) =
        run_cli(&["journal", "dump", "--journal", p, "--key", "acct-05", "--from-seq", "2", "--until-seq", "3"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "{out}");
    // text output is aligned and readable
    assert!(out.lines().all(|l| l.starts_with("acct-05 ") && l.contains("bincode/v1")), "{out}");
    // --from-seq is dump's: replay does not offer it.
    let (code, _, err) = run_cli(&["journal", "replay", "--journal", p, "--from-seq", "2"]);
    assert!(code == 2 && err.contains("unexpected argument '--from-seq'"), "{err}");
    // A key without events: exit 1 and say so, as `table get` does.
    let (code, out, err) = run_cli(&["journal", "dump", "--journal", p, "--key", "nosuch"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("no events of key `nosuch`"), "{err}");

    // `journal archive` moves the history snapshots cover out of sled: every command reads the
    // same journal afterwards.
    let before: Vec<_> =
        [&["replay"][..], &["dump", "--key", "acct-05"], &["replay", "--key", "acct-05", "--until-seq", "3"]]
            .iter()
            .map(|args| run_cli(&[&["journal"][..], args, &["--journal", p, "--format", "json"]].concat()))
            .collect();
    let (code, out, err) = run_cli(&["journal", "archive", "--journal", p]);
    assert_eq!(code, 0, "{err}");
    let moved: u64 = out.split("moved ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(moved > 0, "{out}");
    let (code, out, _) = run_cli(&["journal", "stats", "--journal", p, "--format", "json"]);
    assert_eq!(code, 0);
    let after = &json_lines(&out)[0];
    assert_eq!((&after["events"], &after["keys"]), (&stats["events"], &stats["keys"]));
    assert!(after["archived"].as_u64().unwrap() >= moved, "{after}");
    let (code, out, _) = run_cli(&["journal", "verify", "--journal", p]);
    assert_eq!(code, 0, "{out}");
    for (args, was) in
        [&["replay"][..], &["dump", "--key", "acct-05"], &["replay", "--key", "acct-05", "--until-seq", "3"]]
            .iter()
            .zip(before)
    {
        assert_eq!(run_cli(&[&["journal"][..], args, &["--journal", p, "--format", "json"]].concat()), was, "{args:?}");
    }
}

/// A stage the binary does not know.
struct Counter;

/// A journal of [`Counter`] with one event (7 to key `c`).
async fn counter_journal() -> TempDir {
    let dir = TempDir::new().unwrap();
    let stage =
        StageRuntime::open(Counter, SledJournal::open(dir.path(), "counter").unwrap(), RuntimeConfig::default())
            .await
            .unwrap();
    stage.handle().ask("c".into(), 7).await.unwrap().unwrap();
    stage.shutdown().await.unwrap();
    dir
}

impl EventSourced for Counter {
    const NAME: &'static str = "counter";
    type Key = String;
    type Command = u32;
    type Event = u32;
    type State = u32;
    type Reply = u32;
    type Rejection = String;

    fn handle(&self, _: &u32, c: u32) -> Result<Effect<Self>, String> {
        Ok(Effect::persist([c]).then_reply(|s: &u32| *s))
    }

    fn apply(s: &mut u32, e: &u32) {
        *s += e;
    }
}

#[tokio::test]
async fn unknown_stages_work_at_the_envelope_level() {
    let dir = counter_journal().await;
    let p = dir.path().to_str().unwrap();
    let (code, out, _) = run_cli(&["journal", "dump", "--journal", p, "--format", "json"]);
    assert_eq!(code, 0);
    let line = &json_lines(&out)[0];
    assert_eq!((line["key"].as_str(), line["codec"].as_str()), (Some("c"), Some("bincode")));
    assert_eq!(line["payload_base64"], "Bw==", "bincode of 7u32, base64");
    let (code, _, _) = run_cli(&["journal", "stats", "--journal", p]);
    assert_eq!(code, 0);
    let (code, _, _) = run_cli(&["journal", "verify", "--journal", p]);
    assert_eq!(code, 0);
    let (code, _, err) = run_cli(&["journal", "replay", "--journal", p]);
    assert_eq!(code, 2);
    assert!(err.contains("no stage named `counter`") && err.contains(".stage::<YourStage>()"), "{err}");
}

/// Log lines on stderr: no colour codes into a pipe or file (unless `--color always`), none with
/// NO_COLOR, `--log-level` filters them, and a filter that is not one is refused with the syntax;
/// `--quiet` leaves only errors and the data.
#[tokio::test]
async fn log_lines_are_coloured_only_when_asked_and_filtered_by_log_level() {
    let dir = counter_journal().await;
    let p = dir.path().to_str().unwrap();
    // Dumping a journal of a stage not compiled in logs a warning.
    let warning = "no stage of this name is compiled in";
    let (code, _, err) = run_cli(&["journal", "dump", "--journal", p]);
    assert_eq!(code, 0);
    assert!(err.contains(warning) && !err.contains('\u{1b}'), "no colour codes into a pipe: {err:?}");
    let (_, _, err) = run_cli(&["journal", "dump", "--journal", p, "--color", "always"]);
    assert!(err.contains(warning) && err.contains("\u{1b}["), "colour when asked: {err:?}");
    let out =
        crate::util::eventstage().args(["journal", "dump", "--journal", p]).env("NO_COLOR", "1").output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains('\u{1b}'));
    let (_, _, err) = run_cli(&["journal", "dump", "--journal", p, "--log-level", "error"]);
    assert!(!err.contains(warning), "--log-level error hides warnings: {err}");
    let (code, out, err) = run_cli(&["journal", "dump", "--journal", p, "-q"]);
    assert_eq!((code, err.as_str(), out.lines().count()), (0, "", 1), "--quiet hides warnings, not data");
    let (code, out, err) = run_cli(&["journal", "dump", "--journal", p, "--key", "nosuch", "--quiet"]);
    assert!(code == 1 && out.is_empty() && err.contains("no events of key"), "why nothing came is still said: {err}");
    let (code, _, err) = run_cli(&["journal", "dump", "--journal", p, "-q", "--log-level", "info"]);
    assert!(code == 2 && err.contains("cannot be used with"), "{err}");
    let (code, _, err) = run_cli(&["journal", "dump", "--journal", p, "--log-level", "eventstage=loud"]);
    assert_eq!(code, 2);
    assert!(err.contains("--log-level") && err.contains("error, warn, info"), "{err}");
    // For log shippers: one JSON object per line, never coloured.
    let (code, _, err) = run_cli(&["journal", "dump", "--journal", p, "--log-format", "json", "--color", "always"]);
    assert_eq!(code, 0);
    let lines: Vec<Value> = err.lines().map(|l| serde_json::from_str(l).expect("a JSON log line")).collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN" && l["fields"]["message"].as_str().is_some_and(|m| m.contains(warning))),
        "{err}"
    );
}

/// SIGKILL the demo at random moments while it writes; every time, the journal reopens (no false
/// "lost batches" alarm), verifies clean, and recovery (snapshots + tails) equals a full replay of
/// the events: replay = live across crashes.
#[tokio::test]
async fn sigkill_at_random_moments_leaves_a_consistent_journal() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("crash");
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut last_events = 0;
    for round in 0..4 {
        let mut child = eventstage()
            .args([
                "demo",
                "--data",
                data.to_str().unwrap(),
                "--commands",
                "10000000",
                "--accounts",
                "200",
                "--tasks",
                "16",
            ])
            .args(["--seed", &round.to_string(), "--snapshot-every", "7"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until it has recovered and started sending, then let it write for a random while.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("running:") {
            line.clear();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "round {round}: the demo exited before running");
        }
        let run_for = Duration::from_millis(rng.random_range(100..800));
        let started = Instant::now();
        while started.elapsed() < run_for {
            assert!(child.try_wait().unwrap().is_none(), "the demo stopped on its own");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let deadline = Instant::now() + DEADLINE;
        let store = loop {
            match SledStore::open(&data) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => eprintln!("waiting for the lock: {e}"),
                Err(e) => panic!("round {round} (seed {seed}): {e}"),
            }
        };
        let journal = store.journal("bank").unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));
        let report = journal.verify(Progress::none()).await.unwrap();
        assert!(report.is_ok(), "round {round} (seed {seed}): {:?}", report.problems);
        assert!(report.events > last_events, "round {round}: the demo made progress before the kill");
        last_events = report.events;
        let stage = StageRuntime::open(Bank, journal.clone(), RuntimeConfig::default()).await.unwrap();
        let recovered: BTreeMap<String, Account> =
            stage.handle().snapshot().await.unwrap().into_iter().map(|(k, v)| (k, Account::clone(&v))).collect();
        let replayed: BTreeMap<String, Account> = rebuild::<Bank, _>(&journal, EventQuery::all(), &Progress::none())
            .await
            .unwrap()
            .into_iter()
            .map(|(k, (s, _))| (k, s))
            .collect();
        assert_eq!(recovered, replayed, "round {round} (seed {seed})");
        stage.shutdown().await.unwrap();
    }
}

/// Flags of the other demo are refused instead of ignored, a zero commit interval is refused, and
/// an unreachable cluster is named at once and given up on after `--timeout`.
#[test]
fn demo_flags_that_do_not_apply_are_refused_and_an_unreachable_cluster_is_named_quickly() {
    let (code, _, err) = run_cli(&["demo", "--journal", "kafka:x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--brokers"), "{err}");
    let (code, _, err) = run_cli(&["demo", "--brokers", "127.0.0.1:1", "--commands", "5"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = run_cli(&["demo", "--brokers", "127.0.0.1:1", "--state-cache", "1MiB"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("add --state-dir DIR"), "{err}");
    let (code, _, err) = run_cli(&["demo", "--brokers", "127.0.0.1:1", "--commit-interval", "0s"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at least 1ms"), "{err}");
    let started = Instant::now();
    let (code, _, err) = run_cli(&["demo", "--brokers", "127.0.0.1:1", "--timeout", "2s"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("connecting to Kafka at 127.0.0.1:1"), "{err}");
    assert!(err.contains("cannot reach the brokers at 127.0.0.1:1 within 2s"), "{err}");
    // librdkafka's own request timeout is a minute: the flag bounds the wait.
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
}

/// A Kafka journal's stage is the one --stage names, the only one the binary knows, or the one its name ends with; this one
/// knows several and `j` names none, so replay asks which, naming them, before it asks the cluster anything.
#[test]
fn a_kafka_journal_replay_names_the_stages_to_choose_from() {
    let started = Instant::now();
    let (code, _, err) = run_cli(&["journal", "replay", "--journal", "kafka:j", "--brokers", "127.0.0.1:1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs --stage NAME") && err.contains("knows bank, inventory"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "asked the cluster first: {:?}", started.elapsed());
    let (code, _, err) =
        run_cli(&["journal", "dump", "--journal", "kafka:j", "--brokers", "127.0.0.1:1", "--stage", "nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no stage named `nope`") && err.contains("known: bank, inventory"), "{err}");
}

/// A flow with a zero commit interval is refused with the fix instead of committing per record.
#[test]
fn a_zero_commit_interval_is_refused() {
    let topics = eventstage::stages::bank_flow::BankTopics {
        input: "in".into(),
        replies: "out".into(),
        events: "events".into(),
    };
    let Err(err) =
        eventstage::stages::bank_flow::bank_flow("127.0.0.1:1", "g", topics).commit_interval(Duration::ZERO).run()
    else {
        panic!("a zero commit interval was accepted");
    };
    assert!(err.to_string().contains("commit interval is 0"), "{err}");
}

/// Shell completions cover the subcommands and their flags.
#[test]
fn shell_completions_are_printed() {
    let (code, out, err) = run_cli(&["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("_eventstage()") && out.contains("--metrics-addr") && out.contains("archive"), "{out}");
    let (code, _, err) = run_cli(&["completions", "nosh"]);
    assert_eq!(code, 2);
    assert!(err.contains("possible values"), "{err}");
}
