//! Several `eventstage demo` processes in one group on a real cluster: instances with default ids
//! share the work, an instance fenced by another with its id exits non-zero, a crash loop of two
//! instances (with and without local state stores) between which partitions move on every kill,
//! and a takeover with standby replicas.

use crate::crash::Demo;
use crate::flow::{await_replies, expected, feed_async, journal_state, setup, workload, Setup};
use crate::kafka::{feeder, kafka_journal, wait_for};
use crate::util::broker::unique;
use crate::util::DEADLINE;
use eventstage::stages::bank::{Account, BankCommand};
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Two demo instances on one host with the default transactional id share the group's work: the
/// default ids differ (host and process), so neither fences the other's producer or static
/// membership; every command gets one reply and both drain and exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_default_ids_share_the_work() {
    let s = setup(2).await;
    let logs = tempfile::tempdir().unwrap();
    let cmds = workload(400, 20, 17);
    let (replies, accounts) = expected(&cmds);
    let journal = kafka_journal(&s, "100ms");
    let (a, b) = (Demo::start(&s, "", &journal, logs.path()), Demo::start(&s, "", &journal, logs.path()));
    feed_async(&s, &cmds).await;
    await_replies(&s, replies).await;
    let id = |demo: &Demo| {
        let log = plain_log(&demo.stderr);
        assert!(!log.to_lowercase().contains("fenced"), "{log}");
        let id = log.split("transactional_id=").nth(1).and_then(|rest| rest.split_whitespace().next());
        id.unwrap_or_else(|| panic!("the start-up line names the transactional id: {log}")).to_string()
    };
    let (id_a, id_b) = (id(&a), id(&b));
    assert_ne!(id_a, id_b);
    assert!(id_a.starts_with(&format!("{}-", s.group)) && id_a.ends_with(&format!("-{}", a.child.id())), "{id_a}");
    let _ = (a.drain(), b.drain());
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// Two instances given the same `--transactional-id` (so the same `group.instance.id`): the
/// group coordinator fences the one that joined first, and it must stop by itself with an error
/// naming the cause and a non-zero exit, instead of idling until a SIGTERM makes it exit 0. (The
/// other may be fenced too: its producer, by the later `init_transactions`.) An instance with an
/// id of its own then answers every command exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_fenced_by_another_with_its_id_exits_non_zero() {
    let s = setup(2).await;
    let logs = tempfile::tempdir().unwrap();
    let txn = unique("txn-shared");
    let journal = kafka_journal(&s, "100ms");
    let a = Demo::start(&s, &txn, &journal, logs.path());
    let b = Demo::start(&s, &txn, &journal, logs.path());
    let (status, log) = tokio::task::spawn_blocking(move || {
        let mut demos = [a, b];
        let end = Instant::now() + DEADLINE * 2;
        loop {
            for demo in &mut demos {
                if let Some(status) = demo.child.try_wait().unwrap() {
                    return (status, plain_log(&demo.stderr));
                }
            }
            assert!(Instant::now() < end, "a fenced instance exits by itself");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The other one is killed when `demos` is dropped.
    })
    .await
    .unwrap();
    assert!(!status.success(), "a fenced instance exits non-zero: {status}");
    assert!(log.contains("group.instance.id"), "the error names the cause: {log}");
    let c = Demo::start(&s, &unique("txn-own"), &journal, logs.path());
    let cmds = workload(100, 10, 5);
    let (replies, accounts) = expected(&cmds);
    feed_async(&s, &cmds).await;
    await_replies(&s, replies).await;
    c.drain();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// A demo's log, without its colour codes (written even to a file, for now).
fn plain_log(path: &std::path::Path) -> String {
    let raw = std::fs::read_to_string(path).unwrap_or_default();
    let mut log = String::with_capacity(raw.len());
    let mut rest = raw.as_str();
    while let Some(at) = rest.find('\x1b') {
        log.push_str(&rest[..at]);
        rest = rest[at..].split_once('m').map_or("", |(_, after)| after);
    }
    log.push_str(rest);
    log
}

/// The group's committed offsets of `topic`'s partitions (None: the coordinator did not answer in
/// time, e.g. while it moves or loads).
pub(crate) fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Option<Vec<i64>> {
    // read_uncommitted: the offset fetch then does not ask for stable offsets (KIP-447), which a
    // group committing transactions every 50 ms nearly never has.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
    Some(
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect(),
    )
}

/// Two instances of the bank flow in one group while a producer keeps writing; one of them is
/// SIGKILLed at a random moment, the other takes its partitions (its committed offsets move on
/// every partition while the victim is down), then the victim comes back and partitions move
/// again; five rounds, after a history of 3000 accounts. Every command gets exactly one correct
/// reply and the journal equals the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_of_two_instances_moves_partitions_and_loses_nothing() {
    crash_loop_of_two(false).await;
}

