//! Durable timers (issue 25): a stage of reminders in an application fires each once, not before
//! its time, never when cancelled, and after a restart; where timers cannot run they are refused.

use crate::flow::{setup, Setup};
use crate::util::broker::{create_topic, flush, producer, read_committed, send, unique};
use crate::util::DEADLINE;
use eventstage::flow::{Application, FlowError};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A stage of reminders, for the timers: `remind` schedules a reminder `after_ms` from now
/// (replacing one pending), `cancel` cancels it; a reminder that fires is an event and an output.
mod reminders {
    use eventstage::{Effect, EventSourced};
    use serde::{Deserialize, Serialize};
    use std::time::Duration;

    pub struct Reminders;

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub enum Command {
        Remind { note: String, after_ms: u64 },
        Cancel,
        Fire { note: String },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub enum Event {
        Scheduled { note: String },
        Cancelled,
        Fired { note: String },
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub struct State {
        pub pending: Option<String>,
        pub fired: u32,
    }

    impl EventSourced for Reminders {
        const NAME: &'static str = "reminder";
        type Key = String;
        type Command = Command;
        type Event = Event;
        type State = State;
        type Reply = u32;
        type Rejection = String;

        fn handle(&self, state: &State, command: Command) -> Result<Effect<Self>, String> {
            Ok(match command {
                Command::Remind { note, after_ms } => Effect::persist([Event::Scheduled { note: note.clone() }])
                    .reply(state.fired)
                    .schedule("remind", Duration::from_millis(after_ms), Command::Fire { note }),
                Command::Cancel => Effect::persist([Event::Cancelled]).reply(state.fired).cancel("remind"),
                Command::Fire { note } if state.pending.as_ref() == Some(&note) => {
                    Effect::persist([Event::Fired { note }]).then_reply(|s: &State| s.fired)
                }
                Command::Fire { note } => return Err(format!("{note} is not pending")),
            })
        }

        fn apply(state: &mut State, event: &Event) {
            match event {
                Event::Scheduled { note } => state.pending = Some(note.clone()),
                Event::Cancelled => state.pending = None,
                Event::Fired { .. } => {
                    state.pending = None;
                    state.fired += 1;
                }
            }
        }
    }
}

/// The reminders application: commands (`{"Remind":{...}}`, `"Cancel"`) from `input` keyed by
/// entity; each fired reminder written to `fired` as `{"note":..., "due": ms, "at": ms}`.
fn reminder_app(s: &Setup, input: &str, fired: &str) -> Application {
    let app = Application::new(&s.brokers, &s.group);
    let fired = fired.to_string();
    let flow = app
        .flow(reminders::Reminders, [input])
        .decoder(|r| {
            let key = String::from_utf8(r.key.clone().unwrap_or_default()).map_err(|e| e.to_string())?;
            let command: reminders::Command =
                serde_json::from_slice(r.value.as_deref().unwrap_or_default()).map_err(|e| e.to_string())?;
            Ok::<_, String>((key, command))
        })
        .commit_interval(Duration::from_millis(50))
        .outputs(move |p| match (p.timer(), p.events.first()) {
            (Some("remind"), Some(reminders::Event::Fired { note })) => {
                let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
                let value = serde_json::json!({"note": note, "due": p.input.timestamp, "at": at});
                vec![eventstage::flow::OutputRecord::new(&fired, p.key.as_bytes(), value.to_string())]
            }
            _ => Vec::new(),
        });
    app.stage(flow)
}

fn send_json(s: &Setup, topic: &str, commands: &[(String, serde_json::Value)]) {
    let p = producer(&s.brokers);
    for (key, value) in commands {
        send(&p, topic, key, value.to_string().as_bytes());
    }
    flush(&p);
}

/// Durable timers: scheduled reminders fire once, not before their time; cancelled ones never;
/// pending ones survive an application stopped (aborted, its open transaction with them) and
/// started again, and fire then; every fired reminder is read back once from the committed output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_timers_fire_once_after_their_time_and_survive_a_restart() {
    let s = setup(4).await;
    let fired = unique("fired");
    create_topic(&s.brokers, &fired, 4, &[]).await;
    let remind = |key: &str, after_ms: u64| {
        (key.to_string(), serde_json::json!({"Remind": {"note": format!("note-{key}"), "after_ms": after_ms}}))
    };
    // 20 reminders in 1.5 s, of which the first 8 are cancelled at once.
    let mut commands: Vec<_> = (0..20).map(|i| remind(&format!("r{i}"), 1500)).collect();
    commands.extend((0..8).map(|i| (format!("r{i}"), serde_json::json!("Cancel"))));
    send_json(&s, &s.topics.input, &commands);
    let app = reminder_app(&s, &s.topics.input, &fired).start().await.expect("starts");
    let read = |n: usize| {
        let (b, t) = (s.brokers.clone(), fired.clone());
        tokio::task::spawn_blocking(move || read_committed(&b, &t, |r| r.len() >= n, Duration::from_secs(2)))
    };
    let recs = read(12).await.unwrap();
    let keys: BTreeSet<String> = recs.iter().map(|r| String::from_utf8(r.key.clone().unwrap()).unwrap()).collect();
    let expected: BTreeSet<String> = (8..20).map(|i| format!("r{i}")).collect();
    assert_eq!(recs.len(), 12, "each reminder fired once: {recs:?}");
    assert_eq!(keys, expected, "the cancelled reminders never fire");
    for r in &recs {
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        assert!(v["at"].as_i64().unwrap() >= v["due"].as_i64().unwrap(), "fired before its time: {v}");
    }
    assert_eq!(app.metrics()[0].1.timers_fired, 12);
    // Reminders pending when the application stops (aborted: as a crash leaves its open
    // transaction) fire once it is started again.
    send_json(&s, &s.topics.input, &(20..30).map(|i| remind(&format!("r{i}"), 2500)).collect::<Vec<_>>());
    crate::util::wait_until("the new reminders to be pending", || app.metrics()[0].1.timers_pending >= 10).await;
    app.abort().await.expect("aborts");
    let app = reminder_app(&s, &s.topics.input, &fired).start().await.expect("starts again");
    let recs = read(22).await.unwrap();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &recs {
        *counts.entry(String::from_utf8(r.key.clone().unwrap()).unwrap()).or_default() += 1;
    }
    assert_eq!(counts.len(), 22, "{counts:?}");
    for r in &recs {
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        assert!(v["at"].as_i64().unwrap() >= v["due"].as_i64().unwrap(), "fired before its time: {v}");
    }
    assert!(counts.values().all(|n| *n == 1), "a reminder fired twice: {counts:?}");
    app.drain_and_shutdown().await.expect("drains");
}

/// The in-process runtime keeps no timers: a command that schedules one is refused (and has no
/// effect), saying where timers run; the stage's testkit shows what it scheduled.
#[tokio::test]
async fn the_runtime_refuses_a_timer_and_the_testkit_shows_it() {
    use eventstage::testkit::StageTest;
    use eventstage::{RuntimeConfig, StageRuntime};
    let remind = reminders::Command::Remind { note: "n".into(), after_ms: 5 };
    StageTest::new(reminders::Reminders)
        .when(remind.clone())
        .then_timers(&[("remind", Some(Duration::from_millis(5)))]);
    StageTest::new(reminders::Reminders).when(reminders::Command::Cancel).then_timers(&[("remind", None)]);
    let dir = tempfile::tempdir().unwrap();
    let stage = StageRuntime::open_sled(reminders::Reminders, dir.path(), RuntimeConfig::default()).await.unwrap();
    let err = stage.handle().ask("a".into(), remind).await.expect_err("refused");
    assert!(matches!(err, eventstage::Error::Timers { .. }) && err.to_string().contains("Application"), "{err}");
    assert!(stage.handle().get(&"a".into()).await.unwrap().is_none(), "the refused command had no effect");
    stage.shutdown().await.unwrap();
}

/// A flow outside an application whose stage schedules a timer stops with an error that says
/// where timers run, and commits nothing of the command that scheduled it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_outside_an_application_refuses_a_timer() {
    let s = setup(2).await;
    let flow =
        eventstage::flow::FlowBuilder::new(reminders::Reminders, s.brokers.clone(), s.group.clone(), [&s.topics.input])
            .decoder(|r| {
                let key = String::from_utf8(r.key.clone().unwrap_or_default()).map_err(|e| e.to_string())?;
                let command: reminders::Command =
                    serde_json::from_slice(r.value.as_deref().unwrap_or_default()).map_err(|e| e.to_string())?;
                Ok::<_, String>((key, command))
            })
            .journal_topic(&s.journal)
            .run()
            .unwrap();
    send_json(&s, &s.topics.input, &[("r".into(), serde_json::json!({"Remind": {"note": "n", "after_ms": 10}}))]);
    let err = tokio::time::timeout(DEADLINE, flow.wait()).await.expect("stops").expect_err("an error");
    assert!(matches!(&err, FlowError::Config(m) if m.contains("run the flow as a stage of one")), "{err}");
    // The flow created its journal at start; the command's record never committed.
    let committed = read_committed(&s.brokers, &s.journal, |_| true, Duration::from_secs(1));
    assert!(committed.is_empty(), "nothing of the command was committed: {committed:?}");
}
