//! What the flow thread does once at start: the deadline of the whole start, the inputs'
//! partition count, a journal taken over from another group, and the error of a consumer that
//! cannot go on.

use super::cache::{CacheSettings, StoreProgress};
use super::core::{Core, FlowConsumer, FlowContext, Parts};
use super::emitter::Emitter;
use super::enrich::Pipeline;
use super::guarantee::Guarantee;
use super::kafka_storage::{KafkaStorage, StoreSettings};
use super::producer::{classify, connect_to_cluster, Deliveries, FlowProducerContext, Sink, TxnFailure};
use super::sled_storage::SledStorage;
use super::state::TaskManager;
use super::storage::{NoStorage, Storage};
use super::thread::{FlowThread, Report, Schedule};
use super::view::ViewWriter;
use crate::codec::Codec;
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::exported::Exported;
use crate::flow::record::Outputs;
use crate::flow::settings::Throttle;
use crate::flow::settings::{BadInput, CommitterSettings, FlowJournal};
use crate::flow::shared::{kafka, lock, now_ms, TXN_TIMEOUT};
use crate::stage::EventSourced;
use eventstage_journal::kafka::{Detached, OWNERS_TOPIC};
use eventstage_journal::{Claim, KafkaJournal};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a flow is set up: what `FlowBuilder` collected.
pub(crate) struct Settings {
    pub(crate) common: ClientConfig,
    pub(crate) consumer: ClientConfig,
    pub(crate) producer: ClientConfig,
    pub(crate) transactional_id: String,
    pub(crate) inputs: Vec<String>,
    pub(crate) journal: FlowJournal,
    /// The consumer group, which owns the Kafka journal.
    pub(crate) group: String,
    pub(crate) take_over_journal: bool,
    pub(crate) store: Option<StoreSettings>,
    /// The state cache's budget in bytes (`None`: every key stays in memory).
    pub(crate) state_cache: Option<u64>,
    pub(crate) snapshot_every: u64,
    pub(crate) commit_interval: Duration,
    pub(crate) bad_input: BadInput,
    pub(crate) codec: Codec,
    /// The delivery guarantee the application chose (the engine runs its implementation).
    pub(crate) guarantee: crate::flow::settings::Guarantee,
    pub(crate) committer: CommitterSettings,
    /// Bounds the whole start (see `startup::Setup`).
    pub(crate) setup_timeout: Duration,
}

/// The flow's start (metadata, the journal's checks, the transactional producer's
/// `init_transactions`), bounded as a whole by `FlowBuilder::setup_timeout`: each step retries
/// until the deadline, then the flow stops with one error that names the brokers, the step, how
/// long it tried and the fix.
pub(super) struct Setup<'a> {
    started: Instant,
    timeout: Duration,
    brokers: String,
    stop: &'a AtomicU8,
}

impl<'a> Setup<'a> {
    pub(super) fn new(started: Instant, timeout: Duration, common: &ClientConfig, stop: &'a AtomicU8) -> Self {
        let brokers = common.get("bootstrap.servers").unwrap_or("(no bootstrap.servers)").to_string();
        Self { started, timeout, brokers, stop }
    }

    /// Time left until the deadline.
    pub(super) fn remaining(&self) -> Duration {
        self.timeout.saturating_sub(self.started.elapsed())
    }

    /// The timeout of one blocking attempt: what is left, at most `cap`, at least 100 ms (a
    /// librdkafka call given 0 does not even send its request).
    pub(super) fn attempt(&self, cap: Duration) -> Duration {
        self.remaining().clamp(Duration::from_millis(100), cap.max(Duration::from_millis(100)))
    }

    /// False once the application asked the flow to stop (drain or abort): no more retries.
    pub(super) fn running(&self) -> bool {
        self.stop.load(Ordering::SeqCst) == crate::flow::control::RUN
    }

