//! Section 13 (`EVENTSTAGE_E2E_ONLY=transfers`): several stages in one application (issue 25).
//! The transfer saga (the bank and the transfers, each step a command routed through a
//! repartition topic and handled in a transaction of its own) beside the one-stage bank flow, in
//! the same run, alternating round by round.
//!
//! A transfer is five commands handled by the stages, one after another: the transfer's start,
//! the bank's withdrawal, the transfer's step, the bank's deposit, the transfer's step; four of
//! them arrive through a repartition topic, each after its sender's commit. So the saga's rate is
//! reported both as transfers per second (a reply each) and as stage commands per second (five
//! per transfer), beside the bank flow's commands per second.

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
    }
}

pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    cmds: &[(String, Vec<u8>)],
    transfers: u64,
    rounds: usize,
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
    Ok(TransfersReport { bank: Rounds::of(bank, |f| f.run.window_rate()), saga: Rounds::of(saga, SagaRun::rate) })
}

/// Opens [`ACCOUNTS`] accounts with a large balance through the application, then feeds `n`
/// transfers of 1 between random accounts (keyed by transfer id, partitioned by murmur2 as the
/// application is, so nothing is forwarded) and waits for a reply to each.
fn saga_run(rt: &tokio::runtime::Runtime, broker: &Broker, n: u64, seed: u64) -> Result<SagaRun> {
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
    let mut rng = StdRng::seed_from_u64(seed);
    let list: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let from = rng.random_range(0..ACCOUNTS);
            let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
            let id = format!("t-{i}");
            let t = WireTransfer { id: id.clone(), from: account(from), to: account(to), amount: 1 };
            (id, serde_json::to_vec(&t).unwrap_or_default())
        })
        .collect();
    let reader = count_committed(b, &replies, n);
    let (start, cpu) = (Instant::now(), stat_cpu("/proc/self/stat"));
    feed_murmur2(b, &transfers_topic, &list)?;
    let read = join(reader.handle);
    let cores = stat_cpu("/proc/self/stat").zip(cpu).map(|(end, begin)| (end - begin) / start.elapsed().as_secs_f64());
    let metrics = running.metrics();
    let stopped =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), running.drain_and_shutdown()).await });
    let read = read.with_context(|| format!("the transfers' replies; stages {metrics:?}"))?;
    stopped.map_err(|_| anyhow!("the transfer application did not drain within 30 s"))?.context("drain")?;
    let done = read.done_at.ok_or_else(|| anyhow!("the reader finished without seeing all replies"))?;
    let internal: Vec<String> = ["bank", "transfer"]
        .iter()
        .flat_map(|s| [format!("{group}-{s}-commands"), format!("{group}-{s}-timers"), format!("{group}-{s}-journal")])
        .collect();
    let mut all: Vec<&str> = vec![&topics.input, &topics.replies, &topics.events, &transfers_topic, &replies];
    all.extend(internal.iter().map(String::as_str));
    delete_topics(rt, b, &all);
    Ok(SagaRun {
        n,
        elapsed: done.saturating_duration_since(start),
        cores,
        forwarded: metrics.iter().map(|(_, m)| m.forwarded).sum(),
        transactions: metrics.iter().map(|(_, m)| m.transactions).sum(),
    })
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
