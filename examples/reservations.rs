//! Your own stage as an exactly-once Kafka flow: seat reservations for shows, with a JSON
//! contract of their own. Copy this file to start an application.
//!
//! ```sh
//! RUST_LOG=info cargo run --example reservations -- --brokers 127.0.0.1:9092 --id reservations-0
//! ```
//!
//! Requests on `reservations` (record key = the show, value = JSON):
//! `{"id":"r1","op":"reserve","seat":12,"customer":"ann"}`, `{"id":"r2","op":"release","seat":12,"customer":"ann"}`.
//! One reply per request on `reservations.replies` (read with `isolation.level=read_committed`):
//! `{"id":"r1","ok":true,"taken":1}` or `{"id":"r2","ok":false,"error":"seat 12 is reserved by someone else"}`;
//! every event on `reservations.events`; a record that is not a request goes to `reservations.dlq`
//! with its source and the reason in headers. SIGTERM or Ctrl-C drains: the flow finishes and
//! commits what it took, then exits 0.
//!
//! What to keep when you copy it:
//! - The stage (`Show`) is pure: `handle` decides, `apply` applies. Its events are an externally
//!   tagged enum (serde's default), which the default codec (bincode) reads back. Internally
//!   tagged (`#[serde(tag = "type")]`) or untagged enums, `flatten` and `skip_serializing_if` are
//!   not readable in bincode: the journal refuses such events with the fix (or use `Codec::Json`).
//! - The decoder parses the request once and hands its id to the output mapping
//!   (`decoder_with_context`), so replies echo it without parsing the input again.
//! - A stable `--id` (the transactional id) per instance: a restarted instance fences its own
//!   zombie and, as a static member of the consumer group, takes its partitions back at once.

use eventstage::flow::{FlowBuilder, FlowError, InputRecord, OutputRecord, Processed};
use eventstage::{Effect, EventSourced};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

mod util;

/// The stage: one state per show (the record key), the seats taken and by whom.
pub struct Show;

/// What a request asks of a show.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Reserve `seat` for `customer`.
    Reserve { seat: u32, customer: String },
    /// Give `seat` back; only its customer may.
    Release { seat: u32, customer: String },
}

/// What happened to a show: persisted, replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    Reserved { seat: u32, customer: String },
    Released { seat: u32 },
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("seat {0} does not exist (seats are 1 to {SEATS})")]
    NoSuchSeat(u32),
    #[error("seat {0} is taken")]
    Taken(u32),
    #[error("seat {0} is not reserved")]
    NotReserved(u32),
    #[error("seat {0} is reserved by someone else")]
    NotYours(u32),
}

/// Seats per show.
pub const SEATS: u32 = 200;

/// A show's state: seat → customer.
pub type Seats = BTreeMap<u32, String>;

impl EventSourced for Show {
    const NAME: &'static str = "show";
    type Key = String;
    type Command = Command;
    type Event = Event;
    type State = Seats;
    /// Seats taken after the request.
    type Reply = usize;
    type Rejection = Rejection;

    fn handle(&self, seats: &Seats, command: Command) -> Result<Effect<Self>, Rejection> {
        let taken = |seats: &Seats| seats.len();
        match command {
            Command::Reserve { seat, .. } if !(1..=SEATS).contains(&seat) => Err(Rejection::NoSuchSeat(seat)),
            Command::Reserve { seat, customer } => match seats.get(&seat) {
                // Asking again for one's own seat is answered, not refused (a client's retry).
                Some(holder) if *holder == customer => Ok(Effect::reply(seats.len())),
                Some(_) => Err(Rejection::Taken(seat)),
                None => Ok(Effect::persist([Event::Reserved { seat, customer }]).then_reply(taken)),
            },
            Command::Release { seat, customer } => match seats.get(&seat) {
                None => Err(Rejection::NotReserved(seat)),
                Some(holder) if *holder != customer => Err(Rejection::NotYours(seat)),
                Some(_) => Ok(Effect::persist([Event::Released { seat }]).then_reply(taken)),
            },
        }
    }

    fn apply(seats: &mut Seats, event: &Event) {
        match event {
            Event::Reserved { seat, customer } => {
                seats.insert(*seat, customer.clone());
            }
            Event::Released { seat } => {
                seats.remove(seat);
            }
        }
    }
}

/// A request as it arrives.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub id: String,
    pub op: String,
    pub seat: u32,
    pub customer: String,
}

/// A reply as it leaves.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: String,
    pub ok: bool,
    #[serde(default)]
    pub taken: Option<usize>,
    #[serde(default)]
    pub error: Option<String>,
}

/// Why a record is not a request: the dead-letter record's `eventstage.error` header says it.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("the record has no key (the show)")]
    NoShow,
    #[error("the key (the show) is not UTF-8")]
    ShowNotUtf8,
    #[error("the value is not a request")]
    NotJson(#[source] serde_json::Error),
    #[error("unknown op `{0}` (reserve, release)")]
    UnknownOp(String),
}

/// Input record → (show, command, request id for the reply).
pub fn decode(record: &InputRecord) -> Result<(String, Command, String), BadRequest> {
    let show = record.key.as_deref().ok_or(BadRequest::NoShow)?;
    let show = std::str::from_utf8(show).map_err(|_| BadRequest::ShowNotUtf8)?.to_owned();
    let request: Request =
        serde_json::from_slice(record.value.as_deref().unwrap_or_default()).map_err(BadRequest::NotJson)?;
    let Request { id, op, seat, customer } = request;
    let command = match op.as_str() {
        "reserve" => Command::Reserve { seat, customer },
        "release" => Command::Release { seat, customer },
        _ => return Err(BadRequest::UnknownOp(op)),
    };
    Ok((show, command, id))
}

