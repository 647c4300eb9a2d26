//! Flows with a local state store over the Kafka journal (`FlowBuilder::state_dir`): a restart
//! and a partition that comes back read only the journal's records after the local checkpoint; a
//! store that cannot be trusted is dropped and the state restored from the journal in full.

use crate::flow::{await_replies, expected, feed_async, feed_slowly, journal_state, setup, workload, Setup};
use crate::util::broker::unique;
use eventstage::flow::{FlowControl, FlowError, Guarantee};
use eventstage::journal::KafkaJournal;
use eventstage::stages::bank_flow::bank_flow;
use std::path::Path;
use std::time::Duration;

fn start(s: &Setup, dir: &Path) -> FlowControl {
    bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .state_dir(dir)
        .checkpoint_interval(Duration::from_millis(200))
        .transactional_id(unique("txn"))
        .commit_interval(Duration::from_millis(50))
        .run()
        .unwrap()
}

/// Records in the journal topic now (every partition), as a restore from its start reads them.
pub(crate) async fn journal_records(s: &Setup, partitions: i32) -> u64 {
    let (brokers, topic) = (s.brokers.clone(), s.journal.clone());
    tokio::task::spawn_blocking(move || {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &brokers);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let journal = rt.block_on(KafkaJournal::ensure(config, &topic, partitions)).unwrap();
        let all: Vec<i32> = (0..partitions).collect();
        journal.restore_partitions(&all, Duration::from_secs(30), |_, _, _| {}).unwrap().records
    })
    .await
    .unwrap()
}

/// A restart after a clean shutdown loads the local store and reads nothing from the journal; a
/// flow without the store reads every journal record again, and so does one whose retention
/// dropped the rows of the partitions it had released. The state continues exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_only_the_journal_after_the_local_checkpoint() {
    let s = setup(2).await;
    let dir = tempfile::tempdir().unwrap();
    let cmds = workload(900, 50, 31);
    let flow = start(&s, dir.path());
    feed_async(&s, &cmds[..500]).await;
    await_replies(&s, expected(&cmds[..500]).0).await;
    let m = flow.metrics();
    // Exactly once, the flow hands the store what it commits: nothing is read back.
    assert!(m.store_handed_rows > 0, "{m:?}");
    assert_eq!(m.store_read_records, 0, "the store read back what the flow wrote: {m:?}");
    flow.drain_and_shutdown().await.unwrap();

    let flow = start(&s, dir.path());
    feed_async(&s, &cmds[500..700]).await;
    await_replies(&s, expected(&cmds[..700]).0).await;
    let m = flow.metrics();
    assert!(m.store_rows > 0, "the state came from the local store: {m:?}");
    assert_eq!(m.restored_records, 0, "a clean shutdown leaves the checkpoint at the journal's end: {m:?}");
    assert_eq!((m.store_dropped, m.store_read_records), (0, 0), "{m:?}");
    flow.drain_and_shutdown().await.unwrap();

    // Without the store, the whole journal is read again.
    let total = journal_records(&s, 2).await;
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone()).journal_topic(&s.journal).run().unwrap();
    feed_async(&s, &cmds[700..800]).await;
    await_replies(&s, expected(&cmds[..800]).0).await;
    assert_eq!(flow.metrics().restored_records, total);
    flow.drain_and_shutdown().await.unwrap();

    // A clean shutdown released every partition; a retention of zero drops their rows at the
    // next start, which reads the whole journal again.
    let total = journal_records(&s, 2).await;
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .state_dir(dir.path())
        .state_retention(Duration::ZERO)
        .run()
        .unwrap();
    feed_async(&s, &cmds[800..]).await;
    let (replies, accounts) = expected(&cmds);
    await_replies(&s, replies).await;
    let m = flow.metrics();
    assert_eq!((m.restored_records, m.store_rows), (total, 0), "{m:?}");
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// A partition moves A → B → A: when it comes back, A reads only journal records written after
/// it gave the partition away (what B wrote, and A's last records before the move), not the
/// partition's history; the state continues exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_comes_back_reads_only_what_the_other_instance_wrote() {
    let s = setup(2).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cmds = workload(1500, 60, 32);
    let a = start(&s, dir_a.path());
    feed_async(&s, &cmds[..600]).await;
    await_replies(&s, expected(&cmds[..600]).0).await;
    let before_b = journal_records(&s, 2).await;

    let b = start(&s, dir_b.path());
    crate::util::wait_until("B to take a partition", || b.metrics().assigned_partitions == 1).await;
    crate::util::wait_until("A to keep one", || a.metrics().assigned_partitions == 1).await;
    feed_async(&s, &cmds[600..1000]).await;
    await_replies(&s, expected(&cmds[..1000]).0).await;
    assert!(b.metrics().records_in > 0, "B processed its partition");
    let read_before = a.metrics().restored_records;
    b.drain_and_shutdown().await.unwrap();
    let after_b = journal_records(&s, 2).await;

    crate::util::wait_until("A to own both partitions again", || a.metrics().assigned_partitions == 2).await;
    feed_async(&s, &cmds[1000..]).await;
    let (replies, accounts) = expected(&cmds);
    await_replies(&s, replies).await;
    let m = a.metrics();
    let read_back = m.restored_records - read_before;
    assert!(read_back > 0, "A read B's records: {m:?}");
    assert!(
        read_back <= after_b - before_b,
        "A read {read_back} journal records when the partition came back; only {} were written after A gave it away (of {after_b}): {m:?}",
        after_b - before_b
    );
    a.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// Edits the fjall database of a state directory (the flow must not be running).
