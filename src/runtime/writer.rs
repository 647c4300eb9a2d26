//! The writer task: group commit.
//!
//! It takes whatever commands are queued (up to `max_batch`), runs each against the state as it is
//! after the previous commands of the same batch, writes all their events and due snapshots with one
//! journal append, flushes once (durable mode), then publishes the new states and sends the replies.
//! Commands keep arriving while a batch is being written, so the next batch grows with the load: one
//! fsync serves many callers.

use super::{read, Durability, Outcome, Request, RuntimeConfig, Shared, States};
use crate::error::{Error, Result};
use crate::replay::Entity;
use crate::stage::{EntityKey, EventSourced};
use eventstage_journal::{printable_key, Batch, Envelope, EventRecord, Journal, SnapshotRecord, SourcePosition};
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

pub(super) struct Writer<S: EventSourced, J: Journal> {
    pub(super) stage: S,
    pub(super) journal: J,
    pub(super) config: RuntimeConfig,
    pub(super) shared: Arc<Shared<S>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A command's result waiting for its batch to commit.
type Pending<S> = (oneshot::Sender<Outcome<S>>, Outcome<S>);

/// What an accepted command persists: the entity after its events, and their records.
type Persisted<S> = Option<(Entity<S>, Vec<EventRecord>)>;

impl<S: EventSourced, J: Journal> Writer<S, J> {
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Request<S>>) {
        let mut batch = Vec::with_capacity(self.config.max_batch);
        loop {
            let first = tokio::select! {
                // Queued commands first: shutdown drains them.
                biased;
                r = rx.recv() => r,
                () = self.shared.close.notified() => {
                    rx.close();
                    rx.recv().await
                }
            };
            let Some(first) = first else { break };
            batch.push(first);
            while batch.len() < self.config.max_batch {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.process(&mut batch).await {
                let cause = e.to_string();
                tracing::error!(stage = S::NAME, error = %cause, "journal write failed; the stage stops");
                *self.shared.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(cause);
                // Commands still queued are answered by dropping them (`ask` reports Stopped).
                rx.close();
                break;
            }
            if self.shared.closed.load(Ordering::SeqCst) {
                rx.close();
            }
        }
    }

    /// Runs one command on `entity`, returning the outcome and, if it persisted events, the new
    /// entity and the records to write.
    fn run_command(
        &self,
        key: &S::Key,
        entity: &Entity<S>,
        command: S::Command,
        now: u64,
    ) -> (Outcome<S>, Persisted<S>) {
        let panicked =
            |message| Error::HandlerPanicked { stage: S::NAME.into(), key: printable_key(&key.to_bytes()), message };
        let executed = match crate::stage::execute(&self.stage, &entity.state, command) {
            Ok(executed) => executed,
            Err(message) => return (Err(panicked(message)), None),
        };
        if !executed.timers.is_empty() {
            return (Err(Error::Timers { stage: S::NAME.into(), key: printable_key(&key.to_bytes()) }), None);
        }
        let Some(state) = executed.state else { return (Ok(executed.outcome), None) };
        // A user's Serialize may panic too: caught like the handlers.
        let encoded = catch_unwind(AssertUnwindSafe(|| {
            let raw_key = key.to_bytes().into_owned();
            let mut seq = entity.seq;
            let mut records = Vec::with_capacity(executed.events.len());
            for event in &executed.events {
                seq = seq.next();
                let payload = crate::stage::encode_event::<S>(self.config.codec, event)?;
                let envelope = Envelope::event(self.config.codec.id(), S::EVENT_VERSION, now, payload);
                records.push(EventRecord { key: raw_key.clone(), seq, envelope });
            }
            Ok((seq, records))
        }));
        match encoded {
            Ok(Ok((seq, records))) => (Ok(executed.outcome), Some((Entity { state: Arc::new(state), seq }, records))),
            Ok(Err(source)) => {
                (Err(Error::Encode { stage: S::NAME.into(), key: printable_key(&key.to_bytes()), source }), None)
            }
            Err(panic) => (Err(panicked(crate::stage::panic_message(&*panic))), None),
        }
    }

    fn snapshot(&self, key: &S::Key, entity: &Entity<S>, now: u64) -> Result<SnapshotRecord> {
        let payload = crate::stage::encode_state::<S>(self.config.codec, &entity.state)
            .map_err(|source| Error::Encode { stage: S::NAME.into(), key: printable_key(&key.to_bytes()), source })?;
        Ok(SnapshotRecord {
            key: key.to_bytes().into_owned(),
            seq: entity.seq,
            envelope: Envelope::snapshot(self.config.codec.id(), S::STATE_VERSION, now, payload),
        })
    }

    /// Processes one batch. An `Err` means the journal failed: the callers of the batch got the error
    /// and the stage must stop, since the journal may or may not hold the batch.
    async fn process(&self, requests: &mut Vec<Request<S>>) -> Result<()> {
        let now = now_ms();
        // Working copies of the entities this batch touched: (state before the batch's seq, entity).
        let mut touched: HashMap<S::Key, (u64, Entity<S>)> = HashMap::new();
        // With a state cache: keys whose state the journal could not give, with the reason.
        let mut unreadable: HashMap<S::Key, String> = HashMap::new();
        match &self.shared.states {
            States::All(states) => {
                let states = read(states);
                for r in requests.iter() {
                    if !touched.contains_key(&r.key) {
                        let entity = states.get(&r.key).cloned().unwrap_or_default();
                        touched.insert(r.key.clone(), (entity.seq.0, entity));
                    }
                }
            }
            States::Cached(cached) => {
                // The keys alone cross the await (a command need not be Sync).
                cached.load_batch(requests.iter().map(|r| &r.key).collect(), &mut touched, &mut unreadable).await;
            }
        }
        let mut pending: Vec<Pending<S>> = Vec::with_capacity(requests.len());
        let mut batch = Batch::default();
        // The furthest position of each source partition this batch consumed, stored with its events.
        let mut positions: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for Request { key, command, reply, position } in requests.drain(..) {
            if let Some(p) = position {
                let next = positions.entry((p.topic, p.partition)).or_insert(p.next_offset);
                *next = (*next).max(p.next_offset);
            }
            if let Some(cause) = unreadable.get(&key) {
                let key = printable_key(&key.to_bytes());
                pending.push((reply, Err(Error::Unreadable { stage: S::NAME.into(), key, cause: cause.clone() })));
                continue;
            }
            let Some((_, entity)) = touched.get_mut(&key) else { continue };
            let (outcome, persisted) = self.run_command(&key, entity, command, now);
            if let Some((new_entity, records)) = persisted {
                *entity = new_entity;
                batch.events.extend(records);
            }
            pending.push((reply, outcome));
        }
        if let Some(every) = std::num::NonZeroU64::new(self.config.snapshot_every) {
            for (key, (before, entity)) in &touched {
                if entity.seq.0 / every > *before / every {
                    match self.snapshot(key, entity, now) {
                        Ok(s) => batch.snapshots.push(s),
                        // A state that does not encode costs only its snapshot; events are safe.
                        Err(e) => tracing::warn!(stage = S::NAME, error = %e, "snapshot skipped"),
                    }
                }
            }
        }
        batch.positions = positions
            .into_iter()
            .map(|((topic, partition), next_offset)| SourcePosition { topic, partition, next_offset })
            .collect();
        if !batch.is_empty() {
            // Readers that miss the cache wait until the batch's states are in it (see cached.rs).
            let _gate = match &self.shared.states {
                States::Cached(cached) => Some(cached.gate.write().await),
                States::All(_) => None,
            };
            let written = match self.journal.append(batch).await {
                Ok(_) if self.config.durability == Durability::Durable => self.journal.flush().await,
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                let msg = e.to_string();
                for (reply, _) in pending {
                    let _ = reply.send(Err(Error::Stopped { stage: S::NAME.into(), cause: msg.clone() }));
                }
                return Err(Error::Journal(e));
            }
            let changed = touched.into_iter().filter(|(_, (before, entity))| entity.seq.0 != *before);
            match &self.shared.states {
                States::All(states) => {
                    let mut states = states.write().unwrap_or_else(|p| p.into_inner());
                    for (key, (_, entity)) in changed {
                        states.insert(key, entity);
                    }
                }
                States::Cached(cached) => {
                    for (key, (_, entity)) in changed {
                        cached.insert(key, entity);
                    }
                }
            }
        }
        for (reply, outcome) in pending {
            // A caller that stopped waiting does not matter to anyone else.
            let _ = reply.send(outcome);
        }
        Ok(())
    }
}
