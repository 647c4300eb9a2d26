//! The flow thread: consumer, transactional producer and per-partition state, all on one thread.

use super::checkpoint::Checkpoints;
use super::settings::{AsyncListener, Enrichment, SyncListener};
use super::shared::{kafka, lock, now_ms};
use super::sled_backend::SledBackend;
use super::{
    BadInput, CommitterSettings, Decoder, FlowError, FlowJournal, Guarantee, Metrics, OutputRecord, Outputs,
    RebalanceEvent, ABORT, DRAIN,
};
use crate::codec::Codec;
use crate::stage::EventSourced;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Timeout of one blocking transactional call.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);
/// While records keep coming, the flow loop reads the clock (is a commit due?) once per this many.
const CLOCK_EVERY: u32 = 32;
/// A restore that reads nothing for this long fails.
const RESTORE_STALL: Duration = Duration::from_secs(60);

pub(super) struct Settings {
    pub(super) common: ClientConfig,
    pub(super) consumer: ClientConfig,
    pub(super) producer: ClientConfig,
    pub(super) transactional_id: String,
    pub(super) inputs: Vec<String>,
    pub(super) journal: FlowJournal,
    /// The consumer group, which owns the Kafka journal.
    pub(super) group: String,
    pub(super) take_over_journal: bool,
    pub(super) store: Option<super::checkpoint::StoreSettings>,
    pub(super) snapshot_every: u64,
    pub(super) commit_interval: Duration,
    pub(super) bad_input: BadInput,
    pub(super) codec: Codec,
    pub(super) guarantee: Guarantee,
    pub(super) committer: CommitterSettings,
    /// Bounds the whole start (see `startup::Setup`).
    pub(super) setup_timeout: Duration,
}

mod committer;
mod emitter;
mod enrich;
mod kafka_storage;
mod partitions;
mod records;
mod sled_storage;
mod startup;
mod state;
mod storage;
mod txn;

use committer::{Committer, Deliveries, Delivery, Transactions, Wait};
use emitter::{Emitter, Sink};
use enrich::Pipeline;
use kafka_storage::KafkaStorage;
use partitions::{FlowConsumer, FlowContext};
use sled_storage::SledStorage;
use startup::{
    blocking_runtime, claim_journal, consumer_fatal, input_partitions, start_producer, with_backoff, JournalCheck,
    Setup,
};
use state::{Assigned, KeyMap, Offsets, PartitionState};
use storage::{NoStorage, Storage};

pub(super) struct Parts<S: EventSourced> {
    pub(super) stage: S,
    pub(super) decoder: Decoder<S>,
    pub(super) enrich: Option<Enrichment<S>>,
    pub(super) on_rebalance: Vec<SyncListener>,
    pub(super) on_rebalance_async: Option<AsyncListener>,
    pub(super) tasks: Option<Tasks>,
}

/// Where enrichment calls and async listeners run: the tokio runtime the flow was started from,
/// or one of the flow's own.
pub(super) struct Tasks {
    handle: tokio::runtime::Handle,
    _own: Option<tokio::runtime::Runtime>,
}

impl Tasks {
    pub(super) fn current_or_own() -> Result<Self, FlowError> {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            return Ok(Self { handle, _own: None });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("eventstage-flow-tasks")
            .enable_all()
            .build()
            .map_err(|e| FlowError::Config(format!("cannot start the flow's task runtime: {e}")))?;
        Ok(Self { handle: rt.handle().clone(), _own: Some(rt) })
    }
}

/// The open transaction or batch: where its records go and how it commits.
struct Txn<S: EventSourced> {
    /// The transactional producer.
    sink: Arc<Sink>,
    /// Output records: mapped and produced on a thread of their own.
    emitter: Emitter<S>,
    /// How the flow delivers: transactions, or batches on their way to an offset commit.
    delivery: Delivery,
}

/// How often a running flow logs a progress line at INFO (rate, lag).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The flow thread's state, shared with the consumer's rebalance callbacks.
struct Core<S: EventSourced> {
    parts: Parts<S>,
    assigned: Assigned<S>,
    txn: Txn<S>,
    /// Where the state is restored from and journaled to.
    storage: Box<dyn Storage<S>>,
    /// The storage keeps input positions: inputs below them were applied before a crash.
    skip_applied: bool,
    /// Enrichment calls and the records waiting for them.
    pipeline: Option<Pipeline<S>>,
    /// Feeds the async rebalance listener's task.
    rebalance_events: Option<tokio::sync::mpsc::UnboundedSender<RebalanceEvent>>,
    bad_input: BadInput,
    /// Throttles the warning per bad input record.
    bad_input_log: super::settings::Throttle,
    /// Wall clock (ms since the epoch) as of the flow loop's last look at the clock: the journal's
    /// timestamps, of events and of the snapshots in its records (read every few records, not per
    /// record or per key).
    wall_ms: u64,
    failure: Option<FlowError>,
    /// The flow stopped on an error: nothing of its open work may commit, not even in the
    /// revocation that closing the consumer runs.
    stopped: bool,
    metrics: Arc<Metrics>,
    /// The metrics facade's handles (see `flow::exported`).
    exported: super::exported::Exported,
}

