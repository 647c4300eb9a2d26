//! Issue 26: interactive queries. Two instances of the demo flow answer `GET /state/bank/{key}`
//! for every key whichever is asked, while commands flow and after one is SIGKILLed; every
//! answer is a state the key really had, never older than one answered before.

use crate::crash::Demo;
use crate::flow::{await_replies, expected, feed_async, setup, workload};
use crate::kafka::{feeder, kafka_journal};
use crate::runtime::model;
use crate::util::broker::unique;
use crate::util::{run_cli, DEADLINE};
use eventstage::stages::bank::{Account, BankCommand};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A GET: (status, the Retry-After header, the body as JSON).
fn get(addr: &str, path: &str) -> (u16, Option<String>, Value) {
    let (code, head, body) = crate::util::http_get(addr, path);
    let retry =
        head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().to_string()));
    (code, retry, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Every state each account had, in order (the default first: no state).
fn histories(cmds: &[(String, String, BankCommand)]) -> BTreeMap<String, Vec<Account>> {
    let mut out: BTreeMap<String, Vec<Account>> = BTreeMap::new();
    let mut now: BTreeMap<String, Account> = BTreeMap::new();
    for (key, _, cmd) in cmds {
        let account = now.entry(key.clone()).or_default();
        if model(account, *cmd).is_ok() {
            let closed = !account.open && account.balance == 0;
            out.entry(key.clone()).or_insert_with(|| vec![Account::default()]).push(if closed {
                Account::default()
            } else {
                account.clone()
            });
        }
    }
    out
}

/// Checks answers against the histories: each is a state the key had, at or after the one the
/// key's previous answer showed.
struct Checker {
    histories: BTreeMap<String, Vec<Account>>,
    seen: BTreeMap<String, usize>,
    answered: u64,
    unavailable: u64,
    routed: u64,
}

impl Checker {
    fn check(&mut self, asked: &str, key: &str, (code, retry, body): (u16, Option<String>, Value)) -> bool {
        let state = match code {
            200 => {
                assert_eq!(body["key"], key, "{body}");
                assert!(body["partition"].as_i64().is_some() && body["seq"].as_u64().is_some_and(|s| s > 0), "{body}");
                if body["served_by"] != asked {
                    self.routed += 1;
                }
                serde_json::from_value::<Account>(body["state"].clone()).unwrap()
            }
            404 => Account::default(),
            503 => {
                assert!(retry.is_some(), "a 503 says when to ask again: {body}");
                self.unavailable += 1;
                return false;
            }
            other => panic!("{key} on {asked}: {other} {body}"),
        };
        self.answered += 1;
        let history = &self.histories[key];
        let from = self.seen.get(key).copied().unwrap_or(0);
        let at = history[from..].iter().position(|s| *s == state).map(|i| from + i).unwrap_or_else(|| {
            panic!("{key} on {asked}: {state:?} is not a state the key had at or after {:?}: {body}", history[from])
        });
        self.seen.insert(key.to_string(), at);
        true
    }
}

/// Issue 26's "done when", each instance keeping every key in memory; the limits table (a
/// compacted topic each instance reads) queried too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_answer_every_key_while_commands_flow_and_after_a_kill() {
    two_instances(false).await;
}

/// The same with a local store and a 4 KiB state cache per instance: keys are evicted on every
/// commit, and queries read them from the local store (never through the flow thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_small_state_cache_queries_read_evicted_keys_from_the_local_store() {
    two_instances(true).await;
}

