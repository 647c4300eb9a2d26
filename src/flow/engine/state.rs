//! The flow's per-partition state: each key's committed entity, the changes of the transaction
//! being committed and of the open one, the consumer offsets, and what this instance is assigned.

use crate::flow::record::InputRecord;
use crate::replay::Entity;
use crate::stage::EventSourced;
use eventstage_journal::SourcePosition;
use std::collections::{BTreeMap, HashMap};
/// Per-key maps of the flow's state (ahash: cheaper than SipHash for short keys).
pub(super) type KeyMap<K, V> = HashMap<K, V, ahash::RandomState>;

pub(super) struct PartitionState<S: EventSourced> {
    /// State as of the last committed transaction.
    pub(super) committed: KeyMap<S::Key, Entity<S>>,
    /// Changes of the transaction being committed while the next one is open (exactly once): they
    /// become committed when its commit succeeds, and are dropped when it fails.
    pub(super) sealed: KeyMap<S::Key, Entity<S>>,
    /// Changes of the open transaction (or batch).
    pub(super) overlay: KeyMap<S::Key, Entity<S>>,
    /// Per key, the input positions its state includes (from journal records written by
    /// at-least-once flows, and kept up to date by them): inputs below are not applied again.
    pub(super) applied: KeyMap<S::Key, Vec<SourcePosition>>,
}

impl<S: EventSourced> Default for PartitionState<S> {
    fn default() -> Self {
        Self::new(KeyMap::default())
    }
}

impl<S: EventSourced> PartitionState<S> {
    pub(super) fn new(committed: KeyMap<S::Key, Entity<S>>) -> Self {
        Self { committed, sealed: KeyMap::default(), overlay: KeyMap::default(), applied: KeyMap::default() }
    }

    /// `key`'s newest state: the open transaction's, else the one being committed, else the
    /// committed one.
    pub(super) fn get(&self, key: &S::Key) -> Option<&Entity<S>> {
        self.overlay.get(key).or_else(|| self.sealed.get(key)).or_else(|| self.committed.get(key))
    }

    /// Whether `key` has a state in memory (it need not be read from a store).
    pub(super) fn holds(&self, key: &S::Key) -> bool {
        self.overlay.contains_key(key) || self.sealed.contains_key(key) || self.committed.contains_key(key)
    }

    /// Whether `key`'s state already includes the input at `offset` of `topic`.
    pub(super) fn includes(&self, key: &S::Key, topic: &str, offset: i64) -> bool {
        self.applied.get(key).is_some_and(|ps| ps.iter().any(|s| s.topic == topic && offset < s.next_offset))
    }

    /// Records that `key`'s state includes `input`.
    pub(super) fn note_applied(&mut self, key: &S::Key, input: &InputRecord) {
        let positions = self.applied.entry(key.clone()).or_default();
        let next_offset = input.offset + 1;
        match positions.iter_mut().find(|s| s.topic == input.topic) {
            Some(s) => s.next_offset = next_offset,
            None => {
                positions.push(SourcePosition { topic: input.topic.clone(), partition: input.partition, next_offset })
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Offsets {
    /// Committed next offset (-1: nothing committed yet; start from the beginning).
    pub(super) committed: i64,
    /// The next offset of the transaction being committed (`committed` when none is).
    pub(super) sealed: i64,
    /// Next offset to commit.
    pub(super) next: i64,
    /// Offsets below this were applied already (sled positions ahead of Kafka; -1: none).
    pub(super) applied_until: i64,
}

/// The offsets of `input`'s partition. The lookup borrows the record's topic for a moment
/// instead of copying it.
pub(super) fn offsets_of<'a>(
    offsets: &'a mut BTreeMap<(String, i32), Offsets>,
    input: &mut InputRecord,
) -> Option<&'a mut Offsets> {
    let tp = (std::mem::take(&mut input.topic), input.partition);
    let found = offsets.get_mut(&tp);
    input.topic = tp.0;
    found
}

/// The partitions this instance owns: their state and their consumer offsets.
pub(super) struct Assigned<S: EventSourced> {
    pub(super) partitions: BTreeMap<i32, PartitionState<S>>,
    pub(super) offsets: BTreeMap<(String, i32), Offsets>,
    /// Seeks to do once librdkafka has made the assignment.
    pub(super) pending_seeks: Vec<(String, i32, i64)>,
    /// Inputs were consumed since the last commit.
    pub(super) dirty: bool,
}

impl<S: EventSourced> Assigned<S> {
    /// What was consumed so far goes to a commit: the next commit starts here.
    pub(super) fn seal(&mut self) {
        for o in self.offsets.values_mut() {
            o.sealed = o.next;
        }
        self.dirty = false;
    }

    /// The sealed offsets are committed (or handed to the at-least-once committer).
    pub(super) fn mark_committed(&mut self) {
        for o in self.offsets.values_mut() {
            o.committed = o.sealed;
        }
    }

    /// What was consumed since the last commit (sealed or not) is given up: the next commit
    /// starts where the last one ended.
    pub(super) fn forget_uncommitted(&mut self) {
        for o in self.offsets.values_mut() {
            o.next = o.committed;
            o.sealed = o.committed;
        }
        self.dirty = false;
    }
}
