//! A user's own stage, as a new user writes it (issue 22): serde shapes bincode cannot read back are
//! refused before anything is acknowledged, in the runtime, in a flow and in the testkit.

use crate::util::broker::{create_topic, flush, producer, read_committed, send, unique};
use eventstage::flow::{FlowBuilder, FlowError, OutputRecord};
use eventstage::journal::{Journal, SledJournal};
use eventstage::testkit::StageTest;
use eventstage::{Codec, CodecError, Effect, Error, EventSourced, RuntimeConfig, StageRuntime};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Seats of a show: an internally tagged event enum, the shape serde users reach for first.
struct Seats;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
enum SeatEvent {
    Reserved { seat: u32 },
    Released { seat: u32 },
}

impl EventSourced for Seats {
    const NAME: &'static str = "seats";
    type Key = String;
    type Command = (bool, u32);
    type Event = SeatEvent;
    type State = BTreeSet<u32>;
    type Reply = usize;
    type Rejection = String;

    fn handle(&self, taken: &BTreeSet<u32>, (reserve, seat): (bool, u32)) -> Result<Effect<Self>, String> {
        match (reserve, taken.contains(&seat)) {
            (true, true) => Err(format!("seat {seat} is taken")),
            (false, false) => Err(format!("seat {seat} is free")),
            (true, false) => Ok(Effect::persist([SeatEvent::Reserved { seat }]).then_reply(BTreeSet::len)),
            (false, true) => Ok(Effect::persist([SeatEvent::Released { seat }]).then_reply(BTreeSet::len)),
        }
    }

    fn apply(taken: &mut BTreeSet<u32>, event: &SeatEvent) {
        match event {
            SeatEvent::Reserved { seat } => taken.insert(*seat),
            SeatEvent::Released { seat } => taken.remove(seat),
        };
    }
}

/// A note whose optional text is left out when absent: readable in bincode only while it is there.
struct Notes;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Noted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    n: u64,
}

impl EventSourced for Notes {
    const NAME: &'static str = "notes";
    type Key = String;
    type Command = Option<String>;
    type Event = Noted;
    type State = u64;
    type Reply = u64;
    type Rejection = String;

    fn handle(&self, n: &u64, text: Option<String>) -> Result<Effect<Self>, String> {
        Ok(Effect::persist([Noted { text, n: n + 1 }]).then_reply(|n: &u64| *n))
    }

    fn apply(n: &mut u64, event: &Noted) {
        *n = event.n;
    }
}

/// The committed records of `topic`, read once it holds at least `n`, and on for `settle` after.
async fn committed(brokers: &str, topic: &str, n: usize, settle: Duration) -> Vec<crate::util::broker::Rec> {
    let (b, t) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || read_committed(&b, &t, move |r| r.len() >= n, settle)).await.unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The error of a refused event: it names the type and the fix.
fn assert_unreadable(err: &Error, type_name: &str, attribute: &str) {
    let Error::Encode { source: CodecError::Unreadable { type_name: found, codec, .. }, .. } = err else {
        panic!("expected an unreadable event, got {err:?}")
    };
    assert!(found.ends_with(type_name), "{found}");
    assert_eq!(*codec, "bincode");
    let msg = err.to_string();
    for needle in [type_name, attribute, "Codec::Json", "Nothing was persisted"] {
        assert!(msg.contains(needle), "`{needle}` in: {msg}");
    }
}

