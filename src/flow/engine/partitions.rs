//! State follows partitions: the consumer's rebalance callbacks restore a partition's state on
//! assignment (from the Kafka journal, or from sled with its positions and outbox) and commit and
//! release it on revocation.

use super::*;

pub(super) struct FlowContext<S: EventSourced> {
    pub(super) core: Arc<Mutex<Core<S>>>,
}

impl<S: EventSourced> ClientContext for FlowContext<S> {}

impl<S: EventSourced> ConsumerContext for FlowContext<S> {
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        // At-least-once commits are asynchronous; a failed one is superseded by the next.
        if let Err(e) = result {
            tracing::warn!(error = %e, partitions = offsets.count(), "offset commit failed; the next commit covers it");
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut core = lock(&self.core);
        let result = match rebalance {
            Rebalance::Revoke(tpl) => core.on_revoke(consumer, tpl),
            Rebalance::Assign(tpl) => core.on_assign(consumer, tpl),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                Ok(())
            }
        };
        if let Err(e) = result {
            core.failure.get_or_insert(e);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut core = lock(&self.core);
        if !matches!(rebalance, Rebalance::Assign(_)) || core.pending_seeks.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, p, o) in std::mem::take(&mut core.pending_seeks) {
            let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(o));
        }
        // Only an optimisation: records below the sled positions are skipped anyway.
        if let Err(e) = consumer.seek_partitions(tpl, TXN_TIMEOUT) {
            tracing::warn!(error = %e, "seek past inputs applied before a crash failed; they are skipped as they arrive");
        }
    }
}

pub(super) type FlowConsumer<S> = BaseConsumer<FlowContext<S>>;

/// Per partition: the newest journal entry per key read from the journal (`None`: deleted), and
/// the local store's rows, if any.
type Latest = BTreeMap<i32, (BTreeMap<Vec<u8>, Option<JournalEntry>>, Option<sled::Tree>)>;

/// A key's entity and the input positions its state includes.
type Restored<S> = (Entity<S>, Vec<SourcePosition>);

/// A key's entity and the input positions its state includes, from its journal entry (`None`:
/// an at-least-once deletion marker, without state).
fn entity_of<S: EventSourced>(raw: &[u8], entry: JournalEntry) -> Result<Option<Restored<S>>, FlowError> {
    let Some(env) = &entry.state else { return Ok(None) };
    let state = decode_state::<S>(env).map_err(|source| Error::Decode {
        stage: S::NAME.into(),
        key: printable_key(raw),
        seq: entry.last_seq.0,
        source,
    })?;
    Ok(Some((Entity { state: Arc::new(state), seq: entry.last_seq }, entry.sources)))
}

fn topic_partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| TopicPartition { topic: e.topic().to_string(), partition: e.partition() }).collect()
}

