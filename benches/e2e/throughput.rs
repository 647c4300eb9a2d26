//! Sections 1 and 2: committed throughput of the bank flow and of bare transactional pass-throughs.

use super::*;

/// One throughput run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) n: u64,
    pub(crate) feed: Duration,
    /// Flow / pass-through started.
    pub(crate) start: Instant,
    /// First input record consumed.
    pub(crate) first: Instant,
    /// All input records consumed (not yet committed).
    pub(crate) processed: Instant,
    /// All outputs visible to read_committed.
    pub(crate) visible: Instant,
    /// Records the reader saw (n; more would be duplicates).
    pub(crate) read: u64,
    pub(crate) transactions: u64,
    pub(crate) aborts: u64,
    /// Mean and max commit latency (the flow only gives the max).
    pub(crate) commit_mean: Option<Duration>,
    pub(crate) commit_max: Duration,
    /// Cores used over the processing window.
    pub(crate) cores: Cpu,
}

impl Run {
    /// A run's timing from its processing window and its reader (no transaction figures yet).
    pub(crate) fn timed(
        n: u64,
        feed: Duration,
        start: Instant,
        w: &Window,
        read: &ReadStats,
        what: &str,
    ) -> Result<Self> {
        let visible = read.done_at.ok_or_else(|| anyhow!("the reader finished without seeing all {what}"))?;
        Ok(Self {
            n,
            feed,
            start,
            first: w.first.unwrap_or(start),
            processed: w.processed.unwrap_or(visible),
            visible,
            read: read.records,
            transactions: 0,
            aborts: 0,
            commit_mean: None,
            commit_max: Duration::ZERO,
            cores: w.cores(),
        })
    }

    pub(crate) fn window(&self) -> Duration {
        self.visible.saturating_duration_since(self.first)
    }

    pub(crate) fn window_rate(&self) -> f64 {
        self.n as f64 / self.window().as_secs_f64()
    }

    pub(crate) fn total_rate(&self) -> f64 {
        self.n as f64 / self.visible.saturating_duration_since(self.start).as_secs_f64()
    }
}

/// Samples the consumed count every millisecond until the reader has seen `n` records: when the
/// first and the last input record were consumed, and the CPU used from the first record on.
pub(crate) struct Window {
    /// Per thread name CPU seconds at the first record and when all were consumed.
    pub(crate) threads: (BTreeMap<String, f64>, BTreeMap<String, f64>),
    pub(crate) first: Option<Instant>,
    pub(crate) processed: Option<Instant>,
    pub(crate) cpu_first: Cpu,
    pub(crate) cpu_end: Cpu,
    pub(crate) end: Instant,
}

impl Window {
    /// See [`print_threads`]; with `EVENTSTAGE_E2E_THREADS` only.
    pub(crate) fn print_threads(&self, what: &str, n: u64) {
        if let (true, Some(first), Some(processed)) = (per_thread(), self.first, self.processed) {
            let secs = processed.saturating_duration_since(first).as_secs_f64();
            print_threads(what, &self.threads.0, &self.threads.1, secs, n);
        }
    }

    /// Cores used from the first record to the end of the window.
    pub(crate) fn cores(&self) -> Cpu {
        let secs = self.first.map_or(0.0, |f| self.end.saturating_duration_since(f).as_secs_f64());
        self.cpu_first.cores(&self.cpu_end, secs)
    }
}

