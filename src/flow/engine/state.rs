//! The flow's per-partition state: each key's committed entity, the changes of the transaction
//! being committed and of the open one, the consumer offsets, and what this instance is assigned.

use super::cache::{Committed, Usage};
use super::storage::{Restoration, RestoreJob, Sealed, TaskStore};
use super::timers::Timers;
use super::view::ViewWriter;
use crate::flow::error::FlowError;
use crate::flow::record::{InputRecord, OutputRecord};
use crate::replay::Entity;
use crate::stage::EventSourced;
use eventstage_journal::SourcePosition;
use std::collections::{BTreeMap, HashMap};
/// Per-key maps of the flow's state (ahash: cheaper than SipHash for short keys).
pub(super) type KeyMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// The input positions of a transaction or batch: per partition, the next input offsets.
pub(super) type Positions = BTreeMap<i32, Vec<SourcePosition>>;

pub(super) struct PartitionState<S: EventSourced> {
    /// State as of the last committed transaction: every key, or those a state cache holds.
    pub(super) committed: Committed<S>,
    /// Changes of the transaction being committed while the next one is open (exactly once): they
    /// become committed when its commit succeeds, and are dropped when it fails.
    pub(super) sealed: KeyMap<S::Key, Entity<S>>,
    /// Changes of the open transaction (or batch).
    pub(super) overlay: KeyMap<S::Key, Entity<S>>,
    /// Per key, the input positions its state includes (from journal records written by
    /// at-least-once flows, and kept up to date by them): inputs below are not applied again.
    pub(super) applied: KeyMap<S::Key, Vec<SourcePosition>>,
    /// The entities' durable timers (a stage of an application).
    pub(super) timers: Timers<S::Key>,
}

impl<S: EventSourced> Default for PartitionState<S> {
    fn default() -> Self {
        Self::new(Committed::default())
    }
}

impl<S: EventSourced> PartitionState<S> {
    pub(super) fn new(committed: Committed<S>) -> Self {
        Self {
            committed,
            sealed: KeyMap::default(),
            overlay: KeyMap::default(),
            applied: KeyMap::default(),
            timers: Timers::default(),
        }
    }

    /// `key`'s committed entity as read from the store (with the input positions it includes);
    /// returns it, for the command at hand: the cache may have evicted it at once to make room.
    pub(super) fn read(&mut self, key: S::Key, entity: Entity<S>, sources: Vec<SourcePosition>) -> Entity<S> {
        let evicted = self.committed.insert_read(key.clone(), entity.clone());
        self.forget_evicted(evicted);
        // After the evictions: the command at hand needs them even if the key itself was evicted.
        if !sources.is_empty() {
            self.applied.insert(key, sources);
        }
        entity
    }

    /// The transaction being committed committed (`generation`: see [`Committed::settle`]).
    pub(super) fn settle(&mut self, generation: Option<u64>) {
        let sealed = std::mem::take(&mut self.sealed);
        let evicted = self.committed.settle(sealed, generation);
        self.forget_evicted(evicted);
        self.timers.settle();
    }

    /// Moves what the local store caught up with to the cache.
    pub(super) fn store_caught_up(&mut self) {
        let evicted = self.committed.store_caught_up();
        self.forget_evicted(evicted);
    }

    /// Evicted keys' input positions go with them (their journal records carry them).
    fn forget_evicted(&mut self, evicted: Vec<S::Key>) {
        if self.applied.is_empty() {
            return;
        }
        for key in evicted {
            self.applied.remove(&key);
        }
    }

    /// `key`'s newest state: the open transaction's, else the one being committed, else the
    /// committed one.
    pub(super) fn get(&self, key: &S::Key) -> Option<&Entity<S>> {
        self.overlay.get(key).or_else(|| self.sealed.get(key)).or_else(|| self.committed.get(key))
    }

