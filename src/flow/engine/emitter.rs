//! The flow's output side, on a thread of its own: the output mapping and the produce calls.
//!
//! The flow thread decodes, runs the stage and journals; the emitter thread turns each outcome into
//! output records (the user's mapping, usually serialization) and hands them to the producer. A
//! produce call costs about as much as the rest of a command together (librdkafka copies the
//! record, picks its partition and wakes its broker thread), so two threads keep up with twice the
//! input a single one does. Order is kept: one emitter thread produces outcomes in the order the
//! flow thread handed them over.
//!
//! Commands are handed over [`HANDOFF`] at a time (one wake-up of the emitter per batch), at once
//! when the input runs dry, and before every transaction boundary the flow thread waits until
//! everything handed over is produced ([`Emitter::flush`]): a commit covers exactly the outputs of
//! the inputs it commits, and an abort every output of the aborted transaction. At-least-once
//! batches count each handed-over command as one delivery until its records are produced, so a
//! batch is never taken as acknowledged while its outputs are still on their way to the producer.

use super::producer::Sink;
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::record::{Context, InputRecord, OutputRecord, Outputs, Processed};
use crate::stage::EventSourced;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Commands handed to the emitter thread at once.
const HANDOFF: usize = 64;
/// Outcomes held while a transaction commits before the flow stops consuming until it committed.
const MAX_HELD: usize = 50_000;
/// Hand-overs waiting for the emitter thread before the flow thread waits for it (back-pressure).
const QUEUED_HANDOFFS: usize = 64;

/// What the stage made of one input record, owned: the emitter thread maps it to output records.
pub(super) struct Outcome<S: EventSourced> {
    pub(super) input: InputRecord,
    pub(super) key: S::Key,
    pub(super) events: Vec<S::Event>,
    pub(super) outcome: Result<S::Reply, S::Rejection>,
    /// The entity's state after the events.
    pub(super) state: Arc<S::State>,
    /// What the decoder handed over for the output mapping.
    pub(super) context: Context,
}

enum Job<S: EventSourced> {
    /// Output records from the mapping.
    Outcome(usize, Outcome<S>),
    /// One record as it is (a dead letter, an outbox record produced again): batch, partition.
    Record(usize, i32, OutputRecord),
}

enum Message<S: EventSourced> {
    Jobs(Vec<Job<S>>),
    /// Answered once every job before it is produced.
    Flush(SyncSender<Flushed>),
    /// The jobs after it go to this producer (exactly once alternates two).
    Use(Arc<Sink>),
}

struct Flushed {
    failure: Option<FlowError>,
    outbox: Vec<(i32, OutputRecord)>,
}

/// Set by the emitter thread when a job failed; `stop` by the flow thread to have it skip the rest.
#[derive(Default)]
struct Flags {
    failed: AtomicBool,
    stop: AtomicBool,
}

/// The flow thread's end of the emitter.
pub(super) struct Emitter<S: EventSourced> {
    sink: Arc<Sink>,
    collected: Vec<Job<S>>,
    /// While a transaction commits, the next one's records wait here (the producer takes no
    /// record between a commit and the next begin).
    held: bool,
    queue: Option<SyncSender<Message<S>>>,
    flags: Arc<Flags>,
    thread: Option<JoinHandle<()>>,
}

impl<S: EventSourced> Emitter<S> {
    /// Starts the emitter thread. With `keep_outbox`, every record it produces is also handed back
    /// at the next flush (the sled journal's outbox).
    pub(super) fn start(
        outputs: Outputs<S>,
        sink: Arc<Sink>,
        metrics: Arc<Metrics>,
        keep_outbox: bool,
    ) -> Result<Self, FlowError> {
        let (queue, jobs) = sync_channel(QUEUED_HANDOFFS);
        let flags = Arc::new(Flags::default());
        let worker = Worker { outputs, sink: sink.clone(), metrics, flags: flags.clone(), keep_outbox };
        let thread = std::thread::Builder::new()
            .name(format!("eventstage-emit-{}", S::NAME))
            .spawn(move || worker.run(jobs))
            .map_err(|e| FlowError::Config(format!("cannot start the flow's emitter thread: {e}")))?;
        Ok(Self {
            sink,
            collected: Vec::with_capacity(HANDOFF),
            held: false,
            queue: Some(queue),
            flags,
            thread: Some(thread),
        })
    }

    /// Queues an outcome's output records for `batch`.
    pub(super) fn outcome(&mut self, batch: usize, outcome: Outcome<S>) -> Result<(), FlowError> {
        self.push(batch, Job::Outcome(batch, outcome))
    }

    /// Queues one record of partition `p` for `batch`.
    pub(super) fn record(&mut self, batch: usize, p: i32, record: OutputRecord) -> Result<(), FlowError> {
        self.push(batch, Job::Record(batch, p, record))
    }

    fn push(&mut self, batch: usize, job: Job<S>) -> Result<(), FlowError> {
        // Counted until the emitter thread has produced the job's records (at-least-once).
        self.sink.deliveries.add(batch);
        self.collected.push(job);
        if self.collected.len() >= HANDOFF && !self.held {
            return self.hand_off();
        }
        Ok(())
    }

    /// Holds what is queued from now on until [`release`](Self::release): a transaction commits,
    /// and the records of the next wait for its begin.
    pub(super) fn hold(&mut self) {
        self.held = true;
    }

