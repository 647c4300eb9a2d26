//! Section 3: end-to-end latency at half of the flow's peak.

use super::*;

pub(crate) fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// The command id of a reply (the flow) or of a copied command (the pass-through).
#[derive(serde::Deserialize)]
pub(crate) struct Id {
    pub(crate) id: String,
}

pub(crate) struct Latency {
    /// The flow's commit interval (the pass-through's too).
    pub(crate) commit_interval: Duration,
    pub(crate) target_rate: f64,
    pub(crate) achieved_rate: f64,
    /// End-to-end latencies in microseconds, sorted.
    pub(crate) micros: Vec<u64>,
    pub(crate) transactions: u64,
    pub(crate) aborts: u64,
    /// Commit latencies seen (the flow: sampled from its metrics), sorted.
    pub(crate) commits: Vec<Duration>,
}

pub(crate) fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

impl Latency {
    pub(crate) fn at(&self, q: f64) -> Duration {
        Duration::from_micros(percentile(&self.micros, q))
    }
}

/// Measured while pacing: end-to-end latencies (sorted, µs) and the achieved rate.
pub(crate) struct Paced {
    pub(crate) micros: Vec<u64>,
    pub(crate) achieved: f64,
}

/// Opens every account on `input` and waits for their outputs on `output` (so the consumer has
/// joined its group and restored), then produces deposits at `rate` for `secs`, each id
/// `<send time in ns since the epoch>-<n>`, while a read_committed reader of `output` records
/// `visible time - send time` per output. `tick` runs between sends.
pub(crate) fn paced(
    brokers: &str,
    input: &str,
    output: &str,
    rate: f64,
    secs: Duration,
    mut tick: impl FnMut() -> Result<()>,
) -> Result<Paced> {
    let seen = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let reader = {
        let (brokers, topic) = (brokers.to_string(), output.to_string());
        let (seen, expected) = (seen.clone(), expected.clone());
        let deadline = Instant::now() + secs + RUN_DEADLINE;
        std::thread::spawn(move || -> Result<Vec<u64>> {
            let mut micros = Vec::new();
            read_committed(
                &brokers,
                &topic,
                deadline,
                Duration::ZERO,
                |value| {
                    let visible = now_nanos();
                    seen.fetch_add(1, Ordering::Relaxed);
                    let Ok(Id { id }) = serde_json::from_slice::<Id>(value) else { return };
                    if let Some(sent) = id.split_once('-').and_then(|(ts, _)| ts.parse::<u128>().ok()) {
                        micros.push((visible.saturating_sub(sent) / 1000) as u64);
                    }
                },
                |c| c >= expected.load(Ordering::Relaxed),
            )?;
            micros.sort_unstable();
            Ok(micros)
        })
    };
    let fail = |what: String, reader: JoinHandle<Result<Vec<u64>>>, expected: &AtomicU64| {
        expected.store(0, Ordering::Relaxed);
        let r = join(reader).err();
        anyhow!("{what} (reader: {r:?})")
    };
    let p = producer(brokers, 1)?;
    for i in 0..ACCOUNTS {
        send(&p, input, &account(i), &wire(format!("open-{i}"), "open", None))?;
    }
    let end = Instant::now() + Duration::from_secs(60);
    while seen.load(Ordering::Relaxed) < ACCOUNTS as u64 {
        if Instant::now() >= end || reader.is_finished() {
            return Err(fail("warm-up: not all opens came through within 60 s".into(), reader, &expected));
        }
        if let Err(e) = tick() {
            return Err(fail(format!("{e:#}"), reader, &expected));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let total = (rate * secs.as_secs_f64()).round().max(1.0) as u64;
    let mut rng = StdRng::seed_from_u64(11);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while sent < due {
            let key = account(rng.random_range(0..ACCOUNTS));
            let value = wire(format!("{}-{sent}", now_nanos()), "deposit", Some(rng.random_range(1..100)));
            send(&p, input, &key, &value)?;
            sent += 1;
        }
        if let Err(e) = tick() {
            return Err(fail(format!("{e:#}"), reader, &expected));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    expected.store(ACCOUNTS as u64 + total, Ordering::Relaxed);
    while !reader.is_finished() {
        tick()?;
        std::thread::sleep(Duration::from_millis(1));
    }
    let micros = join(reader)?;
    if micros.len() as u64 != total {
        bail!("{total} commands sent, {} timed outputs read", micros.len());
    }
    Ok(Paced { micros, achieved })
}

pub(crate) fn flow_latency(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    rate: f64,
    secs: Duration,
    commit_interval: Duration,
) -> Result<Latency> {
    let topics = BankTopics { input: unique("lat-cmds"), replies: unique("lat-replies"), events: unique("lat-events") };
    create_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events])?;
    let journal = unique("lat-journal");
    create_journal_topic(rt, brokers, &journal)?;
    let flow = with_properties(bank_flow(brokers, &unique("lat-group"), topics.clone()))
        .journal_topic(&journal)
        .transactional_id(unique("lat-txn"))
        .commit_interval(commit_interval)
        .run()
        .context("start the flow")?;
    // The flow's metrics give the latency of its last commit: sample it at each new transaction.
    let mut commits = Vec::new();
    let mut transactions = 0;
    // With EVENTSTAGE_E2E_TIMELINE, what the flow has consumed and committed, four times a second:
    // shows whether it keeps up with the pace and how its transactions go.
    let timeline = std::env::var_os("EVENTSTAGE_E2E_TIMELINE").is_some();
    let (started, mut printed) = (Instant::now(), Instant::now());
    let result = paced(brokers, &topics.input, &topics.replies, rate, secs, || {
        let m = flow.metrics();
        if timeline && printed.elapsed() >= Duration::from_millis(250) {
            printed = Instant::now();
            progress(&format!(
                "    {:>6.2} s: {} commands consumed, {} transactions, last commit took {}",
                started.elapsed().as_secs_f64(),
                m.records_in,
                m.transactions,
                ms(m.last_commit)
            ));
        }
        if m.transactions != transactions {
            transactions = m.transactions;
            commits.push(m.last_commit);
        }
        Ok(())
    });
    let metrics = flow.metrics();
    let stopped = stop_flow(rt, flow);
    delete_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events, &journal]);
    let paced = result?;
    stopped?;
    commits.sort_unstable();
    Ok(Latency {
        commit_interval,
        target_rate: rate,
        achieved_rate: paced.achieved,
        micros: paced.micros,
        transactions: metrics.transactions,
        aborts: metrics.aborts,
        commits,
    })
}

