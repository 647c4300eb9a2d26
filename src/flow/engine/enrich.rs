//! Async enrichment with bounded parallelism (Akka's `mapAsync`): each decoded record's command
//! goes to the user's async function on a tokio runtime; the flow thread hands the results to the
//! stage in input order per partition. At most `parallelism` records wait in the pipeline (calls
//! running or results waiting for an earlier record of their partition), and the flow stops
//! consuming while it is full.

use crate::flow::control::Metrics;
use crate::flow::record::{Context, Decoded, InputRecord};
use crate::flow::settings::{EnrichFn, EnrichSettings};
use crate::stage::EventSourced;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

/// A decoded record, or why it is not one.
type DecodeResult<S> = Result<Decoded<S>, String>;

struct Slot<S: EventSourced> {
    id: u64,
    input: InputRecord,
    /// `None` while its call runs.
    result: Option<DecodeResult<S>>,
}

struct Done<S: EventSourced> {
    topic: String,
    partition: i32,
    id: u64,
    key: S::Key,
    context: Context,
    result: Result<S::Command, String>,
}

pub(super) struct Pipeline<S: EventSourced> {
    enrich: EnrichFn<S::Key, S::Command>,
    parallelism: usize,
    handle: tokio::runtime::Handle,
    tx: mpsc::Sender<Done<S>>,
    rx: mpsc::Receiver<Done<S>>,
    /// Per input partition, its records in input order.
    queues: HashMap<(String, i32), VecDeque<Slot<S>>>,
    /// Records in the queues.
    queued: usize,
    /// Calls running (including calls whose records were dropped by a rewind).
    running: usize,
    next_id: u64,
}

impl<S: EventSourced> Pipeline<S> {
    pub(super) fn new(
        settings: EnrichSettings,
        enrich: EnrichFn<S::Key, S::Command>,
        handle: tokio::runtime::Handle,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            enrich,
            parallelism: settings.parallelism,
            handle,
            tx,
            rx,
            queues: HashMap::new(),
            queued: 0,
            running: 0,
            next_id: 0,
        }
    }

    /// Whether another record may enter.
    pub(super) fn has_room(&self) -> bool {
        self.queued < self.parallelism && self.running < self.parallelism
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Takes a decoded record: starts its call, or queues its decoding error in its place.
    pub(super) fn submit(&mut self, input: InputRecord, decoded: DecodeResult<S>, metrics: &Metrics) {
        let id = self.next_id;
        self.next_id += 1;
        let result = match decoded {
            Err(reason) => Some(Err(reason)),
            Ok((key, command, context)) => {
                self.running += 1;
                metrics.enrich_in_flight.store(self.running as u64, Ordering::Relaxed);
                metrics.max_enrich_in_flight.fetch_max(self.running as u64, Ordering::Relaxed);
                let (f, tx, topic, partition) =
                    (self.enrich.clone(), self.tx.clone(), input.topic.clone(), input.partition);
                self.handle.spawn(async move {
                    let result = f(key.clone(), command).await;
                    let _ = tx.send(Done { topic, partition, id, key, context, result });
                });
                None
            }
        };
        self.queues.entry((input.topic.clone(), input.partition)).or_default().push_back(Slot { id, input, result });
        self.queued += 1;
    }

    fn complete(&mut self, done: Done<S>, metrics: &Metrics) {
        self.running -= 1;
        metrics.enrich_in_flight.store(self.running as u64, Ordering::Relaxed);
        let Some(queue) = self.queues.get_mut(&(done.topic, done.partition)) else { return };
        if let Some(slot) = queue.iter_mut().find(|s| s.id == done.id) {
            slot.result = Some(done.result.map(|command| (done.key, command, done.context)));
        }
    }

    /// Waits up to `timeout` for a call to finish, then takes every finished call.
    pub(super) fn wait(&mut self, timeout: Duration, metrics: &Metrics) {
        if let Ok(done) = self.rx.recv_timeout(timeout) {
            self.complete(done, metrics);
        }
        self.collect(metrics);
    }

    fn collect(&mut self, metrics: &Metrics) {
        while let Ok(done) = self.rx.try_recv() {
            self.complete(done, metrics);
        }
    }

    /// The records whose turn has come: each partition's finished records up to its first
    /// unfinished one.
    pub(super) fn take_ready(&mut self, metrics: &Metrics) -> Vec<(InputRecord, DecodeResult<S>)> {
        self.collect(metrics);
        let mut ready = Vec::new();
        for queue in self.queues.values_mut() {
            while queue.front().is_some_and(|s| s.result.is_some()) {
                if let Some(Slot { input, result: Some(result), .. }) = queue.pop_front() {
                    ready.push((input, result));
                }
            }
        }
        self.queued -= ready.len();
        ready
    }

    /// Drops every waiting record (a rewind delivers them again); running calls finish unseen.
    pub(super) fn clear(&mut self) {
        self.queues.clear();
        self.queued = 0;
    }
}