/// The topics of one application.
#[derive(Debug, Clone)]
pub struct Topics {
    pub requests: String,
    pub replies: String,
    pub events: String,
}

impl Topics {
    /// `requests`, and the replies and events beside it.
    pub fn new(requests: &str) -> Self {
        Self { requests: requests.into(), replies: format!("{requests}.replies"), events: format!("{requests}.events") }
    }
}

/// One processed request → its reply, and its events.
pub fn outputs(topics: &Topics, p: &Processed<'_, Show, String>) -> Vec<OutputRecord> {
    let reply = match p.outcome {
        Ok(taken) => Reply { id: p.context.clone(), ok: true, taken: Some(*taken), error: None },
        Err(rejection) => Reply { id: p.context.clone(), ok: false, taken: None, error: Some(rejection.to_string()) },
    };
    let mut out = vec![OutputRecord::new(&topics.replies, p.key.as_bytes(), json(&reply))];
    out.extend(p.events.iter().map(|e| OutputRecord::new(&topics.events, p.key.as_bytes(), json(e))));
    out
}

/// JSON of a reply or an event. These types always serialize (no maps with non-string keys).
fn json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// The flow: exactly once (the default), the journal in the compacted topic `<group>-show-journal`.
pub fn flow(brokers: &str, group: &str, id: &str, topics: Topics) -> FlowBuilder<Show, String> {
    FlowBuilder::new(Show, brokers, group, [&topics.requests])
        .transactional_id(id)
        .static_membership(true)
        .commit_interval(Duration::from_millis(100))
        .decoder_with_context(decode)
        .outputs(move |p| outputs(&topics, p))
}

/// `--name value` from the command line, or `default`.
fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

#[tokio::main]
async fn main() -> Result<(), FlowError> {
    util::init_tracing();
    let brokers = arg("--brokers", "127.0.0.1:9092");
    let topics = Topics::new(&arg("--requests", "reservations"));
    let group = arg("--group", "reservations");
    let flow = flow(&brokers, &group, &arg("--id", "reservations-0"), topics).run()?;
    let stopper = flow.stopper();
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else { return };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("draining: finishing what was taken, committing, leaving");
        stopper.drain();
    });
    let (result, metrics) = flow.wait_with_metrics().await;
    tracing::info!(records_in = metrics.records_in, dead_letters = metrics.dead_letters, "stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventstage::testkit::StageTest;

    fn reserve(seat: u32, customer: &str) -> Command {
        Command::Reserve { seat, customer: customer.into() }
    }

    #[test]
    fn a_free_seat_is_reserved_a_taken_one_refused() {
        StageTest::new(Show)
            .when(reserve(12, "ann"))
            .then_events([Event::Reserved { seat: 12, customer: "ann".into() }])
            .then_reply(1);
        StageTest::new(Show)
            .given([Event::Reserved { seat: 12, customer: "ann".into() }])
            .when(reserve(12, "bob"))
            .then_rejected(Rejection::Taken(12));
        StageTest::new(Show).when(reserve(0, "ann")).then_rejected(Rejection::NoSuchSeat(0));
    }

    #[test]
    fn only_the_holder_releases_and_a_retry_is_answered() {
        let given = [Event::Reserved { seat: 3, customer: "ann".into() }];
        StageTest::new(Show).given(given.clone()).when(reserve(3, "ann")).then_events([]).then_reply(1);
        StageTest::new(Show)
            .given(given.clone())
            .when(Command::Release { seat: 3, customer: "bob".into() })
            .then_rejected(Rejection::NotYours(3));
        StageTest::new(Show)
            .given(given)
            .when(Command::Release { seat: 3, customer: "ann".into() })
            .then_events([Event::Released { seat: 3 }])
            .then_reply(0);
    }

    #[test]
    fn the_wire_contract() {
        let record = |value: &str| InputRecord::new("reservations", 0, 7, Some(b"show-1".to_vec()), Some(value.into()));
        let (show, command, id) = decode(&record(r#"{"id":"r1","op":"reserve","seat":12,"customer":"ann"}"#)).unwrap();
        assert_eq!((show.as_str(), command, id.as_str()), ("show-1", reserve(12, "ann"), "r1"));
        for bad in [r#"{"id":"r2","op":"swap","seat":1,"customer":"a"}"#, "not json", r#"{"id":"r3"}"#] {
            assert!(decode(&record(bad)).is_err(), "{bad}");
        }
        let topics = Topics::new("reservations");
        let input = record("");
        let outcome = Err(Rejection::Taken(12));
        let p = Processed {
            input: &input,
            key: &"show-1".to_string(),
            events: &[],
            outcome: &outcome,
            state: &Seats::new(),
            context: &"r9".to_string(),
        };
        let out = outputs(&topics, &p);
        let reply: Reply = serde_json::from_slice(out[0].value.as_deref().unwrap()).unwrap();
        assert_eq!(reply, Reply { id: "r9".into(), ok: false, taken: None, error: Some("seat 12 is taken".into()) });
        assert_eq!(out.len(), 1);
    }
}
