//! What only a real Kafka cluster can prove: the log cleaner's compaction under the journal and a
//! table, the broker aborting a transaction that outlived its timeout, a three-broker cluster losing
//! the partition leader and the transaction coordinator, and a broker killed twice under load.
//! Several instances in one group: `instances.rs`.

use crate::crash::{tail, Demo};
use crate::flow::{await_replies, expected, feed_async, journal_state, setup, setup_on, wire, workload, Setup};
use crate::util::broker::{brokers, create_topic, flush, own_cluster, producer, send, unique, Settings};
use crate::util::DEADLINE;
use eventstage::stages::bank_flow::bank_flow;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Topic settings that let the log cleaner work within about a second: segments roll 100 ms after
/// their first record (on the next append), any dirty share is worth cleaning, tombstones go 100 ms
/// after they were cleaned.
const FAST_COMPACTION: &[(&str, &str)] = &[
    ("cleanup.policy", "compact"),
    ("segment.ms", "100"),
    ("min.cleanable.dirty.ratio", "0.01"),
    ("delete.retention.ms", "100"),
];

/// Creates a topic with [`FAST_COMPACTION`] that the cleaner leaves alone until
/// [`allow_compaction`] (records younger than an hour are not compacted): the test can count what
/// was written first.
async fn compacted_later(brokers: &str, topic: &str, partitions: i32) {
    let mut config = FAST_COMPACTION.to_vec();
    config.push(("min.compaction.lag.ms", "3600000"));
    create_topic(brokers, topic, partitions, &config).await;
}

/// Lets the log cleaner compact `topic` at once.
async fn allow_compaction(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    // AlterConfigs replaces the topic's whole configuration: all of it again, with no lag.
    let mut config = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (k, v) in FAST_COMPACTION {
        config = config.set(k, v);
    }
    config = config.set("min.compaction.lag.ms", "0");
    for r in admin.alter_configs([&config], &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
}

/// The end offsets (high watermarks) of every partition of `topic`.
fn end_offsets(brokers: &str, topic: &str) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    (0..md.topics()[0].partitions().len() as i32)
        .map(|p| (p, c.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1))
        .collect()
}

/// Reads `topic` from its start to its end as of the call (`isolation`: read_committed stops at the
/// last stable offset) and returns the records read, in all and below `below` per partition, and
/// whether every partition's position reached that end (false: a transaction is still open). A
/// partition is done at its end offset or at end-of-partition, so writers that go on do not keep it
/// reading.
fn scan(brokers: &str, topic: &str, isolation: &str, below: &BTreeMap<i32, i64>) -> (usize, usize, bool) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("scan"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    let ends = end_offsets(brokers, topic);
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition_offset(topic, *p, Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let (mut all, mut old) = (0, 0);
    let mut at_end = std::collections::BTreeSet::new();
    let deadline = Instant::now() + DEADLINE;
    while at_end.len() < ends.len() {
        assert!(Instant::now() < deadline, "scanning {topic} timed out");
        if let Ok(positions) = c.position() {
            for (p, end) in &ends {
                if let Some(Offset::Offset(o)) = positions.find_partition(topic, *p).map(|e| e.offset()) {
                    if o >= *end {
                        at_end.insert(*p);
                    }
                }
            }
        }
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                all += 1;
                if m.offset() < below.get(&m.partition()).copied().unwrap_or(0) {
                    old += 1;
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            _ => {}
        }
    }
    let positions = c.position().unwrap();
    let reached = ends.iter().all(|(p, end)| match positions.find_partition(topic, *p).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => o >= *end,
        _ => *end == 0,
    });
    (all, old, reached)
}

/// Polls `cond` on this thread every 200 ms until it holds; panics after `limit`.
pub(crate) fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Feeds `cmds` in chunks of `chunk` every `every` on a thread of its own, until they are all sent
/// or `stop` is set; returns how many it sent.
pub(crate) fn feeder(
    s: &Setup,
    cmds: &[(String, String, eventstage::stages::bank::BankCommand)],
    chunk: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let (b, t, c) = (s.brokers.clone(), s.topics.input.clone(), cmds.to_vec());
    std::thread::spawn(move || {
        let p = producer(&b);
        let mut sent = 0;
        for part in c.chunks(chunk) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            for (key, id, cmd) in part {
                send(&p, &t, key, &wire(id, *cmd));
            }
            flush(&p);
            sent += part.len();
            std::thread::sleep(every);
        }
        sent
    })
}