pub(crate) fn watch(
    broker: &Broker,
    worker: &str,
    n: u64,
    deadline: Instant,
    reader: &Counter,
    consumed: impl Fn() -> u64,
    stopped: impl Fn() -> bool,
) -> Window {
    let (mut first, mut processed, mut cpu_first) = (None, None, Cpu::default());
    let (mut threads_first, mut threads_processed) = (BTreeMap::new(), BTreeMap::new());
    let per_thread = per_thread();
    while reader.seen.load(Ordering::Relaxed) < n
        && !reader.handle.is_finished()
        && !stopped()
        && Instant::now() < deadline
    {
        let c = consumed();
        let now = Instant::now();
        if c > 0 && first.is_none() {
            first = Some(now);
            cpu_first = Cpu::now(broker, worker);
            if per_thread {
                threads_first = threads();
            }
        }
        if c >= n && processed.is_none() {
            processed = Some(now);
            if per_thread {
                threads_processed = threads();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Window {
        threads: (threads_first, threads_processed),
        first,
        processed,
        cpu_first,
        cpu_end: Cpu::now(broker, worker),
        end: Instant::now(),
    }
}

pub(crate) struct FlowRun {
    pub(crate) run: Run,
    pub(crate) metrics: FlowMetrics,
}

/// Repeated runs: the one with the median rate, and every rate.
pub(crate) struct Rounds<T> {
    pub(crate) median: T,
    pub(crate) rates: Vec<f64>,
}

impl<T> Rounds<T> {
    pub(crate) fn of(mut runs: Vec<T>, rate: impl Fn(&T) -> f64) -> Self {
        let rates = runs.iter().map(&rate).collect();
        runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
        let median = runs.swap_remove(runs.len() / 2);
        Self { median, rates }
    }

    pub(crate) fn rates(&self) -> String {
        self.rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
    }
}

/// The bank flow with the librdkafka properties of `EVENTSTAGE_E2E_FLOW_PRODUCER` and
/// `EVENTSTAGE_E2E_FLOW_CONSUMER` (`key=value,key=value`), for tuning experiments.
pub(crate) fn with_properties(
    mut flow: eventstage::flow::FlowBuilder<eventstage::stages::bank::Bank>,
) -> eventstage::flow::FlowBuilder<eventstage::stages::bank::Bank> {
    for (var, producer) in [("EVENTSTAGE_E2E_FLOW_PRODUCER", true), ("EVENTSTAGE_E2E_FLOW_CONSUMER", false)] {
        let props = std::env::var(var).unwrap_or_default();
        for (k, v) in props.split(',').filter_map(|kv| kv.split_once('=')) {
            flow = if producer { flow.producer_property(k, v) } else { flow.consumer_property(k, v) };
        }
    }
    flow
}

pub(crate) fn stop_flow(rt: &tokio::runtime::Runtime, flow: FlowControl) -> Result<()> {
    let stopper = flow.stopper();
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), flow.drain_and_shutdown()).await }) {
        Ok(r) => r.context("the flow stopped with an error"),
        Err(_) => {
            stopper.abort();
            bail!("the flow did not drain within 30 s (aborted)")
        }
    }
}

pub(crate) fn flow_throughput(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    guarantee: Guarantee,
) -> Result<FlowRun> {
    flow_run(rt, broker, cmds, |b, topics, journal| {
        with_properties(bank_flow(b, &unique("group"), topics)).guarantee(guarantee).journal_topic(journal)
    })
}

/// Runs of the bank flow and of the pass-through awaiting deliveries, not counted: a fresh broker
/// creates its internal topics (`__consumer_offsets`, `__transaction_state`) and its JVM compiles
/// its hot paths during the first runs; the first flow run was the slowest in every bench run on
/// Apache Kafka (10-67k commands/s, later runs 47-234k). After one round, a profile still had the
/// JVM's JIT compilers at 37 % of the machine's CPU during the measured runs, so rounds go on
/// (up to [`WARM_UP_ROUNDS`]) until the compilers used less than a tenth of a core in the last one
/// (with a broker of our own; one round with another).
pub(crate) fn warm_up(rt: &tokio::runtime::Runtime, broker: &Broker, cmds: &[(String, Vec<u8>)]) -> Result<()> {
    for round in 1..=WARM_UP_ROUNDS {
        let (jit, started) = (broker.jit_cpu(), Instant::now());
        let flow = flow_throughput(rt, broker, cmds, Guarantee::ExactlyOnce)?;
        let pass = pass_through_throughput(rt, broker, cmds, true, 1)?;
        let jit_cores = jit.zip(broker.jit_cpu()).map(|(a, b)| (b - a) / started.elapsed().as_secs_f64());
        progress(&format!(
            "    warm-up {round}: bank flow {:.0}, pass-through {:.0} records/s (not counted); the broker's JIT compilers {}",
            flow.run.window_rate(),
            pass.window_rate(),
            jit_cores.map_or("n/a".into(), |c| format!("{c:.2} cores"))
        ));
        if jit_cores.is_none_or(|c| c < 0.1) {
            break;
        }
    }
    Ok(())
}