fn edit_store(dir: &Path, edit: impl FnOnce(&fjall::Database)) {
    let db = fjall::Database::builder(dir.join("fjall")).open().unwrap();
    edit(&db);
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

/// Overwrites the row of an account of `next` (the commands to come) with bytes that do not
/// decode (rows are read when a key is first used).
fn damage_a_row(dir: &Path, next: &[(String, String, eventstage::stages::bank::BankCommand)]) {
    edit_store(dir, |db| {
        let trees = ["p0", "p1"].map(|p| db.keyspace(p, fjall::KeyspaceCreateOptions::default).unwrap());
        let (rows, account) = next
            .iter()
            .find_map(|(account, _, _)| trees.iter().find(|t| t.contains_key(account).unwrap()).map(|t| (t, account)))
            .expect("an account of the next commands has a row");
        rows.insert(account.as_bytes(), b"not a journal entry".to_vec()).unwrap();
    });
}

/// A row that does not decode, a checkpoint ahead of the journal (its topic deleted and created
/// again), and a store of another flow's journal: each is dropped with a warning and the state
/// restored from the journal in full, and the flow answers exactly as the model says. A store
/// another instance has open is refused with an error saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_local_store_is_dropped_and_restored_from_the_journal() {
    let s = setup(2).await;
    let dir = tempfile::tempdir().unwrap();
    let cmds = workload(800, 40, 33);
    let flow = start(&s, dir.path());
    feed_async(&s, &cmds[..400]).await;
    await_replies(&s, expected(&cmds[..400]).0).await;

    let other = start(&s, dir.path());
    match tokio::time::timeout(crate::util::DEADLINE, other.wait()).await.expect("the second flow stops") {
        Err(FlowError::Config(msg)) => assert!(msg.contains("another process"), "{msg}"),
        other => panic!("a state directory in use is refused: {other:?}"),
    }
    flow.drain_and_shutdown().await.unwrap();

    // A damaged row, of an account the next commands use (rows are read when first used).
    damage_a_row(dir.path(), &cmds[400..550]);
    let flow = start(&s, dir.path());
    feed_async(&s, &cmds[400..550]).await;
    await_replies(&s, expected(&cmds[..550]).0).await;
    let m = flow.metrics();
    assert_eq!(m.store_dropped, 1, "{m:?}");
    assert!(m.restored_records > 0, "the account's partition was read from the journal: {m:?}");
    flow.drain_and_shutdown().await.unwrap();

    // A checkpoint ahead of the journal's end.
    edit_store(dir.path(), |db| {
        let offsets = db.keyspace("offsets", fjall::KeyspaceCreateOptions::default).unwrap();
        let mut ahead = (1i64 << 40).to_be_bytes().to_vec();
        ahead.extend_from_slice(&0u64.to_be_bytes());
        offsets.insert(1i32.to_be_bytes(), ahead).unwrap();
    });
    let flow = start(&s, dir.path());
    feed_async(&s, &cmds[550..700]).await;
    let (replies, accounts) = expected(&cmds[..700]);
    await_replies(&s, replies).await;
    let m = flow.metrics();
    assert_eq!(m.store_dropped, 1, "{m:?}");
    assert!(m.restored_records > 0, "partition 1 was read from the journal: {m:?}");
    flow.drain_and_shutdown().await.unwrap();
    let s1 = s.clone();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s1, 2)).await.unwrap(), accounts);

    // A store of the format before (sled) is dropped, its directory too, and rebuilt in fjall.
    let old = tempfile::tempdir().unwrap();
    let marker = serde_json::json!({ "format": 1, "journal": s.journal, "stage": "bank" });
    std::fs::write(old.path().join("eventstage-state.json"), marker.to_string()).unwrap();
    std::fs::create_dir(old.path().join("sled")).unwrap();
    std::fs::write(old.path().join("sled").join("db"), b"sled's files").unwrap();
    let flow = start(&s, old.path());
    feed_async(&s, &cmds[700..750]).await;
    await_replies(&s, expected(&cmds[..750]).0).await;
    let m = flow.metrics();
    assert_eq!(m.store_dropped, 1, "{m:?}");
    flow.drain_and_shutdown().await.unwrap();
    assert!(!old.path().join("sled").exists() && old.path().join("fjall").exists());

    // The store of another flow's journal, used by a flow of new topics and journal.
    let t = setup(2).await;
    let flow = start(&t, dir.path());
    feed_async(&t, &cmds[750..]).await;
    let (replies, accounts) = expected(&cmds[750..]);
    await_replies(&t, replies).await;
    let m = flow.metrics();
    assert_eq!((m.store_dropped, m.store_rows), (1, 0), "{m:?}");
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&t, 2)).await.unwrap(), accounts);
}