pub(crate) fn pass_through_latency(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    rate: f64,
    secs: Duration,
    await_deliveries: bool,
    commit_interval: Duration,
    outputs_per_input: usize,
) -> Result<Latency> {
    let (input, output) = (unique("lat-pt-in"), unique("lat-pt-out"));
    // Latency is read on `output`; the other outputs only add their volume.
    let also: Vec<String> = (1..outputs_per_input).map(|i| format!("{output}-{i}")).collect();
    let mut topics = vec![input.as_str(), output.as_str()];
    topics.extend(also.iter().map(String::as_str));
    create_topics(rt, brokers, &topics)?;
    let deadline = Instant::now() + secs + RUN_DEADLINE;
    let pt = PassThrough {
        commit_every: commit_interval,
        also: also.clone(),
        ..PassThrough::new(brokers, &input, &output, None, await_deliveries, deadline)
    };
    let stop = pt.stop.clone();
    let worker = pt.spawn()?;
    let result = paced(brokers, &input, &output, rate, secs, || {
        if worker.is_finished() {
            bail!("the pass-through stopped");
        }
        Ok(())
    });
    stop.store(true, Ordering::Relaxed);
    let stats = join(worker)?;
    delete_topics(rt, brokers, &topics);
    let paced = result?;
    Ok(Latency {
        commit_interval,
        target_rate: rate,
        achieved_rate: paced.achieved,
        micros: paced.micros,
        transactions: stats.transactions,
        aborts: 0,
        commits: Vec::new(),
    })
}