/// Most warm-up rounds. In six rounds (about 40 s) the compilers went from 0.44 to 0.14 cores:
/// Kafka's JIT keeps compiling for minutes, so the measured runs still share the machine with it.
const WARM_UP_ROUNDS: usize = 3;

/// Feeds `cmds` to fresh topics, runs the flow `make` builds on them (given the brokers, the
/// topics and a fresh journal topic) until a `read_committed` reader has seen a reply to each,
/// and drains it.
pub(crate) fn flow_run<S: eventstage::EventSourced>(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    make: impl Fn(&str, BankTopics, &str) -> eventstage::flow::FlowBuilder<S>,
) -> Result<FlowRun> {
    let (run, mut metrics) = group_run(rt, broker, cmds, 1, PARTITIONS, false, make)?;
    Ok(FlowRun { run, metrics: metrics.remove(0) })
}

/// [`flow_run`] with `instances` flows in one consumer group (each with a transactional id of its
/// own) over topics of `partitions` partitions; the metrics of each instance. With `join_first`
/// the commands are fed once every instance has joined the group and has partitions (the
/// processing window then has no rebalance in it), while the flows run.
pub(crate) fn group_run<S: eventstage::EventSourced>(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    instances: usize,
    partitions: i32,
    join_first: bool,
    make: impl Fn(&str, BankTopics, &str) -> eventstage::flow::FlowBuilder<S>,
) -> Result<(Run, Vec<FlowMetrics>)> {
    let b = broker.brokers.as_str();
    let n = cmds.len() as u64;
    let topics = BankTopics { input: unique("cmds"), replies: unique("replies"), events: unique("events") };
    create_topics_of(rt, b, &[&topics.input, &topics.replies, &topics.events], partitions, &[])?;
    let journal = unique("journal");
    create_topics_of(rt, b, &[&journal], partitions, &[("cleanup.policy", "compact")])?;
    let mut fed = if join_first { None } else { Some(feed(b, &topics.input, cmds)?) };
    let reader = count_committed(b, &topics.replies, n);

    let start = Instant::now();
    // Inside the runtime: enrichment calls run on it.
    let flows = rt.block_on(async {
        (0..instances)
            .map(|_| {
                make(b, topics.clone(), &journal).transactional_id(unique("txn")).commit_interval(COMMIT_INTERVAL).run()
            })
            .collect::<Result<Vec<_>, _>>()
    });
    let flows = flows.context("start the flow")?;
    let feeder = if join_first {
        let joined = Instant::now() + Duration::from_secs(60);
        while !flows.iter().all(|f| f.metrics().assigned_partitions > 0)
            || flows.iter().map(|f| f.metrics().assigned_partitions).sum::<u64>() != partitions as u64
        {
            if Instant::now() >= joined {
                bail!("{instances} flows did not all join the group with {partitions} partitions within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (b, input, cmds) = (b.to_string(), topics.input.clone(), cmds.to_vec());
        Some(std::thread::spawn(move || feed(&b, &input, &cmds)))
    } else {
        None
    };
    let deadline = start + RUN_DEADLINE + Duration::from_secs(5);
    let consumed = || flows.iter().map(|f| f.metrics().records_in).sum();
    let w = watch(broker, FLOW_THREAD, n, deadline, &reader, consumed, || false);
    if let Some(feeder) = feeder {
        fed = Some(join(feeder)?);
    }
    let feed = fed.unwrap_or_default();
    w.print_threads(if instances == 1 { "the flow".to_string() } else { format!("{instances} flows") }.as_str(), n);
    let metrics: Vec<FlowMetrics> = flows.iter().map(FlowControl::metrics).collect();
    let read = match join(reader.handle) {
        Ok(r) => r,
        Err(e) => {
            let stopped: Vec<_> = flows.into_iter().map(|f| stop_flow(rt, f).err()).collect();
            return Err(e.context(format!("flow metrics {metrics:?}; flows: {stopped:?}")));
        }
    };
    for flow in flows {
        stop_flow(rt, flow)?;
    }
    delete_topics(rt, b, &[topics.input.as_str(), &topics.replies, &topics.events, &journal]);
    let run = Run {
        transactions: metrics.iter().map(|m| m.transactions).sum(),
        aborts: metrics.iter().map(|m| m.aborts).sum(),
        commit_max: metrics.iter().map(|m| m.max_commit).max().unwrap_or_default(),
        ..Run::timed(n, feed, start, &w, &read, "replies")?
    };
    Ok((run, metrics))
}

/// What a pass-through did.
#[derive(Debug, Default)]
pub(crate) struct PassStats {
    /// When the thread finished and the CPU seconds it had used.
    pub(crate) exit: Option<(Instant, f64)>,
    pub(crate) transactions: u64,
    pub(crate) commit_total: Duration,
    pub(crate) commit_max: Duration,
}

/// A bare transactional pass-through: `input` → `output`, the same key and value, committing every
/// `commit_every` ([`COMMIT_INTERVAL`] unless set) with the consumed offsets. Runs until `n` records are committed (if given),
/// `stop` is set or `deadline` passes. With `await_deliveries`, waits until the producer has no
/// record in flight before `commit_transaction` (whose flush then has nothing to wait for).
pub(crate) struct PassThrough {
    pub(crate) brokers: String,
    pub(crate) input: String,
    pub(crate) output: String,
    pub(crate) n: Option<u64>,
    pub(crate) await_deliveries: bool,
    /// Topics each input record is also produced to (besides `output`).
    pub(crate) also: Vec<String>,
    pub(crate) deadline: Instant,
    pub(crate) commit_every: Duration,
    /// Records consumed so far.
    pub(crate) consumed: Arc<AtomicU64>,
    pub(crate) stop: Arc<AtomicBool>,
}

impl PassThrough {
    pub(crate) fn new(
        brokers: &str,
        input: &str,
        output: &str,
        n: Option<u64>,
        await_deliveries: bool,
        deadline: Instant,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            input: input.into(),
            output: output.into(),
            n,
            await_deliveries,
            also: Vec::new(),
            deadline,
            commit_every: COMMIT_INTERVAL,
            consumed: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs on a thread named [`PASS_THREAD`].
    pub(crate) fn spawn(self) -> Result<JoinHandle<Result<PassStats>>> {
        std::thread::Builder::new()
            .name(PASS_THREAD.into())
            .spawn(move || self.run())
            .context("start the pass-through thread")
    }

    pub(crate) fn run(&self) -> Result<PassStats> {
        let (input, output) = (self.input.as_str(), self.output.as_str());
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", unique("pt-group"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            .create()?;
        consumer.subscribe(&[input])?;
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("transactional.id", unique("pt-txn"))
            .set("transaction.timeout.ms", "10000")
            .create()?;
        producer.init_transactions(TXN_TIMEOUT).context("init transactions")?;
        producer.begin_transaction()?;
        let mut stats = PassStats::default();
        let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
        let (mut consumed, mut committed) = (0u64, 0u64);
        let mut last_commit = Instant::now();
        while self.n.is_none_or(|n| committed < n) && !self.stop.load(Ordering::Relaxed) {
            if Instant::now() >= self.deadline {
                bail!("pass-through timed out: {consumed} consumed, {committed} committed");
            }
            match consumer.poll(Duration::from_millis(20)) {
                Some(Ok(m)) => {
                    for topic in std::iter::once(output).chain(self.also.iter().map(String::as_str)) {
                        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
                        if let Some(k) = m.key() {
                            rec = rec.key(k);
                        }
                        if let Some(v) = m.payload() {
                            rec = rec.payload(v);
                        }
                        send_record(&producer, rec).context("pass-through produce")?;
                    }
                    offsets.insert(m.partition(), m.offset() + 1);
                    consumed += 1;
                    self.consumed.store(consumed, Ordering::Relaxed);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "pass-through consumer error"),
                None => {}
            }
            if last_commit.elapsed() >= self.commit_every && consumed > committed {
                let started = Instant::now();
                let mut tpl = TopicPartitionList::new();
                for (p, o) in &offsets {
                    tpl.add_partition_offset(input, *p, Offset::Offset(*o))?;
                }
                let gm = consumer.group_metadata().ok_or_else(|| anyhow!("no consumer group metadata"))?;
                producer.send_offsets_to_transaction(&tpl, &gm, TXN_TIMEOUT).context("send offsets to transaction")?;
                if self.await_deliveries {
                    let end = Instant::now() + TXN_TIMEOUT;
                    while producer.in_flight_count() > 0 && Instant::now() < end {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
                producer.commit_transaction(TXN_TIMEOUT).context("commit transaction")?;
                producer.begin_transaction()?;
                let took = started.elapsed();
                stats.transactions += 1;
                stats.commit_total += took;
                stats.commit_max = stats.commit_max.max(took);
                committed = consumed;
                last_commit = Instant::now();
            }
        }
        let _ = producer.abort_transaction(TXN_TIMEOUT);
        stats.exit = stat_cpu("/proc/thread-self/stat").map(|cpu| (Instant::now(), cpu));
        Ok(stats)
    }
}

pub(crate) fn pass_through_throughput(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    await_deliveries: bool,
    outputs_per_input: usize,
) -> Result<Run> {
    let b = broker.brokers.as_str();
    let n = cmds.len() as u64;
    let (input, output) = (unique("pt-in"), unique("pt-out"));
    let also: Vec<String> = (1..outputs_per_input).map(|i| format!("{output}-{i}")).collect();
    let mut topics = vec![input.as_str(), output.as_str()];
    topics.extend(also.iter().map(String::as_str));
    create_topics(rt, b, &topics)?;
    let feed = feed(b, &input, cmds)?;
    let reader = count_committed(b, &output, n);
    let start = Instant::now();
    let deadline = start + RUN_DEADLINE;
    let mut pt = PassThrough::new(b, &input, &output, Some(n), await_deliveries, deadline);
    pt.also = also.clone();
    let consumed = pt.consumed.clone();
    let worker = pt.spawn()?;
    let w = watch(
        broker,
        PASS_THREAD,
        n,
        deadline,
        &reader,
        || consumed.load(Ordering::Relaxed),
        || worker.is_finished() && consumed.load(Ordering::Relaxed) < n,
    );
    w.print_threads(&format!("the pass-through ({outputs_per_input} outputs per input)"), n);
    let stats = join(worker)?;
    let read = join(reader.handle)?;
    delete_topics(rt, b, &topics);
    let run = Run::timed(n, feed, start, &w, &read, "records")?;
    Ok(Run {
        transactions: stats.transactions,
        commit_mean: (stats.transactions > 0).then(|| stats.commit_total / stats.transactions as u32),
        commit_max: stats.commit_max,
        cores: Cpu {
            // The pass-through thread is gone by the end of the window: use its own last reading.
            worker: match (w.cpu_first.worker, stats.exit) {
                (Some(a), Some((at, b))) => Some((b - a) / at.saturating_duration_since(run.first).as_secs_f64()),
                _ => None,
            },
            ..run.cores
        },
        ..run
    })
}