/// The log cleaner really compacts a flow's Kafka journal (superseded records disappear from the
/// part of the log written before), and a new instance restored from the compacted journal goes on
/// exactly as the reference model says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_cleaner_compacts_the_journal_and_a_flow_restores_the_model_from_it() {
    let s = setup(2).await;
    compacted_later(&s.brokers, &s.journal, 2).await;
    let cmds = workload(4000, 15, 61);
    let (replies, accounts) = expected(&cmds);
    let start = || {
        bank_flow(&s.brokers, &s.group, s.topics.clone())
            .journal_topic(&s.journal)
            .transactional_id(unique("txn"))
            .commit_interval(Duration::from_millis(20))
            .run()
            .unwrap()
    };
    // Phase 1: many transactions, each writing a record per changed account.
    let flow = start();
    let first = feeder(&s, &cmds[..1000], 25, Duration::from_millis(50), Arc::default()).join().unwrap();
    await_replies(&s, expected(&cmds[..first]).0).await;
    flow.drain_and_shutdown().await.unwrap();
    let (b, journal) = (s.brokers.clone(), s.journal.clone());
    let (ends, written) = tokio::task::spawn_blocking(move || {
        let ends = end_offsets(&b, &journal);
        (ends.clone(), scan(&b, &journal, "read_committed", &ends).1)
    })
    .await
    .unwrap();
    assert!(written > 100, "phase 1 wrote {written} journal records");

    // Phase 2: another instance keeps writing (an append after segment.ms rolls the segment, and only
    // rolled segments are cleaned) until records written in phase 1 have been removed.
    allow_compaction(&s.brokers, &s.journal).await;
    let flow = start();
    let stop = Arc::new(AtomicBool::new(false));
    let more = feeder(&s, &cmds[first..], 20, Duration::from_millis(150), stop.clone());
    let (b, journal) = (s.brokers.clone(), s.journal.clone());
    let left = tokio::task::spawn_blocking(move || {
        let mut left = written;
        wait_for("the log cleaner to compact the journal", DEADLINE * 2, || {
            left = scan(&b, &journal, "read_committed", &ends).1;
            left < written
        });
        left
    })
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    let second = first + more.join().unwrap();
    assert!(left <= written / 2, "compaction left {left} of {written} records of phase 1");
    flow.drain_and_shutdown().await.unwrap();

    // Phase 3: a new instance restores every account from the compacted journal and goes on.
    let flow = start();
    feed_async(&s, &cmds[second..]).await;
    await_replies(&s, replies).await;
    assert!(flow.metrics().restored_records > 0);
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// A table over a topic the log cleaner has compacted (superseded values and tombstones removed)
/// equals the last-write-wins model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_over_a_compacted_topic_equals_the_last_write_wins_model() {
    use crate::table::{contents, open, random_writes, Model};
    crate::util::init_tracing();
    let (b, topic) = (brokers(), unique("compacted"));
    compacted_later(&b, &topic, 2).await;
    let (b2, t2) = (b.clone(), topic.clone());
    let (model, ends) = tokio::task::spawn_blocking(move || {
        let mut model = Model::new();
        random_writes(&b2, &t2, 3000, 100, 1, &mut model);
        let ends = end_offsets(&b2, &t2);
        assert_eq!(scan(&b2, &t2, "read_committed", &ends).1, 3000);
        (model, ends)
    })
    .await
    .unwrap();
    allow_compaction(&b, &topic).await;
    let (b2, t2) = (b.clone(), topic.clone());
    let (model, written) = tokio::task::spawn_blocking(move || {
        let (mut model, before) = (model, 3000);
        // More writes (part of the model too) roll the segments until the cleaner has removed
        // records of the first 3000.
        let mut seed = 2;
        wait_for("the log cleaner to compact the topic", DEADLINE * 2, || {
            random_writes(&b2, &t2, 20, 100, seed, &mut model);
            seed += 1;
            scan(&b2, &t2, "read_committed", &ends).1 < before / 2
        });
        (model, 3000 + 20 * (seed - 2))
    })
    .await
    .unwrap();
    let table = open(&b, &topic).await;
    tokio::time::timeout(DEADLINE, table.caught_up()).await.expect("catches up").unwrap();
    assert_eq!(contents(&table), model);
    let read = table.stats().records_read;
    assert!(read < written, "the table read the compacted topic ({read} of {written} records written)");
}

