//! What a flow's Kafka journal holds: one record per key and transaction (a hot key's events
//! split over records of at most 1000), each key's records in sequence while the flow's two
//! producers take turns, and the newest record per key (what compaction leaves) restores the
//! same state.

use crate::flow::{await_replies, expected, feed_async, feed_slowly, journal_state, setup, workload, Setup};
use crate::util::broker::{create_topic, flush, producer, unique};
use eventstage::journal::KafkaJournal;
use eventstage::stages::bank::BankCommand;
use eventstage::stages::bank_flow::bank_flow;
use std::collections::HashMap;
use std::time::Duration;

/// A journal compacted down to the newest record per key (what log compaction leaves) restores the
/// same state: a flow restarted on a compacted copy continues exactly as the model says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_journal_restores_the_same_state() {
    let s = setup(2).await;
    let cmds = workload(800, 15, 21);
    let (first_half, second_half) = cmds.split_at(400);
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone()).journal_topic(&s.journal).run().unwrap();
    feed_async(&s, first_half).await;
    let (replies, _) = expected(first_half);
    await_replies(&s, replies).await;
    flow.drain_and_shutdown().await.unwrap();

    // The compacted view: the newest record of each key, written to a new compacted topic.
    let compacted = unique("compacted");
    create_topic(&s.brokers, &compacted, 2, &[("cleanup.policy", "compact")]).await;
    let (b, from, to) = (s.brokers.clone(), s.journal.clone(), compacted.clone());
    let copied = tokio::task::spawn_blocking(move || {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &b);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let journal = rt.block_on(KafkaJournal::ensure(config, &from, 2)).unwrap();
        let p = producer(&b);
        let mut n = 0;
        for part in 0..2 {
            for (k, entry) in journal.latest_per_key(part, Duration::from_secs(30)).unwrap() {
                use rdkafka::producer::BaseRecord;
                let v = entry.encode();
                p.send(BaseRecord::to(&to).partition(part).key(&k).payload(&v)).unwrap();
                n += 1;
            }
        }
        flush(&p);
        n
    })
    .await
    .unwrap();
    assert!(copied > 0 && copied <= 15);

    // Same group (its committed offsets continue), journal = the compacted copy.
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone()).journal_topic(&compacted).run().unwrap();
    feed_async(&s, second_half).await;
    let (all_replies, accounts) = expected(&cmds);
    await_replies(&s, all_replies).await;
    assert_eq!(flow.metrics().restored_records, copied as u64);
    flow.drain_and_shutdown().await.unwrap();
    let s3 = Setup { journal: compacted, ..s };
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s3, 2)).await.unwrap(), accounts);
}

/// The records of partition 0 of the setup's (one-partition) Kafka journal, in order: key and
/// entry (None: a tombstone).
async fn journal_records(s: &Setup) -> Vec<(String, Option<eventstage::journal::kafka::JournalEntry>)> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &s.brokers);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let journal = rt.block_on(KafkaJournal::ensure(config, &s.journal, 1)).unwrap();
        let mut records = Vec::new();
        journal
            .restore_partition(0, Duration::from_secs(30), |k, e| {
                records.push((String::from_utf8(k.to_vec()).unwrap(), e))
            })
            .unwrap();
        records
    })
    .await
    .unwrap()
}

/// The Kafka journal writes one record per key and transaction (its events of the transaction and
/// its state after them), and splits a hot key's events over records of at most 1000 events: the
/// records of one key still hold every event once, in sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_records_are_written_per_key_and_transaction() {
    let s = setup(1).await;
    let mut cmds = vec![("hot".to_string(), "c-0".to_string(), BankCommand::Open)];
    cmds.extend((1..2500).map(|i| ("hot".to_string(), format!("c-{i}"), BankCommand::Deposit(1))));
    cmds.extend((0..20).map(|i| (format!("cold-{i}"), format!("o-{i}"), BankCommand::Open)));
    let (replies, accounts) = expected(&cmds);
    // One transaction for everything: the drain commits it.
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .commit_interval(Duration::from_secs(600))
        .run()
        .unwrap();
    feed_async(&s, &cmds).await;
    crate::util::wait_until("every command processed", || flow.metrics().records_in == cmds.len() as u64).await;
    flow.drain_and_shutdown().await.unwrap();
    await_replies(&s, replies).await;

    let records: Vec<_> = journal_records(&s).await.into_iter().map(|(k, e)| (k, e.unwrap())).collect();
    let hot: Vec<_> = records.iter().filter(|(k, _)| k == "hot").map(|(_, e)| e).collect();
    assert_eq!(hot.iter().map(|e| e.last_seq.0).collect::<Vec<_>>(), [1000, 2000, 2500]);
    assert_eq!(hot.iter().map(|e| e.events.len()).collect::<Vec<_>>(), [1000, 1000, 500]);
    assert_eq!(records.len(), 3 + 20, "one record per cold key");
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 1)).await.unwrap(), accounts);
}

/// Exactly once, the flow's two producers take turns: while one commits a transaction, the next
/// transaction's records go to the other once the first one's are acknowledged. With every key in
/// one partition and commits every 5 ms while commands keep coming, a key's records are produced
/// by one producer, then the other, many times over: its replies still come in command order, and
/// its journal records hold its events in sequence, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_records_keep_their_order_while_two_producers_take_turns() {
    let s = setup(1).await;
    let cmds = workload(1500, 4, 61);
    let (replies, accounts) = expected(&cmds);
    let flow = bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .commit_interval(Duration::from_millis(5))
        .run()
        .unwrap();
    feed_slowly(&s, &cmds).join().unwrap();
    let recs = await_replies(&s, replies).await;
    crate::patterns::assert_order(&cmds, &recs);
    let transactions = flow.metrics().transactions;
    assert!(transactions >= 20, "commits followed one another while commands came: {transactions}");
    flow.drain_and_shutdown().await.unwrap();

    let journal = journal_records(&s).await;
    // Per key, in the journal's order: each record's first event follows the previous record's
    // last (a closed account's tombstone starts it again from sequence 1).
    let mut last: HashMap<String, u64> = HashMap::new();
    for (key, entry) in &journal {
        let Some(entry) = entry else {
            last.remove(key);
            continue;
        };
        if entry.events.is_empty() {
            continue;
        }
        let first = entry.last_seq.0 + 1 - entry.events.len() as u64;
        let before = last.insert(key.clone(), entry.last_seq.0).unwrap_or(0);
        assert_eq!(first, before + 1, "{key}'s journal records follow one another in sequence");
    }
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 1)).await.unwrap(), accounts);
}
