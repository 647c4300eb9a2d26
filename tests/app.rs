//! Applications of several stages: the bank and the transfer saga, commands routed between them
//! through repartition topics (issue 25), checked by an independent reader of the committed topics.

use crate::crash::Demo;
use crate::flow::{feed, setup, Setup};
use crate::instances::committed;
use crate::kafka::{feeder, kafka_journal, wait_for};
use crate::util::broker::{create_topic, flush, producer, read_committed, send, unique, Rec};
use crate::util::DEADLINE;
use eventstage::flow::{commands_topic, Application, FlowError};
use eventstage::stages::bank::{BankCommand, BankEvent};
use eventstage::stages::bank_flow::WireReply;
use eventstage::stages::transfer_flow::{replies_topic, transfer_app, WireTransfer, WireTransferReply};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The transfers of a test: (id, from, to, amount) over `accounts` accounts of which the last
/// `unopened` are never opened (deposits to them are refused, withdrawals from them too).
pub(crate) fn transfers(n: usize, accounts: usize, max_amount: u64, seed: u64) -> Vec<WireTransfer> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let from = rng.random_range(0..accounts);
            let to = (from + rng.random_range(1..accounts)) % accounts;
            WireTransfer {
                id: format!("t-{i}"),
                from: format!("acct-{from}"),
                to: format!("acct-{to}"),
                amount: rng.random_range(1..max_amount),
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

/// Waits until the bank answered the `n` commands that open and fund the accounts. A bank
/// command and a transfer's routed step reach the bank through different topics, in no set order:
/// a transfer sent before its accounts are open may find them closed.
pub(crate) async fn accounts_open(s: &Setup, n: usize) {
    let (b, t) = (s.brokers.clone(), s.topics.replies.clone());
    tokio::task::spawn_blocking(move || read_committed(&b, &t, |r| r.len() >= n, Duration::ZERO)).await.unwrap();
}

/// Fresh topics for transfers (`partitions` each) beside `s`'s bank topics, and the bank commands
/// that open accounts 0 to 7 with 100 each (8 and 9 are never opened), fed: (the transfers topic,
/// the open accounts, the commands).
pub(crate) async fn transfer_setup(
    s: &Setup,
    partitions: i32,
) -> (String, BTreeSet<String>, Vec<(String, String, BankCommand)>) {
    let transfers_topic = unique("transfers");
    create_topic(&s.brokers, &transfers_topic, partitions, &[]).await;
    create_topic(&s.brokers, &replies_topic(&transfers_topic), partitions, &[]).await;
    let opened: BTreeSet<String> = (0..8).map(|i| format!("acct-{i}")).collect();
    let history: Vec<_> = opened
        .iter()
        .flat_map(|a| {
            [
                (a.clone(), format!("open-{a}"), BankCommand::Open),
                (a.clone(), format!("dep-{a}"), BankCommand::Deposit(100)),
            ]
        })
        .collect();
    feed(&s.brokers, &s.topics.input, &history);
    (transfers_topic, opened, history)
}

/// Runs the transfer application in this process (withdrawals timing out after `timeout`) until
/// every one of `transfers` has its reply and the books are quiet, then drains it: the books, and
/// each stage's counters.
async fn transfers_in_process(
    s: &Setup,
    transfers_topic: &str,
    history: usize,
    transfers: &[WireTransfer],
    timeout: Duration,
) -> (Books, Vec<(&'static str, eventstage::flow::FlowMetrics)>) {
    let app = transfer_app(&s.brokers, &s.group, s.topics.clone(), transfers_topic, timeout);
    let app = app.into_application().start().await.expect("the application starts");
    accounts_open(s, history).await;
    feed_transfers(&s.brokers, transfers_topic, transfers);
    let ids: BTreeSet<String> = transfers.iter().map(|t| t.id.clone()).collect();
    let books = {
        let (s, topic) = (s.clone(), transfers_topic.to_string());
        tokio::task::spawn_blocking(move || read_books(&s, &topic, &ids, 800)).await.unwrap()
    };
    let metrics = app.metrics();
    app.drain_and_shutdown().await.expect("drains");
    (books, metrics)
}

/// `n` deposits and withdrawals (of 1 to 39) on the open accounts 0 to 7.
fn bank_chaos(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<(String, String, BankCommand)> {
    (0..n)
        .map(|i| {
            let account = format!("acct-{}", rng.random_range(0..8));
            let amount = rng.random_range(1..40);
            let cmd = if rng.random_bool(0.5) { BankCommand::Deposit(amount) } else { BankCommand::Withdraw(amount) };
            (account, format!("c-{i}"), cmd)
        })
        .collect()
}

/// Bank commands and transfers fed in chunks every 100 ms while the application is attacked.
struct Load {
    s: Setup,
    transfers_topic: String,
    /// The bank commands fed before the load (opening the accounts), then the load's.
    bank: Vec<(String, String, BankCommand)>,
    history: usize,
    transfers: Vec<WireTransfer>,
    stop: Arc<AtomicBool>,
    feeding: (std::thread::JoinHandle<usize>, std::thread::JoinHandle<usize>),
}

impl Load {
    fn start(
        s: &Setup,
        transfers_topic: &str,
        history: &[(String, String, BankCommand)],
        chaos: Vec<(String, String, BankCommand)>,
        transfers: &[WireTransfer],
        chunk: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let every = Duration::from_millis(100);
        let feeding = (
            feeder(s, &chaos, chunk, every, stop.clone()),
            transfer_feeder(s, transfers_topic, transfers, chunk, every, stop.clone()),
        );
        Self {
            s: s.clone(),
            transfers_topic: transfers_topic.to_string(),
            bank: [history, &chaos].concat(),
            history: history.len(),
            transfers: transfers.to_vec(),
            stop,
            feeding,
        }
    }

    /// Stops the chunks, feeds the rest at once, and reads the books once every transfer has its
    /// reply: the books, and the money the bank commands brought in.
    async fn finish(self) -> (Books, i128) {
        self.stop.store(true, Ordering::SeqCst);
        let (sent_bank, sent_transfers) = (self.feeding.0.join().unwrap(), self.feeding.1.join().unwrap());
        feed(&self.s.brokers, &self.s.topics.input, &self.bank[self.history + sent_bank..]);
        feed_transfers(&self.s.brokers, &self.transfers_topic, &self.transfers[sent_transfers..]);
        let ids: BTreeSet<String> = self.transfers.iter().map(|t| t.id.clone()).collect();
        tokio::task::spawn_blocking(move || {
            let money = money_in(&self.s, &self.bank);
            (read_books(&self.s, &self.transfers_topic, &ids, money), money)
        })
        .await
        .unwrap()
    }
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
pub(crate) fn read_books(s: &Setup, transfers_topic: &str, ids: &BTreeSet<String>, money: i128) -> Books {
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
    // Read until the balances add up to `money` (a late withdrawal's money may still be on its
    // way back when the last reply is written), or a deadline: then the books say what is wrong.
    let end = std::time::Instant::now() + DEADLINE;
    let balances = loop {
        let balances = balances(s);
        if balances.values().sum::<i128>() == money || std::time::Instant::now() >= end {
            break balances;
        }
    };
    Books { replies, balances }
}

/// Each account's balance: the fold of its committed events.
fn balances(s: &Setup) -> BTreeMap<String, i128> {
    let mut balances: BTreeMap<String, i128> = BTreeMap::new();
    for r in read_committed(&s.brokers, &s.topics.events, |_| true, Duration::from_secs(1)) {
        let account = String::from_utf8(r.key.unwrap()).unwrap();
        let balance = balances.entry(account).or_default();
        match serde_json::from_slice::<BankEvent>(r.value.as_deref().unwrap()).unwrap() {
            BankEvent::Deposited { amount } => *balance += i128::from(amount),
            BankEvent::Withdrawn { amount } => *balance -= i128::from(amount),
            BankEvent::Opened | BankEvent::Closed => {}
        }
    }
    balances
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
            assert!(
                error.contains("insufficient funds") || error.contains("did not answer the withdrawal"),
                "{t:?}: {reply:?}"
            );
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
    let (transfers_topic, opened, bank) = transfer_setup(&s, 4).await;
    let transfers = transfers(60, 10, 80, 7);
    let (books, metrics) =
        transfers_in_process(&s, &transfers_topic, bank.len(), &transfers, Duration::from_secs(30)).await;
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

    // Operators see the application whole: describe lists both inputs, both repartition topics
    // (each consumed to its end) and both stages' journals; a journal command reads the
    // transfers' journal with the stage its name ends with; reset deletes all of it.
    use crate::util::run_cli;
    let inputs = format!("{},{transfers_topic}", s.topics.input);
    let group = ["--brokers", &s.brokers, "--group", &s.group, "--input", &inputs];
    let cli = |cmd: &str, extra: &[&str]| run_cli(&[&[cmd][..], &group[..], extra].concat());
    let (code, out, err) = tokio::task::block_in_place(|| cli("describe", &[]));
    assert_eq!(code, 0, "{err}");
    for topic in ["bank-commands", "transfer-commands", "bank-journal", "transfer-journal"] {
        assert!(out.contains(&format!("{}-{topic}", s.group)), "{topic}: {out}");
    }
    assert!(out.contains(&format!("owned by group {}", s.group)), "{out}");
    // Every input partition is consumed to its end (lag 0: they are written without
    // transactions); every repartition partition has a committed offset (its lag counts the
    // transaction markers and aborted records after the last record consumed).
    for line in out.lines().filter(|l| l.starts_with(&s.topics.input) || l.starts_with(&transfers_topic)) {
        assert!(line.ends_with(" 0"), "{line}");
    }
    let repartition: Vec<&str> =
        out.lines().filter(|l| l.starts_with(&format!("{}-", s.group)) && l.contains("-commands ")).collect();
    assert_eq!(repartition.len(), 8, "two repartition topics of 4 partitions: {out}");
    for line in repartition {
        let committed = line.split_whitespace().nth(2).unwrap_or_default();
        assert!(committed.parse::<i64>().is_ok(), "no committed offset: {line}");
    }
    let journal = format!("kafka:{}-transfer-journal", s.group);
    let (code, out, err) = tokio::task::block_in_place(|| {
        run_cli(&["journal", "replay", "--journal", &journal, "--brokers", &s.brokers, "--format", "json"])
    });
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), transfers.len(), "one state per transfer: {out}");
    let (code, out, err) = tokio::task::block_in_place(|| cli("reset", &[]));
    assert_eq!(code, 0, "{err}");
    for stage in ["bank", "transfer"] {
        assert!(out.contains(&format!("deleted journal {}-{stage}-journal", s.group)), "{stage}: {out}");
        assert!(out.contains(&format!("deleted repartition topic {}-{stage}-commands", s.group)), "{stage}: {out}");
    }
    let (_, out, _) = tokio::task::block_in_place(|| cli("describe", &[]));
    assert!(!out.contains("-transfer-commands") && !out.contains("-transfer-journal"), "{out}");
}

/// Transfers whose withdrawal is not answered within 1 ms (nearly all: the answer takes at least
/// two commits) are rejected as timed out by their durable timer; each late withdrawal that took
/// the money gives it back, so money is conserved, and each transfer still has one reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_whose_withdrawal_is_late_times_out_and_the_late_money_goes_back() {
    let s = setup(4).await;
    let (transfers_topic, opened, bank) = transfer_setup(&s, 4).await;
    let transfers = transfers(60, 10, 30, 11);
    let (books, metrics) =
        transfers_in_process(&s, &transfers_topic, bank.len(), &transfers, Duration::from_millis(1)).await;
    check_books(&books, &transfers, &opened, 800);
    let timed_out =
        books.replies.values().filter(|r| r[0].error.as_deref().is_some_and(|e| e.contains("did not answer"))).count();
    let fired: u64 = metrics.iter().map(|(_, m)| m.timers_fired).sum();
    assert!(timed_out > 30 && fired as usize >= timed_out, "{timed_out} timed out, {fired} timers fired: {metrics:?}");
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

/// Feeds `transfers` in chunks of `chunk` every `every` until they are all sent or `stop` is set;
/// returns how many it sent.
fn transfer_feeder(
    s: &Setup,
    topic: &str,
    transfers: &[WireTransfer],
    chunk: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let (b, t, all) = (s.brokers.clone(), topic.to_string(), transfers.to_vec());
    std::thread::spawn(move || {
        let mut sent = 0;
        for part in all.chunks(chunk) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            feed_transfers(&b, &t, part);
            sent += part.len();
            std::thread::sleep(every);
        }
        sent
    })
}

/// The money the bank commands brought in, from their replies (each read exactly once): the
/// accepted deposits minus the accepted withdrawals.
fn money_in(s: &Setup, cmds: &[(String, String, BankCommand)]) -> i128 {
    let ids: BTreeSet<&str> = cmds.iter().map(|(_, id, _)| id.as_str()).collect();
    let done = |recs: &[Rec]| {
        let seen: BTreeSet<String> = recs
            .iter()
            .filter_map(|r| serde_json::from_slice::<WireReply>(r.value.as_deref()?).ok())
            .map(|r| r.id)
            .collect();
        ids.iter().all(|id| seen.contains(*id))
    };
    let mut replies: BTreeMap<String, Vec<WireReply>> = BTreeMap::new();
    for r in read_committed(&s.brokers, &s.topics.replies, done, Duration::from_secs(2)) {
        let reply: WireReply = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        replies.entry(reply.id.clone()).or_default().push(reply);
    }
    assert_eq!(replies.len(), cmds.len(), "bank replies to commands never sent (a transfer's step answered?)");
    cmds.iter()
        .map(|(_, id, cmd)| {
            let replies = &replies[id];
            assert_eq!(replies.len(), 1, "bank command {id}: {replies:?}");
            match (replies[0].ok, cmd) {
                (true, BankCommand::Deposit(a)) => i128::from(*a),
                (true, BankCommand::Withdraw(a)) => -i128::from(*a),
                _ => 0,
            }
        })
        .sum()
}

/// Two instances of the transfer application (`demo --transfers`) in one group while bank
/// commands and transfers keep coming; one of them is SIGKILLed at a random moment, the survivor
/// takes its partitions (its committed offsets move on every partition of both inputs), then the
/// victim comes back and they move again; three rounds. Read back from the committed topics:
/// every transfer ended exactly once, every bank command has one reply, no balance below zero,
/// and the balances add up to what the bank commands brought in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_of_two_transfer_instances_conserves_money_and_ends_every_transfer_once() {
    transfer_crash_loop(false).await;
}

