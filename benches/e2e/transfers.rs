//! Section 13 (`EVENTSTAGE_E2E_ONLY=transfers`): several stages in one application (issue 25).
//! The transfer saga (the bank and the transfers, each step a command routed through a
//! repartition topic and handled in a transaction of its own) beside the one-stage bank flow, in
//! the same run, alternating round by round.
//!
//! A transfer is five commands handled by the stages, one after another: the transfer's start,
//! the bank's withdrawal, the transfer's step, the bank's deposit, the transfer's step; four of
//! them arrive through a repartition topic, each after its sender's commit. So the saga's rate is
//! reported both as transfers per second (a reply each) and as stage commands per second (five
//! per transfer), beside the bank flow's commands per second. Then a transfer's latency, from its
//! send to its reply visible to a read_committed reader, at half the saga's median rate for
//! `EVENTSTAGE_E2E_LATENCY_SECS`.

use super::*;
use eventstage::stages::transfer_flow::{replies_topic, transfer_app, TransferApp, WireTransfer};

/// One round of the saga.
pub(crate) struct SagaRun {
    pub(crate) n: u64,
    /// From the first transfer fed to the last reply visible to read_committed.
    pub(crate) elapsed: Duration,
    /// Cores the whole process used over that time.
    pub(crate) cores: Option<f64>,
    /// Records of either input forwarded to their key's partition (0: fed with murmur2).
    pub(crate) forwarded: u64,
    pub(crate) transactions: u64,
}

impl SagaRun {
    fn rate(&self) -> f64 {
        self.n as f64 / self.elapsed.as_secs_f64()
    }
}

pub(crate) struct TransfersReport {
    pub(crate) bank: Rounds<FlowRun>,
    pub(crate) saga: Rounds<SagaRun>,
    /// A transfer's latency (sorted µs) at a paced rate, and the rate achieved.
    pub(crate) latency: (Vec<u64>, f64),
}

impl TransfersReport {
    pub(crate) fn print(&self) {
        println!("several stages in one application: the transfer saga beside the one-stage bank flow, same run ({PARTITIONS} partitions, commits every {COMMIT_INTERVAL:?})");
        let bank = &self.bank.median.run;
        let us = |cores: Option<f64>, secs: f64, n: f64| {
            cores.map_or("n/a".into(), |c| format!("{:.1} µs", c * secs * 1e6 / n))
        };
        println!(
            "  bank flow (one stage):          {:>8.0} commands/s (rounds {}); process CPU per command {}",
            bank.window_rate(),
            self.bank.rates(),
            us(bank.cores.process, bank.window().as_secs_f64(), bank.n as f64)
        );
        let saga = &self.saga.median;
        let secs = saga.elapsed.as_secs_f64();
        println!(
            "  transfer saga (two stages):     {:>8.0} transfers/s = {:.0} stage commands/s (rounds {}); process CPU per transfer {}, per stage command {}; {} transactions, {} inputs forwarded",
            saga.rate(),
            5.0 * saga.rate(),
            self.saga.rates(),
            us(saga.cores, secs, saga.n as f64),
            us(saga.cores, secs, 5.0 * saga.n as f64),
            saga.transactions,
            saga.forwarded
        );
        println!(
            "  stage commands/s of the saga / commands/s of the bank flow: {:.2}x",
            5.0 * saga.rate() / bank.window_rate()
        );
        let (micros, achieved) = &self.latency;
        let at = |q| Duration::from_micros(percentile(micros, q));
        println!(
            "  a transfer's latency (sent → its reply visible to read_committed) at {achieved:.0} transfers/s: p50 {}, p99 {}, max {} ({} transfers)",
            ms(at(0.5)),
            ms(at(0.99)),
            ms(at(1.0)),
            micros.len()
        );
    }
}

pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    transfers: u64,
    rounds: usize,
    latency_secs: Duration,
) -> Result<TransfersReport> {
    let (mut bank, mut saga) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let b = flow_throughput(rt, broker, cmds, Guarantee::ExactlyOnce)?;
        let s = saga_run(rt, broker, transfers, round as u64)?;
        progress(&format!(
            "    round {}: bank flow {:.0} commands/s, transfer saga {:.0} transfers/s ({:.0} stage commands/s)",
            round + 1,
            b.run.window_rate(),
            s.rate(),
            5.0 * s.rate()
        ));
        bank.push(b);
        saga.push(s);
    }
    let saga = Rounds::of(saga, SagaRun::rate);
    let rate = 0.5 * saga.median.rate();
    progress(&format!(
        "    a transfer's latency at {rate:.0} transfers/s (half the median) for {} s",
        latency_secs.as_secs()
    ));
    let latency = saga_latency(rt, broker, rate, latency_secs)?;
    Ok(TransfersReport { bank: Rounds::of(bank, |f| f.run.window_rate()), saga, latency })
}

/// The transfer application running on fresh topics, its [`ACCOUNTS`] accounts open with a large
/// balance (fed through the application and answered).
struct Saga {
    topics: BankTopics,
    transfers_topic: String,
    replies: String,
    group: String,
    running: eventstage::flow::Running,
}

impl Saga {
    fn start(rt: &tokio::runtime::Runtime, broker: &Broker) -> Result<Self> {
        let b = broker.brokers.as_str();
        let topics = BankTopics { input: unique("cmds"), replies: unique("replies"), events: unique("events") };
        let transfers_topic = unique("transfers");
        let replies = replies_topic(&transfers_topic);
        create_topics_of(
            rt,
            b,
            &[&topics.input, &topics.replies, &topics.events, &transfers_topic, &replies],
            PARTITIONS,
            &[],
        )?;
        let opening: Vec<(String, Vec<u8>)> = (0..ACCOUNTS)
            .flat_map(|i| {
                [
                    (account(i), wire(format!("open-{i}"), "open", None)),
                    (account(i), wire(format!("fund-{i}"), "deposit", Some(1 << 40))),
                ]
            })
            .collect();
        feed_murmur2(b, &topics.input, &opening)?;
        let opened = count_committed(b, &topics.replies, opening.len() as u64);
        let group = unique("transfer-group");
        let app = transfer_app(b, &group, topics.clone(), &transfers_topic, Duration::from_secs(120));
        let app = TransferApp {
            bank: app.bank.transactional_id(unique("txn")).commit_interval(COMMIT_INTERVAL),
            transfers: app.transfers.transactional_id(unique("txn")).commit_interval(COMMIT_INTERVAL),
            app: app.app,
        };
        let running = rt.block_on(app.into_application().start()).context("start the transfer application")?;
        join(opened.handle).context("the accounts' opening")?;
        Ok(Self { topics, transfers_topic, replies, group, running })
    }

    /// Drains the application and deletes its topics: each stage's last counters.
    fn stop(self, rt: &tokio::runtime::Runtime, broker: &Broker) -> Result<Vec<(&'static str, FlowMetrics)>> {
        let metrics = self.running.metrics();
        let stopped = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), self.running.drain_and_shutdown()).await });
        let internal: Vec<String> = ["bank", "transfer"]
            .iter()
            .flat_map(|s| {
                let g = &self.group;
                [format!("{g}-{s}-commands"), format!("{g}-{s}-timers"), format!("{g}-{s}-journal")]
            })
            .collect();
        let t = &self.topics;
        let mut all: Vec<&str> = vec![&t.input, &t.replies, &t.events, &self.transfers_topic, &self.replies];
        all.extend(internal.iter().map(String::as_str));
        delete_topics(rt, &broker.brokers, &all);
        stopped.map_err(|_| anyhow!("the transfer application did not drain within 30 s"))?.context("drain")?;
        Ok(metrics)
    }
}

