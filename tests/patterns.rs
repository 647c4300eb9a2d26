//! At-least-once flows, async enrichment and rebalance listeners against a real broker.

use crate::crash::crash_loop;
use crate::flow::{
    check_replies, check_replies_at_least_once, expected, feed_async, journal_state, setup, workload, Setup,
};
use crate::util::broker::{create_topic, flush, producer, read_committed, send, unique};
use eventstage::flow::{
    BadInput, CommitterSettings, EnrichSettings, FlowBuilder, Guarantee, RebalanceEvent, TopicPartition,
};
use eventstage::stages::bank::{BankCommand, Limited, LimitedBank};
use eventstage::stages::bank_flow::{decode, outputs, WireReply};
use rand::Rng;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_crash_loop_with_the_kafka_journal() {
    crash_loop(false, "at-least-once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_crash_loop_with_the_sled_journal() {
    crash_loop(true, "at-least-once").await;
}

/// A stand-in for a remote service: answers after a random delay of up to `max_delay`, counts
/// the calls running at once and keeps the largest count.
#[derive(Clone, Default)]
struct Service {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Service {
    async fn call(&self, max_delay: Duration) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        let delay = rand::rng().random_range(Duration::ZERO..=max_delay);
        tokio::time::sleep(delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The bank stage behind an enrichment step that calls `service` for every command.
fn enriched_bank(s: &Setup, service: &Service, parallelism: usize, guarantee: Guarantee) -> FlowBuilder<LimitedBank> {
    let topics = s.topics.clone();
    let service = service.clone();
    FlowBuilder::new(LimitedBank, &s.brokers, &s.group, [s.topics.input.as_str()])
        .decoder(|record| decode(record).map(|(account, command)| (account, Limited { command, limit: None })))
        .enrich(EnrichSettings::parallelism(parallelism), move |_account, command| {
            let service = service.clone();
            async move {
                service.call(Duration::from_millis(8)).await;
                Ok::<_, std::convert::Infallible>(command)
            }
        })
        .outputs(move |p| outputs(&topics, p))
        .journal_topic(&s.journal)
        .guarantee(guarantee)
        .commit_interval(Duration::from_millis(50))
}

/// Replies of one account must come in the order its commands were sent.
pub(crate) fn assert_order(cmds: &[(String, String, BankCommand)], replies: &[crate::util::broker::Rec]) {
    let mut sent: HashMap<&str, Vec<&str>> = HashMap::new();
    for (account, id, _) in cmds {
        sent.entry(account).or_default().push(id);
    }
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for r in replies {
        let reply: WireReply = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        seen.entry(String::from_utf8(r.key.clone().unwrap()).unwrap()).or_default().push(reply.id);
    }
    for (account, ids) in seen {
        assert_eq!(ids, sent[account.as_str()], "replies of {account} in command order");
    }
}

async fn enrichment_keeps_order(guarantee: Guarantee) {
    let s = setup(2).await;
    let cmds = workload(600, 12, 51);
    let (replies, accounts) = expected(&cmds);
    let service = Service::default();
    let flow = enriched_bank(&s, &service, 8, guarantee).run().unwrap();
    feed_async(&s, &cmds).await;
    let recs = {
        let (s, replies) = (s.clone(), replies.clone());
        tokio::task::spawn_blocking(move || match guarantee {
            Guarantee::AtLeastOnce => check_replies_at_least_once(&s, &replies),
            _ => check_replies(&s, &replies),
        })
        .await
        .unwrap()
    };
    assert_order(&cmds, &recs);
    let m = flow.metrics();
    flow.drain_and_shutdown().await.unwrap();
    let most = service.most.load(Ordering::SeqCst);
    assert!(most <= 8, "at most 8 calls in flight, saw {most}");
    assert!(most > 1, "calls overlapped (saw at most {most} at once)");
    assert!(m.max_enrich_in_flight <= 8 && m.max_enrich_in_flight > 1, "{m:?}");
    assert_eq!(service.calls.load(Ordering::SeqCst), cmds.len(), "one call per command");
    assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 2)).await.unwrap(), accounts);
}

/// Calls finish in random order, yet every account's replies come in command order (the balances
/// the model expects), never more than 8 calls run at once, and the journal holds the model state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrichment_keeps_partition_order_and_bounds_calls_in_flight() {
    enrichment_keeps_order(Guarantee::ExactlyOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrichment_composes_with_an_at_least_once_stage() {
    enrichment_keeps_order(Guarantee::AtLeastOnce).await;
}

/// The records of dead-letter topic `dlq`, once it has at least one (and a moment more for any other).
async fn dead_letters(brokers: &str, dlq: &str) -> Vec<crate::util::broker::Rec> {
    let (b, d) = (brokers.to_string(), dlq.to_string());
    tokio::task::spawn_blocking(move || read_committed(&b, &d, |r| !r.is_empty(), Duration::from_millis(300)))
        .await
        .unwrap()
}

/// A command whose enrichment keeps failing goes to the dead-letter topic after its attempts,
/// with the error; the commands around it are handled in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrichment_failures_follow_the_bad_input_policy() {
    let s = setup(1).await;
    let dlq = unique("dlq");
    create_topic(&s.brokers, &dlq, 1, &[]).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let topics = s.topics.clone();
    let counted = attempts.clone();
    let settings = EnrichSettings::parallelism(4).attempts(3).backoff(Duration::from_millis(5), Duration::from_secs(5));
    let flow = FlowBuilder::new(LimitedBank, &s.brokers, &s.group, [s.topics.input.as_str()])
        .decoder(|record| decode(record).map(|(account, command)| (account, Limited { command, limit: None })))
        .enrich(settings, move |account: String, command| {
            let counted = counted.clone();
            async move {
                if account == "blocked" {
                    counted.fetch_add(1, Ordering::SeqCst);
                    return Err("risk service: account blocked".to_string());
                }
                Ok(command)
            }
        })
        .outputs(move |p| outputs(&topics, p))
        .journal_topic(&s.journal)
        .bad_input(BadInput::DeadLetter(dlq.clone()))
        .run()
        .unwrap();
    let cmds = vec![
        ("a".to_string(), "1".to_string(), BankCommand::Open),
        ("blocked".to_string(), "2".to_string(), BankCommand::Open),
        ("a".to_string(), "3".to_string(), BankCommand::Deposit(5)),
    ];
    feed_async(&s, &cmds).await;
    let (mut replies, _) = expected(&cmds);
    replies.remove("2");
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || check_replies(&s2, &replies)).await.unwrap();
    let dead = dead_letters(&s.brokers, &dlq).await;
    assert_eq!(dead.len(), 1);
    let error = dead[0].headers.iter().find(|(k, _)| k == "eventstage.error").map(|(_, v)| v.clone()).unwrap();
    let error = String::from_utf8(error).unwrap();
    assert!(error.contains("after 3 attempts") && error.contains("account blocked"), "{error}");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(flow.metrics().dead_letters, 1);
    flow.drain_and_shutdown().await.unwrap();
}