impl<S: EventSourced> Core<S> {
    fn on_assign(&mut self, consumer: &FlowConsumer<S>, tpl: &TopicPartitionList) -> Result<(), FlowError> {
        let committed =
            consumer.committed_offsets(tpl.clone(), TXN_TIMEOUT).map_err(|e| kafka("fetch committed offsets", e))?;
        for el in committed.elements() {
            let c = match el.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            let tp = (el.topic().to_string(), el.partition());
            let applied_until = self.offsets.get(&tp).map_or(-1, |o| o.applied_until);
            self.offsets.insert(tp, Offsets { committed: c, next: c, applied_until });
        }
        let wanted: Vec<i32> = tpl
            .elements()
            .iter()
            .map(|e| e.partition())
            .filter(|p| !self.partitions.contains_key(p))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        match &self.backend {
            Backend::Kafka(journal) => {
                self.metrics.restoring_partitions.fetch_add(wanted.len() as u64, Ordering::Relaxed);
                let latest = self.latest_entries(journal, &wanted, true);
                self.metrics.restoring_partitions.fetch_sub(wanted.len() as u64, Ordering::Relaxed);
                for (p, (entries, rows)) in latest? {
                    let restored = self.restore_entries(p, entries, rows)?;
                    self.partitions.insert(p, restored);
                }
                if let Some(checkpoints) = &self.checkpoints {
                    wanted.iter().for_each(|&p| checkpoints.follow(p));
                }
            }
            Backend::Sled(_) => {
                for p in wanted {
                    self.metrics.restoring_partitions.fetch_add(1, Ordering::Relaxed);
                    let restored = self.restore_sled(p);
                    self.metrics.restoring_partitions.fetch_sub(1, Ordering::Relaxed);
                    self.partitions.insert(p, restored?);
                }
            }
            Backend::None => {
                for p in wanted {
                    self.partitions.insert(p, PartitionState::new(KeyMap::default()));
                }
            }
        }
        self.metrics.assigned_partitions.store(self.offsets.len() as u64, Ordering::Relaxed);
        let assigned = topic_partitions(tpl);
        tracing::info!(partitions = ?assigned, "assigned and restored");
        self.notify(RebalanceEvent::Assigned(assigned));
        Ok(())
    }

    /// Tells the listeners: the synchronous ones now, in the order they were added (their seeks
    /// are done once librdkafka has made the assignment), the async one through its task.
    fn notify(&mut self, event: RebalanceEvent) {
        let committed: Vec<(TopicPartition, i64)> = self
            .offsets
            .iter()
            .map(|((topic, partition), o)| {
                (TopicPartition { topic: topic.clone(), partition: *partition }, o.committed)
            })
            .collect();
        for listener in &mut self.parts.on_rebalance {
            let mut actions = RebalanceActions { committed: &committed, seeks: &mut self.pending_seeks };
            let ran = catch_unwind(AssertUnwindSafe(|| listener(&event, &mut actions)));
            if ran.is_err() {
                tracing::error!(?event, "the rebalance listener panicked; going on");
            }
        }
        if let Some(tx) = &self.rebalance_events {
            let _ = tx.send(event);
        }
    }

    /// Restores partition `p` from sled and reconciles sled's positions with the group's committed
    /// offsets (see `sled_backend`).
    fn restore_sled(&mut self, p: i32) -> Result<PartitionState<S>, FlowError> {
        let Backend::Sled(sled) = &mut self.backend else { return Err(FlowError::Config("not a sled journal".into())) };
        let restored = sled.restore::<S>(&self.rt, p)?;
        let dir = sled.dir().to_path_buf();
        let stored: HashMap<(String, i32), i64> =
            restored.positions.iter().map(|pos| ((pos.topic.clone(), pos.partition), pos.next_offset)).collect();
        let mut ahead = false;
        for ((topic, part), o) in self.offsets.iter_mut().filter(|((_, part), _)| *part == p) {
            let sled_next = stored.get(&(topic.clone(), *part)).copied().unwrap_or(-1);
            if sled_next < o.committed {
                return Err(FlowError::Config(format!(
                    "the sled journal at {} is behind the group's committed offset of {topic}[{part}] ({sled_next} < {}): its state was lost or belongs to another instance; a sled journal must stay with the instance that wrote it (use a Kafka journal to move partitions between instances)",
                    dir.display(),
                    o.committed
                )));
            }
            o.applied_until = sled_next;
            if sled_next > o.committed {
                tracing::warn!(topic = %topic, partition = part, kafka = o.committed, sled = sled_next,
                    "inputs were applied before a crash but not committed to Kafka: producing their outputs again from the outbox");
                o.next = sled_next;
                self.pending_seeks.push((topic.clone(), *part, sled_next));
                ahead = true;
            }
        }
        if ahead {
            self.dirty = true;
            for o in restored.outbox {
                self.emit(p, o)?;
            }
        }
        Ok(PartitionState::new(restored.entities.into_iter().collect()))
    }

