//! Exactly-once flows against a real Kafka-protocol broker.

use crate::runtime::model;
use crate::util::broker::{brokers, create_topic, flush, producer, read_committed, send, unique, Rec};
use eventstage::flow::FlowError;
use eventstage::journal::KafkaJournal;
use eventstage::stages::bank::{Account, BankCommand, BankRejection};
use eventstage::stages::bank_flow::{bank_flow, BankTopics, WireCommand, WireReply};
use eventstage::Codec;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Topics of one test.
#[derive(Clone)]
pub(crate) struct Setup {
    pub brokers: String,
    pub topics: BankTopics,
    pub journal: String,
    pub group: String,
}

pub(crate) async fn setup(partitions: i32) -> Setup {
    setup_on(brokers(), partitions).await
}

/// Fresh topics of `partitions` partitions on the broker at `brokers`.
pub(crate) async fn setup_on(brokers: String, partitions: i32) -> Setup {
    crate::util::init_tracing();
    let topics = BankTopics { input: unique("cmds"), replies: unique("replies"), events: unique("events") };
    for t in [&topics.input, &topics.replies, &topics.events] {
        create_topic(&brokers, t, partitions, &[]).await;
    }
    Setup { brokers, topics, journal: unique("journal"), group: unique("group") }
}

/// A generated workload: (account, command id, command) in send order.
pub(crate) fn workload(n: usize, accounts: usize, seed: u64) -> Vec<(String, String, BankCommand)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let cmd = match rng.random_range(0..10) {
                0 => BankCommand::Open,
                1..=5 => BankCommand::Deposit(rng.random_range(1..100)),
                6..=8 => BankCommand::Withdraw(rng.random_range(1..100)),
                _ => BankCommand::Close,
            };
            (format!("acct-{}", rng.random_range(0..accounts)), format!("cmd-{i}"), cmd)
        })
        .collect()
}

pub(crate) fn wire(id: &str, cmd: BankCommand) -> Vec<u8> {
    let (op, amount) = match cmd {
        BankCommand::Open => ("open", None),
        BankCommand::Deposit(a) => ("deposit", Some(a)),
        BankCommand::Withdraw(a) => ("withdraw", Some(a)),
        BankCommand::Close => ("close", None),
    };
    serde_json::to_vec(&WireCommand { id: id.into(), op: op.into(), amount }).unwrap()
}

pub(crate) fn feed(brokers: &str, topic: &str, cmds: &[(String, String, BankCommand)]) {
    let p = producer(brokers);
    for (key, id, cmd) in cmds {
        send(&p, topic, key, &wire(id, *cmd));
    }
    flush(&p);
}

/// The replies the reference model expects, by command id, and the final state per account.
pub(crate) fn expected(
    cmds: &[(String, String, BankCommand)],
) -> (HashMap<String, WireReply>, BTreeMap<String, Account>) {
    let mut accounts: BTreeMap<String, Account> = BTreeMap::new();
    let mut replies = HashMap::new();
    for (key, id, cmd) in cmds {
        let account = accounts.entry(key.clone()).or_default();
        let reply = match model(account, *cmd) {
            Ok(balance) => WireReply { id: id.clone(), ok: true, balance: Some(balance), error: None },
            Err(rejection) => WireReply {
                id: id.clone(),
                ok: false,
                balance: account.open.then_some(account.balance),
                error: Some(match rejection {
                    BankRejection::NotOpen => "account is not open".into(),
                    other => other.to_string(),
                }),
            },
        };
        replies.insert(id.clone(), reply);
    }
    accounts.retain(|_, a| *a != Account::default());
    (replies, accounts)
}

/// Reads replies until every command id has one, then checks: exactly one per id, each as expected.
pub(crate) fn check_replies(s: &Setup, expected: &HashMap<String, WireReply>) -> Vec<Rec> {
    let n = expected.len();
    let recs = read_committed(&s.brokers, &s.topics.replies, |r| r.len() >= n, Duration::from_millis(1500));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &recs {
        let reply: WireReply = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        *seen.entry(reply.id.clone()).or_default() += 1;
        let key = r.key.as_deref().map(String::from_utf8_lossy);
        assert_eq!(Some(&reply), expected.get(&reply.id), "reply to {} (key {key:?})", reply.id);
    }
    let dupes: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dupes.is_empty(), "duplicate replies: {dupes:?}");
    assert_eq!(seen.len(), n, "one reply per command");
    recs
}

