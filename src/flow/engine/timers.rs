//! Durable timers of a stage in an application ([`Effect::schedule`](crate::Effect::schedule)):
//! each entity's pending timers, kept per partition like its state (committed, being committed,
//! open), written to the stage's compacted timers topic in the transaction that changed them, read
//! back when a partition is assigned, and fired from the flow's loop.
//!
//! A timer fires from committed state only, and only for a key whose timers no transaction under
//! way changed: firing removes the timer in the open transaction, whose commit carries the fired
//! command's effects too. An abort brings it back, so it fires again: once per committed outcome.

use super::state::KeyMap;
use crate::flow::error::FlowError;
use crate::flow::record::OutputRecord;
use crate::flow::shared::kafka;
use crate::stage::{EntityKey, EventSourced};
use eventstage_journal::kafka::{Detached, ReaderContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Header of a fired timer's input record: the timer's name.
pub(crate) const TIMER_HEADER: &str = "eventstage.timer";

/// How a stage's timers are kept: the topic, and its commands as bytes (JSON).
pub(crate) struct TimerSettings<S: EventSourced> {
    pub(crate) topic: String,
    /// To read the topic back on assignment.
    pub(crate) config: ClientConfig,
    pub(crate) encode: fn(&S::Command) -> Result<Vec<u8>, String>,
    pub(crate) decode: fn(&[u8]) -> Result<S::Command, String>,
    /// The output mapping's context of a fired timer's command.
    pub(crate) context: fn() -> crate::flow::record::Context,
}

/// A pending timer: when it is due (ms since the epoch) and its command, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pending {
    pub(super) due: u64,
    pub(super) command: Arc<[u8]>,
}

/// An entity's pending timers, by name.
pub(super) type KeyTimers = BTreeMap<String, Pending>;

/// A pending timer as the timers topic stores it (the value is the JSON array of an entity's).
#[derive(Serialize, Deserialize)]
struct Stored {
    name: String,
    due: u64,
    /// The command's JSON, as a string.
    command: String,
}

/// The timers record of `key`: its pending timers, or a tombstone when none are left.
pub(super) fn record(topic: &str, key: &[u8], timers: &KeyTimers) -> OutputRecord {
    let value = (!timers.is_empty()).then(|| {
        let stored: Vec<Stored> = timers
            .iter()
            .map(|(name, p)| Stored {
                name: name.clone(),
                due: p.due,
                command: String::from_utf8_lossy(&p.command).into_owned(),
            })
            .collect();
        serde_json::to_vec(&stored).unwrap_or_default()
    });
    OutputRecord { topic: topic.to_string(), key: Some(key.to_vec()), value, headers: Vec::new() }
}

fn parse(value: &[u8]) -> Result<KeyTimers, String> {
    let stored: Vec<Stored> = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    Ok(stored
        .into_iter()
        .map(|s| (s.name, Pending { due: s.due, command: Arc::from(s.command.into_bytes().into_boxed_slice()) }))
        .collect())
}

/// A partition's timers.
pub(super) struct Timers<K> {
    /// As of the last committed transaction.
    committed: KeyMap<K, KeyTimers>,
    /// The committed timers by due time.
    due: BTreeSet<(u64, K, String)>,
    /// Changed by the transaction being committed (an empty set: none left).
    sealed: KeyMap<K, KeyTimers>,
    /// Changed by the open transaction.
    overlay: KeyMap<K, KeyTimers>,
}

impl<K> Default for Timers<K> {
    fn default() -> Self {
        Self {
            committed: KeyMap::default(),
            due: BTreeSet::new(),
            sealed: KeyMap::default(),
            overlay: KeyMap::default(),
        }
    }
}

impl<K: EntityKey> Timers<K> {
    /// `key`'s newest timers.
    pub(super) fn get(&self, key: &K) -> Option<&KeyTimers> {
        self.overlay.get(key).or_else(|| self.sealed.get(key)).or_else(|| self.committed.get(key))
    }

    /// `key`'s timers in the open transaction.
    pub(super) fn set(&mut self, key: K, timers: KeyTimers) {
        self.overlay.insert(key, timers);
    }

    /// The open transaction goes to its commit.
    pub(super) fn seal(&mut self) {
        debug_assert!(self.sealed.is_empty(), "one transaction commits at a time");
        std::mem::swap(&mut self.sealed, &mut self.overlay);
    }

    /// The transaction being committed committed.
    pub(super) fn settle(&mut self) {
        for (key, timers) in std::mem::take(&mut self.sealed) {
            if let Some(old) = self.committed.remove(&key) {
                for (name, p) in old {
                    self.due.remove(&(p.due, key.clone(), name));
                }
            }
            for (name, p) in &timers {
                self.due.insert((p.due, key.clone(), name.clone()));
            }
            if !timers.is_empty() {
                self.committed.insert(key, timers);
            }
        }
    }

    /// The open and sealed transactions' changes are dropped (an abort).
    pub(super) fn discard(&mut self) {
        self.overlay.clear();
        self.sealed.clear();
    }