    /// The newest journal entry per key (`None`: deleted) of each partition of `wanted` and, if
    /// the flow has a local store, its rows of the partition: the journal's records after the
    /// store's checkpoint (or all of them), read by one consumer for all partitions in parallel.
    fn latest_entries(&self, journal: &KafkaJournal, wanted: &[i32], use_store: bool) -> Result<Latest, FlowError> {
        let mut latest: Latest = wanted.iter().map(|&p| (p, (BTreeMap::new(), None))).collect();
        let mut from: Vec<(i32, i64)> = wanted.iter().map(|&p| (p, 0)).collect();
        if let (Some(checkpoints), false, true) = (&self.checkpoints, wanted.is_empty(), use_store) {
            let marks = journal.watermarks(wanted)?;
            for (p, start) in &mut from {
                let loaded = checkpoints.load(*p, marks.get(p).copied().unwrap_or_default())?;
                *start = loaded.from;
                latest.insert(*p, (BTreeMap::new(), loaded.rows));
            }
        }
        let stats = journal.restore_partitions_from(&from, RESTORE_STALL, |p, _, key, entry| {
            latest.entry(p).or_default().0.insert(key.to_vec(), entry);
        })?;
        self.metrics.restored_records.fetch_add(stats.records, Ordering::Relaxed);
        if !wanted.is_empty() {
            tracing::info!(partitions = ?wanted, journal_records = stats.records, elapsed_ms = stats.elapsed.as_millis() as u64, "read the journal");
        }
        Ok(latest)
    }

    /// The state of partition `p` from the newest journal entry of each key (`None`: deleted), on
    /// top of the local store's `rows` (read as keys are first used).
    fn restore_entries(
        &self,
        p: i32,
        latest: BTreeMap<Vec<u8>, Option<JournalEntry>>,
        rows: Option<sled::Tree>,
    ) -> Result<PartitionState<S>, FlowError> {
        let mut committed = KeyMap::with_capacity_and_hasher(latest.len(), ahash::RandomState::new());
        let mut applied = KeyMap::default();
        for (raw, entry) in latest {
            let key = S::Key::from_bytes(&raw)
                .ok_or_else(|| Error::BadKey { stage: S::NAME.into(), key: printable_key(&raw) })?;
            match entry {
                Some(entry) => {
                    if let Some((entity, sources)) = entity_of::<S>(&raw, entry)? {
                        committed.insert(key.clone(), entity);
                        if !sources.is_empty() {
                            applied.insert(key, sources);
                        }
                    }
                }
                // Deleted after the store's checkpoint: its row there is older.
                None if rows.is_some() => {
                    committed.insert(key, Entity { state: Arc::new(S::State::default()), seq: SeqNo::ZERO });
                }
                None => {}
            }
        }
        tracing::info!(partition = p, keys = committed.len(), local_store = rows.is_some(), "restored partition state");
        let mut restored = PartitionState::new(committed);
        restored.applied = applied;
        restored.rows = rows;
        Ok(restored)
    }

