//! The Kafka journal's conformance suite, where the journal contract applies to a compacted topic
//! (it keeps each key's newest entry, not every event, so the event-history clauses of
//! `eventstage_journal::testkit::conformance` do not apply):
//! - a restore of the whole journal equals the model's committed state, key by key, with each
//!   key's sequence; aborted transactions are never read, tombstones remove keys;
//! - a restore of the tail after a checkpoint, applied on top of the state at that checkpoint,
//!   equals the whole restore (the contract the local state store relies on);
//! - an empty journal restores nothing; a record that does not decode is an error naming its
//!   partition and offset; a topic of the wrong partition count or cleanup policy is refused.
//!
//! The model and its random batches are the journal crate's testkit's (`model_batches`), written as
//! the flow writes them: one transaction per batch, one record per key changed.

use crate::util::broker::{brokers, create_topic, unique};
use eventstage::journal::testkit::{fold_model, model_batches, Model, ModelBatch};
use eventstage::journal::{CodecId, Envelope, JournalEntry, KafkaJournal, SeqNo};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::time::Duration;

const PARTITIONS: i32 = 2;
const STALL: Duration = Duration::from_secs(30);

fn config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config
}

async fn journal(brokers: &str, topic: &str) -> KafkaJournal {
    KafkaJournal::ensure(config(brokers), topic, PARTITIONS).await.unwrap()
}

fn transactional(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    let producer: ThreadedProducer<DefaultProducerContext> =
        config(brokers).set("transactional.id", unique("journal-conformance")).set("linger.ms", "2").create().unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    producer
}

/// The key of model key `k`, its partition, and the state the model says it has after `history`.
fn key(k: u8) -> (Vec<u8>, i32) {
    (vec![b'k', k], i32::from(k) % PARTITIONS)
}

/// What a restore folds: per key, its sequence and state (the snapshot's payload).
type Folded = BTreeMap<Vec<u8>, (u64, Vec<u8>)>;

fn fold(state: &mut Folded, key: &[u8], entry: Option<JournalEntry>) {
    match entry {
        Some(e) => {
            let payload = e.state.expect("exactly-once entries carry the state").payload;
            state.insert(key.to_vec(), (e.last_seq.0, payload));
        }
        None => {
            state.remove(key);
        }
    }
}

fn restore(journal: &KafkaJournal, from: &[(i32, i64)], mut state: Folded) -> (Folded, u64) {
    let stats = journal.restore_partitions_from(from, STALL, |_, _, key, entry| fold(&mut state, key, entry)).unwrap();
    (state, stats.records)
}

fn expected(model: &Model) -> Folded {
    fold_model(model).into_iter().map(|(k, state)| (k.clone(), (model[&k].len() as u64, state))).collect()
}

/// Writes batch `mb` as one transaction of one record per key changed (its new events and its
/// state, the concatenation of its payloads), committed or aborted. Every fifth committed batch
/// also deletes its first key (a tombstone). Returns the model after it.
fn write_batch(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    mb: &ModelBatch,
    commit: bool,
    model: &Model,
) -> Model {
    let mut next = model.clone();
    let mut events: BTreeMap<u8, Vec<Envelope>> = BTreeMap::new();
    for &(k, n) in &mb.writes {
        let history = next.entry(key(k).0).or_default();
        for _ in 0..n {
            let seq = history.len() as u64 + 1;
            let payload = format!("{k}:{seq}").into_bytes();
            history.push(payload.clone());
            events.entry(k).or_default().push(Envelope::event(CodecId::RAW, 1, seq, payload));
        }
    }
    if events.is_empty() {
        // Nothing to write: no transaction (aborting an empty one is refused by some brokers).
        return model.clone();
    }
    producer.begin_transaction().unwrap();
    for (k, envelopes) in events {
        let (raw, p) = key(k);
        let history = &next[&raw];
        let state = Envelope::snapshot(CodecId::RAW, 1, 0, history.concat());
        let entry = JournalEntry {
            last_seq: SeqNo(history.len() as u64),
            events: envelopes,
            state: Some(state),
            sources: Vec::new(),
        };
        let value = entry.encode();
        producer.send(BaseRecord::to(topic).partition(p).key(&raw).payload(&value)).map_err(|(e, _)| e).unwrap();
    }
    let delete = mb.writes.first().map(|&(k, _)| k).filter(|_| mb.offset % 5 == 0);
    if let Some(k) = delete {
        let (raw, p) = key(k);
        producer.send(BaseRecord::<[u8], [u8]>::to(topic).partition(p).key(&raw)).map_err(|(e, _)| e).unwrap();
        next.remove(&raw);
    }
    // Every record delivered before the transaction ends (an abort then ends what the broker has).
    producer.flush(Duration::from_secs(30)).unwrap();
    if commit {
        producer.commit_transaction(Duration::from_secs(30)).unwrap();
        next
    } else {
        producer.abort_transaction(Duration::from_secs(30)).unwrap();
        model.clone()
    }
}