/// Invariant 1 for a user's own types: an internally tagged event enum (bincode cannot decode it)
/// is refused at its first command, with the type, the attribute and the fix, and nothing is
/// persisted; reopening finds an empty journal, not an undecodable one. With `Codec::Json` the same
/// stage persists, and reopening rebuilds exactly the live state.
#[test]
fn the_runtime_refuses_events_it_could_not_replay() {
    rt().block_on(async {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("seats");
        let stage = StageRuntime::open_sled(Seats, &path, RuntimeConfig::default()).await.unwrap();
        let err = stage.handle().ask("show-1".into(), (true, 5)).await.unwrap_err();
        assert_unreadable(&err, "SeatEvent", "#[serde(tag");
        assert_eq!(stage.handle().get(&"show-1".to_string()).await.unwrap(), None, "a refused command changes nothing");
        stage.shutdown().await.unwrap();
        let journal = SledJournal::open(&path, Seats::NAME).unwrap();
        assert_eq!(journal.stats().await.unwrap().events, 0, "nothing was persisted");
        let stage = StageRuntime::open(Seats, journal, RuntimeConfig::default()).await.expect("the journal opens");
        stage.shutdown().await.unwrap();

        let json = RuntimeConfig::default().codec(Codec::Json);
        let stage = StageRuntime::open_sled(Seats, &path, json.clone()).await.unwrap();
        let h = stage.handle();
        assert_eq!(h.ask("show-1".into(), (true, 5)).await.unwrap(), Ok(1));
        assert_eq!(h.ask("show-1".into(), (true, 7)).await.unwrap(), Ok(2));
        assert_eq!(h.ask("show-1".into(), (false, 5)).await.unwrap(), Ok(1));
        let live = h.get(&"show-1".to_string()).await.unwrap().map(|s| (*s).clone());
        stage.shutdown().await.unwrap();
        let stage = StageRuntime::open_sled(Seats, &path, json).await.unwrap();
        assert_eq!(stage.handle().get(&"show-1".to_string()).await.unwrap().map(|s| (*s).clone()), live);
        assert_eq!(live, Some(BTreeSet::from([7])));
        stage.shutdown().await.unwrap();
    });
}

/// A shape that reads back only for some values (`skip_serializing_if`): each event is checked, so
/// the one that would not read back is refused and the others are persisted and replayed.
#[test]
fn the_runtime_checks_every_event_not_only_the_first() {
    rt().block_on(async {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("notes");
        let stage = StageRuntime::open_sled(Notes, &path, RuntimeConfig::default()).await.unwrap();
        let h = stage.handle();
        assert_eq!(h.ask("k".into(), Some("first".into())).await.unwrap(), Ok(1));
        let err = h.ask("k".into(), None).await.unwrap_err();
        assert_unreadable(&err, "Noted", "skip_serializing_if");
        assert_eq!(h.ask("k".into(), Some("third".into())).await.unwrap(), Ok(2));
        stage.shutdown().await.unwrap();
        let stage = StageRuntime::open_sled(Notes, &path, RuntimeConfig::default()).await.unwrap();
        assert_eq!(stage.handle().get(&"k".to_string()).await.unwrap().as_deref(), Some(&2));
        stage.shutdown().await.unwrap();
    });
}

/// The testkit checks the codec the stage journals with: bincode by default (the tagged enum fails
/// there, in a unit test, with the fix), JSON when told.
#[test]
fn the_testkit_checks_the_stages_own_codec() {
    let caught = std::panic::catch_unwind(|| {
        StageTest::new(Seats).when((true, 1));
    })
    .expect_err("bincode cannot read the tagged enum back");
    let msg = caught.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("SeatEvent") && msg.contains("#[serde(tag"), "{msg}");
    StageTest::new(Seats)
        .codec(Codec::Json)
        .given([SeatEvent::Reserved { seat: 1 }])
        .when((true, 2))
        .then_events([SeatEvent::Reserved { seat: 2 }])
        .then_reply(2);
}

