//! Commands between the stages of an [`Application`](super::Application): a routed command's
//! record, the sender a target sees, and where a key's state lives (Kafka's default partitioner,
//! murmur2, over the stage's partitions).
//!
//! A stage's repartition topic (`<group>-<stage>-commands`) carries two kinds of record, told
//! apart by their headers:
//! - **routed commands**: a command another stage (or this one, for another key) sent, keyed by
//!   the target key, its value the command as JSON (readable by operators, and every serde shape
//!   reads back), its headers naming the sender;
//! - **forwarded inputs**: a record of one of the stage's own inputs that arrived in a partition
//!   its key does not belong to (its producer partitioned by another function than Kafka's
//!   default), moved to the key's partition as it came, with where it came from.

use crate::flow::record::{Context, Decoder, InputRecord, OutputRecord, Processed};
use crate::stage::{EntityKey, EventSourced};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// Header of a routed command: the stage that sent it.
pub(crate) const FROM_STAGE: &str = "eventstage.routed.stage";
/// Header of a routed command: the sender's entity key (its bytes).
pub(crate) const FROM_KEY: &str = "eventstage.routed.key";
/// Headers of a forwarded input: where it was consumed first, and its own record key (absent
/// when it had none).
const FORWARDED_TOPIC: &str = "eventstage.forwarded.topic";
const FORWARDED_PARTITION: &str = "eventstage.forwarded.partition";
const FORWARDED_OFFSET: &str = "eventstage.forwarded.offset";
const FORWARDED_KEY: &str = "eventstage.forwarded.key";

/// The repartition topic of `stage` in the application of consumer group `group`: the commands
/// routed to the stage, and its inputs that arrived in another partition than their key's.
pub fn commands_topic(group: &str, stage: &str) -> String {
    format!("{group}-{stage}-commands")
}

/// The compacted topic of `stage`'s durable timers in the application of consumer group `group`:
/// per entity key, its pending timers.
pub fn timers_topic(group: &str, stage: &str) -> String {
    format!("{group}-{stage}-timers")
}

/// Where commands for stage `S` go: obtained from [`Application::to`](super::Application::to),
/// used in a [`route`](crate::flow::FlowBuilder::route) mapping to build [`Routed`] commands.
/// Cheap to clone.
pub struct To<S: EventSourced> {
    topic: Arc<str>,
    stage: PhantomData<fn() -> S>,
}

impl<S: EventSourced> Clone for To<S> {
    fn clone(&self) -> Self {
        Self { topic: self.topic.clone(), stage: PhantomData }
    }
}

impl<S: EventSourced> fmt::Debug for To<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("To").field("stage", &S::NAME).field("topic", &self.topic).finish()
    }
}

impl<S: EventSourced> To<S>
where
    S::Command: Serialize,
{
    pub(crate) fn new(group: &str) -> Self {
        Self { topic: commands_topic(group, S::NAME).into(), stage: PhantomData }
    }

    /// `command` for the entity `key` of stage `S`. It is written in the sender's transaction and
    /// handled once that commits (exactly once, with [`Guarantee::ExactlyOnce`](crate::flow::Guarantee)).
    pub fn command(&self, key: &S::Key, command: &S::Command) -> Routed {
        Routed {
            topic: self.topic.clone(),
            key: key.to_bytes().into_owned(),
            value: serde_json::to_vec(command)
                .map_err(|e| format!("a command for stage `{}` is not JSON: {e}", S::NAME)),
            headers: Vec::new(),
        }
    }

    /// The repartition topic the commands go through.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// A command on its way to a stage (see [`To::command`]).
#[derive(Debug, Clone)]
pub struct Routed {
    topic: Arc<str>,
    key: Vec<u8>,
    value: Result<Vec<u8>, String>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Routed {
    /// The same command with a header of your own: the target's mappings read it from
    /// [`Processed::input`] (a step of a saga, a correlation id).
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The record written to the target's repartition topic, naming its sender.
    pub(crate) fn into_record(self, stage: &str, key: &[u8]) -> OutputRecord {
        let value = self.value.unwrap_or_else(|e| panic!("{e}"));
        let mut headers = self.headers;
        headers.push((FROM_STAGE.into(), stage.as_bytes().to_vec()));
        headers.push((FROM_KEY.into(), key.to_vec()));
        OutputRecord { topic: self.topic.to_string(), key: Some(self.key), value: Some(value), headers }
    }
}

/// Who sent a routed command: see [`Processed::sender`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sender<'a> {
    /// The sending stage's name.
    pub stage: &'a str,
    /// The sending entity's key, as bytes ([`EntityKey::to_bytes`]).
    pub key: &'a [u8],
}

impl<S: EventSourced, C> Processed<'_, S, C> {
    /// The stage and key that routed this command here; `None` for a command decoded from one of
    /// the stage's inputs.
    pub fn sender(&self) -> Option<Sender<'_>> {
        let stage = self.input.header(FROM_STAGE).and_then(|s| std::str::from_utf8(s).ok())?;
        Some(Sender { stage, key: self.input.header(FROM_KEY).unwrap_or_default() })
    }
}

impl<S: EventSourced, C> Processed<'_, S, C> {
    /// The name of the durable timer whose command this is
    /// ([`Effect::schedule`](crate::Effect::schedule)); `None` for any other command.
    pub fn timer(&self) -> Option<&str> {
        if self.input.offset != -1 {
            return None;
        }
        self.input.header(crate::flow::engine::TIMER_HEADER).and_then(|n| std::str::from_utf8(n).ok())
    }
}