    /// The error after the deadline: what the flow was `doing`, against which brokers, for how
    /// long, the last error (if any, rendered once) and the fix.
    pub(super) fn gave_up(&self, doing: &str, last: Option<&FlowError>) -> FlowError {
        // One message with the last error's text in it, and no `source()`: a cause chain
        // (anyhow's `{:#}`) prints librdkafka's message once.
        let last = last.map_or_else(String::new, |e| format!(" (last error: {e})"));
        FlowError::Config(format!(
            "the flow's setup gave up after {:.1} s {doing} with the brokers {brokers}{last}: check the bootstrap servers and that the brokers are up and reachable from here, or raise FlowBuilder::setup_timeout (now {:.1} s)",
            self.started.elapsed().as_secs_f64(),
            self.timeout.as_secs_f64(),
            brokers = self.brokers,
        ))
    }

    /// Runs `f` (a step whose blocking calls have deadlines of their own, longer than the time
    /// left) on a thread of its own and waits for it until the deadline. A step still running
    /// then is left to finish on its thread, its result dropped; its clients close when it does.
    pub(super) fn within<T: Send + 'static>(
        &self,
        doing: &str,
        f: impl FnOnce() -> Result<T, FlowError> + Send + 'static,
    ) -> Result<T, FlowError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("eventstage-flow-setup".into())
            .spawn(move || {
                let _ = tx.send(f());
            })
            .map_err(|e| FlowError::Config(format!("cannot start a thread of the flow's setup: {e}")))?;
        match rx.recv_timeout(self.remaining()) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(self.gave_up(doing, None)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(FlowError::Crashed(format!("the flow's setup panicked {doing}")))
            }
        }
    }
}

/// Copies group `from`'s committed offsets of the inputs to group `to` where `to` has none: a
/// group taking a journal over goes on where the journal's state is.
pub(super) fn carry_offsets_over(
    common: &ClientConfig,
    from: &str,
    to: &str,
    inputs: &[String],
    partitions: i32,
) -> Result<(), FlowError> {
    let mut tpl = TopicPartitionList::new();
    for topic in inputs {
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
    }
    let group = |id: &str| -> Result<BaseConsumer, FlowError> {
        common
            .clone()
            .set("group.id", id)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| kafka("offsets client", e))
    };
    let old = group(from)?
        .committed_offsets(tpl.clone(), TXN_TIMEOUT)
        .map_err(|e| kafka(format!("committed offsets of group {from}"), e))?;
    let new = group(to)?;
    let mine =
        new.committed_offsets(tpl, TXN_TIMEOUT).map_err(|e| kafka(format!("committed offsets of group {to}"), e))?;
    let mut carried = TopicPartitionList::new();
    for el in old.elements() {
        let unset =
            mine.find_partition(el.topic(), el.partition()).is_none_or(|m| !matches!(m.offset(), Offset::Offset(_)));
        if let (Offset::Offset(o), true) = (el.offset(), unset) {
            carried
                .add_partition_offset(el.topic(), el.partition(), Offset::Offset(o))
                .map_err(|e| kafka("offsets", e))?;
        }
    }
    if carried.count() > 0 {
        new.commit(&carried, rdkafka::consumer::CommitMode::Sync)
            .map_err(|e| kafka(format!("commit the offsets carried over to group {to}"), e))?;
    }
    tracing::info!(from, to, partitions = carried.count(), "carried the previous owner's committed input offsets over");
    Ok(())
}

/// The inputs' partition count (they must agree); each metadata request waits at most `timeout`.
pub(super) fn input_partitions(common: &ClientConfig, inputs: &[String], timeout: Duration) -> Result<i32, FlowError> {
    let probe: Detached<BaseConsumer> = Detached::new(common.create().map_err(|e| kafka("metadata client", e))?);
    agreed_partitions(inputs, |topic| {
        let md = probe.fetch_metadata(Some(topic), timeout).map_err(|e| kafka(format!("metadata of {topic}"), e))?;
        Ok(md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len() as i32))
    })
}