/// Invariant 1 in a flow: the exactly-once flow whose stage emits the tagged enum stops at the
/// first command with the named error; neither its journal nor its replies topic holds a committed
/// record. With `Codec::Json` the same stage runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_refuses_events_it_could_not_restore() {
    crate::util::init_tracing();
    let brokers = crate::util::broker::brokers();
    let (input, replies, journal) = (unique("seats"), unique("seat-replies"), unique("seat-journal"));
    for t in [&input, &replies] {
        create_topic(&brokers, t, 1, &[]).await;
    }
    let flow = |codec: Codec, group: &str| {
        let replies = replies.clone();
        FlowBuilder::new(Seats, &brokers, group, [input.as_str()])
            .journal_topic(&journal)
            .codec(codec)
            .decoder(|r| {
                let key = String::from_utf8(r.key.clone().unwrap_or_default())?;
                let seat: u32 = std::str::from_utf8(r.value.as_deref().unwrap_or_default())?.parse()?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((key, (true, seat)))
            })
            .outputs(move |p| {
                let reply = match p.outcome {
                    Ok(n) => format!("ok {n}"),
                    Err(e) => format!("rejected: {e}"),
                };
                vec![OutputRecord::new(&replies, p.key.as_bytes(), reply)]
            })
            .run()
            .unwrap()
    };
    let (b, t) = (brokers.clone(), input.clone());
    tokio::task::spawn_blocking(move || {
        let p = producer(&b);
        send(&p, &t, "show-1", b"5");
        flush(&p);
    })
    .await
    .unwrap();
    let group = unique("seats");
    let err = tokio::time::timeout(crate::util::DEADLINE, flow(Codec::Bincode, &group).wait())
        .await
        .expect("the flow stops")
        .unwrap_err();
    let FlowError::Stage(err) = &err else { panic!("expected the stage's error, got {err:?}") };
    assert_unreadable(err, "SeatEvent", "#[serde(tag");
    let none = committed(&brokers, &replies, 0, Duration::from_millis(1500)).await;
    assert!(none.is_empty(), "no reply was committed: {none:?}");
    let none = committed(&brokers, &journal, 0, Duration::from_millis(500)).await;
    assert!(none.is_empty(), "no journal record was committed: {none:?}");

    // The same input, the same group: with JSON the command is handled and answered once.
    let running = flow(Codec::Json, &group);
    let got = committed(&brokers, &replies, 1, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].value.as_deref(), Some(&b"ok 1"[..]));
    tokio::time::timeout(crate::util::DEADLINE, running.drain_and_shutdown()).await.expect("the flow drains").unwrap();
}

/// The example a user copies (`examples/reservations.rs`), compiled into this binary too: its own
/// unit tests run here, and the tests below drive its functions.
#[path = "../examples/reservations.rs"]
#[allow(dead_code, unreachable_pub)]
mod reservations;

/// The reservations example built by `cargo test` (examples are built with the tests).
fn example_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/main-<hash> → target/<profile>/examples/reservations
    let path = exe.parent().and_then(|deps| deps.parent()).unwrap().join("examples").join("reservations");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/reservations.rs");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    assert!(
        modified(&path).is_some_and(|built| modified(&source).is_some_and(|changed| built >= changed)),
        "{} is missing or older than its source: run the tests with `cargo test` without `--test` (it builds the examples), or `cargo build --examples --all-features` first",
        path.display()
    );
    path
}