/// `eventstage demo` arguments: the Kafka journal of `s`, this commit interval.
pub(crate) fn kafka_journal(s: &Setup, commit_interval: &str) -> Vec<String> {
    ["--journal", &format!("kafka:{}", s.journal), "--commit-interval", commit_interval].map(String::from).to_vec()
}

/// The flow's process is stopped (SIGSTOP) for longer than its transaction timeout (10 s), so the
/// broker aborts its open transaction (and the group drops its member); after SIGCONT it must
/// notice and recover by itself (a supervisor would restart it if it stopped, but it must not need
/// to): every command gets exactly one correct reply and the journal equals the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_stopped_past_its_transaction_timeout_recovers_exactly_once() {
    let s = setup(2).await;
    let logs = tempfile::tempdir().unwrap();
    let txn = unique("txn");
    // More than the stops need at this pace (a minute of input: every attempt must find input
    // arriving); the feeder stops once an open transaction was caught, the rest is fed at once.
    let cmds = workload(12000, 20, 71);
    let (replies, accounts) = expected(&cmds);
    let demo = Demo::start(&s, &txn, &kafka_journal(&s, "2s"), logs.path());
    let stop = Arc::new(AtomicBool::new(false));
    let feeding = feeder(&s, &cmds, 10, Duration::from_millis(50), stop.clone());
    let (b, r) = (s.brokers.clone(), s.topics.replies.clone());
    // Stopped until the broker has aborted its open transaction (read_committed reaches the end
    // again), and replies of it were written (visible read_uncommitted, never committed). A stop that
    // caught the flow between a commit and its next record aborts nothing: it is stopped again.
    let demo = tokio::task::spawn_blocking(move || {
        // The replies topic's end offsets when the flow was last continued: it is stopped again only
        // once it wrote more (a flow stopped right after a commit, and continued, needs a moment to
        // open a transaction with replies in it again).
        let mut written = 0;
        for attempt in 0.. {
            assert!(attempt < 5, "never caught an open transaction; the flow's log:\n{}", tail(&demo.stderr));
            // Input keeps arriving, so a transaction with replies in it is open nearly all the time.
            wait_for(&format!("replies ({})", demo.stderr.display()), DEADLINE, || {
                end_offsets(&b, &r).values().sum::<i64>() > written
            });
            demo.signal("-STOP");
            eprintln!("stopped the flow (attempt {attempt})");
            let stopped = Instant::now();
            let mut committed = 0;
            wait_for("the broker to abort the stopped flow's transaction", DEADLINE, || {
                let (c, _, reached) = scan(&b, &r, "read_committed", &BTreeMap::new());
                committed = c;
                reached
            });
            let all = scan(&b, &r, "read_uncommitted", &BTreeMap::new()).0;
            // Past the consumer's session timeout too (the demo's: 10 s).
            let rest = Duration::from_secs(11).saturating_sub(stopped.elapsed());
            std::thread::sleep(rest);
            written = end_offsets(&b, &r).values().sum::<i64>();
            demo.signal("-CONT");
            eprintln!("continued the flow: {all} replies written, {committed} committed");
            if all > committed {
                return demo;
            }
        }
        unreachable!()
    })
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    let sent = feeding.join().unwrap();
    feed_async(&s, &cmds[sent..]).await;
    // A supervisor restarts the flow if it stops, as one would (counted: it must not be needed).
    let watching = Arc::new(AtomicBool::new(true));
    let restarts = Arc::new(AtomicUsize::new(0));
    let supervisor = std::thread::spawn({
        let (s, txn, logs, watching, restarts) =
            (s.clone(), txn.clone(), logs.path().to_path_buf(), watching.clone(), restarts.clone());
        move || {
            let mut demo = demo;
            while watching.load(Ordering::SeqCst) {
                if let Some(status) = demo.child.try_wait().unwrap() {
                    eprintln!("the flow exited with {status}: {}", tail(&demo.stderr));
                    assert!(!status.success(), "a flow that stops on an error exits non-zero");
                    restarts.fetch_add(1, Ordering::SeqCst);
                    demo = Demo::start(&s, &txn, &kafka_journal(&s, "2s"), &logs);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            demo
        }
    });
    await_replies(&s, replies).await;
    watching.store(false, Ordering::SeqCst);
    let demo = supervisor.join().unwrap();
    let log = std::fs::read_to_string(&demo.stderr).unwrap_or_default();
    let out = demo.drain();
    let aborted: u64 = out
        .split(" aborted)")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    for line in log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
        eprintln!("flow: {line}");
    }
    // The broker timed the transaction out: the flow replaces its producer and goes on by itself.
    assert_eq!(restarts.load(Ordering::SeqCst), 0, "the flow recovered without a restart: {out}\n{log}");
    assert!(aborted > 0, "the flow noticed that its transaction was aborted: {out}\n{log}");
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// The broker coordinating `key` (a transactional id in `__transaction_state`, a group id in
/// `__consumer_offsets`): the leader of the internal topic's partition Kafka maps the key to, the
/// absolute value of Java's `String.hashCode` modulo the partition count (`Utils.abs`: 0 for
/// `i32::MIN`).
pub(crate) fn coordinator(brokers: &str, internal_topic: &str, key: &str) -> i32 {
    let hash = key.encode_utf16().fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)));
    let hash = if hash == i32::MIN { 0 } else { hash.abs() };
    leader(brokers, internal_topic, hash % partition_count(brokers, internal_topic))
}

