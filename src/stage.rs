//! The stage API: a command handler that decides, an event handler that applies.

use crate::codec::{Codec, CodecError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::borrow::Cow;
use std::fmt;
use std::hash::Hash;

/// An event-sourced stage (Akka Persistence's `EventSourcedBehavior`, one state per entity key).
///
/// - [`handle`](EventSourced::handle) is the **command handler**: it validates a command against the
///   current state and returns an [`Effect`] (events to persist, then a reply) or a typed
///   `Rejection`. It must not mutate anything and must not do I/O: the runtime may call it on a
///   state that includes events of the same batch that are not yet durable.
/// - [`apply`](EventSourced::apply) is the **event handler**: it applies one event to the state. It
///   must be pure and deterministic, because replay calls it again on every restart and must rebuild
///   exactly the state live processing had.
///
/// ```
/// use eventstage::{Effect, EventSourced};
/// use serde::{Deserialize, Serialize};
///
/// struct Counter;
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// enum Event { Added(u64) }
///
/// impl EventSourced for Counter {
///     const NAME: &'static str = "counter";
///     type Key = String;
///     type Command = u64;
///     type Event = Event;
///     type State = u64;
///     type Reply = u64;
///     type Rejection = String;
///
///     fn handle(&self, total: &u64, add: u64) -> Result<Effect<Self>, String> {
///         if add == 0 {
///             return Err("nothing to add".into());
///         }
///         Ok(Effect::persist([Event::Added(add)]).then_reply(|total: &u64| *total))
///     }
///
///     fn apply(total: &mut u64, event: &Event) {
///         match event { Event::Added(n) => *total += n }
///     }
/// }
/// ```
pub trait EventSourced: Send + Sync + Sized + 'static {
    /// The stage's name, recorded as the journal name. Changing it orphans existing journals.
    const NAME: &'static str;
    /// Schema version of `Event` written now. Bump it when the event type changes incompatibly and
    /// teach [`upcast`](EventSourced::upcast) to read the older versions.
    const EVENT_VERSION: u16 = 1;
    /// Schema version of `State` in snapshots. Snapshots of another version are ignored on recovery
    /// (the key is replayed from its events instead).
    const STATE_VERSION: u16 = 1;

    /// Entity key type.
    type Key: EntityKey;
    /// Commands.
    type Command: Send + 'static;
    /// Events: what is persisted.
    type Event: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Per-key state; `Default` is the state before the first event.
    type State: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static;
    /// Reply to a command that was accepted.
    type Reply: Send + 'static;
    /// A domain rejection: the command was valid input but not allowed in this state.
    type Rejection: Send + 'static;

    /// The command handler. Pure: no mutation, no I/O.
    ///
    /// # Errors
    /// The stage's typed rejection; nothing is persisted then.
    fn handle(&self, state: &Self::State, command: Self::Command) -> Result<Effect<Self>, Self::Rejection>;

    /// The event handler. Pure and deterministic.
    fn apply(state: &mut Self::State, event: &Self::Event);

    /// True when the entity is gone after its events (e.g. a closed, empty account): a Kafka journal
    /// writes a tombstone for it and the next command sees the default state again. Default: never.
    fn is_deleted(_state: &Self::State) -> bool {
        false
    }

    /// Decodes a stored event of `version` (the envelope's type version). The default reads only
    /// [`EVENT_VERSION`](EventSourced::EVENT_VERSION); override it to upcast older versions.
    ///
    /// # Errors
    /// When the payload does not decode or the version is unknown.
    fn upcast(version: u16, codec: Codec, payload: &[u8]) -> Result<Self::Event, CodecError> {
        if version == Self::EVENT_VERSION {
            codec.decode(payload)
        } else {
            Err(CodecError::UnknownVersion { found: version, current: Self::EVENT_VERSION })
        }
    }
}