    /// Hands what was held to the emitter thread: the next transaction has begun.
    pub(super) fn release(&mut self) -> Result<(), FlowError> {
        self.held = false;
        self.hand_off()
    }

    /// What is handed over from now on (what is held included) goes to `sink`'s producer; what
    /// was handed over before goes to the producer it was handed over for.
    pub(super) fn switch(&mut self, sink: &Arc<Sink>) -> Result<(), FlowError> {
        if !Arc::ptr_eq(&self.sink, sink) {
            self.sink = sink.clone();
            self.send(Message::Use(sink.clone()))?;
        }
        Ok(())
    }

    /// Holds records now.
    pub(super) fn holds(&self) -> bool {
        self.held
    }

    /// Holds so many records that consumption should wait for the commit under way.
    pub(super) fn holds_too_many(&self) -> bool {
        self.held && self.collected.len() >= MAX_HELD
    }

    /// Drops what was held (its transaction is aborted before it began).
    pub(super) fn discard_held(&mut self) {
        if self.held {
            for job in self.collected.drain(..) {
                let (Job::Outcome(batch, _) | Job::Record(batch, _, _)) = job;
                self.sink.deliveries.done(batch);
            }
            self.held = false;
        }
    }

    /// Hands the collected commands to the emitter thread; the error of an earlier one, if any.
    pub(super) fn hand_off(&mut self) -> Result<(), FlowError> {
        if !self.collected.is_empty() && !self.held {
            let jobs = std::mem::replace(&mut self.collected, Vec::with_capacity(HANDOFF));
            self.send(Message::Jobs(jobs))?;
        }
        if self.flags.failed.load(Ordering::Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    /// Waits until everything queued is produced (not what is held): its first failure, or the
    /// records it produced for the outbox since the last flush.
    pub(super) fn flush(&mut self) -> Result<Vec<(i32, OutputRecord)>, FlowError> {
        if !self.collected.is_empty() && !self.held {
            let jobs = std::mem::take(&mut self.collected);
            self.send(Message::Jobs(jobs))?;
        }
        let (reply, flushed) = sync_channel(1);
        self.send(Message::Flush(reply))?;
        let flushed = flushed.recv().map_err(|_| Self::gone())?;
        match flushed.failure {
            Some(e) => Err(e),
            None => Ok(flushed.outbox),
        }
    }

    fn send(&self, message: Message<S>) -> Result<(), FlowError> {
        self.queue.as_ref().ok_or_else(Self::gone)?.send(message).map_err(|_| Self::gone())
    }

    fn gone() -> FlowError {
        FlowError::Crashed("the flow's emitter thread stopped".into())
    }
}

impl<S: EventSourced> Drop for Emitter<S> {
    /// Stops the emitter thread without producing what is still queued (the flow stopped; an open
    /// transaction is not committed).
    fn drop(&mut self) {
        self.flags.stop.store(true, Ordering::SeqCst);
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker<S: EventSourced> {
    outputs: Outputs<S>,
    sink: Arc<Sink>,
    metrics: Arc<Metrics>,
    flags: Arc<Flags>,
    keep_outbox: bool,
}

impl<S: EventSourced> Worker<S> {
    fn run(mut self, jobs: Receiver<Message<S>>) {
        let (mut failure, mut outbox) = (None, Vec::new());
        while let Ok(message) = jobs.recv() {
            match message {
                Message::Jobs(batch) => {
                    // Counted once per hand-over: the flow thread writes its counters next to it.
                    let mut records_out = 0;
                    for job in batch {
                        let id = match &job {
                            Job::Outcome(id, _) | Job::Record(id, _, _) => *id,
                        };
                        if failure.is_none() && !self.flags.stop.load(Ordering::Relaxed) {
                            match self.emit(job, &mut outbox) {
                                Ok(n) => records_out += n,
                                Err(e) => {
                                    self.flags.failed.store(true, Ordering::Relaxed);
                                    failure = Some(e);
                                }
                            }
                        }
                        self.sink.deliveries.done(id);
                    }
                    self.metrics.records_out.fetch_add(records_out, Ordering::Relaxed);
                }
                Message::Flush(reply) => {
                    self.flags.failed.store(false, Ordering::Relaxed);
                    let _ = reply.send(Flushed { failure: failure.take(), outbox: std::mem::take(&mut outbox) });
                }
                Message::Use(sink) => self.sink = sink,
            }
        }
    }

    /// Produces a job's records: how many of them are output records (dead letters and outbox
    /// records produced again are not counted).
    fn emit(&self, job: Job<S>, outbox: &mut Vec<(i32, OutputRecord)>) -> Result<u64, FlowError> {
        let (batch, p, records, outputs) = match job {
            Job::Record(batch, p, record) => (batch, p, vec![record], 0),
            Job::Outcome(batch, o) => {
                let processed = Processed {
                    input: &o.input,
                    key: &o.key,
                    events: &o.events,
                    outcome: &o.outcome,
                    state: o.state.as_ref(),
                    context: &o.context,
                };
                let records = catch_unwind(AssertUnwindSafe(|| (self.outputs)(&processed))).map_err(|panic| {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    FlowError::Crashed(format!("the output mapping panicked: {msg}"))
                })?;
                let n = records.len() as u64;
                (batch, o.input.partition, records, n)
            }
        };
        for record in &records {
            self.sink.produce_output(batch, record)?;
        }
        if self.keep_outbox {
            outbox.extend(records.into_iter().map(|r| (p, r)));
        }
        Ok(outputs)
    }
}
