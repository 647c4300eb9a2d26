//! The stage runtime: replay = live (invariant 1), group commit, durability, back-pressure,
//! shutdown, snapshots, positions, failures.

use crate::util::{wait_until, Gated};
use eventstage::journal::{
    Batch, CodecId, Envelope, EventRecord, Journal, MemoryJournal, SeqNo, SledJournal, SnapshotRecord, SourcePosition,
};
use eventstage::stages::bank::{Account, Bank, BankCommand, BankRejection};
use eventstage::stages::inventory::{self, Inventory, InventoryEvent, Stock};
use eventstage::{Codec, Durability, Effect, Error, EventSourced, RuntimeConfig, StageRuntime};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use tempfile::TempDir;

/// The reference model of the bank, written independently of the stage: a plain fold per key.
pub(crate) fn model(account: &mut Account, cmd: BankCommand) -> Result<u64, BankRejection> {
    match (account.open, cmd) {
        (true, BankCommand::Open) => Err(BankRejection::AlreadyOpen),
        (false, BankCommand::Open) => {
            account.open = true;
            Ok(account.balance)
        }
        (false, _) => Err(BankRejection::NotOpen),
        (true, BankCommand::Deposit(n)) => {
            account.balance = account.balance.checked_add(n).ok_or(BankRejection::Overflow)?;
            Ok(account.balance)
        }
        (true, BankCommand::Withdraw(n)) if n > account.balance => {
            Err(BankRejection::InsufficientFunds { balance: account.balance, requested: n })
        }
        (true, BankCommand::Withdraw(n)) => {
            account.balance -= n;
            Ok(account.balance)
        }
        (true, BankCommand::Close) if account.balance > 0 => {
            Err(BankRejection::NonZeroBalance { balance: account.balance })
        }
        (true, BankCommand::Close) => {
            account.open = false;
            Ok(0)
        }
    }
}

fn bank_command() -> impl Strategy<Value = BankCommand> {
    prop_oneof![
        1 => Just(BankCommand::Open),
        3 => (1u64..500).prop_map(BankCommand::Deposit),
        2 => (1u64..500).prop_map(BankCommand::Withdraw),
        1 => Just(BankCommand::Close),
    ]
}

fn plain<S: Clone>(m: BTreeMap<String, Arc<S>>) -> BTreeMap<String, S> {
    m.into_iter().map(|(k, v)| (k, S::clone(&v))).collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Invariant 1 on sled: every reply equals the reference model, and the state rebuilt on reopen
    /// (snapshots + tails, for any snapshot interval and batch size) equals the live state and the model.
    /// With a state cache of a few entries, keys leave memory all the time and are read back from
    /// the journal: the same replies and states.
    #[test]
    fn replay_equals_live_and_model(cmds in proptest::collection::vec((0u8..6, bank_command()), 1..200),
                                    snapshot_every in 0u64..6, max_batch in 1usize..50,
                                    cache in proptest::option::of(1u64..600)) {
        rt().block_on(async {
            let dir = TempDir::new().unwrap();
            let mut config = RuntimeConfig::default().snapshot_every(snapshot_every).max_batch(max_batch);
            if let Some(bytes) = cache {
                config = config.state_cache(bytes);
            }
            let stage = StageRuntime::open(Bank, SledJournal::open(dir.path(), "bank").unwrap(), config.clone()).await.unwrap();
            let handle = stage.handle();
            let mut expected: BTreeMap<String, Account> = BTreeMap::new();
            // Sends per key are concurrent across keys but ordered within a key, like a partitioned input.
            let mut per_key: BTreeMap<String, Vec<BankCommand>> = BTreeMap::new();
            for (k, c) in &cmds {
                per_key.entry(format!("acct-{k}")).or_default().push(*c);
            }
            let mut tasks = Vec::new();
            for (key, cmds) in per_key.clone() {
                let handle = handle.clone();
                tasks.push(tokio::spawn(async move {
                    let mut replies = Vec::new();
                    for c in cmds {
                        replies.push(handle.ask(key.clone(), c).await.unwrap());
                    }
                    (key, replies)
                }));
            }
            for t in tasks {
                let (key, replies) = t.await.unwrap();
                let account = expected.entry(key.clone()).or_default();
                for (c, reply) in per_key[&key].iter().zip(replies) {
                    assert_eq!(reply, model(account, *c), "reply to {c:?} on {key}");
                }
            }
            let live = plain(handle.snapshot().await.unwrap());
            for (key, account) in &expected {
                // Keys whose every command was rejected have no events, hence no state.
                assert_eq!(live.get(key).unwrap_or(&Account::default()), account, "live state of {key} equals the model");
            }
            stage.shutdown().await.unwrap();
            let reopened = StageRuntime::open(Bank, SledJournal::open(dir.path(), "bank").unwrap(), config).await.unwrap();
            let h = reopened.handle();
            for key in expected.keys() {
                assert_eq!(h.get(key).await.unwrap().as_deref(), live.get(key), "{key} read back on its own");
            }
            assert_eq!(plain(h.snapshot().await.unwrap()), live, "replayed state equals live state");
            assert_eq!(h.len().await.unwrap(), live.len());
            reopened.shutdown().await.unwrap();
        });
    }
}