/// What a command handler decided: persist events (possibly none), then reply; and the entity's
/// durable timers to schedule or cancel ([`schedule`](Effect::schedule)).
pub struct Effect<S: EventSourced> {
    pub(crate) events: Vec<S::Event>,
    pub(crate) reply: Reply<S>,
    pub(crate) timers: Vec<TimerOp<S>>,
}

/// A change of an entity's durable timers.
pub(crate) enum TimerOp<S: EventSourced> {
    /// `command` for the entity in `after`, under `name` (a timer of that name is replaced).
    Schedule {
        name: String,
        after: std::time::Duration,
        // Read by the flows (feature `kafka`), which keep timers.
        #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
        command: S::Command,
    },
    /// The timer `name`, if pending, never fires.
    Cancel { name: String },
}

impl<S: EventSourced> TimerOp<S> {
    /// Its name, and its delay (`None`: a cancellation).
    pub(crate) fn described(&self) -> (&str, Option<std::time::Duration>) {
        match self {
            TimerOp::Schedule { name, after, .. } => (name, Some(*after)),
            TimerOp::Cancel { name } => (name, None),
        }
    }
}

/// A reply computed from the state after the events.
type ReplyFn<S> = Box<dyn FnOnce(&<S as EventSourced>::State) -> <S as EventSourced>::Reply + Send>;

pub(crate) enum Reply<S: EventSourced> {
    Value(S::Reply),
    FromState(ReplyFn<S>),
}

/// What one command did: the events it persisted, its reply or rejection, and the state after the
/// events (`None`: it persisted none, the state is unchanged).
pub(crate) struct Executed<S: EventSourced> {
    pub(crate) events: Vec<S::Event>,
    pub(crate) outcome: Result<S::Reply, S::Rejection>,
    pub(crate) state: Option<S::State>,
    /// The timers it scheduled or cancelled (an accepted command only).
    pub(crate) timers: Vec<TimerOp<S>>,
}

/// Runs one command against `state`, the one way the runtime, the flow and the testkit do: the
/// command handler, then the event handler for each event on a copy of the state, then the reply
/// from the state after them. A panic in either handler is caught and returned as its message.
pub(crate) fn execute<S: EventSourced>(
    stage: &S,
    state: &S::State,
    command: S::Command,
) -> Result<Executed<S>, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match stage.handle(state, command) {
        Err(rejection) => Executed { events: Vec::new(), outcome: Err(rejection), state: None, timers: Vec::new() },
        Ok(effect) if effect.events.is_empty() => Executed {
            events: Vec::new(),
            outcome: Ok(effect.reply.resolve(state)),
            state: None,
            timers: effect.timers,
        },
        Ok(effect) => {
            let mut next = state.clone();
            for e in &effect.events {
                S::apply(&mut next, e);
            }
            let reply = effect.reply.resolve(&next);
            Executed { events: effect.events, outcome: Ok(reply), state: Some(next), timers: effect.timers }
        }
    }))
    .map_err(|panic| panic_message(&*panic))
}

/// An event of stage `S` as the journal stores it, read back the way replay reads it
/// ([`EventSourced::upcast`] at [`EventSourced::EVENT_VERSION`]) before anyone may acknowledge
/// it: an event replay cannot decode is refused, never persisted.
pub(crate) fn encode_event<S: EventSourced>(codec: Codec, event: &S::Event) -> Result<Vec<u8>, CodecError> {
    codec.encode_readable(event, |bytes| S::upcast(S::EVENT_VERSION, codec, bytes))
}