/// The same with a local state store per instance (`--state-dir`): besides the above, the
/// instances read only journal tails, far fewer records than restores of whole partitions (the
/// rows they read from their stores depend on the keys their last commands used, and are not
/// asserted here; `store::` tests do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_of_two_instances_with_local_stores_reads_only_journal_tails() {
    crash_loop_of_two(true).await;
}

/// An `open` and a deposit for each of `accounts` accounts `hist-N`.
fn history(accounts: u64) -> Vec<(String, String, BankCommand)> {
    (0..accounts)
        .flat_map(|i| [BankCommand::Open, BankCommand::Deposit(i % 100 + 1)].map(|c| (format!("hist-{i}"), c)))
        .enumerate()
        .map(|(n, (key, c))| (key, format!("hist-cmd-{n}"), c))
        .collect()
}

/// Standby replicas (`--standby all`): two instances with local stores share four partitions
/// after a history of 2000 accounts; one is SIGKILLed, and the survivor takes its partitions over
/// reading almost nothing from the journal (its store kept them current), where a takeover
/// without standbys reads their whole history. Every reply exactly once, journal = model. Then the
/// survivor restarts from its store, which its own commits since the takeover wrote (handed over,
/// not read back): its answers and the journal still equal the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_with_standby_replicas_reads_almost_nothing_from_the_journal() {
    let s = setup(4).await;
    let logs = tempfile::tempdir().unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let args = |slot: usize| {
        let mut args = kafka_journal(&s, "50ms");
        let dir = dirs[slot].path().display().to_string();
        args.extend(["--state-dir", &dir, "--checkpoint-interval", "200ms", "--standby", "all"].map(String::from));
        args
    };
    let history = history(2000);
    // After the kill: a deposit to each of 300 accounts of the history (their state comes from
    // the survivor's local store).
    let cmds: Vec<_> = (0..300).map(|i| (format!("hist-{i}"), format!("after-{i}"), BankCommand::Deposit(1))).collect();
    let (replies, accounts) = expected(&[history.as_slice(), &cmds].concat());
    let txn_a = unique("txn-a");
    let a = Demo::start(&s, &txn_a, &args(0), logs.path());
    let b = Demo::start(&s, &unique("txn-b"), &args(1), logs.path());
    let b_log = b.stderr.clone();
    // The last rebalance the second instance logged gave it partitions.
    let owns = move || {
        let log = plain_log(&b_log);
        let last = log.lines().rev().find(|l| l.contains("assigned and restored") || l.contains("revoked"));
        last.is_some_and(|l| l.contains("assigned and restored partitions=") && !l.contains("partitions=none"))
    };
    let owning = owns.clone();
    tokio::task::spawn_blocking(move || wait_for("the second instance to own partitions", DEADLINE, owning))
        .await
        .unwrap();
    feed_async(&s, &history).await;
    await_replies(&s, expected(&history).0).await;
    assert!(owns(), "the second instance still owns partitions when it is killed");
    b.kill();
    feed_async(&s, &cmds).await;
    await_replies(&s, replies).await;
    let summary = a.drain();
    let (read, rows) = restored(&summary);
    let all = crate::store::journal_records(&s, 4).await;
    eprintln!("journal records {all}; the survivor read {read} from the journal and {rows} local rows");
    assert!(rows > 0, "the survivor loaded its local store: {summary}");
    assert!(read * 10 < all, "the survivor read {read} of {all} journal records: the standbys were not current");
    assert_eq!(journal_state_of(&s).await, accounts);

    // Restarted on its store: every account's balance comes from rows its flow handed over.
    let again: Vec<_> =
        (0..300).map(|i| (format!("hist-{i}"), format!("again-{i}"), BankCommand::Deposit(1))).collect();
    let (replies, accounts) = expected(&[history.as_slice(), &cmds, &again].concat());
    let a = Demo::start(&s, &txn_a, &args(0), logs.path());
    feed_async(&s, &again).await;
    await_replies(&s, replies).await;
    let summary = a.drain();
    let (read, rows) = restored(&summary);
    assert!(rows > 0 && read * 10 < all, "the restart read {read} journal records and {rows} local rows: {summary}");
    assert_eq!(journal_state_of(&s).await, accounts);
}