#[tokio::test]
async fn group_commit_and_durable_replies() {
    let journal = Gated::new(MemoryJournal::new("bank"));
    let stage = StageRuntime::open(Bank, journal.clone(), RuntimeConfig::default()).await.unwrap();
    let handle = stage.handle();
    journal.close_gate();
    let first = tokio::spawn({
        let h = handle.clone();
        async move { h.ask("a".into(), BankCommand::Open).await }
    });
    wait_until("the first batch to be appended", || journal.appends.load(std::sync::atomic::Ordering::SeqCst) == 1)
        .await;
    // Appended but not flushed: no reply yet, and queries do not see the state either.
    assert!(!first.is_finished());
    assert!(handle.get(&"a".to_string()).await.unwrap().is_none());
    let mut rest = Vec::new();
    for i in 0..99 {
        let h = handle.clone();
        rest.push(tokio::spawn(async move { h.ask(format!("k{i}"), BankCommand::Open).await }));
    }
    wait_until("99 commands to queue behind the flush", || handle.queue_depth() == 99).await;
    journal.open_gate();
    assert_eq!(first.await.unwrap().unwrap(), Ok(0));
    for r in rest {
        assert_eq!(r.await.unwrap().unwrap(), Ok(0));
    }
    let stats = journal.inner.stats().await.unwrap();
    assert_eq!((stats.events, stats.batches), (100, 2), "99 queued commands were committed by one write");
    assert_eq!(journal.flushes.load(std::sync::atomic::Ordering::SeqCst), 2);
    stage.shutdown().await.unwrap();
}

#[tokio::test]
async fn buffered_replies_do_not_wait_for_flush() {
    let journal = Gated::new(MemoryJournal::new("bank"));
    journal.close_gate();
    let config = RuntimeConfig::default().durability(Durability::Buffered);
    let stage = StageRuntime::open(Bank, journal.clone(), config).await.unwrap();
    assert_eq!(stage.handle().ask("a".into(), BankCommand::Open).await.unwrap(), Ok(0));
    assert_eq!(journal.flushes.load(std::sync::atomic::Ordering::SeqCst), 0);
    journal.open_gate();
    stage.shutdown().await.unwrap();
}

