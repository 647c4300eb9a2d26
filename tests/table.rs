//! KTable emulation against a real Kafka-protocol broker.

use crate::util::broker::{brokers, create_topic, flush, producer, send, unique};
use crate::util::{init_tracing, wait_until};
use eventstage::table::{BadInput, Decoder, Partitions, Table, TableError};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::time::Duration;

pub(crate) type Model = BTreeMap<String, String>;

pub(crate) async fn compacted_topic(partitions: i32) -> (String, String) {
    init_tracing();
    let (b, topic) = (brokers(), unique("table"));
    create_topic(&b, &topic, partitions, &[("cleanup.policy", "compact")]).await;
    (b, topic)
}

pub(crate) fn tombstone(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str) {
    while p.send::<str, [u8]>(BaseRecord::to(topic).key(key)).is_err() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Produces `n` random upserts and tombstones over `keys` keys and applies them to `model`
/// (last write wins per key; a key's records share a partition, so their order is kept).
pub(crate) fn random_writes(brokers: &str, topic: &str, n: usize, keys: usize, seed: u64, model: &mut Model) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let p = producer(brokers);
    for i in 0..n {
        let key = format!("k{:04}", rng.random_range(0..keys));
        if rng.random_range(0..5) == 0 {
            tombstone(&p, topic, &key);
            model.remove(&key);
        } else {
            let value = format!("v{seed}-{i}");
            send(&p, topic, &key, value.as_bytes());
            model.insert(key, value);
        }
    }
    flush(&p);
}

pub(crate) fn contents(table: &Table<String, String>) -> Model {
    table.snapshot().iter().map(|r| r.map(|v| (v.key().clone(), v.to_string())).unwrap()).collect()
}

pub(crate) async fn open(brokers: &str, topic: &str) -> Table<String, String> {
    Table::builder(brokers, topic).keys(Decoder::utf8()).values(Decoder::utf8()).open().await.unwrap()
}

async fn writes(brokers: &str, topic: &str, n: usize, keys: usize, seed: u64, model: Model) -> Model {
    let (b, t) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let mut model = model;
        random_writes(&b, &t, n, keys, seed, &mut model);
        model
    })
    .await
    .unwrap()
}

/// The table equals a last-write-wins map after catching up and while following live writes, and
/// its watch stream replays exactly the live changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_equals_the_last_write_wins_model() {
    equals_the_last_write_wins_model(None).await;
}

/// The same with a row cache of 16 KiB over a local store (about 100 of the 300 keys fit): rows
/// are read back from the store on every pass, and every read agrees with the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_a_row_cache_equals_the_last_write_wins_model() {
    equals_the_last_write_wins_model(Some(16 * 1024)).await;
}

