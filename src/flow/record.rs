//! What a flow reads and writes: input and output records, and what the output mapping sees of
//! one processed record; the engine's shapes of the user's decoder and mapping.

use crate::stage::EventSourced;
use std::fmt;

/// An input record, as the decoder sees it (and the output mapping, through [`Processed::input`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InputRecord {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub value: Option<Vec<u8>>,
    /// Headers, in the record's order (a header without a value has an empty one).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp in milliseconds since the epoch (its producer's create time, or the
    /// broker's append time, as the topic says); `None` when the record has none.
    pub timestamp: Option<i64>,
}

impl InputRecord {
    /// A record without headers or timestamp (for decoder tests; add them with
    /// [`with_headers`](Self::with_headers) and [`with_timestamp`](Self::with_timestamp)).
    pub fn new(
        topic: impl Into<String>,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    ) -> Self {
        Self { topic: topic.into(), partition, offset, key, value, headers: Vec::new(), timestamp: None }
    }

    /// The same record with these headers.
    #[must_use]
    pub fn with_headers(mut self, headers: Vec<(String, Vec<u8>)>) -> Self {
        self.headers = headers;
        self
    }

    /// The same record with this timestamp (ms since the epoch).
    #[must_use]
    pub fn with_timestamp(mut self, ms: i64) -> Self {
        self.timestamp = Some(ms);
        self
    }

    /// The value of the last header named `name` (Kafka allows repeats; the last one wins, as in
    /// Kafka Streams' `Headers::lastHeader`).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }
}

/// A record to produce.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputRecord {
    /// Destination topic.
    pub topic: String,
    /// Key (the default partitioner picks the partition from it).
    pub key: Option<Vec<u8>>,
    /// Value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutputRecord {
    /// A record with key and value, no headers.
    pub fn new(topic: impl Into<String>, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self { topic: topic.into(), key: Some(key.into()), value: Some(value.into()), headers: Vec::new() }
    }
}

/// What the stage made of one input record: handed to the output mapping.
///
/// `C` is the context the decoder handed over with the command
/// ([`FlowBuilder::decoder_with_context`](crate::flow::FlowBuilder::decoder_with_context)): a request id to echo, a reply topic, a parsed
/// envelope; `()` with [`FlowBuilder::decoder`](crate::flow::FlowBuilder::decoder).
pub struct Processed<'a, S: EventSourced, C = ()> {
    /// The input record (its key, value, headers, timestamp, topic, partition and offset).
    pub input: &'a InputRecord,
    /// The entity key.
    pub key: &'a S::Key,
    /// The events persisted (empty on rejection).
    pub events: &'a [S::Event],
    /// The reply, or the rejection.
    pub outcome: &'a Result<S::Reply, S::Rejection>,
    /// The entity's state after the events.
    pub state: &'a S::State,
    /// What the decoder handed over beside the command.
    pub context: &'a C,
}

impl<S: EventSourced, C> fmt::Debug for Processed<'_, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Processed").field("input", &self.input).field("key", self.key).finish_non_exhaustive()
    }
}

/// The decoder's context for the output mapping, as the engine carries it (the builder knows its
/// type; `()` costs no allocation).
pub(crate) type Context = Box<dyn std::any::Any + Send>;
/// A decoded input record: entity key, command and the context for the output mapping.
pub(crate) type Decoded<S> = (<S as EventSourced>::Key, <S as EventSourced>::Command, Context);
/// Turns an input record into an entity key and a command, or says why it cannot.
pub(crate) type Decoder<S> = Box<dyn Fn(&InputRecord) -> Result<Decoded<S>, String> + Send>;
/// Maps an outcome to zero, one or many output records.
pub(crate) type Outputs<S> = Box<dyn Fn(&Processed<'_, S, Context>) -> Vec<OutputRecord> + Send>;
/// Maps an outcome to the commands it routes to stages of its application.
pub(crate) type RouteFn<S> = Box<dyn Fn(&Processed<'_, S, Context>) -> Vec<crate::flow::route::Routed> + Send>;