/// Reads replies until every command id has one, then checks: each as expected (copies included).
pub(crate) fn check_replies_at_least_once(s: &Setup, expected: &HashMap<String, WireReply>) -> Vec<Rec> {
    let n = expected.len();
    let distinct = |recs: &[Rec]| {
        recs.iter()
            .filter_map(|r| serde_json::from_slice::<WireReply>(r.value.as_deref()?).ok())
            .map(|r| r.id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let recs = read_committed(&s.brokers, &s.topics.replies, |r| distinct(r) >= n, Duration::from_millis(500));
    for r in &recs {
        let reply: WireReply = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        let key = r.key.as_deref().map(String::from_utf8_lossy);
        assert_eq!(Some(&reply), expected.get(&reply.id), "reply to {} (key {key:?})", reply.id);
    }
    assert_eq!(distinct(&recs), n, "a reply per command");
    recs
}

/// The state per key in the journal topic, from the newest record of each key (what compaction keeps).
pub(crate) fn journal_state(s: &Setup, partitions: i32) -> BTreeMap<String, Account> {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &s.brokers);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let journal = rt.block_on(KafkaJournal::ensure(config, &s.journal, partitions)).unwrap();
    let mut state = BTreeMap::new();
    for p in 0..partitions {
        for (k, entry) in journal.latest_per_key(p, Duration::from_secs(30)).unwrap() {
            // No state: an at-least-once flow's deletion marker.
            let Some(env) = entry.state else { continue };
            let account: Account = Codec::from_id(env.codec).unwrap().decode(&env.payload).unwrap();
            state.insert(String::from_utf8(k).unwrap(), account);
        }
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_flow_replies_exactly_once_and_the_journal_rebuilds_the_state() {
    let s = setup(3).await;
    let cmds = workload(600, 25, 1);
    let (replies, accounts) = expected(&cmds);
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .transactional_id(unique("txn"))
        .run()
        .unwrap();
    feed_async(&s, &cmds).await;
    await_replies(&s, replies).await;
    let m = flow.metrics();
    assert_eq!(m.records_in, 600);
    assert!(m.transactions >= 1);
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 3)).await.unwrap(), accounts);
}