#[tokio::test]
async fn back_pressure_bounds_the_queue_and_shutdown_drains_it() {
    let journal = Gated::new(MemoryJournal::new("bank"));
    let config = RuntimeConfig::default().queue_capacity(4).max_batch(2);
    let stage = StageRuntime::open(Bank, journal.clone(), config).await.unwrap();
    let handle = stage.handle();
    journal.close_gate();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move { h.ask(format!("k{i}"), BankCommand::Open).await }));
    }
    wait_until("the queue to fill", || handle.queue_depth() == 4).await;
    // 2 commands in the writer (blocked in flush), 4 queued, 14 callers waiting to enqueue.
    tokio::task::yield_now().await;
    assert_eq!(handle.queue_depth(), 4, "the queue never grows past its capacity");
    assert!(tasks.iter().all(|t| !t.is_finished()));
    let shutdown = tokio::spawn(stage.shutdown());
    journal.open_gate();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(Ok(_)) => ok += 1,
            Err(Error::Closed(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    shutdown.await.unwrap().unwrap();
    let stats = journal.inner.stats().await.unwrap();
    assert_eq!(stats.events, ok, "every acknowledged command is in the journal, and only those");
    assert!(ok >= 6, "commands queued before shutdown are finished, not dropped ({ok})");
    assert!(matches!(handle.ask("late".into(), BankCommand::Open).await, Err(Error::Closed(_))));
}

#[tokio::test]
async fn snapshots_make_restart_read_snapshot_plus_tail() {
    let dir = TempDir::new().unwrap();
    for (every, snapshots, tail) in [(10u64, 1u64, 6u64), (0, 0, 96)] {
        let path = dir.path().join(format!("every-{every}"));
        let config = RuntimeConfig::default().snapshot_every(every).max_batch(1);
        let stage = StageRuntime::open(Bank, SledJournal::open(&path, "bank").unwrap(), config.clone()).await.unwrap();
        let h = stage.handle();
        h.ask("a".into(), BankCommand::Open).await.unwrap().unwrap();
        for _ in 0..95 {
            h.ask("a".into(), BankCommand::Deposit(2)).await.unwrap().unwrap();
        }
        stage.shutdown().await.unwrap();
        let stage = StageRuntime::open(Bank, SledJournal::open(&path, "bank").unwrap(), config).await.unwrap();
        let rec = stage.recovery();
        assert_eq!((rec.keys, rec.snapshots, rec.events), (1, snapshots, tail), "snapshot_every {every}");
        assert_eq!(*stage.handle().get(&"a".into()).await.unwrap().unwrap(), Account { open: true, balance: 190 });
        assert_eq!(stage.handle().seq(&"a".into()).await.unwrap(), SeqNo(96));
        stage.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn positions_are_stored_with_their_batch_and_read_on_open() {
    let dir = TempDir::new().unwrap();
    let pos = |p, o| SourcePosition { topic: "bank-commands".into(), partition: p, next_offset: o };
    let stage = StageRuntime::open(Bank, SledJournal::open(dir.path(), "bank").unwrap(), RuntimeConfig::default())
        .await
        .unwrap();
    let h = stage.handle();
    assert_eq!(h.ask_at("a".into(), BankCommand::Open, pos(0, 1)).await.unwrap(), Ok(0));
    assert_eq!(h.ask_at("b".into(), BankCommand::Open, pos(1, 8)).await.unwrap(), Ok(0));
    // A rejected command consumed its input too: its position is stored although it wrote no event.
    assert!(h.ask_at("a".into(), BankCommand::Open, pos(0, 2)).await.unwrap().is_err());
    stage.shutdown().await.unwrap();
    let stage = StageRuntime::open(Bank, SledJournal::open(dir.path(), "bank").unwrap(), RuntimeConfig::default())
        .await
        .unwrap();
    assert_eq!(stage.positions(), &[pos(0, 2), pos(1, 8)]);
    stage.shutdown().await.unwrap();
}

/// `StageRuntime::open_sled` opens the sled journal named after the stage: the same journal
/// `SledJournal::open(path, S::NAME)` opens, and the one the CLI finds by the stage's name.
#[tokio::test]
async fn open_sled_names_the_journal_after_the_stage() {
    let dir = TempDir::new().unwrap();
    let stage = StageRuntime::open_sled(Bank, dir.path(), RuntimeConfig::default()).await.unwrap();
    assert_eq!(stage.handle().ask("a".into(), BankCommand::Open).await.unwrap(), Ok(0));
    stage.shutdown().await.unwrap();
    let stage = StageRuntime::open(Bank, SledJournal::open(dir.path(), Bank::NAME).unwrap(), RuntimeConfig::default())
        .await
        .unwrap();
    assert_eq!(stage.recovery().events, 1);
    stage.shutdown().await.unwrap();
    assert_eq!(eventstage::journal::SledStore::open(dir.path()).unwrap().journal_names(), ["bank"]);
    let stage = StageRuntime::open_sled(Bank, dir.path(), RuntimeConfig::default()).await.unwrap();
    assert_eq!(*stage.handle().get(&"a".into()).await.unwrap().unwrap(), Account { open: true, balance: 0 });
    stage.shutdown().await.unwrap();
    // Not a store: the journal's error.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        StageRuntime::open_sled(Bank, &file, RuntimeConfig::default()).await,
        Err(eventstage::Error::Journal(_))
    ));
}

/// A stage whose handler panics on one command.
struct Fragile;

impl EventSourced for Fragile {
    const NAME: &'static str = "fragile";
    type Key = String;
    type Command = i32;
    type Event = i32;
    type State = i32;
    type Reply = i32;
    type Rejection = String;

    fn handle(&self, _: &i32, c: i32) -> Result<Effect<Self>, String> {
        assert!(c != 13, "unlucky command");
        Ok(Effect::persist([c]).then_reply(|s: &i32| *s))
    }

    fn apply(s: &mut i32, e: &i32) {
        *s += e;
    }
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_command() {
    let stage = StageRuntime::open(Fragile, MemoryJournal::new("fragile"), RuntimeConfig::default()).await.unwrap();
    let h = stage.handle();
    let (a, b, c) = tokio::join!(h.ask("k".into(), 1), h.ask("k".into(), 13), h.ask("k".into(), 2));
    assert_eq!(a.unwrap(), Ok(1));
    assert!(matches!(b, Err(Error::HandlerPanicked { ref message, .. }) if message.contains("unlucky")), "{b:?}");
    assert_eq!(c.unwrap(), Ok(3));
    assert_eq!(*h.get(&"k".into()).await.unwrap().unwrap(), 3);
    stage.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_journal_failure_stops_the_stage() {
    let journal = Gated::new(MemoryJournal::new("bank"));
    let stage = StageRuntime::open(Bank, journal.clone(), RuntimeConfig::default()).await.unwrap();
    let h = stage.handle();
    h.ask("a".into(), BankCommand::Open).await.unwrap().unwrap();
    journal.fail_appends();
    let err = h.ask("a".into(), BankCommand::Deposit(5)).await.unwrap_err();
    assert!(matches!(err, Error::Stopped { ref cause, .. } if cause.contains("disk on fire")), "{err}");
    assert!(err.is_fatal());
    let again = h.ask("a".into(), BankCommand::Deposit(5)).await.unwrap_err();
    assert!(again.to_string().contains("reopen it to recover"), "{again}");
    assert_eq!(h.get(&"a".into()).await.unwrap().unwrap().balance, 0, "the failed batch never became state");
}

fn record(key: &str, seq: u64, version: u16, payload: Vec<u8>) -> EventRecord {
    EventRecord {
        key: key.as_bytes().to_vec(),
        seq: SeqNo(seq),
        envelope: Envelope::event(CodecId::BINCODE, version, 0, payload),
    }
}

#[tokio::test]
async fn old_event_versions_are_upcast_on_replay() {
    let journal = MemoryJournal::new("inventory");
    let v1 = |e: inventory::v1::InventoryEvent| Codec::Bincode.encode(&e).unwrap();
    let old = vec![
        record("sku-1", 1, 1, v1(inventory::v1::InventoryEvent::Restocked { qty: 10 })),
        record("sku-1", 2, 1, v1(inventory::v1::InventoryEvent::Reserved { order: "o1".into(), qty: 3 })),
    ];
    journal.append(Batch { events: old, ..Batch::default() }).await.unwrap();
    let stage = StageRuntime::open(Inventory, journal.clone(), RuntimeConfig::default()).await.unwrap();
    let stock = stage.handle().get(&"sku-1".into()).await.unwrap().unwrap();
    assert_eq!((stock.on_hand, stock.available()), (10, 7));
    let levels = stage
        .handle()
        .ask("sku-1".into(), inventory::InventoryCommand::Ship { order: "o1".into() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((levels.on_hand, levels.available), (7, 7));
    stage.shutdown().await.unwrap();
    let all = eventstage_journal::testkit::collect_events(&journal, Default::default()).await;
    assert_eq!(
        all.iter().map(|e| e.envelope.type_version).collect::<Vec<_>>(),
        vec![1, 1, 2],
        "new events are written as v2"
    );
    let reopened = StageRuntime::open(Inventory, journal, RuntimeConfig::default()).await.unwrap();
    assert_eq!(reopened.handle().get(&"sku-1".into()).await.unwrap().unwrap().on_hand, 7);
    let _: InventoryEvent = Inventory::upcast(2, Codec::Bincode, &all[2].envelope.payload).unwrap();
    reopened.shutdown().await.unwrap();
}

#[tokio::test]
async fn snapshots_of_another_state_version_are_ignored() {
    let journal = MemoryJournal::new("inventory");
    let ev = |e: InventoryEvent| Codec::Bincode.encode(&e).unwrap();
    let bogus = SnapshotRecord {
        key: b"sku".to_vec(),
        seq: SeqNo(2),
        envelope: Envelope::snapshot(CodecId::BINCODE, 99, 0, b"not a Stock".to_vec()),
    };
    let batch = Batch {
        events: vec![
            record("sku", 1, 2, ev(InventoryEvent::Restocked { qty: 4 })),
            record("sku", 2, 2, ev(InventoryEvent::Restocked { qty: 5 })),
        ],
        snapshots: vec![bogus],
        ..Batch::default()
    };
    journal.append(batch).await.unwrap();
    let stage = StageRuntime::open(Inventory, journal, RuntimeConfig::default()).await.unwrap();
    assert_eq!(
        *stage.handle().get(&"sku".into()).await.unwrap().unwrap(),
        Stock { on_hand: 9, reservations: Default::default() }
    );
    stage.shutdown().await.unwrap();
}

#[tokio::test]
async fn undecodable_events_stop_recovery_with_their_location() {
    let journal = MemoryJournal::new("bank");
    let good = Codec::Bincode.encode(&eventstage::stages::bank::BankEvent::Opened).unwrap();
    journal
        .append(Batch {
            events: vec![record("a", 1, 1, good), record("a", 2, 1, vec![0xff, 0xfe, 0xfd])],
            ..Batch::default()
        })
        .await
        .unwrap();
    let err = StageRuntime::open(Bank, journal, RuntimeConfig::default()).await.unwrap_err();
    assert!(matches!(err, Error::Decode { ref key, seq: 2, .. } if key == "a"), "{err}");
    assert!(err.to_string().contains("upcast"), "the message says what to do: {err}");
}

/// A runtime with a state cache on sled: nothing is read on open, a key is read (latest snapshot
/// and tail) when first used, keys evicted all the time come back right, and the queries over
/// all keys read the journal.
#[test]
fn a_state_cache_reads_keys_when_first_used() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    const KEYS: usize = 2_000;
    const TASKS: usize = 16;
    rt().block_on(async {
        let dir = TempDir::new().unwrap();
        // About 25 keys fit: nearly every command misses and reads its key from the journal.
        let config = RuntimeConfig::default().snapshot_every(4).state_cache(4 << 10);
        let stage = StageRuntime::open_sled(Bank, dir.path(), config.clone()).await.unwrap();
        let h = stage.handle();
        let key = |k: usize| format!("acct-{k:04}");
        // Each task owns the keys `k % TASKS == t`, so its replies follow its own model in order.
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(t as u64);
                let mut model_of: BTreeMap<String, Account> = BTreeMap::new();
                for i in 0..600 {
                    let k = key(rng.random_range(0..KEYS / TASKS) * TASKS + t);
                    let cmd =
                        if i % 5 == 0 { BankCommand::Open } else { BankCommand::Deposit(rng.random_range(1..100)) };
                    let reply = h.ask(k.clone(), cmd).await.unwrap();
                    assert_eq!(reply, model(model_of.entry(k.clone()).or_default(), cmd), "{cmd:?} on {k}");
                }
                model_of
            }));
        }
        let mut expected = BTreeMap::new();
        for t in tasks {
            expected.extend(t.await.unwrap().into_iter().filter(|(_, a)| a.open));
        }
        let stats = h.cache_stats().expect("a state cache");
        assert!(stats.evictions > 1_000 && stats.misses > 5_000, "keys left memory and came back: {stats:?}");
        assert!(stats.bytes <= stats.budget && stats.entries > 0, "{stats:?}");
        assert_eq!(plain(h.snapshot().await.unwrap()), expected, "the journal's state is the model's");
        let range = key(100)..key(400);
        let in_range: Vec<_> = expected.range(range.clone()).map(|(k, a)| (k.clone(), a.clone())).collect();
        let got: Vec<_> = h.range(range).await.unwrap().into_iter().map(|(k, a)| (k, Account::clone(&a))).collect();
        assert_eq!(got, in_range);
        assert_eq!(h.len().await.unwrap(), expected.len());
        stage.shutdown().await.unwrap();

        // A restart reads nothing; every key comes back on first use, commands go on from it.
        let reopened = StageRuntime::open_sled(Bank, dir.path(), config).await.unwrap();
        let rec = reopened.recovery();
        assert_eq!((rec.keys, rec.snapshots, rec.events), (0, 0, 0));
        let h = reopened.handle();
        for (k, account) in expected.iter().rev() {
            assert_eq!(h.get(k).await.unwrap().as_deref(), Some(account), "{k}");
        }
        assert_eq!(h.get(&key(KEYS)).await.unwrap(), None, "a key without events has no state");
        for (k, account) in expected.iter_mut().step_by(7) {
            let reply = h.ask(k.clone(), BankCommand::Deposit(1)).await.unwrap();
            assert_eq!(reply, model(account, BankCommand::Deposit(1)), "{k}");
        }
        reopened.shutdown().await.unwrap();
        let all = StageRuntime::open_sled(Bank, dir.path(), RuntimeConfig::default()).await.unwrap();
        assert_eq!(plain(all.handle().snapshot().await.unwrap()), expected, "a full recovery agrees");
        all.shutdown().await.unwrap();
    });
}