/// The partition count `inputs` agree on, `count_of` giving each topic's (0: no such topic): a
/// flow's inputs are co-partitioned, partition `p` of each holding the same keys.
pub(in crate::flow) fn agreed_partitions(
    inputs: &[String],
    mut count_of: impl FnMut(&str) -> Result<i32, FlowError>,
) -> Result<i32, FlowError> {
    let mut count = None;
    for topic in inputs {
        let n = count_of(topic)?;
        if n == 0 {
            return Err(FlowError::Config(format!("input topic `{topic}` does not exist; create it first")));
        }
        if count.is_some_and(|c| c != n) {
            return Err(FlowError::Config(format!(
                "input topics have different partition counts ({} vs {n} for `{topic}`); state partitions must line up, so give them the same count",
                count.unwrap_or_default()
            )));
        }
        count = Some(n);
    }
    count.ok_or_else(|| FlowError::Config("no input topics".into()))
}

/// Retries a setup step `f` with exponential backoff (100 ms .. 5 s) while it fails with a
/// retriable error, the flow is not asked to stop and the setup's deadline is not reached; after
/// the deadline, the setup's error (naming `doing`, the brokers and the last error).
pub(super) fn with_backoff<T>(
    doing: &str,
    setup: &Setup<'_>,
    mut f: impl FnMut() -> Result<T, FlowError>,
    retriable: impl Fn(&FlowError) -> bool,
) -> Result<T, FlowError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if retriable(&e) && setup.running() => {
                let left = setup.remaining();
                if left.is_zero() {
                    return Err(setup.gave_up(doing, Some(&e)));
                }
                let wait = delay.min(left);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, left_ms = left.as_millis() as u64, "{doing} failed; retrying");
                std::thread::sleep(wait);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// What the Kafka journal's checks need, owned: they run on a thread of their own, bounded by the
/// setup's deadline (see `Setup::within`).
pub(super) struct JournalCheck {
    pub(super) common: ClientConfig,
    pub(super) group: String,
    pub(super) take_over: bool,
    pub(super) inputs: Vec<String>,
    pub(super) topic: String,
    pub(super) partitions: i32,
}

/// A runtime of the calling thread's own for the journals' async calls (built only by the journal
/// that needs one: the Kafka journal's checks at start, the sled storage).
pub(super) fn blocking_runtime() -> Result<tokio::runtime::Runtime, FlowError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| FlowError::Config(format!("cannot start the flow's journal runtime: {e}")))
}

/// Makes sure the flow's Kafka journal exists as it must and is this group's (or takes it over).
pub(super) fn claim_journal(check: JournalCheck) -> Result<KafkaJournal, FlowError> {
    let JournalCheck { common, group, take_over, inputs, topic, partitions } = check;
    let rt = blocking_runtime()?;
    let started = Instant::now();
    let journal = rt.block_on(KafkaJournal::ensure(common.clone(), &topic, partitions))?;
    let ensured = started.elapsed();
    let claim = rt.block_on(journal.claim(&group, take_over))?;
    tracing::debug!(journal = %topic, ensure_ms = ensured.as_millis() as u64, claim_ms = (started.elapsed() - ensured).as_millis() as u64, "journal checked");
    match claim {
        Claim::New => {
            tracing::info!(journal = %topic, group = %group, "the journal is this group's (recorded in {OWNERS_TOPIC})")
        }
        Claim::Owned => {}
        Claim::TakenOver { from } => {
            tracing::warn!(journal = %topic, group = %group, previous = %from, "took the journal over from another group");
            carry_offsets_over(&common, &from, &group, &inputs, partitions)?;
        }
    }
    Ok(journal)
}

/// The flow's producer; transactional (exactly once) with its first transaction begun.
fn start_producer(
    config: &ClientConfig,
    settings: &Settings,
    deliveries: &Arc<Deliveries>,
    setup: &Setup<'_>,
    at_least_once: bool,
) -> Result<ThreadedProducer<FlowProducerContext>, FlowError> {
    let producer: ThreadedProducer<_> = config
        .create_with_context(FlowProducerContext { deliveries: deliveries.clone() })
        .map_err(|e| kafka("producer", e))?;
    if !at_least_once {
        connect_to_cluster(&producer, settings.inputs.first().map(String::as_str));
        with_backoff(
            "initializing transactions (the transaction coordinator)",
            setup,
            || producer.init_transactions(setup.attempt(TXN_TIMEOUT)).map_err(|e| kafka("init transactions", e)),
            |e| matches!(e, FlowError::Kafka { error, .. } if classify(error) != TxnFailure::Fatal && classify(error) != TxnFailure::Fenced),
        )?;
        producer.begin_transaction().map_err(|e| kafka("begin transaction", e))?;
    }
    Ok(producer)
}