/// Room for about 20 accounts in the state cache (an entry of the bank weighs about 150 bytes).
const SMALL_CACHE: u64 = 3000;

fn start_cached(s: &Setup, dir: &Path, guarantee: Guarantee) -> FlowControl {
    bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .state_dir(dir)
        .state_cache(SMALL_CACHE)
        .guarantee(guarantee)
        // The store's follower writes a second behind the flow: a key evicted before the store has
        // its newest state would come back older than it is.
        .checkpoint_interval(Duration::from_secs(1))
        .transactional_id(unique("txn"))
        .commit_interval(Duration::from_millis(50))
        .run()
        .unwrap()
}

/// Issue 24: a state cache with room for about 20 of 300 accounts evicts keys on every commit and
/// reads them back from the local store, and every reply is as the model says: across an abort
/// (the dropped transaction changed keys that were evicted before it, and their committed state
/// must come back, not its changes) and a restart. The cache never holds more than its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_cache_smaller_than_the_state_evicts_keys_and_reads_them_back_right() {
    let s = setup(2).await;
    let dir = tempfile::tempdir().unwrap();
    let cmds = workload(2400, 300, 34);
    let flow = start_cached(&s, dir.path(), Guarantee::ExactlyOnce);
    // Slowly: many commits, each evicting.
    feed_slowly(&s, &cmds[..1000]).join().unwrap();
    await_replies(&s, expected(&cmds[..1000]).0).await;
    let m = flow.metrics();
    assert!(m.cache_evictions > 100 && m.cache_misses > 100, "keys were evicted and read back: {m:?}");
    assert!(m.cache_bytes <= SMALL_CACHE, "the cache holds at most its budget: {m:?}");

    // The open transaction is aborted while commands flow: the inputs it held come again.
    let feeder = feed_slowly(&s, &cmds[1000..1600]);
    crate::util::wait_until("the flow to process part of the next commands", || flow.metrics().records_in >= 1250)
        .await;
    flow.abort().await.unwrap();
    feeder.join().unwrap();

    let flow = start_cached(&s, dir.path(), Guarantee::ExactlyOnce);
    feed_async(&s, &cmds[1600..2000]).await;
    await_replies(&s, expected(&cmds[..2000]).0).await;
    let m = flow.metrics();
    assert!(m.cache_evictions > 0 && m.cache_misses > 0, "{m:?}");
    assert!(m.cache_bytes <= SMALL_CACHE, "{m:?}");
    flow.drain_and_shutdown().await.unwrap();

    // A row that does not decode: its partition is restored from the journal in full, and every
    // key of it stays in memory until the follower has written its rows again.
    damage_a_row(dir.path(), &cmds[2000..]);
    let flow = start_cached(&s, dir.path(), Guarantee::ExactlyOnce);
    feed_slowly(&s, &cmds[2000..]).join().unwrap();
    let (replies, accounts) = expected(&cmds);
    await_replies(&s, replies).await;
    let m = flow.metrics();
    assert_eq!(m.store_dropped, 1, "{m:?}");
    assert!(m.cache_bytes <= SMALL_CACHE, "{m:?}");
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// Issue 24: with a state cache, a new instance with an empty local store (a first start, a
/// takeover without standbys) does not read the journal into memory: its tail is larger than the
/// cache, so the store's follower writes it first and the keys are read from the store when
/// used. Every reply afterwards is as the model says, and the journal records read into memory
/// are only what the follower had not written when it reached the end (none here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_journal_tail_is_restored_through_the_store_not_into_memory() {
    let s = setup(2).await;
    let cmds = workload(1600, 300, 35);
    let first = tempfile::tempdir().unwrap();
    let flow = start_cached(&s, first.path(), Guarantee::ExactlyOnce);
    feed_async(&s, &cmds[..1000]).await;
    await_replies(&s, expected(&cmds[..1000]).0).await;
    flow.drain_and_shutdown().await.unwrap();

    let empty = tempfile::tempdir().unwrap();
    let flow = start_cached(&s, empty.path(), Guarantee::ExactlyOnce);
    feed_slowly(&s, &cmds[1000..]).join().unwrap();
    let (replies, accounts) = expected(&cmds);
    await_replies(&s, replies).await;
    let m = flow.metrics();
    assert_eq!(m.restored_records, 0, "the journal tail went through the store, not into memory: {m:?}");
    assert!(m.cache_misses > 100 && m.cache_bytes <= SMALL_CACHE, "keys were read from the store: {m:?}");
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// At least once, a batch's keys stay in memory until its journal records are acknowledged and in
/// the local store; evicted keys come back with the input positions their state includes. Every
/// reply is as the model says, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_at_least_once_flow_with_a_small_state_cache_answers_right() {
    let s = setup(2).await;
    let dir = tempfile::tempdir().unwrap();
    let cmds = workload(1200, 300, 35);
    let flow = start_cached(&s, dir.path(), Guarantee::AtLeastOnce);
    feed_slowly(&s, &cmds[..800]).join().unwrap();
    await_replies(&s, expected(&cmds[..800]).0).await;
    let m = flow.metrics();
    assert!(m.cache_evictions > 100 && m.cache_misses > 100, "keys were evicted and read back: {m:?}");
    flow.drain_and_shutdown().await.unwrap();

    let flow = start_cached(&s, dir.path(), Guarantee::AtLeastOnce);
    feed_async(&s, &cmds[800..]).await;
    let (replies, accounts) = expected(&cmds);
    await_replies(&s, replies).await;
    assert_eq!(flow.metrics().skipped_redeliveries, 0);
    flow.drain_and_shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// A state cache is refused, with the fix, where it could not be kept: without a local store (an