/// A Kafka journal belongs to the group that first ran on it: a flow of another group on the same
/// journal and inputs is refused (it would start from its own offsets and apply every past command
/// again on top of the journal's state); one told to take the journal over continues from its state
/// and the previous group's offsets (no command applied twice), and the previous group is refused
/// from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_belongs_to_one_group_unless_taken_over() {
    let s = setup(2).await;
    let cmds = workload(300, 20, 5);
    let start = |group: &str, take_over: bool| {
        let flow =
            bank_flow(&s.brokers, group, s.topics.clone()).journal_topic(&s.journal).transactional_id(unique("txn"));
        let flow = if take_over { flow.take_over_journal() } else { flow };
        flow.run().unwrap()
    };
    let refused = |result: Result<(), FlowError>, owner: &str, group: &str| match result {
        Err(e @ FlowError::Journal(_)) => {
            let msg = e.to_string();
            assert!(msg.contains(&s.journal) && msg.contains(owner) && msg.contains(group), "{msg}");
            assert!(msg.contains("take the journal over"), "the error says what to do: {msg}");
        }
        other => panic!("a journal of group {owner} is refused to group {group}: {other:?}"),
    };
    let (first, second) = (unique("group"), unique("group"));
    let flow = start(&first, false);
    feed_async(&s, &cmds[..150]).await;
    await_replies(&s, expected(&cmds[..150]).0).await;
    flow.drain_and_shutdown().await.unwrap();

    let other = start(&second, false);
    refused(tokio::time::timeout(crate::util::DEADLINE, other.wait()).await.expect("refused at once"), &first, &second);

    let flow = start(&second, true);
    feed_async(&s, &cmds[150..]).await;
    let (replies, accounts) = expected(&cmds);
    await_replies(&s, replies).await;
    assert_eq!(flow.metrics().records_in, 150, "the new group starts where the previous one committed");
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(
        tokio::task::spawn_blocking({
            let s = s.clone();
            move || journal_state(&s, 2)
        })
        .await
        .unwrap(),
        accounts
    );

    let old = start(&first, false);
    refused(tokio::time::timeout(crate::util::DEADLINE, old.wait()).await.expect("refused at once"), &second, &first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_goes_to_the_dead_letter_topic_with_its_source() {
    let s = setup(1).await;
    let dlq = unique("dlq");
    create_topic(&s.brokers, &dlq, 1, &[]).await;
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .bad_input(eventstage::flow::BadInput::DeadLetter(dlq.clone()))
        .run()
        .unwrap();
    let (b, input) = (s.brokers.clone(), s.topics.input.clone());
    let dlq_recs = tokio::task::spawn_blocking(move || {
        let p = producer(&b);
        send(&p, &input, "acct-1", &wire("c1", BankCommand::Open));
        send(&p, &input, "acct-1", b"{not json");
        send(&p, &input, "acct-1", br#"{"id":"c3","op":"deposit"}"#);
        send(&p, &input, "acct-1", &wire("c4", BankCommand::Deposit(5)));
        flush(&p);
        read_committed(&b, &dlq, |r| r.len() >= 2, Duration::from_millis(500))
    })
    .await
    .unwrap();
    assert_eq!(dlq_recs.len(), 2);
    let h = |r: &Rec, k: &str| String::from_utf8(r.headers.iter().find(|(n, _)| n == k).unwrap().1.clone()).unwrap();
    assert_eq!(dlq_recs[0].value.as_deref(), Some(&b"{not json"[..]));
    assert_eq!(dlq_recs[0].key.as_deref(), Some(&b"acct-1"[..]));
    assert_eq!(h(&dlq_recs[0], "eventstage.source.topic"), s.topics.input);
    assert_eq!(h(&dlq_recs[0], "eventstage.source.partition"), "0");
    assert_eq!(h(&dlq_recs[0], "eventstage.source.offset"), "1");
    assert!(h(&dlq_recs[0], "eventstage.error").contains("not a bank command"));
    assert!(h(&dlq_recs[1], "eventstage.error").contains("needs an amount"));
    // The good records around them were processed: the partition is not blocked.
    let replies = tokio::task::spawn_blocking({
        let (b, t) = (s.brokers.clone(), s.topics.replies.clone());
        move || read_committed(&b, &t, |r| r.len() >= 2, Duration::from_millis(300))
    })
    .await
    .unwrap();
    let last: WireReply = serde_json::from_slice(replies[1].value.as_deref().unwrap()).unwrap();
    assert_eq!((last.id.as_str(), last.balance), ("c4", Some(5)));
    assert_eq!(flow.metrics().dead_letters, 2);
    flow.drain_and_shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_journal_topic_is_refused_with_the_fix() {
    let s = setup(3).await;
    create_topic(&s.brokers, &s.journal, 2, &[("cleanup.policy", "compact")]).await;
    let err = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .run()
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has 2 partitions, the input has 3"), "{err}");
    let delete = unique("journal");
    create_topic(&s.brokers, &delete, 3, &[("cleanup.policy", "delete")]).await;
    let err = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&delete)
        .run()
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cleanup.policy=delete") && err.to_string().contains("compact"), "{err}");
    let missing = BankTopics { input: unique("missing"), ..s.topics.clone() };
    let err =
        bank_flow(&s.brokers, &s.group, missing).journal_topic(&s.journal).run().unwrap().wait().await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_with_the_same_transactional_id_cannot_commit() {
    let s = setup(2).await;
    let txn = unique("txn");
    let cmds = workload(400, 20, 3);
    let (replies, accounts) = expected(&cmds);
    let zombie = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .transactional_id(&txn)
        .run()
        .unwrap();
    feed_async(&s, &cmds[..200]).await;
    crate::util::wait_until("the first instance to commit", || {
        zombie.metrics().records_in >= 200 && zombie.metrics().transactions > 0
    })
    .await;
    // A new instance with the same transactional id takes over: the old one is now a zombie. Once
    // the successor owns partitions, its producer has fenced the zombie's epoch and the group has
    // split the two partitions: the zombie learns it is fenced at its next commit, which the rest
    // of the input (spread over both partitions) brings.
    let successor = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .transactional_id(&txn)
        .run()
        .unwrap();
    crate::util::wait_until("the successor to own partitions", || successor.metrics().assigned_partitions > 0).await;
    feed_async(&s, &cmds[200..]).await;
    let err = tokio::time::timeout(crate::util::DEADLINE, zombie.wait()).await.expect("the zombie stops").unwrap_err();
    assert!(matches!(err, eventstage::flow::FlowError::Fenced { .. }), "{err}");
    await_replies(&s, replies).await;
    successor.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_at_start_is_waited_for() {
    use crate::util::broker::{own_cluster, wait_ready, Settings};
    let mut cluster = own_cluster(Settings::single());
    let addr = cluster.bootstrap();
    let s = setup_on(addr.clone(), 1).await;
    cluster.stop_node(0);
    // The broker is down: the flow starts anyway and keeps retrying.
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone()).journal_topic(&s.journal).run().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(flow.metrics().records_in, 0);
    cluster.restart_node(0).unwrap();
    wait_ready(&addr);
    let cmds = workload(50, 5, 4);
    let (replies, _) = expected(&cmds);
    feed_async(&s, &cmds).await;
    await_replies(&s, replies).await;
    flow.drain_and_shutdown().await.unwrap();
}

/// The state per key in a flow's sled journal (all partitions), rebuilt by replaying the events.
pub(crate) async fn sled_state(dir: &std::path::Path, partitions: i32) -> BTreeMap<String, Account> {
    use eventstage::journal::{EventQuery, Progress, SledStore};
    let store = SledStore::open(dir).unwrap();
    let mut state = BTreeMap::new();
    for p in 0..partitions {
        let journal = store.existing_journal(&format!("bank/p{p}")).unwrap();
        for (k, (account, _)) in
            eventstage::rebuild::<eventstage::stages::bank::Bank, _>(&journal, EventQuery::all(), &Progress::none())
                .await
                .unwrap()
        {
            if account != Account::default() {
                state.insert(k, account);
            }
        }
    }
    state
}

/// Feeds `cmds` to the input topic from a blocking task.
pub(crate) async fn feed_async(s: &Setup, cmds: &[(String, String, BankCommand)]) {
    let (b, t, c) = (s.brokers.clone(), s.topics.input.clone(), cmds.to_vec());
    tokio::task::spawn_blocking(move || feed(&b, &t, &c)).await.unwrap();
}

/// [`check_replies`] from a blocking task.
pub(crate) async fn await_replies(s: &Setup, replies: HashMap<String, WireReply>) -> Vec<Rec> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || check_replies(&s, &replies)).await.unwrap()
}

pub(crate) fn feed_slowly(s: &Setup, cmds: &[(String, String, BankCommand)]) -> std::thread::JoinHandle<()> {
    let (b, t, c) = (s.brokers.clone(), s.topics.input.clone(), cmds.to_vec());
    std::thread::spawn(move || {
        for chunk in c.chunks(50) {
            feed(&b, &t, chunk);
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// Invariant 5: a second instance joins mid-stream, then the first dies (aborting its open
/// transaction); partitions (and their state) move twice, and still every command is answered
/// exactly once, as the model says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_lose_and_duplicate_nothing() {
    rebalances(&[("session.timeout.ms", "6000")]).await;
}

/// The same with the consumer group protocol of KIP-848 (`group.protocol=consumer`): the broker
/// assigns partitions incrementally, and the session timeout is the broker's
/// (`group.consumer.session.timeout.ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_lose_and_duplicate_nothing_with_the_consumer_group_protocol() {
    rebalances(&[("group.protocol", "consumer")]).await;
}

async fn rebalances(consumer: &[(&str, &str)]) {
    let s = setup(4).await;
    let cmds = workload(1500, 40, 11);
    let (replies, accounts) = expected(&cmds);
    let start = |name: &str| {
        let mut flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
            .journal_topic(&s.journal)
            .transactional_id(unique(name))
            .commit_interval(Duration::from_millis(50));
        for (k, v) in consumer {
            flow = flow.consumer_property(k, v);
        }
        flow.run().unwrap()
    };
    let first = start("first");
    let feeder = feed_slowly(&s, &cmds[..1000]);
    // Twice the usual deadline: joining a group (with KIP-848, a few heartbeats) is the slow part
    // of this test on a loaded two-core machine.
    crate::util::wait_until_within("the first instance to process a third", crate::util::DEADLINE * 2, || {
        first.metrics().records_in >= 400
    })
    .await;
    let second = start("second");
    crate::util::wait_until("the second instance to take partitions", || second.metrics().assigned_partitions > 0)
        .await;
    assert!(first.metrics().assigned_partitions < 4, "the partitions are split");
    crate::util::wait_until("both to process more", || second.metrics().records_in >= 100).await;
    first.abort().await.unwrap();
    feeder.join().unwrap();
    feed_slowly(&s, &cmds[1000..]).join().unwrap();
    await_replies(&s, replies).await;
    let m = second.metrics();
    assert_eq!(m.assigned_partitions, 4, "the survivor owns everything");
    assert!(m.restored_records > 0, "it restored the partitions it took over from the journal");
    second.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 4)).await.unwrap(), accounts);
}