/// A state of stage `S` as snapshots and journal entries store it, read back as restores read it.
pub(crate) fn encode_state<S: EventSourced>(codec: Codec, state: &S::State) -> Result<Vec<u8>, CodecError> {
    codec.encode_readable(state, |bytes| codec.decode::<S::State>(bytes))
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

impl<S: EventSourced> Reply<S> {
    pub(crate) fn resolve(self, state: &S::State) -> S::Reply {
        match self {
            Reply::Value(v) => v,
            Reply::FromState(f) => f(state),
        }
    }
}

impl<S: EventSourced> Effect<S> {
    /// Persist these events; finish with [`PersistThen::then_reply`] or [`PersistThen::reply`].
    pub fn persist(events: impl IntoIterator<Item = S::Event>) -> PersistThen<S> {
        PersistThen { events: events.into_iter().collect() }
    }

    /// Reply without persisting anything (a query, or an idempotent no-op).
    pub fn reply(value: S::Reply) -> Self {
        Self { events: Vec::new(), reply: Reply::Value(value), timers: Vec::new() }
    }

    /// The events this effect persists.
    pub fn events(&self) -> &[S::Event] {
        &self.events
    }

    /// Also schedules `command` for this entity `after` from now: a **durable timer** (Akka
    /// Persistence's timers, Kafka Streams' punctuators, but per entity and surviving crashes).
    /// It is written with this command's journal records, in the same transaction, and fires
    /// once, not before its time (a little after: it is handled in the flow's loop), on whichever
    /// instance owns the entity then, restarts and moves between instances included. Its
    /// handling is exactly once like any command's: the timer is gone in the same transaction as
    /// the fired command's effects. A timer of the same `name` is replaced; see
    /// [`cancel`](Self::cancel). The fired command's input (`Processed::timer` in the flows'
    /// mappings) names the timer.
    ///
    /// Timers run in the exactly-once flows of an `eventstage::flow::Application` (feature
    /// `kafka`; its stages' commands are serde, and it keeps each stage's timers in the compacted
    /// topic `<group>-<stage>-timers`); a flow outside one, an at-least-once stage and the
    /// in-process runtime refuse a command whose effect schedules or cancels one.
    #[must_use]
    pub fn schedule(mut self, name: impl Into<String>, after: std::time::Duration, command: S::Command) -> Self {
        self.timers.push(TimerOp::Schedule { name: name.into(), after, command });
        self
    }

    /// Also cancels this entity's timer `name` (nothing when none is pending), in the same
    /// transaction as this command's journal records.
    #[must_use]
    pub fn cancel(mut self, name: impl Into<String>) -> Self {
        self.timers.push(TimerOp::Cancel { name: name.into() });
        self
    }

    /// The timers this effect schedules (name, delay) and cancels (name, `None`), in order.
    pub fn timers(&self) -> Vec<(&str, Option<std::time::Duration>)> {
        self.timers.iter().map(TimerOp::described).collect()
    }
}

impl<S: EventSourced> fmt::Debug for Effect<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Effect").field("events", &self.events.len()).finish_non_exhaustive()
    }
}

/// Events to persist, waiting for their reply.
#[must_use = "an effect needs a reply: call then_reply or reply"]
pub struct PersistThen<S: EventSourced> {
    events: Vec<S::Event>,
}

impl<S: EventSourced> fmt::Debug for PersistThen<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistThen").field("events", &self.events.len()).finish()
    }
}

impl<S: EventSourced> PersistThen<S> {
    /// Reply with a value computed from the state after the events are applied.
    pub fn then_reply(self, reply: impl FnOnce(&S::State) -> S::Reply + Send + 'static) -> Effect<S> {
        Effect { events: self.events, reply: Reply::FromState(Box::new(reply)), timers: Vec::new() }
    }

    /// Reply with a fixed value.
    pub fn reply(self, value: S::Reply) -> Effect<S> {
        Effect { events: self.events, reply: Reply::Value(value), timers: Vec::new() }
    }
}

/// An entity key: anything that maps to and from bytes, since journals and Kafka store bytes.
pub trait EntityKey: Clone + Ord + Hash + fmt::Debug + Send + Sync + 'static {
    /// The key as stored.
    fn to_bytes(&self) -> Cow<'_, [u8]>;
    /// The key from its stored bytes; `None` when the bytes are not a key of this type.
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
}

impl EntityKey for String {
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.as_bytes())
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    }
}

impl EntityKey for Vec<u8> {
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self)
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(bytes.to_vec())
    }
}

impl EntityKey for u64 {
    /// Big-endian, so byte order is numeric order.
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.to_be_bytes().to_vec())
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
}