    /// Reads `key`'s state from the local store into partition `p`'s state, the first time it is
    /// used. A row that cannot be read drops the partition's store and restores it from the
    /// journal in full.
    pub(super) fn fault_in(&mut self, p: i32, key: &S::Key) -> Result<(), FlowError> {
        let Some(part) = self.partitions.get_mut(&p) else { return Ok(()) };
        let Some(rows) = &part.rows else { return Ok(()) };
        if part.overlay.contains_key(key) || part.committed.contains_key(key) {
            return Ok(());
        }
        let raw = key.to_bytes();
        let entry = match rows.get(raw.as_ref()) {
            Ok(None) => None,
            Ok(Some(v)) => match JournalEntry::decode(&v) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    let why = format!("the row of key {} does not decode ({e})", printable_key(&raw));
                    return self.restore_in_full(p, &why);
                }
            },
            Err(e) => return self.restore_in_full(p, &format!("sled: {e}")),
        };
        self.metrics.store_rows.fetch_add(u64::from(entry.is_some()), Ordering::Relaxed);
        let found = match entry {
            Some(entry) => entity_of::<S>(&raw, entry)?,
            None => None,
        };
        // A key without a row is remembered too (as the default state): it is not looked up again.
        let (entity, sources) =
            found.unwrap_or_else(|| (Entity { state: Arc::new(S::State::default()), seq: SeqNo::ZERO }, Vec::new()));
        if !sources.is_empty() {
            part.applied.insert(key.clone(), sources);
        }
        part.committed.insert(key.clone(), entity);
        Ok(())
    }

    /// Drops partition `p`'s local store (`why` it cannot be used) and restores the partition's
    /// committed state from the journal in full, keeping the open transaction's changes.
    fn restore_in_full(&mut self, p: i32, why: &str) -> Result<(), FlowError> {
        let Backend::Kafka(journal) = &self.backend else { return Ok(()) };
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.drop_partition(p, why);
        }
        let journal = journal.clone();
        let (entries, _) = self.latest_entries(&journal, &[p], false)?.remove(&p).unwrap_or_default();
        let mut restored = self.restore_entries(p, entries, None)?;
        if let Some(old) = self.partitions.remove(&p) {
            for (key, sources) in old.applied {
                if old.overlay.contains_key(&key) {
                    restored.applied.insert(key, sources);
                }
            }
            restored.overlay = old.overlay;
            restored.unjournaled = old.unjournaled;
            restored.deferred = old.deferred;
        }
        self.partitions.insert(p, restored);
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.follow(p);
        }
        Ok(())
    }

    fn on_revoke(&mut self, consumer: &FlowConsumer<S>, tpl: &TopicPartitionList) -> Result<(), FlowError> {
        let lost = consumer.assignment_lost();
        let committed = if lost {
            // Another instance may own them already: nothing of the open work may commit.
            tracing::warn!(partitions = tpl.count(), "partitions lost (session expired?): dropping uncommitted work");
            if self.committer.is_some() {
                // Journal records already handed to the producer land before any restore reads
                // the journal again (ours on reassignment, or the new owner's).
                if let Err(e) = self.emitter.flush() {
                    tracing::warn!(error = %e, "producing outputs after losing partitions failed");
                }
                if let Err(e) = self.sink.producer().flush(TXN_TIMEOUT) {
                    tracing::warn!(error = %e, "flushing the producer after losing partitions failed");
                }
                self.drop_batches();
                self.discard_open_work();
                Ok(())
            } else {
                let aborted = self.abort_and_rewind(consumer).or_else(|e| match e {
                    FlowError::Fenced { .. } => Err(e),
                    other => {
                        tracing::warn!(error = %other, "aborting the lost partitions' transaction failed");
                        Ok(())
                    }
                });
                aborted.and_then(|()| self.sink.begin())
            }
        } else {
            // Finish in-flight work: commit before the partitions go to another instance.
            self.finish(consumer)
        };
        let event = if lost { RebalanceEvent::Lost } else { RebalanceEvent::Revoked };
        self.notify(event(topic_partitions(tpl)));
        for el in tpl.elements() {
            self.offsets.remove(&(el.topic().to_string(), el.partition()));
        }
        let still: BTreeSet<i32> = self.offsets.keys().map(|(_, p)| *p).collect();
        self.partitions.retain(|p, _| still.contains(p));
        for el in tpl.elements().iter().filter(|el| !still.contains(&el.partition())) {
            if let Backend::Sled(sled) = &mut self.backend {
                sled.release(el.partition());
            }
            if let Some(checkpoints) = &self.checkpoints {
                checkpoints.release(el.partition());
            }
        }
        self.metrics.assigned_partitions.store(self.offsets.len() as u64, Ordering::Relaxed);
        tracing::info!(partitions = tpl.count(), "revoked");
        committed
    }
}
