//! Tables that read some partitions of a topic: `Partitions::Assigned` (assign, revoke, and a
//! partition coming back), and a table co-partitioned with a flow, following its partitions.

use crate::table::{compacted_topic, contents, Model};
use crate::util::broker::{flush, producer, send, unique};
use eventstage::table::{Decoder, Partitions, Table, TableError};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Writes `value` (or a tombstone) for `key` to an explicit partition.
fn send_to(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, partition: i32, key: &str, value: Option<&str>) {
    loop {
        let mut record = BaseRecord::<str, [u8]>::to(topic).partition(partition).key(key);
        if let Some(v) = value {
            record = record.payload(v.as_bytes());
        }
        if p.send(record).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A table opened with `Partitions::Assigned` reads exactly the partitions it is given: `assign`
/// returns once they are caught up, `revoke` drops their rows, and assigning a partition again
/// reads only its tail after the store's checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigned_table_reads_only_its_partitions() {
    assigned_table_reads_only_its_partitions(None).await;
}

/// The same with a row cache: a revoked partition's rows stay in the store, out of sight, and
/// come back with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigned_table_with_a_row_cache_reads_only_its_partitions() {
    assigned_table_reads_only_its_partitions(Some(32 * 1024)).await;
}

async fn assigned_table_reads_only_its_partitions(cache: Option<u64>) {
    let (b, topic) = compacted_topic(4).await;
    // Per partition, the last-write-wins model of what the test wrote there.
    let mut models: Vec<Model> = vec![Model::new(); 4];
    let p = producer(&b);
    let write = |models: &mut Vec<Model>, partition: i32, key: String, value: Option<String>| {
        send_to(&p, &topic, partition, &key, value.as_deref());
        let model = &mut models[partition as usize];
        match value {
            Some(v) => model.insert(key, v),
            None => model.remove(&key),
        };
    };
    for round in 0..3 {
        for i in 0..400 {
            let value = (round == 0 || i % (round + 2) == 0).then(|| format!("v{round}-{i}"));
            let value = if round == 2 && i % 7 == 0 { None } else { value };
            if round == 0 || value.is_some() || i % 7 == 0 {
                write(&mut models, i % 4, format!("k{i:04}"), value);
            }
        }
    }
    flush(&p);
    let union =
        |models: &[Model], ps: &[i32]| -> Model { ps.iter().flat_map(|&p| models[p as usize].clone()).collect() };
    let dir = tempfile::tempdir().unwrap();
    let mut builder =
        Table::builder(&b, &topic).keys(Decoder::utf8()).values(Decoder::utf8()).partitions(Partitions::Assigned);
    builder = builder.store(dir.path());
    if let Some(bytes) = cache {
        builder = builder.cache(bytes);
    }
    let table = builder.open().await.unwrap();
    table.caught_up().await.unwrap();
    assert!(table.is_empty(), "nothing is read before an assignment");

    table.assign(&[0, 2]).await.unwrap();
    assert_eq!(contents(&table), union(&models, &[0, 2]), "assign returns once its partitions are caught up");
    assert_eq!(table.len(), contents(&table).len());
    assert_eq!(table.stats().positions.keys().copied().collect::<Vec<_>>(), vec![0, 2]);

    for (k, v) in union(&models, &[0, 2]) {
        assert_eq!(table.get(k.as_str()).as_deref(), Some(&v), "get({k})");
    }
    table.revoke(&[0]).await.unwrap();
    assert_eq!(contents(&table), union(&models, &[2]), "revoke drops the partition's rows");
    assert_eq!(table.get("k0000"), None);
    assert_eq!(table.len(), models[2].len());
    for k in models[0].keys() {
        assert_eq!(table.get(k.as_str()), None, "get({k}) of a revoked partition");
    }
    assert_eq!(table.stats().positions.keys().copied().collect::<Vec<_>>(), vec![2]);

    // New records on partition 0 while it is not read; then it comes back with partition 1.
    for i in (0..40).step_by(4) {
        write(&mut models, 0, format!("k{i:04}"), Some(format!("late-{i}")));
    }
    write(&mut models, 0, "k0004".into(), None);
    flush(&p);
    let before = table.stats();
    let partition_1_records = models[1].len() as u64; // a lower bound: it is read from its start
    table.assign(&[0, 1]).await.unwrap();
    assert_eq!(contents(&table), union(&models, &[0, 1, 2]));
    assert_eq!(table.len(), union(&models, &[0, 1, 2]).len());
    for (k, v) in union(&models, &[0, 1, 2]) {
        assert_eq!(table.get(k.as_str()).as_deref(), Some(&v), "get({k})");
    }
    let after = table.stats();
    let read = after.records_read - before.records_read;
    assert!(read >= partition_1_records, "partition 1 is read from its start ({read} records)");
    // Partition 1 got 400/4 + later rounds' records; partition 0 only its 11 new ones.
    let partition_1_total = after.end_offsets[&1];
    assert_eq!(read, partition_1_total as u64 + 11, "partition 0 is read from its checkpoint: only the tail");
    assert!(after.loaded_from_store > before.loaded_from_store, "partition 0's rows came from the store");

    match table.assign(&[9]).await {
        Err(TableError::NoSuchPartition { partition: 9, count: 4, .. }) => {}
        other => panic!("expected NoSuchPartition, got {other:?}"),
    }
    table.close().await.unwrap();
}