/// The same with a local state store per instance and a state cache of 4 KiB: both stages evict
/// keys on every commit and read them back (routed steps and fired timers included) while
/// partitions move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_of_two_transfer_instances_with_small_state_caches_conserves_money() {
    transfer_crash_loop(true).await;
}

async fn transfer_crash_loop(stores: bool) {
    let s = setup(4).await;
    let (transfers_topic, opened, history) = transfer_setup(&s, 4).await;
    let logs = tempfile::tempdir().unwrap();
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Deposits and withdrawals on the open accounts, beside transfers between all ten.
    let chaos = bank_chaos(3000, &mut rng);
    let transfers = transfers(3000, 10, 25, seed);
    let mut args = kafka_journal(&s, "50ms");
    // A withdrawal late by more than 300 ms (its partition moving after a kill) times out the
    // transfer, and the late withdrawal is given back.
    args.extend(["--transfers", &transfers_topic, "--transfer-timeout", "300ms"].map(String::from));
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let args = |slot: usize| {
        let mut args = args.clone();
        if stores {
            let dir = dirs[slot].path().display().to_string();
            args.extend(
                ["--state-dir", &dir, "--state-cache", "4KiB", "--checkpoint-interval", "200ms"].map(String::from),
            );
        }
        args
    };
    let slots = [unique("txn-a"), unique("txn-b")];
    let mut demos: Vec<Option<Demo>> =
        (0..2).map(|slot| Some(Demo::start(&s, &slots[slot], &args(slot), logs.path()))).collect();
    accounts_open(&s, history.len()).await;
    let load = Load::start(&s, &transfers_topic, &history, chaos, &transfers, 5);
    for round in 0..3 {
        let victim = round % 2;
        std::thread::sleep(Duration::from_millis(rng.random_range(200..2000)));
        demos[victim].take().unwrap().kill();
        let (b, g) = (s.brokers.clone(), s.group.clone());
        let inputs = [s.topics.input.clone(), transfers_topic.clone()];
        tokio::task::spawn_blocking(move || {
            for t in &inputs {
                let mut at_kill = None;
                wait_for("the group's committed offsets", DEADLINE, || {
                    at_kill = committed(&b, &g, t, 4);
                    at_kill.is_some()
                });
                let at_kill = at_kill.unwrap_or_default();
                wait_for(
                    &format!("round {round} (seed {seed}): the survivor to commit on every partition of {t}"),
                    DEADLINE * 2,
                    || {
                        committed(&b, &g, t, 4)
                            .is_some_and(|now| now.iter().zip(&at_kill).all(|(now, then)| now > then))
                    },
                );
            }
        })
        .await
        .unwrap();
        demos[victim] = Some(Demo::start(&s, &slots[victim], &args(victim), logs.path()));
    }
    let (books, money) = load.finish().await;
    let drained: Vec<String> = demos.into_iter().flatten().map(Demo::drain).collect();
    if stores {
        // The stages read evicted keys back from their stores: "<n> read from the local store".
        let reads: u64 = drained
            .iter()
            .flat_map(|out| out.lines().filter(|l| l.starts_with("state:")))
            .filter_map(|l| l.split(" read from the local store").next()?.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(reads > 0, "no key was read back from a local store: {drained:?}");
    }
    let timed_out =
        books.replies.values().filter(|r| r[0].error.as_deref().is_some_and(|e| e.contains("did not answer"))).count();
    eprintln!(
        "seed {seed}: {} transfers ended, money {money}, {} completed, {} refunded, {timed_out} timed out",
        books.replies.len(),
        books.replies.values().filter(|r| r[0].status == "completed").count(),
        books.replies.values().filter(|r| r[0].status == "refunded").count()
    );
    check_books(&books, &transfers, &opened, money);
}

/// On three brokers (replication factor 3, min.insync.replicas 2), while bank commands and
/// transfers flow through the transfer application, the leader of the bank's repartition topic's
/// partition 0, then the bank stage's transaction coordinator, then the group coordinator are
/// SIGKILLed and restarted, one at a time: the stages heal by themselves, every transfer ends
/// exactly once and money is conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transfer_application_survives_losing_brokers_on_three_nodes() {
    use crate::kafka::{coordinator, leader};
    use crate::util::broker::{own_cluster, Settings};
    let mut cluster = own_cluster(Settings::three());
    let s = crate::flow::setup_on(cluster.bootstrap(), 2).await;
    let (transfers_topic, opened, history) = transfer_setup(&s, 2).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let chaos = bank_chaos(4000, &mut rng);
    let transfers = transfers(4000, 10, 25, 5);
    let txn = unique("txn");
    let app = transfer_app(&s.brokers, &s.group, s.topics.clone(), &transfers_topic, Duration::from_secs(5));
    let app = eventstage::stages::transfer_flow::TransferApp {
        bank: app.bank.journal_topic(&s.journal),
        transfers: app.transfers,
        app: app.app.transactional_id(&txn),
    };
    let running = app.into_application().start().await.expect("the application starts");
    accounts_open(&s, history.len()).await;
    let load = Load::start(&s, &transfers_topic, &history, chaos, &transfers, 10);
    // Progress: the stages' inputs taken and a commit since, within a deadline.
    let progress = |running: &eventstage::flow::Running, what: String| {
        let before: Vec<(u64, u64)> = running.metrics().iter().map(|(_, m)| (m.records_in, m.transactions)).collect();
        let statuses = running.statuses();
        async move {
            let end = std::time::Instant::now() + DEADLINE * 3;
            loop {
                let now: Vec<(u64, u64)> =
                    statuses.iter().map(|(_, s)| (s.metrics().records_in, s.metrics().transactions)).collect();
                if now.iter().zip(&before).all(|(n, b)| n.0 >= b.0 + 100 && n.1 > b.1) {
                    return;
                }
                assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    progress(&running, "the application to run".into()).await;
    let repartition = commands_topic(&s.group, "bank");
    let victims = [
        ("the leader of the bank's repartition topic", "", repartition),
        ("the bank stage's transaction coordinator", "__transaction_state", format!("{txn}-bank")),
        ("the group coordinator", "__consumer_offsets", s.group.clone()),
    ];
    for (what, internal, key) in victims {
        let b = s.brokers.clone();
        let id = tokio::task::spawn_blocking(move || match internal {
            "" => leader(&b, &key, 0),
            internal => coordinator(&b, internal, &key),
        })
        .await
        .unwrap();
        let node = cluster.node_of_broker(id).unwrap_or_else(|| panic!("{what} is broker {id}"));
        cluster.kill_node(node);
        eprintln!("killed broker {id}, {what}");
        progress(&running, format!("progress without {what}")).await;
        cluster.restart_node(node).unwrap();
        let c = &cluster;
        tokio::task::block_in_place(|| {
            c.wait_ready().unwrap();
            c.wait_in_sync(DEADLINE * 2).unwrap();
        });
    }
    let (books, money) = load.finish().await;
    running.drain_and_shutdown().await.expect("drains");
    check_books(&books, &transfers, &opened, money);
}

/// A stage routes commands to other keys of its own, at least once: every accepted deposit to an
/// account also routes a fee of 1 to the account `fees`. With no crash, each routed command is
/// handled once: `fees` has one deposit event per accepted deposit, and the bank's replies are
/// its own commands' only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_routes_to_its_own_keys_at_least_once() {
    use eventstage::stages::bank::Bank;
    use eventstage::stages::bank_flow;
    let s = setup(4).await;
    let app = Application::new(&s.brokers, &s.group);
    let to_bank = app.to::<Bank>();
    let topics = s.topics.clone();
    let flow = app
        .flow(Bank, [s.topics.input.as_str()])
        .decoder(bank_flow::decode)
        .guarantee(eventstage::flow::Guarantee::AtLeastOnce)
        .outputs(move |p| match p.sender() {
            Some(_) => bank_flow::outputs(&topics, p).split_off(1),
            None => bank_flow::outputs(&topics, p),
        })
        .route(move |p| match (p.sender(), p.events.first()) {
            (None, Some(BankEvent::Deposited { .. })) => {
                vec![to_bank.command(&"fees".to_string(), &BankCommand::Deposit(1))]
            }
            _ => vec![],
        });
    let running = app.stage(flow).start().await.expect("starts");
    let mut cmds = vec![("fees".to_string(), "open-fees".to_string(), BankCommand::Open)];
    cmds.extend((0..8).map(|i| (format!("acct-{i}"), format!("open-{i}"), BankCommand::Open)));
    feed(&s.brokers, &s.topics.input, &cmds);
    accounts_open(&s, cmds.len()).await;
    let deposits: Vec<_> =
        (0..400).map(|i| (format!("acct-{}", i % 8), format!("dep-{i}"), BankCommand::Deposit(5))).collect();
    feed(&s.brokers, &s.topics.input, &deposits);
    let fees = {
        let (b, t) = (s.brokers.clone(), s.topics.events.clone());
        let fee = |r: &Rec| {
            r.key.as_deref() == Some(b"fees".as_slice())
                && r.value.as_deref() == Some(br#"{"Deposited":{"amount":1}}"#.as_slice())
        };
        tokio::task::spawn_blocking(move || {
            read_committed(&b, &t, |r| r.iter().filter(|r| fee(r)).count() >= 400, Duration::from_secs(2))
        })
        .await
        .unwrap()
        .iter()
        .filter(|r| fee(r))
        .count()
    };
    let replies =
        read_committed(&s.brokers, &s.topics.replies, |r| r.len() >= cmds.len() + 400, Duration::from_secs(1));
    running.drain_and_shutdown().await.expect("drains");
    assert_eq!(fees, 400, "one fee per deposit");
    assert_eq!(replies.len(), cmds.len() + 400, "replies to the bank's own commands only");
}