impl<S: EventSourced> Core<S> {
    /// The at-least-once batch being filled (exactly-once has no batches: 0).
    fn batch(&self) -> usize {
        self.txn.delivery.batch()
    }

    /// Queues a record of partition `p`'s transaction for the emitter (which keeps it for the sled
    /// outbox).
    fn emit(&mut self, p: i32, o: OutputRecord) -> Result<(), FlowError> {
        let batch = self.batch();
        self.txn.emitter.record(batch, p, o)
    }

    /// Waits until the emitter has produced everything queued; with the sled journal (exactly
    /// once), the records it produced go to the outbox.
    fn flush_outputs(&mut self) -> Result<(), FlowError> {
        for (p, o) in self.txn.emitter.flush()? {
            self.storage.keep_output(p, o);
        }
        Ok(())
    }

    /// Asks the broker for the end offsets (a round trip per partition: call it rarely).
    fn update_lag(&self, consumer: &FlowConsumer<S>) {
        let mut lag = 0u64;
        for ((topic, p), o) in &self.assigned.offsets {
            if let Ok((_, high)) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(1)) {
                let behind = (high - o.next.max(0)).max(0) as u64;
                self.exported.partition_lag(topic, *p, behind);
                lag += behind;
            }
        }
        self.metrics.lag.store(lag, Ordering::Relaxed);
    }
}