/// Partitions a flow was given before its table had read them to their end.
type Early = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A bank flow instance joining its own limits table, co-partitioned with the flow's commands. A
/// second listener, called after the table's, records any assigned partition the table has not
/// yet read to its end (the flow would process its commands next).
async fn limited_instance(
    s: &crate::flow::Setup,
    limits_topic: &str,
    name: &str,
    early: &Early,
) -> (Table<String, u64>, eventstage::flow::FlowControl) {
    let table = Table::builder(&s.brokers, limits_topic)
        .keys(Decoder::utf8())
        .values(Decoder::<u64>::json())
        .partitions(Partitions::Assigned)
        .open()
        .await
        .unwrap();
    let check = {
        let (table, early) = (table.clone(), early.clone());
        move |event: &eventstage::flow::RebalanceEvent, _: &mut eventstage::flow::RebalanceActions<'_>| {
            if let eventstage::flow::RebalanceEvent::Assigned(tps) = event {
                let stats = table.stats();
                for tp in tps {
                    let (pos, end) = (stats.positions.get(&tp.partition), stats.end_offsets.get(&tp.partition));
                    if pos.is_none() || pos < end {
                        early.lock().unwrap().push(format!("{tp}: read up to {pos:?} of {end:?}"));
                    }
                }
            }
        }
    };
    let flow =
        eventstage::stages::bank_flow::bank_flow_with_limits(&s.brokers, &s.group, s.topics.clone(), table.clone())
            .journal_topic(&s.journal)
            .transactional_id(unique(name))
            .commit_interval(Duration::from_millis(50))
            .consumer_property("session.timeout.ms", "6000")
            .on_rebalance(table.follow_assignment(&s.topics.input))
            .on_rebalance(check)
            .run()
            .unwrap();
    (table, flow)
}