/// A transfer of 1 between two random accounts, as (key: its id, value).
fn transfer(id: String, rng: &mut StdRng) -> (String, Vec<u8>) {
    let from = rng.random_range(0..ACCOUNTS);
    let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
    let t = WireTransfer { id: id.clone(), from: account(from), to: account(to), amount: 1 };
    (id, serde_json::to_vec(&t).unwrap_or_default())
}

/// Feeds `n` transfers (keyed by transfer id, partitioned by murmur2 as the application is, so
/// nothing is forwarded) to a running saga and waits for a reply to each.
fn saga_run(rt: &tokio::runtime::Runtime, broker: &Broker, n: u64, seed: u64) -> Result<SagaRun> {
    let saga = Saga::start(rt, broker)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let list: Vec<(String, Vec<u8>)> = (0..n).map(|i| transfer(format!("t-{i}"), &mut rng)).collect();
    let reader = count_committed(&broker.brokers, &saga.replies, n);
    let (start, cpu) = (Instant::now(), stat_cpu("/proc/self/stat"));
    feed_murmur2(&broker.brokers, &saga.transfers_topic, &list)?;
    let read = join(reader.handle);
    let cores = stat_cpu("/proc/self/stat").zip(cpu).map(|(end, begin)| (end - begin) / start.elapsed().as_secs_f64());
    let metrics = saga.stop(rt, broker)?;
    let read = read.with_context(|| format!("the transfers' replies; stages {metrics:?}"))?;
    let done = read.done_at.ok_or_else(|| anyhow!("the reader finished without seeing all replies"))?;
    Ok(SagaRun {
        n,
        elapsed: done.saturating_duration_since(start),
        cores,
        forwarded: metrics.iter().map(|(_, m)| m.forwarded).sum(),
        transactions: metrics.iter().map(|(_, m)| m.transactions).sum(),
    })
}

/// Transfers paced at `rate` per second for `secs`, each id `<send time in ns>-<n>`, while a
/// read_committed reader of the replies records `visible time - send time`: sorted µs, and the
/// rate achieved.
pub(crate) fn saga_latency(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    rate: f64,
    secs: Duration,
) -> Result<(Vec<u64>, f64)> {
    let saga = Saga::start(rt, broker)?;
    let total = (rate * secs.as_secs_f64()).round().max(1.0) as u64;
    let reader = {
        let (b, topic) = (broker.brokers.clone(), saga.replies.clone());
        std::thread::spawn(move || -> Result<Vec<u64>> {
            let mut micros = Vec::new();
            let deadline = Instant::now() + secs + RUN_DEADLINE;
            read_committed(
                &b,
                &topic,
                deadline,
                Duration::ZERO,
                |value| {
                    let visible = now_nanos();
                    let Ok(Id { id }) = serde_json::from_slice::<Id>(value) else { return };
                    if let Some(sent) = id.split_once('-').and_then(|(ts, _)| ts.parse::<u128>().ok()) {
                        micros.push((visible.saturating_sub(sent) / 1000) as u64);
                    }
                },
                |c| c >= total,
            )?;
            micros.sort_unstable();
            Ok(micros)
        })
    };
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("partitioner", "murmur2_random")
        .create()?;
    let mut rng = StdRng::seed_from_u64(13);
    let (start, mut sent) = (Instant::now(), 0u64);
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while sent < due {
            let (key, value) = transfer(format!("{}-{sent}", now_nanos()), &mut rng);
            send(&p, &saga.transfers_topic, &key, &value)?;
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    let micros = join(reader);
    saga.stop(rt, broker)?;
    let micros = micros?;
    if micros.len() as u64 != total {
        bail!("{total} transfers sent, {} timed replies read", micros.len());
    }
    Ok((micros, achieved))
}

/// [`feed`] with a producer that partitions by murmur2, as an application's stages do.
fn feed_murmur2(brokers: &str, topic: &str, records: &[(String, Vec<u8>)]) -> Result<()> {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create()?;
    for (key, value) in records {
        send(&p, topic, key, value)?;
    }
    p.flush(Duration::from_secs(60)).context("flush the input producer")?;
    Ok(())
}