    /// Committed timers due at `now`, at most `limit`, of keys no transaction under way changed.
    pub(super) fn due(&self, now: u64, limit: usize) -> Vec<(K, String, Arc<[u8]>)> {
        let mut out = Vec::new();
        for (due, key, name) in &self.due {
            if *due > now || out.len() >= limit {
                break;
            }
            if self.overlay.contains_key(key) || self.sealed.contains_key(key) {
                continue;
            }
            if let Some(p) = self.committed.get(key).and_then(|t| t.get(name)) {
                out.push((key.clone(), name.clone(), p.command.clone()));
            }
        }
        out
    }

    /// The earliest committed due time.
    pub(super) fn next_due(&self) -> Option<u64> {
        self.due.first().map(|(due, _, _)| *due)
    }

    /// How many timers are pending (committed).
    pub(super) fn len(&self) -> usize {
        self.due.len()
    }

    /// The partition's timers as read from the topic.
    pub(super) fn load(&mut self, read: Vec<(K, KeyTimers)>) {
        for (key, timers) in read {
            self.sealed.insert(key, timers);
        }
        self.settle();
    }
}

/// Reads `partitions` of the timers `topic` (compacted: each key's newest record) up to their
/// committed ends, with one consumer: every entity's pending timers, per partition.
pub(super) fn read_partitions<K: EntityKey>(
    config: &ClientConfig,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, Vec<(K, KeyTimers)>>, FlowError> {
    // An end of partition is how it knows it read a partition: not an error to log.
    let context = ReaderContext { what: "timers reader" };
    let consumer: Detached<BaseConsumer<ReaderContext>> = Detached::new(
        config
            .clone()
            .set("group.id", "eventstage-timers-reader")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create_with_context(context)
            .map_err(|e| kafka("timers reader", e))?,
    );
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning).map_err(|e| kafka("timers reader", e))?;
    }
    consumer.assign(&tpl).map_err(|e| kafka("timers reader", e))?;
    let mut read: BTreeMap<i32, KeyMap<Vec<u8>, Option<Vec<u8>>>> =
        partitions.iter().map(|p| (*p, KeyMap::default())).collect();
    let mut open: BTreeSet<i32> = partitions.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if let (Some(key), Some(keys)) = (m.key(), read.get_mut(&m.partition())) {
                    keys.insert(key.to_vec(), m.payload().map(<[u8]>::to_vec));
                }
            }
            // The end of a partition's committed records (read_committed: its last stable offset).
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) if Instant::now() >= deadline => return Err(kafka(format!("read {topic}"), e)),
            Some(Err(e)) => tracing::debug!(topic, error = %e, "reading timers; retrying"),
            None if Instant::now() >= deadline => {
                return Err(FlowError::Config(format!("reading the timers of {topic} {open:?} took longer than 60 s")))
            }
            None => {}
        }
    }
    read.into_iter().map(|(p, keys)| Ok((p, decode_partition(topic, p, keys)?))).collect()
}

/// A partition's newest timers records: each key's timers (a tombstone: none).
fn decode_partition<K: EntityKey>(
    topic: &str,
    p: i32,
    read: KeyMap<Vec<u8>, Option<Vec<u8>>>,
) -> Result<Vec<(K, KeyTimers)>, FlowError> {
    let mut out = Vec::new();
    for (key, value) in read {
        let Some(value) = value else { continue };
        let Some(k) = K::from_bytes(&key) else {
            return Err(FlowError::Config(format!(
                "a record of the timers topic {topic}[{p}] has a key that is not a key of this stage: is the topic another stage's?"
            )));
        };
        let timers = parse(&value).map_err(|e| {
            FlowError::Config(format!("a record of the timers topic {topic}[{p}] is not a stage's timers ({e})"))
        })?;
        out.push((k, timers));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(due: u64) -> Pending {
        Pending { due, command: Arc::from(&b"\"c\""[..]) }
    }

    #[test]
    fn a_timer_fires_from_committed_state_and_comes_back_after_an_abort() {
        let mut t: Timers<String> = Timers::default();
        t.set("a".into(), [("x".to_string(), pending(10))].into());
        assert!(t.due(100, 10).is_empty(), "not committed yet");
        t.seal();
        assert!(t.due(100, 10).is_empty(), "being committed");
        t.settle();
        assert_eq!(t.due(9, 10), vec![], "not before its time");
        assert_eq!(t.due(10, 10).len(), 1);
        // Fired in the open transaction, which aborts: it is due again.
        t.set("a".into(), KeyTimers::new());
        assert!(t.due(100, 10).is_empty(), "its key changed in the open transaction");
        t.discard();
        assert_eq!(t.due(100, 10).len(), 1);
        // Fired and committed: gone.
        t.set("a".into(), KeyTimers::new());
        t.seal();
        t.settle();
        assert!(t.due(u64::MAX, 10).is_empty() && t.len() == 0 && t.get(&"a".to_string()).is_none());
    }

    #[test]
    fn a_record_reads_back_and_an_empty_set_is_a_tombstone() {
        let timers: KeyTimers = [("x".to_string(), pending(5)), ("y".to_string(), pending(7))].into();
        let r = record("t", b"k", &timers);
        assert_eq!(parse(r.value.as_deref().unwrap()).unwrap(), timers);
        assert_eq!(record("t", b"k", &KeyTimers::new()).value, None);
    }
}