/// A task restores on a thread of its own (Kafka Streams' state updater): while an instance reads
/// the journal of a partition it takes over, its other partition goes on being processed. The
/// restore is held on purpose: a transaction left open on the journal partition keeps it reading
/// (a restore waits for open transactions to end, then reads up to the last stable offset), so
/// the other partition's replies come while it is still under way. Then the partition it took
/// over answers from the state its restore read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_being_restored_does_not_stop_the_others() {
    use eventstage::flow::RebalanceEvent;
    use eventstage::journal::{Envelope, JournalEntry, SeqNo};
    use eventstage::stages::bank::Bank;
    use eventstage::EventSourced;
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    use std::sync::{Arc, Mutex};
    let s = setup(2).await;
    let owned: Arc<Mutex<Vec<i32>>> = Arc::default();
    let start = |name: &str, owned: Option<Arc<Mutex<Vec<i32>>>>| {
        let mut flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
            .journal_topic(&s.journal)
            .transactional_id(unique(name))
            .commit_interval(Duration::from_millis(50))
            .consumer_property("group.protocol", "consumer");
        if let Some(owned) = owned {
            flow = flow.on_rebalance(move |event, _| {
                if let RebalanceEvent::Assigned(tps) = event {
                    owned.lock().unwrap().extend(tps.iter().map(|tp| tp.partition));
                }
            });
        }
        flow.run().unwrap()
    };
    let a = start("a", None);
    crate::util::wait_until_within("the first instance to own both partitions", crate::util::DEADLINE * 2, || {
        let m = a.metrics();
        m.assigned_partitions == 2 && m.restoring_partitions == 0
    })
    .await;
    let b = start("b", Some(owned.clone()));
    crate::util::wait_until_within("the second instance to own a partition", crate::util::DEADLINE * 2, || {
        owned.lock().unwrap().len() == 1 && a.metrics().assigned_partitions == 1
    })
    .await;
    let moved = owned.lock().unwrap()[0];
    let other = 1 - moved;

    // The moved partition's journal: an account with 77 in it, committed; then a transaction
    // left open.
    let codec = Codec::default();
    let account = Account { open: true, balance: 77 };
    let snapshot = Envelope::snapshot(codec.id(), Bank::STATE_VERSION, 0, codec.encode(&account).unwrap());
    let entry = JournalEntry { last_seq: SeqNo(2), events: Vec::new(), state: Some(snapshot), sources: Vec::new() };
    let transactional = |id: &str| {
        let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &s.brokers)
            .set("transactional.id", unique(id))
            .create()
            .unwrap();
        p.init_transactions(Duration::from_secs(30)).unwrap();
        p.begin_transaction().unwrap();
        p
    };
    let value = entry.encode();
    let history = transactional("history");
    history.send(BaseRecord::to(&s.journal).partition(moved).key("rich").payload(&value)).map_err(|(e, _)| e).unwrap();
    history.commit_transaction(Duration::from_secs(30)).unwrap();
    let open = transactional("open");
    open.send(BaseRecord::to(&s.journal).partition(moved).key("pending").payload(&value)).map_err(|(e, _)| e).unwrap();
    open.flush(Duration::from_secs(30)).unwrap();

    // The second instance leaves: the first takes the partition over and restores it.
    b.drain_and_shutdown().await.unwrap();
    crate::util::wait_until("the first instance to restore the partition it takes over", || {
        a.metrics().restoring_partitions == 1
    })
    .await;
    let input = |p: i32, key: &str, id: &str, cmd: BankCommand| {
        let producer = producer(&s.brokers);
        producer.send(BaseRecord::to(&s.topics.input).partition(p).key(key).payload(&wire(id, cmd))).unwrap();
        flush(&producer);
    };
    let reply = |id: &str, balance: u64| {
        (id.to_string(), WireReply { id: id.into(), ok: true, balance: Some(balance), error: None })
    };
    let before = a.metrics();
    input(other, "fresh", "c1", BankCommand::Open);
    input(other, "fresh", "c2", BankCommand::Deposit(5));
    crate::util::wait_until("the other partition's commands to be processed and committed", || {
        let m = a.metrics();
        m.records_in >= before.records_in + 2 && m.transactions > before.transactions
    })
    .await;
    assert_eq!(
        a.metrics().restoring_partitions,
        1,
        "the other partition was processed while the restore was under way"
    );

    // Once restored, the moved partition answers from the committed journal (not the open
    // transaction's record).
    input(moved, "rich", "c3", BankCommand::Withdraw(7));
    let replies: HashMap<String, WireReply> = [reply("c1", 0), reply("c2", 5), reply("c3", 70)].into();
    await_replies(&s, replies).await;
    open.abort_transaction(Duration::from_secs(30)).unwrap();
    a.drain_and_shutdown().await.unwrap();
}

