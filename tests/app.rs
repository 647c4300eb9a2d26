//! Applications of several stages: the bank and the transfer saga, commands routed between them
//! through repartition topics (issue 25), checked by an independent reader of the committed topics.

use crate::flow::{feed, setup, Setup};
use crate::util::broker::{create_topic, flush, producer, read_committed, send, unique, Rec};
use eventstage::flow::{commands_topic, Application, FlowError};
use eventstage::stages::bank::{BankCommand, BankEvent};
use eventstage::stages::bank_flow::WireReply;
use eventstage::stages::transfer_flow::{replies_topic, transfer_app, WireTransfer, WireTransferReply};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The transfers of a test: (id, from, to, amount) over `accounts` accounts of which the last
/// `unopened` are never opened (deposits to them are refused, withdrawals from them too).
pub(crate) fn transfers(n: usize, accounts: usize, seed: u64) -> Vec<WireTransfer> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let from = rng.random_range(0..accounts);
            let to = (from + rng.random_range(1..accounts)) % accounts;
            WireTransfer {
                id: format!("t-{i}"),
                from: format!("acct-{from}"),
                to: format!("acct-{to}"),
                amount: rng.random_range(1..80),
            }
        })
        .collect()
}

pub(crate) fn feed_transfers(brokers: &str, topic: &str, transfers: &[WireTransfer]) {
    let p = producer(brokers);
    for t in transfers {
        // Keyed by the source account, not the transfer id: the transfer stage forwards each to
        // its id's partition.
        send(&p, topic, &t.from, &serde_json::to_vec(t).unwrap());
    }
    flush(&p);
}

/// What an independent reader of the committed topics finds.
pub(crate) struct Books {
    /// Each transfer's replies.
    pub replies: BTreeMap<String, Vec<WireTransferReply>>,
    /// Each account's balance, folded from its events in order.
    pub balances: BTreeMap<String, i128>,
}

/// Reads the transfers' replies until every transfer of `ids` has one (then a while longer, for
/// duplicates) and every account's events.
pub(crate) fn read_books(s: &Setup, transfers_topic: &str, ids: &BTreeSet<String>) -> Books {
    let done = |recs: &[Rec]| {
        let seen: BTreeSet<String> = recs
            .iter()
            .filter_map(|r| serde_json::from_slice::<WireTransferReply>(r.value.as_deref()?).ok())
            .map(|r| r.id)
            .collect();
        ids.iter().all(|id| seen.contains(id))
    };
    let mut replies: BTreeMap<String, Vec<WireTransferReply>> = BTreeMap::new();
    for r in read_committed(&s.brokers, &replies_topic(transfers_topic), done, Duration::from_secs(3)) {
        let reply: WireTransferReply = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        replies.entry(reply.id.clone()).or_default().push(reply);
    }
    // The events of a key are in one partition, in order: each account's balance is their fold.
    let mut balances: BTreeMap<String, i128> = BTreeMap::new();
    for r in read_committed(&s.brokers, &s.topics.events, |_| true, Duration::from_secs(2)) {
        let account = String::from_utf8(r.key.unwrap()).unwrap();
        let balance = balances.entry(account).or_default();
        match serde_json::from_slice::<BankEvent>(r.value.as_deref().unwrap()).unwrap() {
            BankEvent::Deposited { amount } => *balance += i128::from(amount),
            BankEvent::Withdrawn { amount } => *balance -= i128::from(amount),
            BankEvent::Opened | BankEvent::Closed => {}
        }
    }
    Books { replies, balances }
}