async fn journal_state_of(s: &Setup) -> std::collections::BTreeMap<String, Account> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || journal_state(&s, 4)).await.unwrap()
}

/// Journal records (and local store rows) the drained demo restored, from its summary.
fn restored(summary: &str) -> (u64, u64) {
    let line = summary.lines().find(|l| l.starts_with("metrics:")).unwrap_or_default();
    let before = |word: &str| -> u64 {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == word).unwrap_or_else(|| panic!("`{word}` in {summary}"));
        words[at - 1].parse().unwrap()
    };
    (before("journal"), before("local"))
}

async fn crash_loop_of_two(stores: bool) {
    let s = setup(4).await;
    let logs = tempfile::tempdir().unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let args = |slot: usize| {
        let mut args = kafka_journal(&s, "50ms");
        if stores {
            let dir = dirs[slot].path().display().to_string();
            args.extend(["--state-dir".into(), dir, "--checkpoint-interval".into(), "200ms".into()]);
        }
        args
    };
    // A history of 3000 accounts first (a restore of whole partitions reads it), then more
    // commands than the rounds need at this pace: the feeder is stopped after the last round.
    let history = history(2000);
    let cmds = workload(8000, 60, 91);
    let (replies, accounts) = expected(&[history.as_slice(), &cmds].concat());
    feed_async(&s, &history).await;
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let slots = [unique("txn-a"), unique("txn-b")];
    let stop = Arc::new(AtomicBool::new(false));
    let feeding = feeder(&s, &cmds, 20, Duration::from_millis(200), stop.clone());
    let mut demos: Vec<Option<Demo>> =
        (0..2).map(|slot| Some(Demo::start(&s, &slots[slot], &args(slot), logs.path()))).collect();
    for round in 0..5 {
        let victim = round % 2;
        std::thread::sleep(Duration::from_millis(rng.random_range(200..2000)));
        demos[victim].take().unwrap().kill();
        let (b, g, t) = (s.brokers.clone(), s.group.clone(), s.topics.input.clone());
        tokio::task::spawn_blocking(move || {
            let mut at_kill = None;
            wait_for("the group's committed offsets", DEADLINE, || {
                at_kill = committed(&b, &g, &t, 4);
                at_kill.is_some()
            });
            let at_kill = at_kill.unwrap_or_default();
            // The survivor owns every partition once its session with the victim's has expired.
            wait_for(
                &format!("round {round} (seed {seed}): the survivor to commit on every partition"),
                DEADLINE * 2,
                || committed(&b, &g, &t, 4).is_some_and(|now| now.iter().zip(&at_kill).all(|(now, then)| now > then)),
            );
        })
        .await
        .unwrap();
        demos[victim] = Some(Demo::start(&s, &slots[victim], &args(victim), logs.path()));
    }
    stop.store(true, Ordering::SeqCst);
    let sent = feeding.join().unwrap();
    feed_async(&s, &cmds[sent..]).await;
    await_replies(&s, replies).await;
    let summaries: Vec<String> = demos.into_iter().flatten().map(Demo::drain).collect();
    // Every journal record, as a restore of all four partitions from their start reads them.
    let all = crate::store::journal_records(&s, 4).await;
    let (read, rows): (Vec<u64>, Vec<u64>) = summaries.iter().map(|s| restored(s)).unzip();
    eprintln!("journal records {all}; the last instances read {read:?} from the journal, {rows:?} local rows");
    if stores {
        for r in &read {
            assert!(*r * 4 < all, "seed {seed}: an instance read {r} of {all} journal records: not just tails");
        }
    }
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 4)).await.unwrap(), accounts, "seed {seed}");
}

/// A GET of `path` on the demo's HTTP server: (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (code, _, body) = crate::util::http_get(addr, path);
    (code, body)
}

/// The value of the sample `name{...}` (the first one) in a Prometheus text body.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name || key.starts_with(&format!("{name}{{"))).then(|| value.parse().ok())?
    })
}