async fn equals_the_last_write_wins_model(cache: Option<u64>) {
    let (b, topic) = compacted_topic(3).await;
    let model = writes(&b, &topic, 3000, 300, 1, Model::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let table = match cache {
        None => open(&b, &topic).await,
        Some(bytes) => Table::builder(&b, &topic)
            .keys(Decoder::utf8())
            .values(Decoder::utf8())
            .store(dir.path())
            .cache(bytes)
            .open()
            .await
            .unwrap(),
    };
    tokio::time::timeout(crate::util::DEADLINE, table.caught_up()).await.expect("catches up").unwrap();
    assert_eq!(contents(&table), model, "after catching up");
    let every_key = |table: &Table<String, String>, model: &Model| {
        for k in 0..310 {
            let key = format!("k{k:04}");
            assert_eq!(table.get(key.as_str()).as_deref(), model.get(&key), "get({key})");
        }
    };
    every_key(&table, &model);
    let stats = table.stats();
    assert_eq!(stats.records_read, 3000);
    assert_eq!(stats.keys as usize, model.len());
    assert!(stats.tombstones > 0 && stats.caught_up);

    // Live: watch from a snapshot, then apply the changes to it.
    let mut replayed: Model = contents(&table);
    let mut changes = Box::pin(table.watch());
    let model = writes(&b, &topic, 2000, 300, 2, model).await;
    wait_until("the table to follow the live writes", || contents(&table) == model).await;
    let mut seen = 0;
    while seen < 2000 {
        let change = tokio::time::timeout(crate::util::DEADLINE, changes.next()).await.expect("a change").unwrap();
        let change = change.expect("no lag at this rate");
        assert_eq!(replayed.get(&change.key).map(String::as_str), change.old.as_deref().map(String::as_str));
        match change.new {
            Some(v) => replayed.insert(change.key, v.to_string()),
            None => replayed.remove(&change.key),
        };
        seen += 1;
    }
    assert_eq!(replayed, model, "the watch stream replays the live changes");

    // Lookups, ranges and prefixes on a snapshot.
    let snap = table.snapshot();
    let some = model.keys().nth(model.len() / 2).unwrap();
    assert_eq!(table.get(some.as_str()).as_deref(), model.get(some));
    assert!(!table.contains_key("no such key"));
    let range: Vec<_> =
        snap.range("k0100".to_string().."k0200".to_string()).map(|r| r.unwrap().key().clone()).collect();
    let expect: Vec<_> = model.range("k0100".to_string().."k0200".to_string()).map(|(k, _)| k.clone()).collect();
    assert_eq!(range, expect);
    let prefixed: Vec<_> = snap.prefix("k01").map(|r| r.unwrap().key().clone()).collect();
    assert_eq!(prefixed, model.keys().filter(|k| k.starts_with("k01")).cloned().collect::<Vec<_>>());
    assert_eq!(snap.len(), model.len());
    assert_eq!(snap.get("k0001").unwrap().as_deref(), model.get("k0001"));
    every_key(&table, &model);
    let stats = table.stats();
    assert_eq!(stats.keys as usize, model.len());
    let bytes: usize = model.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert_eq!(stats.bytes as usize, bytes, "the bytes of the rows");
    if let Some(budget) = cache {
        // Two passes over 310 keys, with room for about 64 rows: nearly every read is a miss.
        assert!(stats.cache_misses >= 600 && stats.cache_hits < 20, "{stats:?}");
        let hot = model.keys().next().unwrap();
        for _ in 0..5 {
            assert_eq!(table.get(hot.as_str()).as_deref(), model.get(hot));
        }
        assert!(table.stats().cache_hits >= stats.cache_hits + 4, "a key read again is in the cache");
        assert!(stats.cache_bytes <= budget && stats.cache_entries < 300, "{stats:?}");
    }
    table.close().await.unwrap();
}

/// A restart from the local store reads only the records written after its last checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_the_store_reads_only_the_tail() {
    let (b, topic) = compacted_topic(2).await;
    let dir = tempfile::tempdir().unwrap();
    let model = writes(&b, &topic, 2000, 200, 3, Model::new()).await;
    let open_stored =
        || Table::builder(&b, &topic).keys(Decoder::utf8()).values(Decoder::utf8()).store(dir.path()).open();
    let table = open_stored().await.unwrap();
    table.caught_up().await.unwrap();
    assert_eq!(contents(&table), model);
    assert_eq!(table.stats().records_read, 2000);
    table.close().await.unwrap();

    let stored = model.len() as u64;
    let model = writes(&b, &topic, 150, 200, 4, model).await;
    let table = open_stored().await.unwrap();
    assert_eq!(table.stats().loaded_from_store, stored, "rows come from the store");
    table.caught_up().await.unwrap();
    assert_eq!(table.stats().records_read, 150, "only the tail is read");
    assert_eq!(contents(&table), model);
    table.close().await.unwrap();

    // The same store for another topic is refused.
    let err = Table::builder(&b, unique("other")).store(dir.path()).open().await.unwrap_err();
    assert!(matches!(err, TableError::MissingTopic { .. }), "{err}");
    let (_, other) = compacted_topic(1).await;
    let err = Table::builder(&b, &other).store(dir.path()).open().await.unwrap_err();
    assert!(matches!(err, TableError::StoreMismatch { .. }), "{err}");
    assert!(err.to_string().contains("use another store directory"), "{err}");
}

