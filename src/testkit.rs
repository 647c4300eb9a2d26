//! Given / when / then tests for stage authors: no journal, no broker, no runtime.
//!
//! ```
//! use eventstage::testkit::StageTest;
//! use eventstage::{Effect, EventSourced};
//! use serde::{Deserialize, Serialize};
//!
//! /// A wallet per key that refuses to go below zero.
//! struct Wallet;
//!
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! enum Event { Credited(u64), Debited(u64) }
//!
//! #[derive(Debug, PartialEq)]
//! enum Rejection { Insufficient { balance: u64 } }
//!
//! impl EventSourced for Wallet {
//!     const NAME: &'static str = "wallet";
//!     type Key = String;
//!     type Command = i64;
//!     type Event = Event;
//!     type State = u64;
//!     type Reply = u64;
//!     type Rejection = Rejection;
//!
//!     fn handle(&self, balance: &u64, delta: i64) -> Result<Effect<Self>, Rejection> {
//!         let event = match delta {
//!             d if d >= 0 => Event::Credited(d as u64),
//!             d if d.unsigned_abs() <= *balance => Event::Debited(d.unsigned_abs()),
//!             _ => return Err(Rejection::Insufficient { balance: *balance }),
//!         };
//!         Ok(Effect::persist([event]).then_reply(|balance: &u64| *balance))
//!     }
//!
//!     fn apply(balance: &mut u64, event: &Event) {
//!         match event {
//!             Event::Credited(n) => *balance += n,
//!             Event::Debited(n) => *balance -= n,
//!         }
//!     }
//! }
//!
//! StageTest::new(Wallet)
//!     .given([Event::Credited(50)])
//!     .when(-20)
//!     .then_events([Event::Debited(20)])
//!     .then_reply(30);
//!
//! StageTest::new(Wallet)
//!     .when(-1)
//!     .then_rejected(Rejection::Insufficient { balance: 0 });
//! ```
//!
//! Every check also proves what the runtime and flows rely on: each produced event, and the state
//! after it, reads back from what the stage's codec writes (bincode unless
//! [`StageTest::codec`] says otherwise), exactly as the journal checks it before persisting; the
//! event reads back equal; and replaying given + produced events rebuilds the state the command
//! handler's reply saw. A serde shape bincode cannot decode (`#[serde(tag = "..")]`, `untagged`,
//! `flatten`, `skip_serializing_if`) fails here, in a unit test, with the fix.

use crate::codec::Codec;
use crate::stage::EventSourced;
use std::fmt::Debug;

/// A stage under test with its past events.
#[derive(Debug)]
pub struct StageTest<S: EventSourced> {
    stage: S,
    state: S::State,
    given: usize,
    codec: Codec,
}

/// The outcome of one command.
#[derive(Debug)]
pub struct Then<S: EventSourced> {
    /// Events the command persisted.
    pub events: Vec<S::Event>,
    /// The reply, or the rejection.
    pub outcome: Result<S::Reply, S::Rejection>,
    /// The state after the events.
    pub state: S::State,
    /// The durable timers the effect scheduled (name, delay) or cancelled (name, `None`), in
    /// order.
    pub timers: Vec<(String, Option<std::time::Duration>)>,
}