async fn two_instances(cache: bool) {
    let s = setup(4).await;
    let logs = tempfile::tempdir().unwrap();
    let stores = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // Withdrawal limits no withdrawal reaches, for acct-0..=9: the table is queried, the books
    // are the model's.
    let (_, limits) = crate::table::compacted_topic(4).await;
    let p = crate::util::broker::producer(&s.brokers);
    for i in 0..10u64 {
        crate::util::broker::send(&p, &limits, &format!("acct-{i}"), (1_000_000 + i).to_string().as_bytes());
    }
    crate::util::broker::flush(&p);
    let args = |slot: usize| {
        let mut args = kafka_journal(&s, "50ms");
        args.extend(["--http-addr", "127.0.0.1:0", "--limits", &limits].map(String::from));
        if cache {
            let dir = stores[slot].path().display().to_string();
            args.extend(["--state-dir".to_string(), dir, "--state-cache".into(), "4KiB".into()]);
            // Each instance's store keeps the other's partitions current: stale queries read them.
            args.extend(["--standby", "all"].map(String::from));
        }
        args
    };
    let history = workload(1500, 40, 261);
    // Command ids of their own: replies are matched by id.
    let more: Vec<_> = workload(6000, 40, 262).into_iter().map(|(k, id, c)| (k, format!("more-{id}"), c)).collect();
    let all = [history.as_slice(), &more].concat();
    let (replies, finals) = expected(&all);
    let (first_replies, _) = expected(&history);
    let mut checker =
        Checker { histories: histories(&all), seen: BTreeMap::new(), answered: 0, unavailable: 0, routed: 0 };
    let keys: Vec<String> = checker.histories.keys().cloned().collect();
    let a = Demo::start(&s, &unique("txn-a"), &args(0), logs.path());
    let b = Demo::start(&s, &unique("txn-b"), &args(1), logs.path());
    let (addr_a, addr_b) = (a.http_addr(), b.http_addr());
    feed_async(&s, &history).await;
    await_replies(&s, first_replies).await;

    // At rest: every key, from both instances, as the model says; some answers came from the
    // other instance (the key's partition is not the asked one's).
    let (ka, kb, sa, sb) = (keys.clone(), keys.clone(), addr_a.clone(), addr_b.clone());
    let answers = tokio::task::spawn_blocking(move || {
        let end = Instant::now() + DEADLINE;
        let mut out = Vec::new();
        for (addr, keys) in [(sa, ka), (sb, kb)] {
            for key in keys {
                loop {
                    let answer = get(&addr, &format!("/state/bank/{key}"));
                    if answer.0 != 503 {
                        out.push((addr.clone(), key, answer));
                        break;
                    }
                    assert!(Instant::now() < end, "{key} on {addr}: still 503: {}", answer.2);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        out
    })
    .await
    .unwrap();
    let (_, at_rest) = expected(&history);
    for (addr, key, (code, _, body)) in &answers {
        match at_rest.get(key) {
            Some(account) => {
                assert_eq!(*code, 200, "{key} on {addr}: {body}");
                assert_eq!(serde_json::from_value::<Account>(body["state"].clone()).unwrap(), *account, "{body}");
            }
            None => assert_eq!(*code, 404, "{key} on {addr}: {body}"),
        }
    }
    let served_elsewhere =
        answers.iter().filter(|(addr, _, (c, _, body))| *c == 200 && body["served_by"] != *addr).count();
    assert!(served_elsewhere > 0, "some keys live on the other instance and are forwarded");
    // With the cache, evicted keys were read from the local store; without, all from memory.
    let from_store = answers.iter().filter(|(_, _, (_, _, body))| body["read_from"] == "local store").count();
    if cache {
        assert!(from_store > 0, "a 4 KiB cache keeps few keys: most answers come from the local store");
    } else {
        assert_eq!(from_store, 0);
    }

    // Bad input: 4xx, never a panic; the instance goes on answering.
    let sa = addr_a.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(get(&sa, "/state/nosuch/acct-1").0, 404);
        assert_eq!(get(&sa, &format!("/state/bank/{}", "k".repeat(9000))).0, 414);
        assert_eq!(get(&sa, "/state/bank/%FF%FE").0, 400);
        assert_eq!(get(&sa, "/state/bank?limit=0").0, 400);
        assert_eq!(get(&sa, "/state/bank?limit=x").0, 400);
        assert_eq!(get(&sa, "/state").0, 404);
        assert_eq!(get(&sa, "/nosuch").0, 404);
    })
    .await
    .unwrap();

    // The limits table, from each instance's own copy.
    let (sa, sb, t) = (addr_a.clone(), addr_b.clone(), limits.clone());
    tokio::task::spawn_blocking(move || {
        for addr in [&sa, &sb] {
            let (code, _, v) = get(addr, &format!("/tables/{t}/acct-3"));
            assert_eq!((code, &v["value"]), (200, &serde_json::json!(1_000_003)), "{v}");
            assert_eq!(get(addr, &format!("/tables/{t}/acct-99")).0, 404);
            let (mut keys, mut after) = (Vec::new(), String::new());
            loop {
                let (code, _, page) = get(addr, &format!("/tables/{t}?prefix=acct-&limit=4{after}"));
                assert_eq!(code, 200, "{page}");
                keys.extend(page["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap().to_string()));
                match page["next"].as_str() {
                    Some(next) => after = format!("&after={next}"),
                    None => break,
                }
            }
            let want: Vec<String> = (0..10).map(|i| format!("acct-{i}")).collect();
            assert_eq!(keys, want);
        }
        assert_eq!(get(&sa, "/tables/nosuch/acct-1").0, 404);
    })
    .await
    .unwrap();

    // Prefix scans of each instance's own partitions, paged: together they hold every key with
    // the prefix, each once.
    let (sa, sb) = (addr_a.clone(), addr_b.clone());
    let scanned = tokio::task::spawn_blocking(move || {
        let mut keys = Vec::new();
        for addr in [sa, sb] {
            let mut after = String::new();
            loop {
                let (code, _, page) = get(&addr, &format!("/state/bank?prefix=acct-1&limit=3{after}"));
                assert_eq!(code, 200, "{page}");
                let items = page["items"].as_array().unwrap();
                assert!(items.len() <= 3);
                keys.extend(items.iter().map(|i| i["key"].as_str().unwrap().to_string()));
                match page["next"].as_str() {
                    Some(next) => after = format!("&after={next}"),
                    None => break,
                }
            }
        }
        keys
    })
    .await
    .unwrap();
    let want: Vec<&String> = at_rest.keys().filter(|k| k.starts_with("acct-1")).collect();
    let mut got = scanned.clone();
    got.sort();
    assert_eq!(got.iter().collect::<Vec<_>>(), want, "every key with the prefix once");

    // The CLI finds an instance in the group and asks it.
    let app = |key: &str| ["query", "--brokers", &s.brokers, "--group", &s.group, key].map(String::from);
    let some_key = at_rest.keys().next().unwrap().clone();
    let (cli_ok, cli_none) = (app(&some_key), app("acct-none"));
    let (ok, none) = tokio::task::spawn_blocking(move || {
        fn as_strs(a: &[String; 6]) -> Vec<&str> {
            a.iter().map(String::as_str).collect()
        }
        (run_cli(&as_strs(&cli_ok)), run_cli(&as_strs(&cli_none)))
    })
    .await
    .unwrap();
    assert_eq!(ok.0, 0, "{} {}", ok.1, ok.2);
    let body: Value = serde_json::from_str(ok.1.trim()).unwrap();
    assert_eq!(serde_json::from_value::<Account>(body["state"].clone()).unwrap(), at_rest[&some_key]);
    assert_eq!(none.0, 1, "no state: exit 1: {} {}", none.1, none.2);
    assert!(none.2.contains("has no state"), "{}", none.2);

    // While commands flow: ask both instances, then only the survivor of a SIGKILL.
    let stop = Arc::new(AtomicBool::new(false));
    let feeding = feeder(&s, &more, 20, Duration::from_millis(60), stop.clone());
    let mut b = Some(b);
    let mut killed_at = None;
    let started = Instant::now();
    let mut i = 0usize;
    // Until well after the kill: the survivor answers for every key again.
    let mut answered_after_kill: BTreeSet<String> = BTreeSet::new();
    while answered_after_kill.len() < keys.len() {
        assert!(
            started.elapsed() < DEADLINE * 3,
            "answers did not resume after the kill: {} of {} keys",
            answered_after_kill.len(),
            keys.len()
        );
        let key = keys[i % keys.len()].clone();
        let addr = if b.is_some() && i % 2 == 1 { addr_b.clone() } else { addr_a.clone() };
        let path = format!("/state/bank/{key}");
        let answer = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || get(&addr, &path)
        })
        .await
        .unwrap();
        let ok = checker.check(&addr, &key, answer);
        if killed_at.is_some() && ok {
            answered_after_kill.insert(key);
        }
        i += 1;
        if b.is_some() && started.elapsed() > Duration::from_secs(4) {
            b.take().unwrap().kill();
            killed_at = Some(Instant::now());
            if cache {
                // Until the group drops the killed instance, its keys' owner cannot answer: with
                // `stale=true` the survivor answers from its standby copy, saying how far behind.
                let (sa, ks, hs) = (addr_a.clone(), keys.clone(), checker.histories.clone());
                let stale = tokio::task::spawn_blocking(move || {
                    let mut stale = 0;
                    for key in ks {
                        let (code, _, body) = get(&sa, &format!("/state/bank/{key}?stale=true"));
                        assert!(code == 200 || code == 404 || code == 503, "{code} {body}");
                        if code == 200 && body.get("stale").is_some() {
                            stale += 1;
                            assert!(body["stale"]["store_next_offset"].as_i64().is_some(), "{body}");
                            let state: Account = serde_json::from_value(body["state"].clone()).unwrap();
                            assert!(hs[&key].contains(&state), "{key}: a stale answer is a state the key had: {body}");
                        }
                    }
                    stale
                })
                .await
                .unwrap();
                assert!(stale > 0, "the killed instance's keys are answered from the standby copy");
            }
        }
    }
    let resumed = killed_at.unwrap().elapsed();
    stop.store(true, Ordering::SeqCst);
    let sent = feeding.join().unwrap();
    feed_async(&s, &more[sent..]).await;
    await_replies(&s, replies).await;
    // At the end, the survivor answers for every key: the final state.
    let sa = addr_a.clone();
    let finals_checked = finals.clone();
    tokio::task::spawn_blocking(move || {
        for key in keys {
            let (code, _, body) = get(&sa, &format!("/state/bank/{key}"));
            match finals_checked.get(&key) {
                Some(account) => {
                    assert_eq!(code, 200, "{body}");
                    assert_eq!(serde_json::from_value::<Account>(body["state"].clone()).unwrap(), *account);
                }
                None => assert_eq!(code, 404, "{body}"),
            }
        }
    })
    .await
    .unwrap();
    eprintln!(
        "queries: {} answered ({} by the other instance), {} 503s; answers for every key {:?} after the kill",
        checker.answered, checker.routed, checker.unavailable, resumed
    );
    assert!(checker.routed > 0, "some answers came from the other instance while commands flowed");
    a.drain();
}

/// An application of two stages (`demo --transfers`) as two instances: every key lives in its
/// murmur2 partition, so a query goes straight to the owner. Each account's answer is its
/// balance as its committed events add up, each transfer's its final status, from both instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_answers_for_each_of_its_stages_from_every_instance() {
    let s = setup(4).await;
    let (transfers_topic, _, history) = crate::app::transfer_setup(&s, 4).await;
    let logs = tempfile::tempdir().unwrap();
    let mut args = kafka_journal(&s, "50ms");
    args.extend(["--transfers", &transfers_topic, "--http-addr", "127.0.0.1:0"].map(String::from));
    let a = Demo::start(&s, &unique("txn-a"), &args, logs.path());
    let b = Demo::start(&s, &unique("txn-b"), &args, logs.path());
    let addrs = [a.http_addr(), b.http_addr()];
    crate::app::accounts_open(&s, history.len()).await;
    let transfers = crate::app::transfers(40, 10, 80, 11);
    crate::app::feed_transfers(&s.brokers, &transfers_topic, &transfers);
    let ids: BTreeSet<String> = transfers.iter().map(|t| t.id.clone()).collect();
    let books = {
        let (s, topic) = (s.clone(), transfers_topic.clone());
        tokio::task::spawn_blocking(move || crate::app::read_books(&s, &topic, &ids, 800)).await.unwrap()
    };
    let routed = tokio::task::spawn_blocking(move || {
        let mut routed = 0;
        for addr in &addrs {
            for i in 0..10 {
                let key = format!("acct-{i}");
                let (code, _, body) = get(addr, &format!("/state/bank/{key}"));
                match books.balances.get(&key) {
                    Some(balance) => {
                        assert_eq!(code, 200, "{key} on {addr}: {body}");
                        assert_eq!(body["state"]["balance"].as_i64().map(i128::from), Some(*balance), "{body}");
                    }
                    // Never opened: no state.
                    None => assert_eq!(code, 404, "{key} on {addr}: {body}"),
                }
                routed += usize::from(code == 200 && body["served_by"] != addr.as_str());
            }
            for (id, replies) in &books.replies {
                let (code, _, body) = get(addr, &format!("/state/transfer/{id}"));
                assert_eq!(code, 200, "{id} on {addr}: {body}");
                let status = body["state"]["status"].as_str().unwrap_or_default().to_lowercase();
                assert_eq!(status, replies[0].status, "{id} on {addr}: {body}");
                routed += usize::from(body["served_by"] != addr.as_str());
            }
            // An application has two queryable stages: the CLI needs one named.
            assert_eq!(get(addr, "/state/nosuch/x").0, 404);
        }
        routed
    })
    .await
    .unwrap();
    assert!(routed > 0, "keys of the other instance's partitions were forwarded");
    let (code, _, err) = tokio::task::spawn_blocking({
        let (b, g) = (s.brokers.clone(), s.group.clone());
        move || run_cli(&["query", "--brokers", &b, "--group", &g, "acct-1"])
    })
    .await
    .unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("several queryable stages") && err.contains("--stage"), "{err}");
    a.drain();
    b.drain();
}