/// Random batches (the testkit's model), every fourth aborted: the whole restore equals the
/// model, and the tail after a checkpoint taken halfway, on top of the state then, equals it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_equals_the_committed_model_and_a_tail_completes_a_checkpoint() {
    let brokers = brokers();
    let mut runner = TestRunner::deterministic();
    let strategy = model_batches(6, 24);
    for case in 0..3 {
        let batches = strategy.new_tree(&mut runner).unwrap().current();
        let topic = unique("journal-conformance");
        let journal = journal(&brokers, &topic).await;
        let (b, t) = (brokers.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            let producer = transactional(&b);
            let mut model = Model::new();
            let half = batches.len() / 2;
            let mut checkpoint = None;
            for (i, mb) in batches.iter().enumerate() {
                if i == half {
                    let marks = journal.watermarks(&[0, 1]).unwrap();
                    let at: Vec<(i32, i64)> = marks.iter().map(|(p, (_, high))| (*p, *high)).collect();
                    let (state, _) = restore(&journal, &[(0, 0), (1, 0)], Folded::new());
                    assert_eq!(state, expected(&model), "case {case}: the state at the checkpoint");
                    checkpoint = Some((at, state));
                }
                model = write_batch(&producer, &t, mb, i % 4 != 3, &model);
            }
            let (whole, records) = restore(&journal, &[(0, 0), (1, 0)], Folded::new());
            assert_eq!(whole, expected(&model), "case {case}: {} batches", batches.len());
            let Some((at, state)) = checkpoint else { return };
            let (tail, tail_records) = restore(&journal, &at, state);
            assert_eq!(tail, whole, "case {case}: checkpoint + tail = whole");
            assert!(tail_records <= records, "case {case}: the tail reads no more than the whole");
            let latest = journal.latest_per_key_of(&[0, 1], STALL).unwrap();
            let flat: Folded = latest
                .into_values()
                .flatten()
                .map(|(k, e)| (k, (e.last_seq.0, e.state.map(|s| s.payload).unwrap_or_default())))
                .collect();
            assert_eq!(flat, whole, "case {case}: latest_per_key is the same state");
        })
        .await
        .unwrap();
    }
}

/// An empty journal restores nothing; an undecodable record is an error naming where it is; a
/// topic that cannot be a journal is refused with what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_journals_are_refused_with_what_is_wrong() {
    let brokers = brokers();
    let topic = unique("journal-conformance");
    let journal = journal(&brokers, &topic).await;
    let j = journal.clone();
    let (empty, _) = tokio::task::spawn_blocking(move || restore(&j, &[(0, 0), (1, 0)], Folded::new())).await.unwrap();
    assert!(empty.is_empty());

    let (b, t) = (brokers.clone(), topic.clone());
    let err = tokio::task::spawn_blocking(move || {
        let producer = transactional(&b);
        producer.begin_transaction().unwrap();
        producer.send(BaseRecord::to(&t).partition(1).key("k").payload("not an entry")).map_err(|(e, _)| e).unwrap();
        producer.commit_transaction(Duration::from_secs(30)).unwrap();
        journal.restore_partitions(&[0, 1], STALL, |_, _, _| {}).unwrap_err().to_string()
    })
    .await
    .unwrap();
    assert!(err.contains(&topic) && err.contains("partition 1") && err.contains("offset 0"), "{err}");

    let wrong_count = KafkaJournal::ensure(config(&brokers), &topic, 3).await.unwrap_err().to_string();
    assert!(wrong_count.contains("2 partitions") && wrong_count.contains("3"), "{wrong_count}");
    let deleting = unique("journal-conformance");
    create_topic(&brokers, &deleting, PARTITIONS, &[("cleanup.policy", "delete")]).await;
    let policy = KafkaJournal::ensure(config(&brokers), &deleting, PARTITIONS).await.unwrap_err().to_string();
    assert!(policy.contains("cleanup.policy=compact"), "{policy}");
}