/// With a state cache, a key whose records do not decode fails its own commands and queries
/// ([`Error::Unreadable`], the decode error), not the stage: the other keys go on, and nothing is
/// written for the broken key.
#[tokio::test]
async fn a_state_cache_fails_only_the_commands_of_a_key_it_cannot_read() {
    let journal = MemoryJournal::new("bank");
    let opened = Codec::Bincode.encode(&eventstage::stages::bank::BankEvent::Opened).unwrap();
    let events =
        vec![record("a", 1, 1, opened.clone()), record("a", 2, 1, vec![0xff, 0xfe]), record("b", 1, 1, opened)];
    journal.append(Batch { events, ..Batch::default() }).await.unwrap();
    let stage = StageRuntime::open(Bank, journal.clone(), RuntimeConfig::default().state_cache(1 << 20)).await.unwrap();
    let h = stage.handle();
    let (a, b) = tokio::join!(h.ask("a".into(), BankCommand::Deposit(5)), h.ask("b".into(), BankCommand::Deposit(5)));
    let err = a.unwrap_err();
    assert!(matches!(err, Error::Unreadable { ref key, .. } if key == "a"), "{err}");
    assert!(err.to_string().contains("journal verify"), "the message says what to do: {err}");
    assert_eq!(b.unwrap(), Ok(5));
    let err = h.get(&"a".into()).await.unwrap_err();
    assert!(matches!(err, Error::Decode { ref key, seq: 2, .. } if key == "a"), "{err}");
    assert!(h.snapshot().await.is_err(), "a snapshot of every key cannot leave one out");
    assert_eq!(h.get(&"b".into()).await.unwrap().unwrap().balance, 5);
    assert_eq!(h.cache_stats().unwrap().evictions, 0, "a key's newer state replacing its older one is no eviction");
    stage.shutdown().await.unwrap();
    let stats = journal.stats().await.unwrap();
    assert_eq!((stats.events, stats.batches), (4, 2), "only b's deposit was written");
}