/// Where a key of a stage in an application lives: the partition Kafka's default partitioner
/// (murmur2, as Java clients and Kafka Streams use it) gives its bytes, in the stage's
/// repartition topic and its inputs alike.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// The stage's repartition topic.
    pub(crate) topic: String,
    pub(crate) partitions: i32,
}

impl Placement {
    /// The partition of `key`.
    pub(crate) fn partition_of(&self, key: &[u8]) -> i32 {
        ((murmur2(key) & 0x7fff_ffff) % self.partitions as u32) as i32
    }

    /// `input`, moved to its key's partition of the repartition topic as it came (the producer
    /// partitions by murmur2 too), with where it came from.
    pub(crate) fn forward(&self, input: &InputRecord, key: &[u8]) -> OutputRecord {
        let mut headers = input.headers.clone();
        headers.extend([
            (FORWARDED_TOPIC.into(), input.topic.as_bytes().to_vec()),
            (FORWARDED_PARTITION.into(), input.partition.to_string().into_bytes()),
            (FORWARDED_OFFSET.into(), input.offset.to_string().into_bytes()),
        ]);
        if let Some(k) = &input.key {
            headers.push((FORWARDED_KEY.into(), k.clone()));
        }
        OutputRecord { topic: self.topic.clone(), key: Some(key.to_vec()), value: input.value.clone(), headers }
    }
}

/// A forwarded input as it was first consumed (what the stage's decoder is given).
fn forwarded(input: &InputRecord) -> Option<InputRecord> {
    let text = |name| input.header(name).and_then(|v| std::str::from_utf8(v).ok());
    let topic = text(FORWARDED_TOPIC)?;
    let mut original = InputRecord::new(
        topic,
        text(FORWARDED_PARTITION).and_then(|p| p.parse().ok()).unwrap_or(-1),
        text(FORWARDED_OFFSET).and_then(|o| o.parse().ok()).unwrap_or(-1),
        input.header(FORWARDED_KEY).map(<[u8]>::to_vec),
        input.value.clone(),
    );
    original.headers = input.headers.iter().filter(|(k, _)| !k.starts_with("eventstage.forwarded.")).cloned().collect();
    original.timestamp = input.timestamp;
    Some(original)
}

/// The decoder of a stage in an application: records of its repartition topic (`own`) are routed
/// commands (JSON, context `context()`) or forwarded inputs (given to `user` as they first came);
/// the stage's inputs go to `user`.
pub(crate) fn application_decoder<S: EventSourced>(
    own: String,
    user: Option<Decoder<S>>,
    context: fn() -> Context,
) -> Decoder<S>
where
    S::Command: DeserializeOwned,
{
    Box::new(move |input: &InputRecord| {
        let decode = |input: &InputRecord| match &user {
            Some(user) => user(input),
            None => Err(format!("stage `{}` has no decoder for records of `{}`", S::NAME, input.topic)),
        };
        if input.topic != own {
            return decode(input);
        }
        if let Some(original) = forwarded(input) {
            return decode(&original);
        }
        let key = input.key.as_deref().ok_or_else(|| format!("a routed command for stage `{}` has no key", S::NAME))?;
        let key = S::Key::from_bytes(key)
            .ok_or_else(|| format!("the key of a routed command is not a key of stage `{}`", S::NAME))?;
        let value =
            input.value.as_deref().ok_or_else(|| format!("a routed command for stage `{}` has no value", S::NAME))?;
        let command = serde_json::from_slice(value).map_err(|e| {
            format!("a routed command is not a command of stage `{}` ({e}); was the command type changed while commands were in flight?", S::NAME)
        })?;
        Ok((key, command, context()))
    })
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`, librdkafka's
/// `murmur2_random` for a key that is not null).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_kafkas() {
        // Kafka's own UtilsTest cases (Java ints).
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ];
        for (key, java) in cases {
            assert_eq!(murmur2(key.as_bytes()) as i32, java, "{key}");
        }
    }

    #[test]
    fn a_forwarded_input_reads_as_it_came() {
        let placement = Placement { topic: "app-bank-commands".into(), partitions: 4 };
        let input = InputRecord::new("bank-commands", 3, 17, Some(b"acct-1".to_vec()), Some(b"{}".to_vec()))
            .with_headers(vec![("trace".into(), b"x".to_vec())])
            .with_timestamp(5);
        let out = placement.forward(&input, b"acct-1");
        assert_eq!(out.topic, "app-bank-commands");
        let consumed = InputRecord::new("app-bank-commands", 1, 2, out.key, out.value).with_headers(out.headers);
        let consumed = InputRecord { timestamp: Some(5), ..consumed };
        assert_eq!(forwarded(&consumed), Some(input));
        // A keyless input stays keyless.
        let keyless = InputRecord::new("bank-commands", 0, 1, None, Some(b"{}".to_vec()));
        let out = placement.forward(&keyless, b"k");
        let consumed = InputRecord::new("app-bank-commands", 1, 2, out.key, out.value).with_headers(out.headers);
        assert_eq!(forwarded(&consumed), Some(keyless));
    }

    #[test]
    fn placement_is_the_java_clients_partition() {
        let placement = Placement { topic: "t".into(), partitions: 12 };
        // toPositive(murmur2("foobar")) % 12, as Java's DefaultPartitioner computes it.
        assert_eq!(placement.partition_of(b"foobar"), ((-790_332_482i32 & 0x7fff_ffff) % 12));
    }
}