/// A table with a row cache keeps its rows in the store: a store written by a table held in
/// memory is taken over (its rows counted once), a restart loads nothing and reads only the tail,
/// and settings that cannot work are refused with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_a_row_cache_reads_its_rows_from_the_store() {
    let (b, topic) = compacted_topic(2).await;
    let dir = tempfile::tempdir().unwrap();
    let model = writes(&b, &topic, 2000, 400, 5, Model::new()).await;
    let builder = || Table::builder(&b, &topic).keys(Decoder::utf8()).values(Decoder::utf8()).store(dir.path());
    // Written by checkpoints, in memory.
    let table = builder().open().await.unwrap();
    table.caught_up().await.unwrap();
    table.close().await.unwrap();

    let model = writes(&b, &topic, 300, 400, 6, model).await;
    let table = builder().cache(8 * 1024).open().await.unwrap();
    assert_eq!(table.len(), contents(&table).len(), "the store's rows, counted");
    table.caught_up().await.unwrap();
    assert_eq!(table.stats().records_read, 300, "only the tail is read");
    assert_eq!(contents(&table), model);
    assert_eq!(table.len(), model.len());
    table.close().await.unwrap();

    let model = writes(&b, &topic, 200, 400, 7, model).await;
    let table = builder().cache(8 * 1024).open().await.unwrap();
    let stats = table.stats();
    assert_eq!(stats.cache_entries, 0, "nothing is loaded up front");
    table.caught_up().await.unwrap();
    assert_eq!(table.stats().records_read, 200, "only the tail is read");
    for (k, v) in &model {
        assert_eq!(table.try_get(k.as_str()).unwrap().as_deref(), Some(v), "get({k})");
    }
    assert_eq!(contents(&table), model);
    assert_eq!(table.stats().bytes as usize, model.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>());
    table.close().await.unwrap();

    // And back to memory: the store's rows are loaded.
    let table = builder().open().await.unwrap();
    table.caught_up().await.unwrap();
    assert_eq!(table.stats().records_read, 0);
    assert_eq!(contents(&table), model);
    table.close().await.unwrap();

    // What cannot work.
    let refused = |e: TableError, needle: &str| {
        assert!(matches!(e, TableError::Settings { .. }) && e.to_string().contains(needle), "{e}");
    };
    let e = Table::builder(&b, &topic).keys(Decoder::utf8()).cache(1 << 20).open().await.unwrap_err();
    refused(e, "needs a local store");
    refused(builder().cache(0).open().await.unwrap_err(), "0 bytes");
    let e = Table::builder(&b, &topic)
        .keys(Decoder::new("text", |b: &[u8]| Ok(String::from_utf8_lossy(b).into_owned())))
        .store(dir.path())
        .cache(1 << 20)
        .open()
        .await
        .unwrap_err();
    refused(e, "with_encoder");

    // A store of format 1 (sled, before 2026-12-05) is dropped and the table read again.
    let old = tempfile::tempdir().unwrap();
    let marker = serde_json::json!({ "format": 1, "topic": topic });
    std::fs::write(old.path().join("eventstage-table.json"), marker.to_string()).unwrap();
    std::fs::create_dir(old.path().join("sled")).unwrap();
    std::fs::write(old.path().join("sled").join("db"), b"sled pages").unwrap();
    let table = Table::builder(&b, &topic)
        .keys(Decoder::utf8())
        .values(Decoder::utf8())
        .store(old.path())
        .cache(1 << 20)
        .open()
        .await
        .unwrap();
    table.caught_up().await.unwrap();
    assert_eq!(contents(&table), model);
    assert_eq!(table.stats().records_read, 2500, "read again from the topic");
    assert!(!old.path().join("sled").exists() && old.path().join("fjall").exists());
    table.close().await.unwrap();
}

fn transactional(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("transactional.id", unique("table-txn"))
        .create()
        .unwrap();
    p.init_transactions(Duration::from_secs(30)).unwrap();
    p
}