/// With a state cache, a reader that does not find a key in memory reads the journal, but never
/// a batch the journal has not made durable yet: it waits for the batch's flush.
#[tokio::test]
async fn a_state_cache_never_reads_a_batch_before_it_is_durable() {
    let journal = Gated::new(MemoryJournal::new("bank"));
    let stage = StageRuntime::open(Bank, journal.clone(), RuntimeConfig::default().state_cache(1 << 20)).await.unwrap();
    let h = stage.handle();
    journal.close_gate();
    let open = tokio::spawn({
        let h = h.clone();
        async move { h.ask("c".into(), BankCommand::Open).await }
    });
    wait_until("the batch to be appended", || journal.appends.load(std::sync::atomic::Ordering::SeqCst) == 1).await;
    // The journal has c's event, not yet flushed: a query must not return it (nor anything else
    // that could be rolled back) while the flush is held.
    let read = tokio::time::timeout(std::time::Duration::from_millis(300), h.get(&"c".into())).await;
    assert!(read.is_err(), "a query returned a state the journal had not made durable: {read:?}");
    journal.open_gate();
    assert_eq!(open.await.unwrap().unwrap(), Ok(0));
    assert!(h.get(&"c".into()).await.unwrap().unwrap().open);
    stage.shutdown().await.unwrap();
}