type Seen = Arc<Mutex<Vec<RebalanceEvent>>>;

fn partitions(events: &[RebalanceEvent], which: fn(&RebalanceEvent) -> bool) -> Vec<BTreeSet<i32>> {
    events.iter().filter(|e| which(e)).map(|e| e.partitions().iter().map(|tp| tp.partition).collect()).collect()
}

/// Two instances, one joins, one leaves: both listeners (sync and async) see every assignment and
/// revocation with the right partitions, in order; the sync listener sees the committed offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_listeners_see_assignments_and_revocations() {
    let s = setup(4).await;
    let cmds = workload(400, 20, 61);
    let (replies, _) = expected(&cmds);
    let start = |sync: &Seen, async_seen: &Seen, committed_seen: &Arc<Mutex<Vec<Option<i64>>>>| {
        let (sync, async_seen, committed_seen) = (sync.clone(), async_seen.clone(), committed_seen.clone());
        eventstage::stages::bank_flow::bank_flow(&s.brokers, &s.group, s.topics.clone())
            .journal_topic(&s.journal)
            .commit_interval(Duration::from_millis(50))
            .consumer_property("session.timeout.ms", "6000")
            .on_rebalance(move |event, actions| {
                if let RebalanceEvent::Revoked(tps) = event {
                    let tp: &TopicPartition = &tps[0];
                    committed_seen.lock().unwrap().push(actions.committed_offset(&tp.topic, tp.partition));
                }
                sync.lock().unwrap().push(event.clone());
            })
            .on_rebalance_async(move |event| {
                let seen = async_seen.clone();
                async move {
                    tokio::task::yield_now().await;
                    seen.lock().unwrap().push(event);
                }
            })
            .run()
            .unwrap()
    };
    let (a_sync, a_async, a_committed) = (Seen::default(), Seen::default(), Arc::default());
    let (b_sync, b_async, b_committed) = (Seen::default(), Seen::default(), Arc::default());
    let first = start(&a_sync, &a_async, &a_committed);
    crate::util::wait_until("the first instance to own every partition", || first.metrics().assigned_partitions == 4)
        .await;
    feed_async(&s, &cmds[..200]).await;
    crate::util::wait_until("the first half processed", || first.metrics().records_in >= 200).await;
    let second = start(&b_sync, &b_async, &b_committed);
    crate::util::wait_until("the second instance to own partitions", || second.metrics().assigned_partitions > 0).await;
    crate::util::wait_until("the first to settle", || {
        first.metrics().assigned_partitions + second.metrics().assigned_partitions == 4
    })
    .await;
    feed_async(&s, &cmds[200..]).await;
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || check_replies(&s2, &replies)).await.unwrap();
    second.drain_and_shutdown().await.unwrap();
    crate::util::wait_until("the first to take everything back", || first.metrics().assigned_partitions == 4).await;
    first.drain_and_shutdown().await.unwrap();

    for (sync, async_seen) in [(&a_sync, &a_async), (&b_sync, &b_async)] {
        crate::util::wait_until("the async listeners to catch up", || {
            async_seen.lock().unwrap().len() >= sync.lock().unwrap().len()
        })
        .await;
    }
    let all: BTreeSet<i32> = (0..4).collect();
    let is_assigned = |e: &RebalanceEvent| matches!(e, RebalanceEvent::Assigned(_));
    let is_revoked = |e: &RebalanceEvent| matches!(e, RebalanceEvent::Revoked(_));
    for (name, sync, async_seen) in [("first", &a_sync, &a_async), ("second", &b_sync, &b_async)] {
        let (sync, async_seen) = (sync.lock().unwrap().clone(), async_seen.lock().unwrap().clone());
        assert_eq!(sync, async_seen, "{name}: the async listener sees the same events in the same order");
        assert!(sync.iter().all(|e| !matches!(e, RebalanceEvent::Lost(_))), "{name}: nothing lost");
        assert!(is_assigned(&sync[0]), "{name} starts with an assignment: {sync:?}");
        for pair in sync.windows(2) {
            assert!(is_assigned(&pair[0]) != is_assigned(&pair[1]), "{name}: assign and revoke alternate: {sync:?}");
        }
    }
    let a = a_sync.lock().unwrap().clone();
    let b = b_sync.lock().unwrap().clone();
    let (a_assigned, b_assigned) = (partitions(&a, is_assigned), partitions(&b, is_assigned));
    assert_eq!(a_assigned[0], all, "the first instance owned everything at first: {a:?}");
    assert_eq!(*a_assigned.last().unwrap(), all, "... and again at the end: {a:?}");
    // While both ran (eager rebalancing: everything is revoked, then reassigned), they split the
    // partitions without overlap.
    let (a_mid, b_mid) = (&a_assigned[1], &b_assigned[0]);
    assert!(a_mid.is_disjoint(b_mid) && a_mid.union(b_mid).copied().collect::<BTreeSet<_>>() == all, "{a:?} {b:?}");
    assert_eq!(partitions(&b, is_revoked).last(), Some(b_mid), "the second gives back what it had: {b:?}");
    assert!(
        a_committed.lock().unwrap().iter().all(|o| o.is_some()),
        "revocations see the committed offsets of the partitions they release"
    );
}