/// The window the outbox exists for, hit on purpose: the process dies right after a sled write and
/// before the Kafka commit. The restarted flow does not apply those inputs again and produces their
/// outputs from the outbox: still exactly one reply per command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_sled_write_and_the_kafka_commit_is_repaired_from_the_outbox() {
    use std::process::Stdio;
    let s = setup(2).await;
    let dir = tempfile::tempdir().unwrap();
    let journal = format!("sled:{}", dir.path().join("j").display());
    let cmds = workload(400, 10, 31);
    let (replies, accounts) = expected(&cmds);
    feed_async(&s, &cmds).await;
    let run = |crash: Option<&str>| {
        let mut cmd = crate::util::eventstage();
        cmd.args(["demo", "--brokers", &s.brokers, "--input", &s.topics.input, "--replies", &s.topics.replies])
            .args(["--events", &s.topics.events, "--group", &s.group, "--transactional-id", "outbox-test"])
            .args(["--journal", &journal, "--commit-interval", "20ms", "--partitions", "2"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(n) = crash {
            cmd.env("EVENTSTAGE_CRASH_AFTER_SLED_WRITES", n);
        }
        cmd.spawn().unwrap()
    };
    let crashed = run(Some("1")).wait_with_output().unwrap();
    assert!(!crashed.status.success(), "the fault injection aborts the process");
    assert!(String::from_utf8_lossy(&crashed.stderr).contains("aborting after sled write 1"));
    let survivor = run(None);
    await_replies(&s, replies).await;
    std::process::Command::new("kill").args(["-TERM", &survivor.id().to_string()]).status().unwrap();
    let out = survivor.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("producing their outputs again from the outbox"), "the outbox path ran: {log}");
    assert_eq!(sled_state(&dir.path().join("j"), 2).await, accounts);
}