/// The example as a child process; killed when dropped.
struct Example {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Example {
    fn start(brokers: &str, requests: &str, group: &str, id: &str, logs: &std::path::Path) -> Self {
        let log = logs.join(format!("{id}-{}.log", rand::random::<u32>()));
        let child = std::process::Command::new(example_binary())
            .args(["--brokers", brokers, "--requests", requests, "--group", group, "--id", id])
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The reference model of a show's seats, written apart from the stage: (reply ok, taken, error).
fn model_reply(
    seats: &mut BTreeMap<u32, String>,
    op: &str,
    seat: u32,
    customer: &str,
) -> (bool, Option<usize>, Option<String>) {
    let refuse = |e: String| (false, None, Some(e));
    match (op, seats.get(&seat).cloned()) {
        (_, _) if !(1..=reservations::SEATS).contains(&seat) && op == "reserve" => {
            refuse(format!("seat {seat} does not exist (seats are 1 to {})", reservations::SEATS))
        }
        ("reserve", Some(holder)) if holder == customer => (true, Some(seats.len()), None),
        ("reserve", Some(_)) => refuse(format!("seat {seat} is taken")),
        ("reserve", None) => {
            seats.insert(seat, customer.to_string());
            (true, Some(seats.len()), None)
        }
        (_, None) => refuse(format!("seat {seat} is not reserved")),
        (_, Some(holder)) if holder != customer => refuse(format!("seat {seat} is reserved by someone else")),
        (_, Some(_)) => {
            seats.remove(&seat);
            (true, Some(seats.len()), None)
        }
    }
}

/// Issue 22's example and restart, end to end on Apache Kafka: the reservations example runs as
/// a process with a stable id; requests are answered exactly once each, as the model says; after
/// `kill -9` the restarted instance (a static member of the group) answers again within seconds,
/// not after the dead member's 45 s session; a record that is not a request goes to the dead
/// letter topic; SIGTERM drains and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_answers_exactly_once_restarts_at_once_and_drains() {
    use rand::{Rng, SeedableRng};
    crate::util::init_tracing();
    let brokers = crate::util::broker::brokers();
    let topics = reservations::Topics::new(&unique("reservations"));
    for t in [&topics.requests, &topics.replies, &topics.events] {
        create_topic(&brokers, t, 4, &[]).await;
    }
    let (group, id) = (unique("reservations"), unique("reservations-0"));
    let logs = TempDir::new().unwrap();
    // Requests over 8 shows, in two halves; the expected reply of each, by request id.
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let mut shows: BTreeMap<String, BTreeMap<u32, String>> = BTreeMap::new();
    let mut expected = std::collections::HashMap::new();
    let requests: Vec<(String, Vec<u8>)> = (0..600)
        .map(|i| {
            let show = format!("show-{}", rng.random_range(0..8));
            let op = if rng.random_bool(0.7) { "reserve" } else { "release" };
            let (seat, customer) = (rng.random_range(0..=24u32), ["ann", "bob"][rng.random_range(0..2)]);
            let (ok, taken, error) = model_reply(shows.entry(show.clone()).or_default(), op, seat, customer);
            let id = format!("r{i}");
            expected.insert(id.clone(), reservations::Reply { id: id.clone(), ok, taken, error });
            let json = serde_json::json!({"id": id, "op": op, "seat": seat, "customer": customer});
            (show, json.to_string().into_bytes())
        })
        .collect();
    let feed = |batch: Vec<(String, Vec<u8>)>| {
        let (b, t) = (brokers.clone(), topics.requests.clone());
        tokio::task::spawn_blocking(move || {
            let p = producer(&b);
            for (show, value) in batch {
                send(&p, &t, &show, &value);
            }
            flush(&p);
        })
    };

    // Two instances: `other` (the group's leader) stays up; `first` is killed and restarted.
    let other = Example::start(&brokers, &topics.requests, &group, &format!("{id}-other"), logs.path());
    crate::util::wait_until("the first instance to own partitions", || other.log().contains("assigned and restored"))
        .await;
    let first = Example::start(&brokers, &topics.requests, &group, &id, logs.path());
    let feeding = {
        let (b, t, batch) = (brokers.clone(), topics.requests.clone(), requests[..300].to_vec());
        std::thread::spawn(move || {
            let p = producer(&b);
            for chunk in batch.chunks(10) {
                for (show, value) in chunk {
                    send(&p, &t, show, value);
                }
                flush(&p);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    committed(&brokers, &topics.replies, 150, Duration::from_millis(200)).await;
    // kill -9, then the same instance again: it takes its place in the group at once.
    let mut first = first;
    // Both have taken their share (the leader logs its second assignment after the split).
    crate::util::wait_until("the group to split the partitions", || {
        first.log().contains("assigned and restored") && other.log().matches("assigned and restored").count() >= 2
    })
    .await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let other_before = other.log().len();
    feeding.join().unwrap();
    let restarted = Instant::now();
    let second = Example::start(&brokers, &topics.requests, &group, &id, logs.path());
    feed(requests[300..].to_vec()).await.unwrap();
    feed(vec![("show-1".into(), b"not a request".to_vec())]).await.unwrap();
    committed(&brokers, &topics.replies, 600, Duration::from_millis(200)).await;
    let took = restarted.elapsed();
    // A static member that comes back takes its old assignment: the other instance sees no
    // rebalance (a dynamic member's return revokes and reassigns every partition of the group).
    let other_after = other.log()[other_before..].to_string();
    assert!(
        !other_after.contains("revoked") && !other_after.contains("assigned and restored"),
        "the restart rebalanced the group: {other_after}"
    );
    assert!(
        took < Duration::from_secs(20),
        "answering again took {took:?} after the restart (a dynamic member waits ~45 s): {}",
        second.log()
    );

    // Exactly one reply per request, each as the model says.
    let got = committed(&brokers, &topics.replies, 600, Duration::from_millis(200)).await;
    let mut seen = std::collections::HashSet::new();
    for r in &got {
        let reply: reservations::Reply = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        assert_eq!(Some(&reply), expected.get(&reply.id), "reply {}", reply.id);
        assert!(seen.insert(reply.id.clone()), "two replies to {}", reply.id);
    }
    assert_eq!(seen.len(), 600);
    let dead = committed(&brokers, &format!("{}.dlq", topics.requests), 1, Duration::from_millis(200)).await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0]
        .headers
        .iter()
        .any(|(k, v)| k == "eventstage.error" && v.starts_with(b"the value is not a request")));

    // SIGTERM drains: the process exits 0.
    let mut second = second;
    let pid = second.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || {
        let status = second.child.wait().unwrap();
        (status, second.log())
    })
    .await
    .unwrap();
    assert!(status.0.success() && status.1.contains("stopped"), "{:?}: {}", status.0, status.1);
}

/// The output mapping sees the input as it came (headers, timestamp) and the decoder's context;
/// a dead letter keeps the input's own headers before the flow's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outputs_see_the_inputs_headers_timestamp_and_the_decoders_context() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::BaseRecord;
    crate::util::init_tracing();
    let brokers = crate::util::broker::brokers();
    let (input, replies) = (unique("seats"), unique("seat-replies"));
    for t in [&input, &replies] {
        create_topic(&brokers, t, 1, &[]).await;
    }
    let out = replies.clone();
    let flow = FlowBuilder::new(Seats, &brokers, unique("seats"), [&input])
        .journal_topic(unique("seat-journal"))
        .codec(Codec::Json)
        .decoder_with_context(|r| {
            let key = String::from_utf8(r.key.clone().unwrap_or_default())?;
            let seat: u32 = std::str::from_utf8(r.value.as_deref().unwrap_or_default())?.parse()?;
            // The context: parsed from a header once, typed.
            let trace = r.header("trace-id").map(|t| String::from_utf8_lossy(t).into_owned());
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((key, (true, seat), (trace, seat)))
        })
        .outputs(move |p: &eventstage::flow::Processed<'_, Seats, (Option<String>, u32)>| {
            let (trace, seat) = p.context;
            let value =
                format!("{} {seat} {:?} {}", trace.as_deref().unwrap_or("-"), p.input.timestamp, p.input.headers.len());
            vec![OutputRecord::new(&out, p.key.as_bytes(), value)]
        })
        .run()
        .unwrap();
    let (b, t) = (brokers.clone(), input.clone());
    tokio::task::spawn_blocking(move || {
        let p = producer(&b);
        let headers = OwnedHeaders::new()
            .insert(Header { key: "trace-id", value: Some("t-1") })
            .insert(Header { key: "origin", value: Some("test") });
        for (value, headers) in [(&b"5"[..], headers.clone()), (&b"not a seat"[..], headers)] {
            let record = BaseRecord::to(&t).key("show-1").payload(value).headers(headers).timestamp(1_700_000_000_123);
            p.send(record).map_err(|(e, _)| e).unwrap();
        }
        flush(&p);
    })
    .await
    .unwrap();
    let got = committed(&brokers, &replies, 1, Duration::from_millis(300)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].value.as_deref(), Some(&b"t-1 5 Some(1700000000123) 2"[..]));
    let dead = committed(&brokers, &format!("{input}.dlq"), 1, Duration::from_millis(300)).await;
    let names: Vec<&str> = dead[0].headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(&names[..3], ["trace-id", "origin", "eventstage.source.topic"], "{names:?}");
    tokio::time::timeout(crate::util::DEADLINE, flow.drain_and_shutdown()).await.expect("the flow drains").unwrap();
}