pub(super) fn run<S: EventSourced>(
    settings: Settings,
    parts: Parts<S>,
    outputs: Outputs<S>,
    stop: Arc<AtomicU8>,
    metrics: Arc<Metrics>,
) -> Result<(), FlowError> {
    let run_started = Instant::now();
    let is_kafka = |e: &FlowError| matches!(e, FlowError::Kafka { .. });
    let at_least_once = settings.guarantee == Guarantee::AtLeastOnce;
    let deliveries = Arc::new(Deliveries::new(at_least_once));
    let setup = Setup::new(run_started, settings.setup_timeout, &settings.common, &stop);
    // The transactional producer's start (a round trip to the transaction coordinator, or 500 ms
    // when librdkafka's first try finds the coordinator not ready) does not depend on the input's
    // metadata nor on the Kafka journal's checks (its topic; its owner in the registry): it runs
    // beside them.
    let (journal, producer) = std::thread::scope(|s| {
        let (inputs_ok, inputs_checked) = std::sync::mpsc::channel::<()>();
        let (settings_, deliveries_, setup_) = (&settings, &deliveries, &setup);
        let producer = s.spawn(move || {
            let started = Instant::now();
            let producer =
                start_producer(settings_, deliveries_, setup_, at_least_once, || inputs_checked.recv().is_ok());
            tracing::debug!(producer_ms = started.elapsed().as_millis() as u64, "producer started");
            producer
        });
        let partitions = with_backoff(
            "reading the input topics' metadata",
            &setup,
            || input_partitions(&settings.common, &settings.inputs, setup.attempt(Duration::from_secs(10))),
            is_kafka,
        );
        if partitions.is_ok() {
            let _ = inputs_ok.send(());
        }
        drop(inputs_ok);
        let checked = partitions.and_then(|partitions| {
            tracing::debug!(metadata_ms = run_started.elapsed().as_millis() as u64, "input metadata read");
            match &settings.journal {
                FlowJournal::Kafka(topic) => {
                    let check = JournalCheck {
                        common: settings.common.clone(),
                        group: settings.group.clone(),
                        take_over: settings.take_over_journal,
                        inputs: settings.inputs.clone(),
                        topic: topic.clone(),
                        partitions,
                    };
                    setup.within("checking the journal topic", move || claim_journal(check)).map(Some)
                }
                _ => Ok(None),
            }
        });
        let producer =
            producer.join().unwrap_or_else(|_| Err(FlowError::Crashed("the producer's start panicked".into())));
        Ok::<_, FlowError>((checked?, producer?))
    })?;
    let storage: Box<dyn Storage<S>> = match &settings.journal {
        FlowJournal::Kafka(_) => {
            let journal = journal.ok_or_else(|| FlowError::Crashed("the journal was not checked".into()))?;
            let checkpoints = match &settings.store {
                Some(store) => Some(Checkpoints::start(store, &journal, &settings.common, S::NAME, metrics.clone())?),
                None => None,
            };
            Box::new(KafkaStorage::<S>::new(journal, checkpoints, settings.codec, at_least_once, metrics.clone()))
        }
        FlowJournal::Sled(dir) => Box::new(SledStorage::new(
            SledBackend::open(dir)?,
            blocking_runtime()?,
            settings.codec,
            settings.snapshot_every,
            metrics.clone(),
        )),
        FlowJournal::None => Box::new(NoStorage),
    };
    let mut parts = parts;
    let pipeline = match (parts.enrich.take(), &parts.tasks) {
        (Some((settings, f)), Some(tasks)) => Some(Pipeline::new(settings, f, tasks.handle.clone())),
        _ => None,
    };
    let rebalance_events = match (&parts.on_rebalance_async, &parts.tasks) {
        (Some(listener), Some(tasks)) => {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let listener = listener.clone();
            tasks.handle.spawn(async move {
                while let Some(event) = rx.recv().await {
                    listener(event).await;
                }
            });
            Some(tx)
        }
        _ => None,
    };
    let sink = Arc::new(Sink::new(
        producer,
        settings.producer.clone(),
        deliveries,
        settings.transactional_id.clone(),
        settings.inputs.first().cloned(),
    ));
    let keep_outbox = storage.keeps_outbox() && !at_least_once;
    let emitter = Emitter::start(outputs, sink.clone(), metrics.clone(), keep_outbox)?;
    let core = Arc::new(Mutex::new(Core {
        parts,
        assigned: Assigned {
            partitions: BTreeMap::new(),
            offsets: BTreeMap::new(),
            pending_seeks: Vec::new(),
            dirty: false,
        },
        txn: Txn {
            sink,
            emitter,
            delivery: if at_least_once {
                Delivery::Batches(Committer::new(settings.committer))
            } else {
                Delivery::Transactions(Transactions::default())
            },
        },
        skip_applied: storage.stores_positions(),
        storage,
        pipeline,
        rebalance_events,
        bad_input: settings.bad_input.clone(),
        bad_input_log: super::settings::Throttle::new(),
        wall_ms: now_ms(),
        failure: None,
        stopped: false,
        metrics: metrics.clone(),
        exported: super::exported::Exported::new(S::NAME, &settings.group),
    }));
    let consumer: FlowConsumer<S> =
        settings.consumer.create_with_context(FlowContext { core: core.clone() }).map_err(|e| kafka("consumer", e))?;
    let topics: Vec<&str> = settings.inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| kafka("subscribe", e))?;
    let journal_name = lock(&core).storage.name();
    let bad_input = match &settings.bad_input {
        BadInput::DeadLetter(dlq) => format!("dead-letter topic {dlq}"),
        BadInput::Stop => "stop".to_string(),
    };
    tracing::info!(stage = S::NAME, inputs = %settings.inputs.join(","), journal = %journal_name, transactional_id = %settings.transactional_id, bad_input = %bad_input, startup_ms = run_started.elapsed().as_millis() as u64, "flow running (joining the group)");

    let commit_every = match settings.committer.max_interval {
        Some(interval) if at_least_once => interval,
        _ => settings.commit_interval,
    };
    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now();
    let mut last_progress = (Instant::now(), 0u64);
    let mut polls = 0u32;
    let result = loop {
        match stop.load(Ordering::SeqCst) {
            // The open transaction is aborted below, with every other way of stopping on an error.
            ABORT => break Err(FlowError::Aborted),
            DRAIN => break lock(&core).finish(&consumer),
            _ => {}
        }
        // The lock is not held while polling: rebalance callbacks run inside poll and take it.
        // With enrichment, a full pipeline stops consumption (back-pressure) and a busy one is
        // polled without waiting, so finished calls reach the stage at once.
        let (room, busy) = {
            let c = lock(&core);
            c.pipeline.as_ref().map_or((true, false), |p| (p.has_room(), !p.is_empty()))
        };
        let mut waited = false;
        let polled = match (room, busy) {
            // Without waiting first (no clock reads while records are queued); before waiting,
            // the emitter gets what is collected, so outputs never wait for more input.
            (true, false) => match consumer.poll(Duration::ZERO) {
                None => {
                    waited = true;
                    let mut c = lock(&core);
                    if let Err(e) = c.txn.emitter.hand_off().or_else(|e| c.recover(&consumer, e)) {
                        break Err(e);
                    }
                    drop(c);
                    consumer.poll(Duration::from_millis(20))
                }
                polled => polled,
            },
            (true, true) => consumer.poll(Duration::ZERO),
            (false, _) => None,
        };
        let polled_none = polled.is_none();
        let mut c = lock(&core);
        // A fence of a timed-out transaction is recovered from wherever it surfaces (see
        // `Core::recover`); every other error stops the flow.
        if let Some(e) = c.failure.take() {
            match c.recover(&consumer, e) {
                // The consumer was rewound: a record polled before that comes again.
                Ok(()) => continue,
                Err(e) => break Err(e),
            }
        }
        match polled {
            Some(Ok(msg)) => {
                // After a recovery the consumer was rewound: the record comes again.
                if let Err(e) = c.process(&msg).or_else(|e| c.recover(&consumer, e)) {
                    break Err(e);
                }
            }
            // A fatal consumer error ends the consumer for good (librdkafka retries nothing):
            // the flow must stop, not idle as if healthy.
            Some(Err(KafkaError::MessageConsumptionFatal(code))) => break Err(consumer_fatal(code)),
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error (librdkafka retries)"),
            None => {
                if let Err(e) = c.txn.emitter.hand_off().or_else(|e| c.recover(&consumer, e)) {
                    break Err(e);
                }
                if let (true, Core { pipeline: Some(p), metrics, .. }) = (busy, &mut *c) {
                    p.wait(Duration::from_millis(if room { 2 } else { 20 }), metrics);
                }
            }
        }
        if let Err(e) =
            c.run_pipeline().and_then(|()| c.advance(&consumer, Wait::No)).or_else(|e| c.recover(&consumer, e))
        {
            break Err(e);
        }
        // The clock is read every CLOCK_EVERY records while records keep coming.
        polls = polls.wrapping_add(1);
        let now = (waited || polled_none || polls % CLOCK_EVERY == 0).then(|| {
            c.wall_ms = now_ms();
            Instant::now()
        });
        let due = now.is_some_and(|now| now.saturating_duration_since(last_commit) >= commit_every);
        if due || c.txn.delivery.due() {
            let started = now.unwrap_or_else(Instant::now);
            if let Err(e) = c.commit(&consumer).or_else(|e| c.recover(&consumer, e)) {
                break Err(e);
            }
            // The next commit is due one interval after this one started (as Kafka Streams
            // counts: a commit's own duration does not stretch the interval), but no sooner than
            // half an interval, or as long as this commit took, after it finished. The loop does
            // not consume while it commits, so after a commit slower than the interval the next
            // one would be due at once, after CLOCK_EVERY records: on Apache Kafka, where a commit
            // can take 100+ ms, the flow fell into committing every 32 commands (~300/s) while its
            // backlog grew. And a flow that spends less time processing than committing cannot
            // catch up: its transactions grow, so do its commits, and it falls further behind.
            let finished = Instant::now();
            let gap = (commit_every / 2).max(finished.saturating_duration_since(started));
            let due = (finished + gap).max(started + commit_every);
            last_commit = due.checked_sub(commit_every).unwrap_or(started);
            if last_lag.elapsed() >= Duration::from_secs(5) {
                c.update_lag(&consumer);
                last_lag = Instant::now();
            }
            let m = c.metrics.snapshot();
            c.exported.publish(&m);
            if last_progress.0.elapsed() >= PROGRESS_EVERY {
                let secs = last_progress.0.elapsed().as_secs_f64();
                let rate = (m.records_in - last_progress.1) as f64 / secs;
                tracing::info!(
                    records_per_s = rate.round() as u64,
                    lag = m.lag,
                    partitions = m.assigned_partitions,
                    commits = m.transactions,
                    aborts = m.aborts,
                    dead_letters = m.dead_letters,
                    "progress"
                );
                last_progress = (Instant::now(), m.records_in);
            }
        }
    };
    if result.is_err() {
        // The error may have come after the failed record's offset was counted (a command whose
        // events cannot be journaled): the open transaction is aborted, and closing the consumer
        // must not commit it on the way out.
        lock(&core).abandon();
    }
    if result.is_ok() {
        // Leave the group now; the revoke callback finds nothing left to commit.
        consumer.unsubscribe();
        let _ = consumer.poll(Duration::from_millis(100));
        lock(&core).storage.close();
    }
    drop(consumer);
    result
}