/// Checks the books against the transfers and the money the bank commands brought in: each
/// transfer ended exactly once, no balance went below zero, and the balances add up to `money`.
pub(crate) fn check_books(books: &Books, transfers: &[WireTransfer], opened: &BTreeSet<String>, money: i128) {
    for t in transfers {
        let replies = books.replies.get(&t.id).unwrap_or_else(|| panic!("transfer {} has no reply", t.id));
        assert_eq!(replies.len(), 1, "transfer {} has {} replies: {replies:?}", t.id, replies.len());
        let reply = &replies[0];
        match (opened.contains(&t.from), opened.contains(&t.to)) {
            (false, _) => assert_eq!(reply.status, "rejected", "{t:?}: {reply:?}"),
            (true, false) => assert!(
                reply.status == "refunded" || reply.status == "rejected",
                "a transfer to an account never opened is refunded (or rejected for want of funds): {t:?}: {reply:?}"
            ),
            (true, true) => assert!(reply.status == "completed" || reply.status == "rejected", "{t:?}: {reply:?}"),
        }
        if reply.status == "rejected" && opened.contains(&t.from) {
            let error = reply.error.as_deref().unwrap_or_default();
            assert!(error.contains("insufficient funds"), "{t:?}: {reply:?}");
        }
    }
    assert_eq!(books.replies.len(), transfers.len(), "replies of transfers never sent");
    for (account, balance) in &books.balances {
        assert!(*balance >= 0, "{account} went below zero: {balance}");
    }
    let total: i128 = books.balances.values().sum();
    assert_eq!(
        total, money,
        "money is not conserved: balances add up to {total}, the bank commands brought in {money}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_between_accounts_are_one_exactly_once_application() {
    let s = setup(4).await;
    let transfers_topic = unique("transfers");
    create_topic(&s.brokers, &transfers_topic, 4, &[]).await;
    create_topic(&s.brokers, &replies_topic(&transfers_topic), 4, &[]).await;
    // Accounts 0..8 are opened with 100 each; 8 and 9 never are.
    let opened: BTreeSet<String> = (0..8).map(|i| format!("acct-{i}")).collect();
    let mut bank = Vec::new();
    for a in &opened {
        bank.push((a.clone(), format!("open-{a}"), BankCommand::Open));
        bank.push((a.clone(), format!("dep-{a}"), BankCommand::Deposit(100)));
    }
    // Fed before the application starts: the bank commands come first in their partitions, and
    // the transfers wait for the bank's answers whatever the order.
    feed(&s.brokers, &s.topics.input, &bank);
    let transfers = transfers(60, 10, 7);
    feed_transfers(&s.brokers, &transfers_topic, &transfers);
    let app = transfer_app(&s.brokers, &s.group, s.topics.clone(), &transfers_topic);
    let app = app.into_application().start().await.expect("the application starts");
    let ids: BTreeSet<String> = transfers.iter().map(|t| t.id.clone()).collect();
    let books = {
        let (s, topic) = (s.clone(), transfers_topic.clone());
        tokio::task::spawn_blocking(move || read_books(&s, &topic, &ids)).await.unwrap()
    };
    let metrics = app.metrics();
    app.drain_and_shutdown().await.expect("drains");
    check_books(&books, &transfers, &opened, 800);
    let completed = books.replies.values().filter(|r| r[0].status == "completed").count();
    let refunded = books.replies.values().filter(|r| r[0].status == "refunded").count();
    assert!(completed > 10 && refunded > 0, "{completed} completed, {refunded} refunded: the workload misses a path");
    // The bank replied to its own commands only, each once.
    let replies = read_committed(&s.brokers, &s.topics.replies, |r| r.len() >= bank.len(), Duration::from_secs(1));
    let mut ids: Vec<String> =
        replies.iter().map(|r| serde_json::from_slice::<WireReply>(r.value.as_deref().unwrap()).unwrap().id).collect();
    ids.sort();
    let mut sent: Vec<String> = bank.iter().map(|(_, id, _)| id.clone()).collect();
    sent.sort();
    assert_eq!(ids, sent, "one bank reply per bank command, none for the transfers' steps");
    // Records of either input that came in another partition than their key's were forwarded
    // (the test's producer partitions by CRC32, not murmur2), and nothing was dead-lettered.
    let forwarded: u64 = metrics.iter().map(|(_, m)| m.forwarded).sum();
    assert!(forwarded > 0, "nothing was forwarded: {metrics:?}");
    assert!(metrics.iter().all(|(_, m)| m.dead_letters == 0), "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_that_cannot_run_as_built_says_why() {
    let s = setup(2).await;
    // A route to a stage the application does not have.
    let app = Application::new(&s.brokers, &s.group);
    let _to = app.to::<eventstage::stages::transfer::Transfers>();
    let flow = app
        .flow(eventstage::stages::bank::Bank, [s.topics.input.as_str()])
        .decoder(eventstage::stages::bank_flow::decode);
    let err = app.stage(flow).start().await.expect_err("refused");
    assert!(err.to_string().contains("`transfer`, which is not a stage"), "{err}");
    // A stage built for another group.
    let other = eventstage::flow::FlowBuilder::new(
        eventstage::stages::bank::Bank,
        s.brokers.clone(),
        "other",
        [s.topics.input.as_str()],
    )
    .decoder(eventstage::stages::bank_flow::decode);
    let err = Application::new(&s.brokers, &s.group).stage(other).start().await.expect_err("refused");
    assert!(err.to_string().contains("build it with Application::flow"), "{err}");
    // A flow with a route mapping outside an application.
    let app = Application::new(&s.brokers, &s.group);
    let to = app.to::<eventstage::stages::bank::Bank>();
    let lone = app
        .flow(eventstage::stages::bank::Bank, [s.topics.input.as_str()])
        .decoder(eventstage::stages::bank_flow::decode)
        .route(move |p| vec![to.command(p.key, &BankCommand::Deposit(1))]);
    assert!(matches!(lone.run(), Err(FlowError::Config(m)) if m.contains("run it as a stage of an Application")));
    // A repartition topic with another partition count than the stage's inputs.
    let s2 = setup(2).await;
    create_topic(&s2.brokers, &commands_topic(&s2.group, "bank"), 3, &[]).await;
    let app = Application::new(&s2.brokers, &s2.group);
    let flow = app
        .flow(eventstage::stages::bank::Bank, [s2.topics.input.as_str()])
        .decoder(eventstage::stages::bank_flow::decode);
    let err = app.stage(flow).start().await.expect_err("refused");
    assert!(err.to_string().contains("has 3 partitions, its stage's inputs have 2"), "{err}");
}