/// The consume-only variant: each record processed by an async function, offsets committed after;
/// a record whose processing keeps failing goes to the dead-letter topic; a restarted consumer in
/// the same group gets only what was not committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_processes_each_record_then_commits() {
    let brokers = crate::util::broker::brokers();
    crate::util::init_tracing();
    let (topic, group, dlq) = (unique("events"), unique("group"), unique("dlq"));
    create_topic(&brokers, &topic, 2, &[]).await;
    create_topic(&brokers, &dlq, 1, &[]).await;
    let produce = |range: std::ops::Range<usize>| {
        let (b, t) = (brokers.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            let p = producer(&b);
            for i in range {
                send(&p, &t, &format!("k{}", i % 7), format!("v{i}").as_bytes());
            }
            flush(&p);
        })
    };
    let run = |seen: Arc<Mutex<Vec<String>>>| {
        eventstage::flow::consume(&brokers, &group, &[topic.as_str()])
            .settings(
                EnrichSettings::parallelism(4).attempts(2).backoff(Duration::from_millis(5), Duration::from_secs(5)),
            )
            .committer(CommitterSettings::default().max_batch(50))
            .bad_input(BadInput::DeadLetter(dlq.clone()))
            .run(move |record| {
                let seen = seen.clone();
                async move {
                    // Any error type goes, with `?`, and messages too.
                    let value = String::from_utf8(record.value.unwrap_or_default())?;
                    if value == "v13" {
                        return Err("cannot process v13".into());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    seen.lock().unwrap().push(value);
                    Ok::<_, eventstage::flow::BoxError>(())
                }
            })
            .unwrap()
    };
    let first_seen = Arc::new(Mutex::new(Vec::new()));
    let first = run(first_seen.clone());
    produce(0..300).await.unwrap();
    crate::util::wait_until("300 records processed", || first.metrics().records_in == 300).await;
    first.drain_and_shutdown().await.unwrap();
    let first_seen = first_seen.lock().unwrap().clone();
    assert_eq!(first_seen.len(), 299, "every record but the failing one");
    assert_eq!(first_seen.iter().collect::<BTreeSet<_>>().len(), 299, "each once");

    let second_seen = Arc::new(Mutex::new(Vec::new()));
    let second = run(second_seen.clone());
    produce(300..350).await.unwrap();
    crate::util::wait_until("the new records processed", || second.metrics().records_in == 50).await;
    second.drain_and_shutdown().await.unwrap();
    let second_seen = second_seen.lock().unwrap().clone();
    let expected: Vec<String> = (300..350).map(|i| format!("v{i}")).collect();
    assert_eq!(second_seen.iter().collect::<BTreeSet<_>>(), expected.iter().collect(), "only the uncommitted");

    let dead = dead_letters(&brokers, &dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value.as_deref(), Some(&b"v13"[..]));
}