/// Feeds an `open` of acct-1, then `second` for it, and returns the error that stops `flow`.
async fn stops_at_second_command(s: &Setup, flow: eventstage::flow::FlowControl, second: Vec<u8>) -> FlowError {
    let (b, input) = (s.brokers.clone(), s.topics.input.clone());
    tokio::task::spawn_blocking(move || {
        let p = producer(&b);
        send(&p, &input, "acct-1", &wire("c1", BankCommand::Open));
        send(&p, &input, "acct-1", &second);
        flush(&p);
    })
    .await
    .unwrap();
    tokio::time::timeout(crate::util::DEADLINE, flow.wait()).await.expect("the flow stops").unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_can_stop_the_flow_instead() {
    let s = setup(1).await;
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .bad_input(eventstage::flow::BadInput::Stop)
        .run()
        .unwrap();
    let err = stops_at_second_command(&s, flow, b"garbage".to_vec()).await;
    let msg = err.to_string();
    assert!(msg.contains(&format!("{}[0]@1", s.topics.input)) && msg.contains("not a bank command"), "{msg}");
}

/// A panic in the output mapping (which runs on the flow's emitter thread) stops the flow with an
/// error that carries the panic's message, instead of hanging the flow thread's next commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_output_mapping_stops_the_flow_with_its_message() {
    let s = setup(1).await;
    let topics = s.topics.clone();
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .outputs(move |p| {
            if p.input.value.as_deref().is_some_and(|v| v.windows(4).any(|w| w == b"boom")) {
                panic!("no outputs for boom");
            }
            eventstage::stages::bank_flow::outputs(&topics, p)
        })
        .journal_topic(&s.journal)
        .run()
        .unwrap();
    let err = stops_at_second_command(&s, flow, wire("boom", BankCommand::Deposit(5))).await;
    assert!(matches!(err, FlowError::Crashed(_)), "{err:?}");
    assert!(err.to_string().contains("output mapping panicked: no outputs for boom"), "{err}");
}

