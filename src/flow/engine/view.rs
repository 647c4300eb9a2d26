//! The flow thread's side of the committed view ([`crate::flow::view`]): the task manager tells it
//! what is assigned, restored, committed and revoked, and it publishes each change.

use super::cache::{Committed, StoreProgress};
use super::state::KeyMap;
use crate::flow::view::{Part, Ready, StoreRead, View};
use crate::replay::Entity;
use crate::stage::EventSourced;
use std::collections::BTreeMap;
use std::sync::Arc;

pub(super) struct ViewWriter<S: EventSourced> {
    view: Arc<View<S>>,
    /// The view being built: its maps share their nodes with the published one.
    parts: BTreeMap<i32, Part<S>>,
    /// How far the Kafka journal's records were acknowledged.
    progress: Option<Arc<StoreProgress>>,
}

impl<S: EventSourced> ViewWriter<S> {
    pub(super) fn new(view: Arc<View<S>>, progress: Option<Arc<StoreProgress>>) -> Self {
        view.publish(BTreeMap::new(), true);
        Self { view, parts: BTreeMap::new(), progress }
    }

    fn publish(&self) {
        self.view.publish(self.parts.clone(), true);
    }

    /// Partition `p` is assigned here: it restores.
    pub(super) fn assigned(&mut self, p: i32) {
        if let std::collections::btree_map::Entry::Vacant(e) = self.parts.entry(p) {
            e.insert(Part::Restoring);
            self.publish();
        }
    }

    /// Partition `p`'s state is restored (or rebuilt): every key, or with a state cache the keys
    /// the local store does not have yet, the store's `reader` reading the others.
    pub(super) fn restored(&mut self, p: i32, committed: &mut Committed<S>, reader: Option<Arc<dyn StoreRead<S>>>) {
        let store = match committed.all() {
            Some(_) => None,
            None => {
                committed.watch_stored();
                committed.take_stored();
                reader
            }
        };
        let keys = committed.unstored().map(|(k, e)| (k.clone(), e.clone())).collect();
        let journal_below = self.progress.as_ref().map(|pr| pr.acked(p));
        self.parts.insert(p, Part::Ready(Ready { keys, store, journal_below, committed_ms: 0 }));
        self.publish();
    }

    /// The local store of partition `p` caught up with `keys`: they are read from it now.
    pub(super) fn stored(&mut self, p: i32, keys: Vec<S::Key>) {
        if let Some(Part::Ready(ready)) = self.parts.get_mut(&p) {
            for k in keys {
                ready.keys.remove(&k);
            }
        }
    }

    /// Partition `p`'s `changes` are committing (published by [`Self::settled`]).
    pub(super) fn changed(&mut self, p: i32, changes: &KeyMap<S::Key, Entity<S>>) {
        if changes.is_empty() {
            return;
        }
        if let Some(Part::Ready(ready)) = self.parts.get_mut(&p) {
            for (k, e) in changes {
                // With a store, a deletion stays until the store has it: it hides the older row.
                if S::is_deleted(&e.state) && ready.store.is_none() {
                    ready.keys.remove(k);
                } else {
                    ready.keys.insert(k.clone(), e.clone());
                }
            }
        }
    }

    /// The changes committed: publishes them, with how far each journal partition goes.
    pub(super) fn settled(&mut self, now_ms: u64) {
        for (p, part) in &mut self.parts {
            if let Part::Ready(ready) = part {
                ready.journal_below = self.progress.as_ref().map(|pr| pr.acked(*p));
                ready.committed_ms = now_ms;
            }
        }
        self.publish();
    }

    /// Partition `p` left this instance.
    pub(super) fn revoked(&mut self, p: i32) {
        if self.parts.remove(&p).is_some() {
            self.publish();
        }
    }
}

impl<S: EventSourced> Drop for ViewWriter<S> {
    /// The flow stopped: it owns nothing any more.
    fn drop(&mut self) {
        self.view.publish(BTreeMap::new(), false);
    }
}

#[cfg(all(test, feature = "query"))]
mod tests {
    use super::*;
    use crate::flow::view::{Lookup, StageView};
    use crate::stages::bank::{Account, Bank};
    use eventstage_journal::SeqNo;

    fn entity(balance: u64, seq: u64) -> Entity<Bank> {
        Entity { state: Arc::new(Account { open: balance > 0, balance }), seq: SeqNo(seq) }
    }

    fn balance(view: &View<Bank>, key: &str) -> Option<u64> {
        match view.get(key.as_bytes()) {
            Lookup::Found(v) => v["state"]["balance"].as_u64(),
            _ => None,
        }
    }

    #[test]
    fn queries_see_what_committed_and_nothing_of_partitions_gone() {
        let view = Arc::new(View::<Bank>::default());
        assert!(matches!(view.get(b"acct-1"), Lookup::Stopped), "before the flow runs");
        let mut writer = ViewWriter::new(view.clone(), None);
        writer.assigned(0);
        assert!(matches!(view.get(b"acct-1"), Lookup::Restoring), "a partition that restores answers later");
        let mut committed = Committed::<Bank>::default();
        committed.insert_read("acct-1".into(), entity(5, 1));
        writer.restored(0, &mut committed, None);
        assert_eq!(balance(&view, "acct-1"), Some(5));
        // Changes of a transaction are seen once it settled, not before.
        let changes: KeyMap<String, Entity<Bank>> =
            [("acct-1".to_string(), entity(7, 2)), ("acct-2".to_string(), entity(3, 1))].into_iter().collect();
        writer.changed(0, &changes);
        assert_eq!(balance(&view, "acct-1"), Some(5), "not published before the commit settled");
        assert!(matches!(view.get(b"acct-2"), Lookup::Missing));
        writer.settled(42);
        assert_eq!((balance(&view, "acct-1"), balance(&view, "acct-2")), (Some(7), Some(3)));
        // A deleted account (closed, empty) has no state.
        let closed: KeyMap<String, Entity<Bank>> = [("acct-2".to_string(), entity(0, 2))].into_iter().collect();
        writer.changed(0, &closed);
        writer.settled(43);
        assert!(matches!(view.get(b"acct-2"), Lookup::Missing));
        // A prefix scan, paged.
        let scan = view.scan(b"acct-", None, 10);
        assert_eq!(scan.items.len(), 1);
        assert_eq!(scan.partitions, vec![0]);
        // Revoked: gone at once; the flow stopped: nothing.
        writer.revoked(0);
        assert!(matches!(view.get(b"acct-1"), Lookup::Missing), "a plain flow searched every partition here: none");
        drop(writer);
        assert!(matches!(view.get(b"acct-1"), Lookup::Stopped));
    }
}
