//! Plain data types shared by all backends.

use crate::envelope::Envelope;
use crate::keys::printable_key;
use serde::Serialize;
use std::fmt;
use std::sync::Arc;

/// Per-key sequence number. The first event of a key has seq 1; 0 means "nothing yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct SeqNo(pub u64);

impl SeqNo {
    /// Before the first event.
    pub const ZERO: SeqNo = SeqNo(0);

    /// The next sequence number.
    #[must_use]
    pub fn next(self) -> SeqNo {
        SeqNo(self.0 + 1)
    }
}

impl fmt::Display for SeqNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a batch's input came from: the next offset to consume from one topic partition.
/// Stored atomically with the events it produced, so a restart resumes exactly after them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SourcePosition {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// The next offset to consume (last consumed + 1).
    pub next_offset: i64,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Entity key.
    pub key: Vec<u8>,
    /// Sequence number within the key.
    pub seq: SeqNo,
    /// The record.
    pub envelope: Envelope,
}

/// One stored snapshot: the whole state of a key after event `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Entity key.
    pub key: Vec<u8>,
    /// The state includes events up to and including this one.
    pub seq: SeqNo,
    /// The record.
    pub envelope: Envelope,
}

/// An atomic unit of writing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Events, each key's in sequence order.
    pub events: Vec<EventRecord>,
    /// Snapshots; each replaces the key's previous one.
    pub snapshots: Vec<SnapshotRecord>,
    /// Source positions covered by this batch; each replaces the previous one of its partition.
    pub positions: Vec<SourcePosition>,
    /// Opaque metadata written atomically with the batch (`None` deletes the key). Flows keep their
    /// outbox here: the outputs of the last batch, produced again if the process died before Kafka
    /// committed them.
    pub meta: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    /// True when the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.snapshots.is_empty() && self.positions.is_empty() && self.meta.is_empty()
    }
}

/// What an append committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The batch number (1 for a journal's first batch).
    pub batch: u64,
}

/// One item of [`Journal::recover`](crate::Journal::recover).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// The latest snapshot of a key; the events that follow it for the same key come next.
    Snapshot(SnapshotRecord),
    /// An event.
    Event(EventRecord),
}

impl Recovered {
    /// The entity key.
    pub fn key(&self) -> &[u8] {
        match self {
            Recovered::Snapshot(s) => &s.key,
            Recovered::Event(e) => &e.key,
        }
    }
}

/// Which events [`Journal::events`](crate::Journal::events) returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Only this key (all keys when `None`).
    pub key: Option<Vec<u8>>,
    /// First sequence number (inclusive); 0 and 1 both mean "from the start".
    pub from_seq: SeqNo,
    /// Last sequence number (inclusive).
    pub until_seq: Option<SeqNo>,
    /// Per key, stop at the first event written after this time (milliseconds since the epoch), so a
    /// key's history is always a prefix even if clocks stepped back.
    pub until_time_ms: Option<u64>,
}

impl EventQuery {
    /// Every event of every key.
    pub fn all() -> Self {
        Self::default()
    }

    /// Every event of one key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        Self { key: Some(key.into()), ..Self::default() }
    }

    /// True when `(seq, timestamp)` is past the query's upper bounds.
    pub fn is_past(&self, seq: SeqNo, timestamp_ms: u64) -> bool {
        self.until_seq.is_some_and(|u| seq > u) || self.until_time_ms.is_some_and(|t| timestamp_ms > t)
    }
}

/// Counts and sizes of a journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JournalStats {
    /// Journal name.
    pub name: String,
    /// Keys with at least one event.
    pub keys: u64,
    /// Events.
    pub events: u64,
    /// Of those, events in the history archive (sled journals: events their key's snapshot covers,
    /// moved out of sled).
    pub archived: u64,
    /// Snapshots (at most one per key).
    pub snapshots: u64,
    /// Bytes of stored event and snapshot records.
    pub bytes: u64,
    /// Committed batches.
    pub batches: u64,
    /// Timestamp of the oldest event, ms since the epoch.
    pub first_event_ms: Option<u64>,
    /// Timestamp of the newest event, ms since the epoch.
    pub last_event_ms: Option<u64>,
    /// Stored source positions.
    pub positions: Vec<SourcePosition>,
}

/// One problem found by [`Journal::verify`](crate::Journal::verify).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The key, printable (UTF-8 or `0x` hex), when known.
    pub key: Option<String>,
    /// The sequence number, when known.
    pub seq: Option<u64>,
    /// What is wrong.
    pub what: String,
}

impl Problem {
    /// A problem of `key` (at `seq`, when known).
    pub fn at(key: &[u8], seq: Option<u64>, what: impl Into<String>) -> Self {
        Self { key: Some(printable_key(key)), seq, what: what.into() }
    }

    pub(crate) fn general(what: impl Into<String>) -> Self {
        Self { key: None, seq: None, what: what.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.key, self.seq) {
            (Some(k), Some(s)) => write!(f, "key {k} seq {s}: {}", self.what),
            (Some(k), None) => write!(f, "key {k}: {}", self.what),
            _ => f.write_str(&self.what),
        }
    }
}

/// The result of [`Journal::verify`](crate::Journal::verify).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Journal name.
    pub name: String,
    /// Records checked.
    pub records: u64,
    /// Events checked.
    pub events: u64,
    /// Keys seen.
    pub keys: u64,
    /// Snapshots checked.
    pub snapshots: u64,
    /// Everything wrong, in storage order.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A progress callback: called with the number of records processed so far.
#[derive(Clone)]
pub struct Progress(Arc<dyn Fn(u64) + Send + Sync>);

impl Progress {
    /// Wraps a callback.
    pub fn new(f: impl Fn(u64) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// No reporting.
    pub fn none() -> Self {
        Self::new(|_| {})
    }

    /// Reports `done` records.
    pub fn report(&self, done: u64) {
        (self.0)(done)
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Progress(..)")
    }
}