fn partition_count(brokers: &str, topic: &str) -> i32 {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap().topics()[0].partitions().len() as i32
}

/// The broker id leading `topic`'s `partition` (-1 while there is none).
pub(crate) fn leader(brokers: &str, topic: &str, partition: i32) -> i32 {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    md.topics()[0].partitions().iter().find(|p| p.id() == partition).map_or(-1, |p| p.leader())
}

/// A broker the failover test kills: the leader of a topic's partition 0, or the coordinator of a
/// key in an internal topic.
enum Victim {
    Leader(String),
    Coordinator(&'static str, String),
}

/// Waits until `flow` has taken `records` inputs and committed a transaction since; three brokers
/// on two cores start, move leaderships and coordinators slowly, hence three times the usual deadline.
async fn progress(flow: &eventstage::flow::FlowControl, records: u64, what: &str) {
    let end = Instant::now() + DEADLINE * 3;
    let commits = flow.metrics().transactions;
    while flow.metrics().records_in < records || flow.metrics().transactions <= commits {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bank flow (Kafka journal, 100 ms commits, transactional id `txn`) under a steady load of
/// `cmds` (20 every 100 ms), running and committing: the outage tests' start.
struct Loaded {
    flow: eventstage::flow::FlowControl,
    cmds: Vec<(String, String, eventstage::stages::bank::BankCommand)>,
    stop: Arc<AtomicBool>,
    feeding: std::thread::JoinHandle<usize>,
}

impl Loaded {
    async fn start(s: &Setup, txn: &str, cmds: Vec<(String, String, eventstage::stages::bank::BankCommand)>) -> Self {
        let flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
            .journal_topic(&s.journal)
            .transactional_id(txn)
            .commit_interval(Duration::from_millis(100))
            .run()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let feeding = feeder(s, &cmds, 20, Duration::from_millis(100), stop.clone());
        // Steady load first: the flow runs and commits before any broker dies.
        progress(&flow, 200, "the flow to run").await;
        Self { flow, cmds, stop, feeding }
    }

    /// Stops the steady load, feeds the rest at once, and checks: exactly one correct reply per
    /// command, the flow drains without an error, the journal equals the model.
    async fn finish(self, s: Setup) {
        let (replies, accounts) = expected(&self.cmds);
        self.stop.store(true, Ordering::SeqCst);
        let sent = self.feeding.join().unwrap();
        feed_async(&s, &self.cmds[sent..]).await;
        await_replies(&s, replies).await;
        assert!(self.flow.metrics().transactions > 0);
        self.flow.drain_and_shutdown().await.unwrap();
        assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
    }
}

/// On three brokers (replication factor 3, min.insync.replicas 2), under a steady load, the broker
/// leading an input partition, then the transaction coordinator, then the group coordinator are
/// SIGKILLed and restarted, one at a time: the flow recovers by itself, every command gets exactly
/// one correct reply and the journal equals the model.
///
/// The group coordinator's loss once stopped the flow for good, silently: librdkafka's
/// `send_offsets_to_transaction` never returned (librdkafka #5456, #5511). The flow now replaces
/// its producer when that happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_survives_losing_the_partition_leader_and_both_coordinators() {
    let mut cluster = own_cluster(Settings::three());
    let s = setup_on(cluster.bootstrap(), 2).await;
    let txn = unique("txn");
    // More than the kills need at this pace: the feeder stops once they are done, the rest is fed
    // at once.
    let loaded = Loaded::start(&s, &txn, workload(20000, 30, 81)).await;
    let flow = &loaded.flow;
    let victims = [
        ("the input's partition leader", Victim::Leader(s.topics.input.clone())),
        ("the transaction coordinator", Victim::Coordinator("__transaction_state", txn.clone())),
        ("the group coordinator", Victim::Coordinator("__consumer_offsets", s.group.clone())),
    ];
    for (what, victim) in victims {
        let b = s.brokers.clone();
        let id = tokio::task::spawn_blocking(move || match victim {
            Victim::Leader(topic) => leader(&b, &topic, 0),
            Victim::Coordinator(internal, key) => coordinator(&b, internal, &key),
        })
        .await
        .unwrap();
        let node = cluster.node_of_broker(id).unwrap_or_else(|| panic!("{what} is broker {id}"));
        let before = flow.metrics().records_in;
        cluster.kill_node(node);
        eprintln!("killed broker {id}, {what}, at {before} commands in");
        // The flow goes on with the other two brokers...
        progress(flow, before + 200, &format!("progress without {what}")).await;
        cluster.restart_node(node).unwrap();
        // ...and, as in a rolling restart, the next broker dies only once this one is back in sync.
        let c = &cluster;
        tokio::task::block_in_place(|| {
            c.wait_ready().unwrap();
            c.wait_in_sync(DEADLINE * 2).unwrap();
        });
    }
    loaded.finish(s).await;
}

/// Under a steady load, the flow's only broker is SIGKILLed and restarted, twice: the flow heals in
/// its own process (no supervisor: a new producer where librdkafka's one failed for good, aborts,
/// rewinds), every command gets exactly one correct reply and the journal equals the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_heals_in_process_when_its_broker_is_killed_twice_under_load() {
    let mut cluster = own_cluster(Settings::single());
    let s = setup_on(cluster.bootstrap(), 2).await;
    let loaded = Loaded::start(&s, &unique("txn"), workload(20000, 30, 91)).await;
    let flow = &loaded.flow;
    for round in 1..=2 {
        let before = flow.metrics().records_in;
        cluster.kill_node(0);
        eprintln!("killed the broker (round {round}) at {before} commands in");
        cluster.restart_node(0).unwrap();
        let c = &cluster;
        tokio::task::block_in_place(|| c.wait_ready().unwrap());
        progress(flow, before + 200, &format!("progress after the broker's restart (round {round})")).await;
    }
    loaded.finish(s).await;
}