/// The broker goes away mid-run and comes back: the flow retries, and every command is still
/// answered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_run_loses_and_duplicates_nothing() {
    use crate::util::broker::{own_cluster, wait_ready, Settings};
    let mut cluster = own_cluster(Settings::single());
    let addr = cluster.bootstrap();
    let s = setup_on(addr.clone(), 2).await;
    let cmds = workload(300, 10, 41);
    let (first, second) = cmds.split_at(150);
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone()).journal_topic(&s.journal).run().unwrap();
    feed_async(&s, first).await;
    let (first_replies, _) = expected(first);
    await_replies(&s, first_replies).await;
    cluster.stop_node(0);
    std::thread::sleep(Duration::from_secs(2));
    cluster.restart_node(0).unwrap();
    wait_ready(&addr);
    feed_async(&s, second).await;
    let (replies, accounts) = expected(&cmds);
    await_replies(&s, replies).await;
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// `describe --group` shows the group's committed offsets, lag and journal; `reset --dry-run`
/// changes nothing; `reset` refuses while an instance runs, and after it a rerun of the group
/// starts from scratch: every command is processed again on empty state (balances are not
/// doubled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_makes_a_rerun_start_from_scratch_and_describe_shows_the_group() {
    use crate::util::run_cli;
    let s = setup(2).await;
    let cmds = workload(200, 10, 23);
    let (replies, accounts) = expected(&cmds);
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone()).journal_topic(&s.journal).run().unwrap();
    feed_async(&s, &cmds).await;
    await_replies(&s, replies.clone()).await;
    let app = ["--brokers", &s.brokers, "--group", &s.group, "--input", &s.topics.input, "--journal", &s.journal];
    let cli = |cmd: &str, extra: &[&str]| run_cli(&[&[cmd][..], &app[..], extra].concat());
    let (code, _, err) = tokio::task::block_in_place(|| cli("reset", &[]));
    assert!(code == 2 && err.contains("running members"), "a reset under a running flow is refused: {err}");
    flow.drain_and_shutdown().await.unwrap();

    let (code, before, err) = tokio::task::block_in_place(|| cli("describe", &[]));
    assert_eq!(code, 0, "{err}");
    assert!(before.contains("lag in total: 0") && before.contains(&format!("owned by group {}", s.group)), "{before}");
    let (code, out, err) = tokio::task::block_in_place(|| cli("reset", &["--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("would delete the committed offsets") && out.contains("nothing changed"), "{out}");
    assert_eq!(tokio::task::block_in_place(|| cli("describe", &[])).1, before, "a dry run changes nothing");
    let (code, out, err) = tokio::task::block_in_place(|| cli("reset", &[]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted the committed offsets") && out.contains("deleted journal"), "{out}");
    let (_, after, _) = tokio::task::block_in_place(|| cli("describe", &[]));
    assert!(after.contains("lag in total: 200"), "{after}");

    // The rerun reads every command again and applies it to empty state.
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone()).journal_topic(&s.journal).run().unwrap();
    crate::util::wait_until("the rerun to process every command", || flow.metrics().records_in >= 200).await;
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}