/// `demo --metrics-addr`: /ready turns 200 once the partitions are restored, /health is 200 while
/// the flow runs, /metrics (Prometheus text) has the flow's counters, which move with the load,
/// and a histogram of its commits; `describe --instances` shows what the running instance holds
/// (its state cache's figures are those of /metrics), and fails naming an instance it cannot ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_serves_prometheus_metrics_health_and_readiness() {
    let s = setup(2).await;
    let logs = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut args = kafka_journal(&s, "100ms");
    args.extend(["--metrics-addr".to_string(), "127.0.0.1:0".to_string()]);
    args.extend(["--state-dir".to_string(), state.path().display().to_string()]);
    args.extend(["--state-cache".to_string(), "16MiB".to_string()]);
    let demo = Demo::start(&s, "", &args, logs.path());
    let addr = demo.http_addr();
    let get = |path: &'static str| {
        let addr = addr.clone();
        move || http_get(&addr, path)
    };
    let end = Instant::now() + DEADLINE;
    while tokio::task::spawn_blocking(get("/ready")).await.unwrap().0 != 200 {
        assert!(Instant::now() < end, "never ready: {}", crate::crash::tail(&demo.stderr));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tokio::task::spawn_blocking(get("/health")).await.unwrap().0, 200);
    assert_eq!(tokio::task::spawn_blocking(get("/nosuch")).await.unwrap().0, 404);
    let cmds = workload(300, 10, 5);
    let (replies, _) = expected(&cmds);
    feed_async(&s, &cmds).await;
    await_replies(&s, replies).await;
    // The counters are published once per commit interval.
    let body = loop {
        let (code, body) = tokio::task::spawn_blocking(get("/metrics")).await.unwrap();
        assert_eq!(code, 200);
        if sample(&body, "eventstage_flow_records_in_total") == Some(300.0) {
            break body;
        }
        assert!(Instant::now() < end + DEADLINE, "records_in never reached 300: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("stage=\"bank\"") && body.contains(&format!("group=\"{}\"", s.group)), "{body}");
    assert!(
        sample(&body, "eventstage_flow_records_out_total").is_some_and(|n| n >= 300.0),
        "a reply per command: {body}"
    );
    assert!(sample(&body, "eventstage_flow_commits_total").is_some_and(|c| c >= 1.0), "{body}");
    assert!(sample(&body, "eventstage_flow_commit_seconds_count").is_some_and(|c| c >= 1.0), "{body}");
    assert!(sample(&body, "eventstage_flow_rebalances_total").is_some_and(|c| c >= 1.0), "{body}");
    assert_eq!(sample(&body, "eventstage_flow_assigned_partitions"), Some(2.0), "{body}");
    // Every command looked its key up in the cache: a hit, or a miss read from the store.
    let (hits, misses) =
        (sample(&body, "eventstage_flow_cache_hits_total"), sample(&body, "eventstage_flow_cache_misses_total"));
    let (hits, misses) = (hits.unwrap_or(0.0), misses.unwrap_or(0.0));
    assert_eq!(hits + misses, 300.0, "{body}");

    let app = ["--brokers", &s.brokers, "--group", &s.group, "--input", &s.topics.input, "--journal", &s.journal];
    let describe = |instances: String| {
        let app = app.map(String::from);
        move || {
            let mut a: Vec<&str> = vec!["describe"];
            a.extend(app.iter().map(String::as_str));
            a.extend(["--instances", &instances]);
            crate::util::run_cli(&a)
        }
    };
    let (code, out, err) = tokio::task::spawn_blocking(describe(addr.clone())).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("instance {addr}: 2 partitions")), "{out}");
    assert!(out.contains(&format!("{hits} hits, {misses} misses")), "the figures of /metrics: {out}");
    assert!(out.contains("local store:"), "{out}");
    // An address where nothing answers: the rest is shown, the instance named, exit 1.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = gone.local_addr().unwrap().to_string();
    drop(gone);
    let (code, out, err) = tokio::task::spawn_blocking(describe(format!("{addr},{nobody}"))).await.unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("instance {addr}:")), "{out}");
    assert!(err.contains(&format!("instance {nobody}: cannot read its metrics")), "{err}");
    let rest = demo.drain();
    assert!(rest.contains("300 records in"), "{rest}");
}