/// The transactional id of a flow's producer `i`: the flow's own for the first, with `.i`
/// appended for the others (exactly once alternates two). Stable per instance, like the flow's.
fn producer_id(transactional_id: &str, i: usize) -> String {
    match i {
        0 => transactional_id.to_string(),
        i => format!("{transactional_id}.{i}"),
    }
}

/// Starts the flow's `n` producers side by side, once the inputs are known to exist
/// (`inputs_exist`): `connect_to_cluster` names an input topic, and a producer's metadata request
/// may create a topic that does not exist (`allow.auto.create.topics`).
fn start_producers(
    n: usize,
    settings: &Settings,
    deliveries: &Arc<Deliveries>,
    setup: &Setup<'_>,
    at_least_once: bool,
    inputs_exist: impl FnOnce() -> bool,
) -> Result<Vec<(ThreadedProducer<FlowProducerContext>, ClientConfig, String)>, FlowError> {
    let configs: Vec<(ClientConfig, String)> = (0..n)
        .map(|i| {
            let id = producer_id(&settings.transactional_id, i);
            let mut config = settings.producer.clone();
            if !at_least_once {
                config.set("transactional.id", &id);
            }
            (config, id)
        })
        .collect();
    if !inputs_exist() {
        return Err(FlowError::Config("not started: the input topics were not found".into()));
    }
    let producers = std::thread::scope(|s| {
        let started: Vec<_> = configs
            .iter()
            .map(|(config, _)| s.spawn(move || start_producer(config, settings, deliveries, setup, at_least_once)))
            .collect();
        started
            .into_iter()
            .map(|p| p.join().unwrap_or_else(|_| Err(FlowError::Crashed("the producer's start panicked".into()))))
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok(producers.into_iter().zip(configs).map(|(p, (config, id))| (p, config, id)).collect())
}

/// Starts a flow: reads the inputs' metadata, checks (or claims) the Kafka journal and starts the
/// transactional producer beside them, all within the setup timeout; opens the storage; and
/// subscribes the consumer. The loop runs next ([`FlowThread::run`]).
pub(super) fn start<S: EventSourced, G: Guarantee>(
    settings: Settings,
    parts: Parts<S>,
    outputs: Outputs<S>,
    stop: &AtomicU8,
    metrics: Arc<Metrics>,
    guarantee: impl FnOnce(Vec<Arc<Sink>>) -> G,
) -> Result<FlowThread<S, G>, FlowError> {
    let run_started = Instant::now();
    let is_kafka = |e: &FlowError| matches!(e, FlowError::Kafka { .. });
    let at_least_once = !G::TRANSACTIONAL;
    let deliveries = Arc::new(Deliveries::new(at_least_once));
    let setup = Setup::new(run_started, settings.setup_timeout, &settings.common, stop);
    // The transactional producer's start (a round trip to the transaction coordinator, or 500 ms
    // when librdkafka's first try finds the coordinator not ready) does not depend on the input's
    // metadata nor on the Kafka journal's checks (its topic; its owner in the registry): it runs
    // beside them.
    let (journal, producers) = std::thread::scope(|s| {
        let (inputs_ok, inputs_checked) = std::sync::mpsc::channel::<()>();
        let (settings_, deliveries_, setup_) = (&settings, &deliveries, &setup);
        let producer = s.spawn(move || {
            let started = Instant::now();
            let inputs_exist = || inputs_checked.recv().is_ok();
            let producers = start_producers(G::PRODUCERS, settings_, deliveries_, setup_, at_least_once, inputs_exist);
            tracing::debug!(producer_ms = started.elapsed().as_millis() as u64, "producers started");
            producers
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
        let producers =
            producer.join().unwrap_or_else(|_| Err(FlowError::Crashed("the producers' start panicked".into())));
        Ok::<_, FlowError>((checked?, producers?))
    })?;
    // A queryable flow's view says how far each journal partition goes: the delivery callback
    // stamps it then too.
    let mut view_progress = None;
    let storage: Box<dyn Storage<S>> = match &settings.journal {
        FlowJournal::Kafka(_) => {
            let journal = journal.ok_or_else(|| FlowError::Crashed("the journal was not checked".into()))?;
            if parts.view.is_some() {
                let progress = Arc::new(StoreProgress::new(journal.topic(), journal.partitions().max(0) as usize));
                let _ = deliveries.journal.set(progress);
                view_progress = deliveries.journal.get().cloned();
            }
            // With a local store: how far the journal's records were acknowledged, for the store's
            // checkpoints of what the flow commits (exactly once) and for the state cache; the
            // delivery callback stamps it only when one of them reads it.
            let progress = settings.store.as_ref().map(|_| match &view_progress {
                Some(progress) => progress.clone(),
                None => {
                    let progress = Arc::new(StoreProgress::new(journal.topic(), journal.partitions().max(0) as usize));
                    if !at_least_once || settings.state_cache.is_some() {
                        let _ = deliveries.journal.set(progress.clone());
                    }
                    progress
                }
            });
            let cache = settings.state_cache.zip(progress.clone()).map(|(budget, progress)| CacheSettings {
                budget,
                progress,
                metrics: metrics.clone(),
            });
            let storage = KafkaStorage::open(
                journal,
                settings.store.as_ref().zip(progress).map(|(store, progress)| (store, progress, cache)),
                &settings.common,
                S::NAME,
                settings.codec,
                at_least_once,
                metrics.clone(),
            )?;
            if let Some(view) = &parts.view {
                if let Some(reader) = storage.standby_reader::<S>(&settings.common) {
                    view.set_standby(reader);
                }
            }
            Box::new(storage)
        }
        FlowJournal::Sled(dir) => {
            Box::new(SledStorage::open(dir, blocking_runtime()?, settings.codec, settings.snapshot_every)?)
        }
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
    let sinks: Vec<Arc<Sink>> = producers
        .into_iter()
        .map(|(producer, config, id)| {
            Arc::new(Sink::new(producer, config, deliveries.clone(), id, settings.inputs.first().cloned()))
        })
        .collect();
    // Exactly once over the sled journal (the state of record): a transaction's outputs are kept
    // in its sled write, to be produced again if its Kafka commit fails.
    let keep_outbox = G::TRANSACTIONAL && matches!(settings.journal, FlowJournal::Sled(_));
    let emitter = Emitter::start(outputs, sinks[0].clone(), metrics.clone(), keep_outbox)?;
    let view = parts.view.as_ref().map(|view| {
        let journal = match &settings.journal {
            FlowJournal::Kafka(topic) => Some(topic.clone()),
            _ => None,
        };
        view.started(parts.placement.clone(), journal);
        ViewWriter::new(view.clone(), view_progress)
    });
    let core = Arc::new(Mutex::new(Core {
        parts,
        tasks: TaskManager::new(settings.state_cache, view),
        guarantee: guarantee(sinks),
        emitter,
        // Set once a restore finds inputs applied beyond the committed offsets (sled positions).
        skip_applied: false,
        storage,
        pipeline,
        rebalance_events,
        bad_input: settings.bad_input.clone(),
        bad_input_log: Throttle::new(),
        wall_ms: now_ms(),
        failure: None,
        stopped: false,
        metrics: metrics.clone(),
        exported: Exported::new(S::NAME, &settings.group),
    }));
    let consumer: FlowConsumer<S, G> =
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
    Ok(FlowThread { core, consumer, schedule: Schedule::new(commit_every), report: Report::new() })
}