impl<S: EventSourced> StageTest<S>
where
    S::Event: Clone + PartialEq + Debug,
{
    /// A stage with no history.
    pub fn new(stage: S) -> Self {
        Self { stage, state: S::State::default(), given: 0, codec: Codec::default() }
    }

    /// The codec the stage journals with (`RuntimeConfig::codec`, `FlowBuilder::codec`), which the
    /// round trips use. Default: [`Codec::Bincode`], the journals' default.
    #[must_use]
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// These events happened before (applied with the stage's event handler).
    #[must_use]
    pub fn given(mut self, events: impl IntoIterator<Item = S::Event>) -> Self {
        for e in events {
            S::apply(&mut self.state, &e);
            self.given += 1;
        }
        self
    }

    /// The state after the given events.
    pub fn state(&self) -> &S::State {
        &self.state
    }

    /// Runs a command through the command handler; its events are applied as the runtime would.
    ///
    /// # Panics
    /// When a handler panics, or an event or the state after the events does not survive a round
    /// trip through the stage's codec (the journal would refuse to persist them).
    #[track_caller]
    pub fn when(&self, command: S::Command) -> Then<S> {
        let codec = self.codec;
        let executed = crate::stage::execute(&self.stage, &self.state, command)
            .unwrap_or_else(|message| panic!("the stage panicked: {message}"));
        for e in &executed.events {
            let bytes = crate::stage::encode_event::<S>(codec, e)
                .unwrap_or_else(|err| panic!("event {e:?} cannot be journaled: {err}"));
            let back = S::upcast(S::EVENT_VERSION, codec, &bytes)
                .unwrap_or_else(|err| panic!("event {e:?} does not decode: {err}"));
            assert_eq!(&back, e, "event changes through a {codec:?} round trip");
        }
        if let Some(state) = &executed.state {
            if let Err(err) = crate::stage::encode_state::<S>(codec, state) {
                panic!("the state after the events cannot be journaled: {err}");
            }
        }
        let state = executed.state.unwrap_or_else(|| self.state.clone());
        let timers = executed.timers.iter().map(|t| t.described()).map(|(n, d)| (n.to_string(), d)).collect();
        Then { events: executed.events, outcome: executed.outcome, state, timers }
    }
}

impl<S: EventSourced> Then<S>
where
    S::Event: PartialEq + Debug,
    S::Reply: Debug,
    S::Rejection: Debug,
{
    /// Asserts the persisted events.
    ///
    /// # Panics
    /// When they differ.
    #[track_caller]
    pub fn then_events(self, expected: impl IntoIterator<Item = S::Event>) -> Self {
        let expected: Vec<_> = expected.into_iter().collect();
        assert_eq!(self.events, expected, "persisted events");
        self
    }

    /// Asserts the reply (and that the command was accepted).
    ///
    /// # Panics
    /// When rejected or the reply differs.
    #[track_caller]
    pub fn then_reply(self, expected: S::Reply) -> Self
    where
        S::Reply: PartialEq,
    {
        match &self.outcome {
            Ok(r) => assert_eq!(r, &expected, "reply"),
            Err(rej) => panic!("expected reply {expected:?}, the command was rejected: {rej:?}"),
        }
        self
    }

    /// Asserts the rejection (and that nothing was persisted).
    ///
    /// # Panics
    /// When accepted or the rejection differs.
    #[track_caller]
    pub fn then_rejected(self, expected: S::Rejection) -> Self
    where
        S::Rejection: PartialEq,
    {
        match &self.outcome {
            Err(r) => assert_eq!(r, &expected, "rejection"),
            Ok(reply) => panic!("expected rejection {expected:?}, the command was accepted with {reply:?}"),
        }
        assert!(self.events.is_empty(), "a rejected command persists nothing");
        self
    }

    /// Asserts the durable timers the command scheduled (name, delay) and cancelled (name,
    /// `None`), in order.
    ///
    /// # Panics
    /// When they differ.
    #[track_caller]
    pub fn then_timers(self, expected: &[(&str, Option<std::time::Duration>)]) -> Self {
        let got: Vec<(&str, Option<std::time::Duration>)> = self.timers.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        assert_eq!(got, expected, "timers scheduled and cancelled");
        self
    }

    /// Asserts the state after the command.
    ///
    /// # Panics
    /// When it differs.
    #[track_caller]
    pub fn then_state(self, expected: S::State) -> Self
    where
        S::State: PartialEq + Debug,
    {
        assert_eq!(self.state, expected, "state after the command");
        self
    }
}