/// evicted key could only be read back by reading its whole journal partition), on a journal that
/// is not Kafka's, and with a budget of 0.
#[test]
fn a_state_cache_it_cannot_keep_is_refused() {
    use eventstage::stages::bank_flow::BankTopics;
    let topics = BankTopics { input: "in".into(), replies: "out".into(), events: "events".into() };
    let refused = |flow: eventstage::flow::FlowBuilder<eventstage::stages::bank::Bank>| match flow.run() {
        Err(FlowError::Config(msg)) => msg,
        Err(e) => panic!("not a configuration error: {e}"),
        Ok(_) => panic!("started"),
    };
    let dir = tempfile::tempdir().unwrap();
    let flow = || bank_flow("127.0.0.1:1", "g", topics.clone());
    let msg = refused(flow().state_cache(1 << 20));
    assert!(msg.contains("state directory") && msg.contains("--state-dir"), "{msg}");
    let msg = refused(flow().sled_journal(dir.path()).state_cache(1 << 20));
    assert!(msg.contains("no Kafka journal"), "{msg}");
    let msg = refused(flow().state_dir(dir.path()).state_cache(0));
    assert!(msg.contains("0 bytes"), "{msg}");
}

/// At least once, a deletion's journal record keeps the input positions it includes, and a restore
/// keeps them too: after a crash that lost the committed offset of the deleting input, that input,
/// delivered again, is skipped rather than handled again on a deleted key (it answered "account is
/// not open" before, found by `at_least_once_crash_loop_with_the_kafka_journal`). Restored from the
/// journal alone, and with a local store, whose row of the key is the deletion's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_at_least_once_deletion_delivered_again_is_skipped() {
    use eventstage::stages::bank::BankCommand;
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    for with_store in [false, true] {
        let s = setup(1).await;
        let dir = tempfile::tempdir().unwrap();
        let start = || {
            let flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
                .journal_topic(&s.journal)
                .guarantee(Guarantee::AtLeastOnce)
                .commit_interval(Duration::from_millis(50));
            let flow = if with_store { flow.state_dir(dir.path()) } else { flow };
            flow.run().unwrap()
        };
        let cmd = |key: &str, id: &str, c: BankCommand| (key.to_string(), id.to_string(), c);
        let mut cmds = vec![cmd("acct-1", "open", BankCommand::Open), cmd("acct-1", "close", BankCommand::Close)];
        let flow = start();
        feed_async(&s, &cmds).await;
        await_replies(&s, expected(&cmds).0).await;
        flow.drain_and_shutdown().await.unwrap();

        // The group's offset back to the close (input offset 1), as if the flow had crashed after
        // journaling it and before committing its offset.
        let group: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &s.brokers).set("group.id", &s.group).create().unwrap();
        let mut back = TopicPartitionList::new();
        back.add_partition_offset(&s.topics.input, 0, Offset::Offset(1)).unwrap();
        group.commit(&back, CommitMode::Sync).unwrap();
        drop(group);

        let flow = start();
        // Answered after the close (one partition): once it is, the close was seen again.
        cmds.push(cmd("acct-2", "after", BankCommand::Open));
        feed_async(&s, &cmds[2..]).await;
        let replies = expected(&cmds).0;
        let s2 = s.clone();
        tokio::task::spawn_blocking(move || crate::flow::check_replies_at_least_once(&s2, &replies)).await.unwrap();
        assert_eq!(flow.metrics().skipped_redeliveries, 1, "the close was delivered again and skipped");
        flow.drain_and_shutdown().await.unwrap();
    }
}