    /// Whether `key` has a state in memory (it need not be read from a store).
    pub(super) fn holds(&self, key: &S::Key) -> bool {
        self.overlay.contains_key(key) || self.sealed.contains_key(key) || self.committed.contains(key)
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

/// A task (Kafka Streams' `StreamTask`): input partition `p` of every input topic (the inputs are
/// co-partitioned: partition `p` of each holds the same keys), with its keys' state, its store
/// and its offsets per input topic. The task manager creates it when the group assigns one of
/// its topic partitions, has the storage restore it, and closes it when the last of them is
/// revoked.
pub(super) struct Task<S: EventSourced> {
    pub(super) state: PartitionState<S>,
    /// Its part of the storage, once restored.
    store: Option<Box<dyn TaskStore<S>>>,
    /// While it restores: the first input offset per topic polled before its partitions were
    /// paused, dropped (the partition is sought back to it once restored).
    dropped: BTreeMap<String, i64>,
    /// Per input topic.
    pub(super) offsets: BTreeMap<String, Offsets>,
}

/// A restore under way on a thread of its own (see [`RestoreJob`]).
pub(super) struct RestoreRun<S: EventSourced> {
    pub(super) partitions: Vec<i32>,
    pub(super) started: std::time::Instant,
    thread: std::thread::JoinHandle<Restoration<S>>,
}

impl<S: EventSourced> RestoreRun<S> {
    /// The restored partitions (waits for the restore to end).
    pub(super) fn join(self) -> Restoration<S> {
        self.thread.join().map_err(|_| FlowError::Crashed("a restore thread panicked".into()))?
    }
}

/// The task manager: the tasks of the partitions this instance owns, and what the consumer is to
/// do about them.
pub(super) struct TaskManager<S: EventSourced> {
    tasks: BTreeMap<i32, Task<S>>,
    /// Restores under way.
    restores: Vec<RestoreRun<S>>,
    /// Topic partitions to pause once librdkafka has made the assignment: their tasks restore.
    pub(super) pending_pauses: Vec<(String, i32)>,
    /// Seeks to do once librdkafka has made the assignment.
    pub(super) pending_seeks: Vec<(String, i32, i64)>,
    /// Inputs were consumed since the last commit.
    pub(super) dirty: bool,
    /// Partitions whose timers fired since the last commit (their tasks commit with no input).
    pub(super) fired: std::collections::BTreeSet<i32>,
    /// The state cache's budget in bytes, split evenly over the tasks (`None`: no cache).
    cache_budget: Option<u64>,
    /// The committed view queries read, when the flow is queryable.
    view: Option<ViewWriter<S>>,
}

impl<S: EventSourced> TaskManager<S> {
    pub(super) fn new(cache_budget: Option<u64>, view: Option<ViewWriter<S>>) -> Self {
        Self {
            tasks: BTreeMap::new(),
            restores: Vec::new(),
            pending_pauses: Vec::new(),
            pending_seeks: Vec::new(),
            dirty: false,
            fired: std::collections::BTreeSet::new(),
            cache_budget,
            view,
        }
    }

    /// The transaction (or batch) being committed committed: its changes become every task's
    /// committed state (`generation`: see [`Committed::settle`]).
    pub(super) fn settle(&mut self, generation: Option<u64>, now_ms: u64) {
        for (p, task) in &mut self.tasks {
            if let Some(view) = &mut self.view {
                view.changed(*p, &task.state.sealed);
            }
            task.state.settle(generation);
            if let Some(store) = &mut task.store {
                store.committed();
            }
            if let Some(view) = &mut self.view {
                Self::view_follows(view, *p, task);
            }
        }
        if let Some(view) = &mut self.view {
            view.settled(now_ms);
        }
    }

    /// The guarantee's batches up to `generation` are journaled: their keys may leave memory once
    /// the local store has them.
    pub(super) fn journaled(&mut self, generation: u64) {
        for (p, task) in &mut self.tasks {
            task.state.committed.journaled(generation);
            task.state.store_caught_up();
            if let Some(view) = &mut self.view {
                Self::view_follows(view, *p, task);
            }
        }
    }

    /// The committed view follows partition `p`'s local store: the keys it caught up with are
    /// read from it, and a state rebuilt from the journal (its store dropped) is taken again.
    fn view_follows(view: &mut ViewWriter<S>, p: i32, task: &mut Task<S>) {
        let Some(store) = &mut task.store else { return };
        if store.take_rebuilt() {
            view.restored(p, &mut task.state.committed, store.query_reader());
        } else {
            view.stored(p, task.state.committed.take_stored());
        }
    }

    /// What every task holds in memory.
    pub(super) fn usage(&self) -> Usage {
        self.tasks.values().map(|t| t.state.committed.usage()).fold(Usage::default(), Usage::add)
    }

    /// Splits the cache's budget evenly over the tasks restored.
    fn share_budget(&mut self) {
        let Some(budget) = self.cache_budget else { return };
        let n = self.tasks.values().filter(|t| t.store.is_some()).count().max(1) as u64;
        for task in self.tasks.values_mut() {
            task.state.committed.set_budget(budget / n);
        }
    }

    /// Partition `p`'s state, to change.
    pub(super) fn state_mut(&mut self, p: i32) -> Option<&mut PartitionState<S>> {
        self.tasks.get_mut(&p).map(|t| &mut t.state)
    }

    /// Partition `p`'s state and store, once restored.
    pub(super) fn restored_mut(&mut self, p: i32) -> Option<(&mut PartitionState<S>, &mut dyn TaskStore<S>)> {
        let task = self.tasks.get_mut(&p)?;
        Some((&mut task.state, task.store.as_deref_mut()?))
    }

    /// Keeps an output record of partition `p`'s open transaction with its state (see
    /// [`TaskStore::keep_output`]).
    pub(super) fn keep_output(&mut self, p: i32, record: OutputRecord) {
        if let Some(store) = self.tasks.get_mut(&p).and_then(|t| t.store.as_mut()) {
            store.keep_output(record);
        }
    }

    /// Seals the open transaction or batch of every task that consumed inputs in it (up to
    /// `positions`): what each must write.
    pub(super) fn seal_stores(&mut self, positions: Positions) -> Result<Vec<Sealed>, FlowError> {
        let mut sealed = Vec::with_capacity(positions.len());
        for (p, positions) in positions {
            let Some(task) = self.tasks.get_mut(&p) else { continue };
            if let Some(store) = &mut task.store {
                sealed.push(store.seal(&task.state, positions)?);
            }
        }
        Ok(sealed)
    }

    /// Forgets the open work's changes, in every task's state and store.
    pub(super) fn discard(&mut self) {
        for task in self.tasks.values_mut() {
            task.state.overlay.clear();
            task.state.sealed.clear();
            task.state.timers.discard();
            if let Some(store) = &mut task.store {
                store.discard();
            }
        }
    }

    /// Every task's state.
    pub(super) fn states_mut(&mut self) -> impl Iterator<Item = &mut PartitionState<S>> {
        self.tasks.values_mut().map(|t| &mut t.state)
    }

    /// The offsets of `topic`'s partition `p`, if assigned here.
    pub(super) fn offsets_mut(&mut self, topic: &str, p: i32) -> Option<&mut Offsets> {
        self.tasks.get_mut(&p)?.offsets.get_mut(topic)
    }

    /// Partition `p`'s offsets per input topic.
    pub(super) fn task_offsets_mut(&mut self, p: i32) -> Option<&mut BTreeMap<String, Offsets>> {
        self.tasks.get_mut(&p).map(|t| &mut t.offsets)
    }

    /// Every assigned topic partition with its offsets.
    pub(super) fn offsets(&self) -> impl Iterator<Item = (&str, i32, &Offsets)> {
        self.tasks.iter().flat_map(|(p, t)| t.offsets.iter().map(move |(topic, o)| (topic.as_str(), *p, o)))
    }

    /// How many topic partitions are assigned here.
    pub(super) fn assigned(&self) -> usize {
        self.tasks.values().map(|t| t.offsets.len()).sum()
    }

    /// `topic`'s partition `p` was assigned, with `committed` as the group's committed offset:
    /// creates partition `p`'s task if it has none (its state waits for the storage's restore).
    pub(super) fn assign(&mut self, topic: &str, p: i32, committed: i64) {
        let task = self.tasks.entry(p).or_insert_with(|| Task {
            state: PartitionState::default(),
            store: None,
            dropped: BTreeMap::new(),
            offsets: BTreeMap::new(),
        });
        if task.store.is_none() {
            self.pending_pauses.push((topic.to_string(), p));
        }
        if let Some(view) = &mut self.view {
            view.assigned(p);
        }
        let applied_until = task.offsets.get(topic).map_or(-1, |o| o.applied_until);
        let offsets = Offsets { committed, sealed: committed, next: committed, applied_until };
        task.offsets.insert(topic.to_string(), offsets);
    }

    /// The partitions whose tasks wait for a restore to start.
    pub(super) fn unrestored(&self) -> Vec<i32> {
        let restoring = |p: &i32| self.restores.iter().any(|r| r.partitions.contains(p));
        self.tasks.iter().filter(|(p, t)| t.store.is_none() && !restoring(p)).map(|(p, _)| *p).collect()
    }

    /// Starts `job`, the restore of partitions `wanted`, on a thread of its own.
    pub(super) fn start_restore(&mut self, wanted: Vec<i32>, job: RestoreJob<S>) -> Result<(), FlowError> {
        let thread = std::thread::Builder::new()
            .name("eventstage-restore".into())
            .spawn(job)
            .map_err(|e| FlowError::Config(format!("cannot start a restore thread: {e}")))?;
        self.restores.push(RestoreRun { partitions: wanted, started: std::time::Instant::now(), thread });
        Ok(())
    }

    /// Whether a restore ended and waits for its tasks to take it.
    pub(super) fn restore_ended(&self) -> bool {
        self.restores.iter().any(|r| r.thread.is_finished())
    }

    /// The restores that ended (`all`: every restore, to be waited for).
    pub(super) fn take_restores(&mut self, all: bool) -> Vec<RestoreRun<S>> {
        let (ended, running) =
            std::mem::take(&mut self.restores).into_iter().partition(|r| all || r.thread.is_finished());
        self.restores = running;
        ended
    }

    /// Whether partition `p`'s task has its state: else the input at `offset` of `topic`, polled
    /// before its partition was paused, is dropped until it has (see [`Self::restored`]).
    pub(super) fn takes(&mut self, topic: &str, p: i32, offset: i64) -> bool {
        // Per record: no lookup while nothing restores.
        if self.restores.is_empty() {
            return true;
        }
        let Some(task) = self.tasks.get_mut(&p) else { return true };
        if task.store.is_some() {
            return true;
        }
        task.dropped.entry(topic.to_string()).or_insert(offset);
        false
    }

    /// Partition `p`'s task (if it is still here) takes its committed state and its store;
    /// returns the offsets per topic to seek to: inputs dropped while it restored.
    pub(super) fn restored(
        &mut self,
        p: i32,
        state: PartitionState<S>,
        store: Box<dyn TaskStore<S>>,
    ) -> Vec<(String, i64)> {
        let Some(task) = self.tasks.get_mut(&p) else { return Vec::new() };
        task.state = state;
        task.store = Some(store);
        if let Some(view) = &mut self.view {
            let reader = task.store.as_ref().and_then(|s| s.query_reader());
            view.restored(p, &mut task.state.committed, reader);
        }
        let dropped = std::mem::take(&mut task.dropped).into_iter().collect();
        self.share_budget();
        dropped
    }

    /// The input topics of partition `p`'s task.
    pub(super) fn topics(&self, p: i32) -> Vec<String> {
        self.tasks.get(&p).map(|t| t.offsets.keys().cloned().collect()).unwrap_or_default()
    }

    /// `topic`'s partition `p` was revoked; true when that closed partition `p`'s task (no input
    /// topic's partition `p` is left here).
    pub(super) fn revoke(&mut self, topic: &str, p: i32) -> bool {
        let Some(task) = self.tasks.get_mut(&p) else { return false };
        task.offsets.remove(topic);
        if task.offsets.is_empty() {
            self.tasks.remove(&p);
            if let Some(view) = &mut self.view {
                view.revoked(p);
            }
            self.share_budget();
            return true;
        }
        false
    }

    /// What was consumed so far goes to a commit: the next commit starts here.
    pub(super) fn seal(&mut self) {
        self.each_offsets(|o| o.sealed = o.next);
        self.dirty = false;
        self.fired.clear();
    }

    /// The sealed offsets are committed (or handed to the at-least-once committer).
    pub(super) fn mark_committed(&mut self) {
        self.each_offsets(|o| o.committed = o.sealed);
    }

    /// What was consumed since the last commit (sealed or not) is given up: the next commit
    /// starts where the last one ended.
    pub(super) fn forget_uncommitted(&mut self) {
        self.each_offsets(|o| {
            o.next = o.committed;
            o.sealed = o.committed;
        });
        self.dirty = false;
        self.fired.clear();
    }

    /// The partitions whose tasks are restored.
    pub(super) fn restored_partitions(&self) -> Vec<i32> {
        self.tasks.iter().filter(|(_, t)| t.store.is_some()).map(|(p, _)| *p).collect()
    }

    /// Whether a restored task has a timer due at `now`.
    pub(super) fn timer_due(&self, now: u64) -> bool {
        self.tasks.values().any(|t| t.store.is_some() && t.state.timers.next_due().is_some_and(|d| d <= now))
    }

    /// Timers pending in the restored tasks.
    pub(super) fn timers_pending(&self) -> u64 {
        self.tasks.values().map(|t| t.state.timers.len() as u64).sum()
    }

    fn each_offsets(&mut self, mut f: impl FnMut(&mut Offsets)) {
        self.tasks.values_mut().flat_map(|t| t.offsets.values_mut()).for_each(&mut f);
    }
}