/// Records of aborted transactions never reach the table, whether it reads them while catching
/// up or while following.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactional_writes_never_appear() {
    let (b, topic) = compacted_topic(2).await;
    let write = |aborted: &'static str, committed: &'static str| {
        let (b, topic) = (b.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            let p = transactional(&b);
            for (value, commit) in [(aborted, false), (committed, true)] {
                p.begin_transaction().unwrap();
                for i in 0..50 {
                    send(&p, &topic, &format!("k{i}"), value.as_bytes());
                }
                if commit {
                    p.commit_transaction(Duration::from_secs(30)).unwrap();
                } else {
                    p.flush(Duration::from_secs(30)).unwrap();
                    p.abort_transaction(Duration::from_secs(30)).unwrap();
                }
            }
        })
    };
    write("aborted-1", "committed-1").await.unwrap();
    let table = open(&b, &topic).await;
    table.caught_up().await.unwrap();
    assert_eq!(table.len(), 50);
    assert!(table.snapshot().iter().all(|v| v.unwrap().as_str() == "committed-1"));

    let mut changes = Box::pin(table.watch());
    write("aborted-2", "committed-2").await.unwrap();
    wait_until("the committed values", || table.snapshot().iter().all(|v| v.unwrap().as_str() == "committed-2")).await;
    for _ in 0..50 {
        let c = changes.next().await.unwrap().unwrap();
        assert_eq!(c.new.as_deref().map(String::as_str), Some("committed-2"), "only committed values are applied");
    }
    table.close().await.unwrap();
}

/// A record that does not decode is skipped and counted, or stops the table, by policy; either
/// way it never silently disappears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_counted_or_stops_the_table() {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Limit {
        max: u64,
    }
    let (b, topic) = compacted_topic(1).await;
    let p = producer(&b);
    send(&p, &topic, "a", br#"{"max": 1}"#);
    send(&p, &topic, "b", b"not json");
    send(&p, &topic, "c", br#"{"max": 3}"#);
    flush(&p);

    let skipping = Table::builder(&b, &topic).keys(Decoder::utf8()).values(Decoder::<Limit>::json()).open().await;
    let skipping = skipping.unwrap();
    skipping.caught_up().await.unwrap();
    assert_eq!(skipping.len(), 2);
    assert_eq!(skipping.get("c").as_deref(), Some(&Limit { max: 3 }));
    assert_eq!(skipping.stats().bad_input, 1);
    skipping.close().await.unwrap();

    let stopping = Table::builder(&b, &topic)
        .keys(Decoder::utf8())
        .values(Decoder::<Limit>::json())
        .bad_input(BadInput::Stop)
        .open()
        .await
        .unwrap();
    let err = stopping.caught_up().await.unwrap_err();
    match &err {
        TableError::BadInput { partition: 0, offset: 1, reason, .. } => assert!(reason.contains("json"), "{reason}"),
        other => panic!("unexpected {other}"),
    }
    assert_eq!(stopping.get("a").as_deref(), Some(&Limit { max: 1 }), "what came before is still served");
    assert!(stopping.get("c").is_none());
}

/// A table's metrics go through the `metrics` facade: with a Prometheus recorder installed, the
/// records read, keys, bad records, tombstones and checkpoints move as the table reads, and the
/// lag (in total and per partition) and the partitions still catching up fall to 0.
#[cfg(feature = "prometheus")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_exports_its_metrics() {
    use eventstage::table::metric_names as names;
    static RECORDER: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    let handle =
        RECORDER.get_or_init(|| metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap());
    let (b, topic) = compacted_topic(2).await;
    // `name{topic="T"[,partition="P"]} value` in the exposition text.
    let value = |name: &str, partition: Option<i32>| -> Option<f64> {
        let labels = match partition {
            Some(p) => format!("{{topic=\"{topic}\",partition=\"{p}\"}}"),
            None => format!("{{topic=\"{topic}\"}}"),
        };
        let prefix = format!("{name}{labels} ");
        handle.render().lines().find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.parse().ok()))
    };
    let p = producer(&b);
    for i in 0..100 {
        send(&p, &topic, &format!("k{}", i % 10), br#"{"max": 1}"#);
    }
    send(&p, &topic, "bad", b"not json");
    tombstone(&p, &topic, "k3");
    flush(&p);

    let dir = tempfile::TempDir::new().unwrap();
    let table = Table::builder(&b, &topic)
        .keys(Decoder::utf8())
        .values(Decoder::<serde_json::Value>::json())
        .store(dir.path())
        .checkpoint_interval(Duration::from_millis(50))
        .open()
        .await
        .unwrap();
    table.caught_up().await.unwrap();
    let expected =
        [(names::RECORDS_READ, 102.0), (names::KEYS, 9.0), (names::BAD_INPUT, 1.0), (names::TOMBSTONES, 1.0)];
    let settled = |extra: f64| {
        expected.iter().all(|&(n, v)| value(n, None) == Some(if n == names::RECORDS_READ { v + extra } else { v }))
            && value(names::CATCHING_UP_PARTITIONS, None) == Some(0.0)
            && value(names::LAG, None) == Some(0.0)
            && (0..2).all(|p| value(names::LAG, Some(p)) == Some(0.0))
    };
    wait_until("the table's metrics after catching up", || settled(0.0)).await;
    assert!(value(names::BYTES, None).is_some_and(|b| b > 0.0));

    // Live records move the counters on, and a checkpoint is counted.
    for i in 0..20 {
        send(&p, &topic, &format!("k{}", i % 2), br#"{"max": 2}"#);
    }
    flush(&p);
    wait_until("the table's metrics after live records", || {
        settled(20.0) && value(names::CHECKPOINTS, None).is_some_and(|c| c >= 1.0)
    })
    .await;
    table.close().await.unwrap();
}

/// Clear errors for an unreachable cluster, a missing topic and a missing partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_and_missing_topics_are_named() {
    let (b, topic) = compacted_topic(2).await;
    let err = Table::builder(&b, unique("missing")).open().await.unwrap_err();
    assert!(matches!(err, TableError::MissingTopic { .. }) && err.to_string().contains("does not exist"), "{err}");
    let err = Table::builder(&b, &topic).partitions(Partitions::Only(vec![0, 5])).open().await.unwrap_err();
    assert_eq!(err, TableError::NoSuchPartition { topic: topic.clone(), partition: 5, count: 2 });
    let port = crate::util::broker::free_port();
    let err =
        Table::builder(format!("127.0.0.1:{port}"), &topic).timeout(Duration::from_secs(2)).open().await.unwrap_err();
    assert!(matches!(err, TableError::Unreachable { .. }) && err.to_string().contains("--brokers"), "{err}");
    // The client's error is kept as the source, as flows keep it.
    let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<rdkafka::error::KafkaError>());
    assert!(source.is_some(), "{err:?}");
}