/// Two bank flow instances, each joining its own limits table co-partitioned with the commands
/// (`Partitions::Assigned` + `follow_assignment`): each table holds exactly the partitions its
/// flow owns, through a join and a leave, and every withdrawal sees its account's limit (a table
/// not yet caught up on a new partition would let an over-limit withdrawal through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_co_partitioned_table_follows_the_flows_partitions() {
    use eventstage::stages::bank::{Account, BankCommand};
    use eventstage::stages::bank_flow::WireReply;
    let s = crate::flow::setup(4).await;
    let (b, limits_topic) = compacted_topic(4).await;
    let accounts = 24;
    let limit = |i: usize| 20 + i as u64;
    let p = producer(&b);
    for i in 0..accounts {
        // The default partitioner, as for the commands: a key lands on the same partition number.
        send(&p, &limits_topic, &format!("acct-{i}"), limit(i).to_string().as_bytes());
    }
    flush(&p);

    let owned = |t: &Table<String, u64>| t.stats().positions.keys().copied().collect::<BTreeSet<i32>>();

    let mut balances: BTreeMap<String, Account> = BTreeMap::new();
    let mut expected = std::collections::HashMap::new();
    let mut n = 0;
    let mut round = |cmds: Vec<(usize, BankCommand)>| {
        let mut out = Vec::new();
        for (i, cmd) in cmds {
            let (key, id) = (format!("acct-{i}"), format!("c{n}"));
            n += 1;
            let account = balances.entry(key.clone()).or_default();
            let reply = match cmd {
                BankCommand::Withdraw(x) if x > limit(i) => WireReply {
                    id: id.clone(),
                    ok: false,
                    balance: Some(account.balance),
                    error: Some(format!("withdrawal of {x} is over the account's limit of {}", limit(i))),
                },
                _ => {
                    let balance = crate::runtime::model(account, cmd).expect("the test's commands are valid");
                    WireReply { id: id.clone(), ok: true, balance: Some(balance), error: None }
                }
            };
            expected.insert(id.clone(), reply);
            out.push((key, id, cmd));
        }
        (out, expected.clone())
    };
    let withdrawals = |first: u64| -> Vec<(usize, BankCommand)> {
        (0..accounts)
            .flat_map(|i| [(i, BankCommand::Withdraw(limit(i) + 1)), (i, BankCommand::Withdraw(first.min(limit(i))))])
            .collect()
    };

    let early = Early::default();
    let (table_a, first) = limited_instance(&s, &limits_topic, "first", &early).await;
    // The listeners run right after the flow counts its partitions.
    crate::util::wait_until("the first instance and its table to own every partition", || {
        first.metrics().assigned_partitions == 4 && owned(&table_a).len() == 4 && table_a.len() == accounts
    })
    .await;
    let mut opening: Vec<(usize, BankCommand)> = (0..accounts).map(|i| (i, BankCommand::Open)).collect();
    opening.extend((0..accounts).map(|i| (i, BankCommand::Deposit(1000))));
    opening.extend(withdrawals(1000));
    let (cmds, replies) = round(opening);
    crate::flow::feed_async(&s, &cmds).await;
    crate::flow::await_replies(&s, replies).await;

    let (table_b, second) = limited_instance(&s, &limits_topic, "second", &early).await;
    crate::util::wait_until("the two instances to split the partitions", || {
        let (a, b) = (first.metrics().assigned_partitions, second.metrics().assigned_partitions);
        a > 0 && b > 0 && a + b == 4 && owned(&table_a).len() as u64 == a && owned(&table_b).len() as u64 == b
    })
    .await;
    let (a, bb) = (owned(&table_a), owned(&table_b));
    assert!(a.is_disjoint(&bb) && a.union(&bb).count() == 4, "the tables split like the flows: {a:?} {bb:?}");
    // (A table lists a partition as soon as it starts reading it; its rows follow.)
    crate::util::wait_until("each row to be in the table of its partition's owner", || {
        table_a.len() + table_b.len() == accounts
    })
    .await;
    let (cmds, replies) = round(withdrawals(1));
    crate::flow::feed_async(&s, &cmds).await;
    crate::flow::await_replies(&s, replies).await;

    second.drain_and_shutdown().await.unwrap();
    crate::util::wait_until("the first to own everything again", || {
        first.metrics().assigned_partitions == 4 && owned(&table_a).len() == 4 && table_a.len() == accounts
    })
    .await;
    let (cmds, replies) = round(withdrawals(2));
    crate::flow::feed_async(&s, &cmds).await;
    crate::flow::await_replies(&s, replies).await;
    first.drain_and_shutdown().await.unwrap();
    let early = early.lock().unwrap().clone();
    assert!(early.is_empty(), "the flow got partitions before its table had read them: {early:?}");
    table_a.close().await.unwrap();
    table_b.close().await.unwrap();
}
