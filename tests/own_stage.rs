//! A user's own stage, as a new user writes it (issue 22): serde shapes bincode cannot read back are
//! refused before anything is acknowledged, in the runtime, in a flow and in the testkit.

use crate::util::broker::{create_topic, flush, producer, read_committed, send, unique};
use eventstage::flow::{FlowBuilder, FlowError, OutputRecord};
use eventstage::journal::{Journal, SledJournal};
use eventstage::testkit::StageTest;
use eventstage::{Codec, CodecError, Effect, Error, EventSourced, RuntimeConfig, StageRuntime};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;
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
        let stage = StageRuntime::open(Seats, SledJournal::open(&path, Seats::NAME).unwrap(), RuntimeConfig::default())
            .await
            .unwrap();
        let err = stage.handle().ask("show-1".into(), (true, 5)).await.unwrap_err();
        assert_unreadable(&err, "SeatEvent", "#[serde(tag");
        assert_eq!(stage.handle().get(&"show-1".to_string()), None, "a refused command changes nothing");
        stage.shutdown().await.unwrap();
        let journal = SledJournal::open(&path, Seats::NAME).unwrap();
        assert_eq!(journal.stats().await.unwrap().events, 0, "nothing was persisted");
        let stage = StageRuntime::open(Seats, journal, RuntimeConfig::default()).await.expect("the journal opens");
        stage.shutdown().await.unwrap();

        let json = RuntimeConfig::default().codec(Codec::Json);
        let stage =
            StageRuntime::open(Seats, SledJournal::open(&path, Seats::NAME).unwrap(), json.clone()).await.unwrap();
        let h = stage.handle();
        assert_eq!(h.ask("show-1".into(), (true, 5)).await.unwrap(), Ok(1));
        assert_eq!(h.ask("show-1".into(), (true, 7)).await.unwrap(), Ok(2));
        assert_eq!(h.ask("show-1".into(), (false, 5)).await.unwrap(), Ok(1));
        let live = h.get(&"show-1".to_string()).map(|s| (*s).clone());
        stage.shutdown().await.unwrap();
        let stage = StageRuntime::open(Seats, SledJournal::open(&path, Seats::NAME).unwrap(), json).await.unwrap();
        assert_eq!(stage.handle().get(&"show-1".to_string()).map(|s| (*s).clone()), live);
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
        let stage = StageRuntime::open(Notes, SledJournal::open(&path, Notes::NAME).unwrap(), RuntimeConfig::default())
            .await
            .unwrap();
        let h = stage.handle();
        assert_eq!(h.ask("k".into(), Some("first".into())).await.unwrap(), Ok(1));
        let err = h.ask("k".into(), None).await.unwrap_err();
        assert_unreadable(&err, "Noted", "skip_serializing_if");
        assert_eq!(h.ask("k".into(), Some("third".into())).await.unwrap(), Ok(2));
        stage.shutdown().await.unwrap();
        let stage = StageRuntime::open(Notes, SledJournal::open(&path, Notes::NAME).unwrap(), RuntimeConfig::default())
            .await
            .unwrap();
        assert_eq!(stage.handle().get(&"k".to_string()).as_deref(), Some(&2));
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
        FlowBuilder::new(Seats, &brokers, group, &[input.as_str()])
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
    let (b, r) = (brokers.clone(), replies.clone());
    let none = tokio::task::spawn_blocking(move || read_committed(&b, &r, |_| true, Duration::from_millis(1500)))
        .await
        .unwrap();
    assert!(none.is_empty(), "no reply was committed: {none:?}");
    let (b, j) = (brokers.clone(), journal.clone());
    let none = tokio::task::spawn_blocking(move || read_committed(&b, &j, |_| true, Duration::from_millis(500)))
        .await
        .unwrap();
    assert!(none.is_empty(), "no journal record was committed: {none:?}");

    // The same input, the same group: with JSON the command is handled and answered once.
    let running = flow(Codec::Json, &group);
    let (b, r) = (brokers.clone(), replies.clone());
    let got =
        tokio::task::spawn_blocking(move || read_committed(&b, &r, |r| !r.is_empty(), Duration::from_millis(500)))
            .await
            .unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].value.as_deref(), Some(&b"ok 1"[..]));
    tokio::time::timeout(crate::util::DEADLINE, running.drain_and_shutdown()).await.expect("the flow drains").unwrap();
}