/// `eventstage table dump|get|stats` on a plain topic (with a reused store) and on a bank flow's
/// Kafka journal (rebuilt state per key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_dumps_gets_and_counts_tables() {
    use crate::util::run_cli;
    let (b, topic) = compacted_topic(2).await;
    let p = producer(&b);
    send(&p, &topic, "alice", br#"{"limit": 100}"#);
    send(&p, &topic, "bob", br#"{"limit": 5}"#);
    send(&p, &topic, "carol", br#"{"limit": 7}"#);
    tombstone(&p, &topic, "carol");
    send(&p, &topic, "bob", br#"{"limit": 50}"#);
    flush(&p);
    let store = tempfile::tempdir().unwrap();
    let store_arg = store.path().join("t").display().to_string();
    let base = ["--brokers", b.as_str(), "--topic", topic.as_str()];
    let cli = |args: &[&str]| {
        let mut all = vec!["table"];
        all.extend_from_slice(args);
        all.extend_from_slice(&base);
        run_cli(&all)
    };

    let (code, out, err) = cli(&["dump", "--format", "json", "--value-format", "json", "--store", &store_arg]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        rows,
        [
            serde_json::json!({"key": "alice", "value": {"limit": 100}}),
            serde_json::json!({"key": "bob", "value": {"limit": 50}})
        ]
    );
    let (code, out, _) = cli(&["get", "bob"]);
    assert_eq!((code, out.trim()), (0, r#"bob  {"limit": 50}"#));
    let (code, _, err) = cli(&["get", "carol"]);
    assert_eq!(code, 1);
    assert!(err.contains("`carol` is not in topic"), "{err}");
    let (code, out, _) = cli(&["get", "626f62", "--key-format", "hex", "--value-format", "base64"]);
    assert_eq!((code, out.trim()), (0, "626f62  eyJsaW1pdCI6IDUwfQ=="));

    // Stats, reusing the store: nothing new to read.
    let (code, out, err) = cli(&["stats", "--format", "json", "--store", &store_arg]);
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(stats["keys"], 2);
    assert_eq!(stats["records_read"], 0, "the store had everything");
    assert_eq!(stats["loaded_from_store"], 2);
    let (code, out, _) = cli(&["stats"]);
    assert_eq!(code, 0);
    assert!(out.contains("tombstones seen    1") && out.contains("records read       5"), "{out}");
    // The same store with a row cache: the rows stay in the store, and `get` reads them there.
    let cached = ["--store", store_arg.as_str(), "--cache", "1MiB"];
    let (code, out, err) = cli(&[&["get", "bob"][..], &cached].concat());
    assert_eq!((code, out.trim()), (0, r#"bob  {"limit": 50}"#), "{err}");
    let (code, out, err) = cli(&[&["stats", "--format", "json"][..], &cached].concat());
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((stats["keys"].as_u64(), stats["cache"]["budget"].as_u64()), (Some(2), Some(786_432)), "{stats}");
    let (code, _, err) = cli(&["get", "bob", "--cache", "1MiB"]);
    assert!(code == 2 && err.contains("--store"), "{code} {err}");

    // A value that is not JSON: counted and skipped, or an error naming where it is.
    send(&p, &topic, "dave", b"{not json");
    flush(&p);
    let (code, out, err) = cli(&["stats", "--value-format", "json", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""bad_input":1"#) && err.contains("skipped"), "{out}\n{err}");
    let (code, _, err) = cli(&["dump", "--value-format", "json", "--on-bad-input", "stop"]);
    assert_eq!(code, 2);
    assert!(err.contains("partition ") && err.contains("offset ") && err.contains("not JSON"), "{err}");

    // Wrong flags and a missing topic.
    let (code, _, err) = run_cli(&["table", "dump", "--topic", &topic]);
    assert!(code == 2 && err.contains("--brokers"), "{err}");
    let (code, _, err) = run_cli(&["table", "dump", "--brokers", &b, "--topic", "no-such-topic-here"]);
    assert!(code == 2 && err.contains("does not exist"), "{err}");

    // A bank flow's Kafka journal, with the bank stage: the state per account.
    let s = crate::flow::setup(1).await;
    let cmds = crate::flow::workload(200, 8, 77);
    let (replies, accounts) = crate::flow::expected(&cmds);
    let flow = eventstage::stages::bank_flow::bank_flow(&s.brokers, &s.group, s.topics.clone())
        .journal_topic(&s.journal)
        .run()
        .unwrap();
    crate::flow::feed_async(&s, &cmds).await;
    crate::flow::await_replies(&s, replies).await;
    flow.drain_and_shutdown().await.unwrap();
    let (code, out, err) =
        run_cli(&["table", "dump", "--brokers", &b, "--topic", &s.journal, "--stage", "bank", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let states: BTreeMap<String, eventstage::stages::bank::Account> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["key"].as_str().unwrap().to_string(), serde_json::from_value(v["value"]["state"].clone()).unwrap())
        })
        .collect();
    assert_eq!(states, accounts);
    // Without --stage the values do not decode: the command says what the topic is.
    let (code, out, err) = run_cli(&["table", "dump", "--brokers", &b, "--topic", &s.journal]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert!(err.contains("holds eventstage Kafka journal records: add --stage NAME"), "{err}");

    // The journal commands read the Kafka journal too.
    let j = format!("kafka:{}", s.journal);
    let journal = |args: &[&str]| run_cli(&[&["journal"][..], args, &["--journal", &j, "--brokers", &b]].concat());
    let (code, out, err) = journal(&["replay", "--stage", "bank", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let replayed: BTreeMap<String, eventstage::stages::bank::Account> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["key"].as_str().unwrap().to_string(), serde_json::from_value(v["state"].clone()).unwrap())
        })
        .collect();
    assert_eq!(replayed, accounts);
    let (code, out, err) = journal(&["stats", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(stats["keys"].as_u64(), Some(accounts.len() as u64), "{stats}");
    let (code, out, err) = journal(&["verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok"), "{out}");
    let key = accounts.keys().next().unwrap();
    let (code, out, err) = journal(&["dump", "--stage", "bank", "--key", key, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let seqs: Vec<u64> =
        out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_u64().unwrap()).collect();
    assert!(!seqs.is_empty() && seqs.windows(2).all(|w| w[0] < w[1]), "{out}");
    let (code, _, err) = journal(&["replay"]);
    assert!(code == 2 && err.contains("needs --stage") && err.contains("bank, inventory"), "{err}");
    let (code, _, err) = run_cli(&["journal", "stats", "--journal", &j]);
    assert!(code == 2 && err.contains("needs --brokers"), "{err}");
    let (code, _, err) = run_cli(&["journal", "stats", "--journal", "kafka:no-such-journal-here", "--brokers", &b]);
    assert!(code == 2 && err.contains("does not exist"), "{err}");
    // A record that is not a journal entry: verify reports it (exit 1), replay refuses to go on.
    let p = crate::util::broker::producer(&b);
    crate::util::broker::send(&p, &s.journal, "intruder", b"not an entry");
    crate::util::broker::flush(&p);
    let (code, out, _) = journal(&["verify", "--format", "json"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("intruder") && out.contains("does not decode"), "{out}");
    let (code, _, err) = journal(&["replay", "--stage", "bank"]);
    assert!(code == 2 && err.contains("does not decode") && err.contains("journal verify"), "{err}");
}

/// A stream-table join inside an exactly-once flow: the bank flow consults a limits table for
/// every withdrawal, and a limit changed in the topic applies to the commands processed after the
/// table has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bank_flow_joins_a_limits_table() {
    use eventstage::stages::bank::BankCommand::{Deposit, Open, Withdraw};
    use eventstage::stages::bank_flow::{bank_flow_with_limits, WireReply};
    let s = crate::flow::setup(2).await;
    let (b, limits_topic) = compacted_topic(1).await;
    let p = producer(&b);
    send(&p, &limits_topic, "acct-0", b"50");
    send(&p, &limits_topic, "acct-1", b"10");
    flush(&p);
    let limits = Table::builder(&b, &limits_topic).keys(Decoder::utf8()).values(Decoder::<u64>::json()).open().await;
    let limits = limits.unwrap();
    limits.caught_up().await.unwrap();
    let flow =
        bank_flow_with_limits(&s.brokers, &s.group, s.topics.clone(), limits.clone()).journal_topic(&s.journal).run();
    let flow = flow.unwrap();

    let cmd = |i: usize, account: &str, c| (account.to_string(), format!("c{i}"), c);
    let reply = |i: usize, ok: bool, balance: u64, error: Option<&str>| WireReply {
        id: format!("c{i}"),
        ok,
        balance: Some(balance),
        error: error.map(str::to_string),
    };
    let first = vec![
        cmd(0, "acct-0", Open),
        cmd(1, "acct-1", Open),
        cmd(2, "acct-2", Open),
        cmd(3, "acct-0", Deposit(100)),
        cmd(4, "acct-1", Deposit(100)),
        cmd(5, "acct-2", Deposit(100)),
        cmd(6, "acct-0", Withdraw(60)),
        cmd(7, "acct-1", Withdraw(60)),
        cmd(8, "acct-2", Withdraw(60)),
    ];
    let mut expected: std::collections::HashMap<String, WireReply> = [
        reply(0, true, 0, None),
        reply(1, true, 0, None),
        reply(2, true, 0, None),
        reply(3, true, 100, None),
        reply(4, true, 100, None),
        reply(5, true, 100, None),
        reply(6, false, 100, Some("withdrawal of 60 is over the account's limit of 50")),
        reply(7, false, 100, Some("withdrawal of 60 is over the account's limit of 10")),
        reply(8, true, 40, None),
    ]
    .into_iter()
    .map(|r| (r.id.clone(), r))
    .collect();
    crate::flow::feed_async(&s, &first).await;
    crate::flow::await_replies(&s, expected.clone()).await;

    // Raise acct-0's limit, drop acct-1's; once the table has both, withdraw again.
    send(&p, &limits_topic, "acct-0", b"100");
    tombstone(&p, &limits_topic, "acct-1");
    flush(&p);
    wait_until("the table to have the new limits", || {
        limits.get("acct-0").as_deref() == Some(&100) && !limits.contains_key("acct-1")
    })
    .await;
    let second = vec![cmd(9, "acct-0", Withdraw(60)), cmd(10, "acct-1", Withdraw(60))];
    expected.extend([reply(9, true, 40, None), reply(10, true, 40, None)].into_iter().map(|r| (r.id.clone(), r)));
    crate::flow::feed_async(&s, &second).await;
    crate::flow::await_replies(&s, expected).await;
    flow.drain_and_shutdown().await.unwrap();
    limits.close().await.unwrap();
}
