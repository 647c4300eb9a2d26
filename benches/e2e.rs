//! End-to-end benchmark of the exactly-once Kafka flow against a real Kafka-protocol broker.
//!
//! `cargo bench --bench e2e` starts a noida-db broker of its own on a free port (stopped when this
//! process exits, however it exits: a shell watchdog kills it when our end of its stdin closes), or
//! uses the cluster named by `EVENTSTAGE_TEST_BROKERS=host:port`. Every measurement gets fresh topics
//! (4 partitions), group ids and transactional ids; everything commits every 100 ms. It measures:
//!
//! 1. committed throughput of the bank flow: N commands (an `open` per account for 1000 accounts,
//!    then deposits to random accounts) are produced to the input topic first, then the flow
//!    starts; the clock stops when a `read_committed` reader has seen all N replies;
//! 2. the same for a bare rdkafka transactional pass-through (`BaseConsumer`, read_committed, group
//!    subscription → transactional `ThreadedProducer`, `send_offsets_to_transaction` +
//!    `commit_transaction` every 100 ms, the same bytes to one output topic), and the ratio. A
//!    second pass-through variant waits for its delivery reports before `commit_transaction`: with a
//!    `ThreadedProducer`, rdkafka 0.39's `commit_transaction` flushes with `poll(100 ms)` on a queue
//!    the producer's own thread serves, so a commit with records in flight takes ~100 ms more;
//! 3. end-to-end latency (send → reply visible to a `read_committed` reader) with commands paced at
//!    half of the flow's throughput from 1 (and, for reference, of both pass-throughs at that rate);
//! 4. the restore rate of `KafkaJournal` over a journal topic of N records (written here the way a
//!    flow writes them: the bank's key, its events and its state after them, over 1000 accounts;
//!    the flow itself writes one record per key and commit interval, far fewer), against bare
//!    `read_committed` consumers reading the same topic to its end.
//!
//! Throughputs are over the processing window (first input record consumed → last output visible),
//! which the ratios use; the report also gives them including startup (group join, restore). The
//! three throughput runs are repeated (interleaved) and the median round is reported: with a 100 ms
//! commit interval a run of N = 100 000 lasts only a few commits. Topics are deleted once measured
//! (the broker keeps everything in memory). CPU figures come from /proc (Linux; 100 ticks/s).
//!
//! 5. KTable emulation: see `e2e_table.rs` (materialization vs a bare consumer, `get` latency,
//!    memory per key).
//!
//! Environment: `EVENTSTAGE_E2E_RECORDS` (N, default 100 000), `EVENTSTAGE_E2E_ROUNDS` (default 3),
//! `EVENTSTAGE_E2E_TABLE_KEYS` (default 10^6), `EVENTSTAGE_E2E_ONLY=table` (only section 5),
//! `EVENTSTAGE_E2E_LATENCY_SECS` (default 10), `NOIDA_DB_BIN` (the broker binary; default: found
//! through python3), `RUST_LOG` (tracing filter, default `warn`).

mod e2e_table;

use anyhow::{anyhow, bail, Context, Result};
use eventstage::flow::{FlowControl, FlowMetrics};
use eventstage::journal::KafkaJournal;
use eventstage::stages::bank_flow::{bank_flow, BankTopics, WireCommand};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PARTITIONS: i32 = 4;
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
const ACCOUNTS: usize = 1000;
/// Upper bound of one throughput run (producing the input excluded).
const RUN_DEADLINE: Duration = Duration::from_secs(150);
/// A read_committed reader that gets nothing for this long reconnects (see [`read_committed`]).
const READER_STALL: Duration = Duration::from_secs(2);
/// Timeout of librdkafka's transactional calls.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// Rounds of the restore comparison (the median is reported).
const RESTORE_ROUNDS: usize = 3;
/// `comm` of the flow's thread (its name `eventstage-flow-bank`, cut to 15 bytes by Linux).
const FLOW_THREAD: &str = "eventstage-flow";
/// `comm` of the pass-through's thread.
const PASS_THREAD: &str = "e2e-passthrough";

fn main() {
    // `cargo bench` passes `--bench`; a filter argument that does not match this target skips it.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if !args.is_empty() && !args.iter().any(|a| "e2e".contains(a.as_str())) {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Err(e) = run() {
        eprintln!("e2e benchmark failed: {e:#}");
        std::process::exit(1);
    }
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.trim().replace('_', "").parse().with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

fn progress(what: &str) {
    eprintln!("[e2e] {what}");
}

fn run() -> Result<()> {
    let n = env_number("EVENTSTAGE_E2E_RECORDS", 100_000)?.max(ACCOUNTS as u64 + 1);
    let latency_secs = Duration::from_secs(env_number("EVENTSTAGE_E2E_LATENCY_SECS", 10)?.max(1));
    let rounds = env_number("EVENTSTAGE_E2E_ROUNDS", 3)?.max(1) as usize;
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("build the tokio runtime")?;
    let broker = Broker::start()?;
    let b = broker.brokers.as_str();
    progress(&format!(
        "broker {b} ({}); N = {n}, {PARTITIONS} partitions, commit interval {COMMIT_INTERVAL:?}",
        if broker.own.is_some() { "noida-db started by this benchmark" } else { "EVENTSTAGE_TEST_BROKERS" }
    ));
    let table_keys = env_number("EVENTSTAGE_E2E_TABLE_KEYS", 1_000_000)?.max(1);
    if std::env::var("EVENTSTAGE_E2E_ONLY").as_deref() == Ok("table") {
        progress("5/5 table materialization and lookups (EVENTSTAGE_E2E_ONLY=table)");
        let table = e2e_table::run(&rt, &broker, table_keys)?;
        println!();
        table.print();
        return Ok(());
    }
    let cmds = commands(n as usize, 7);

    progress(&format!(
        "1+2/5 throughput, {rounds} rounds of: bank flow, pass-through, pass-through awaiting deliveries, the same with 2 outputs per input"
    ));
    let (mut flows, mut passes, mut drained, mut doubled) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        flows.push(flow_throughput(&rt, &broker, &cmds)?);
        passes.push(pass_through_throughput(&rt, &broker, &cmds, false, 1)?);
        drained.push(pass_through_throughput(&rt, &broker, &cmds, true, 1)?);
        doubled.push(pass_through_throughput(&rt, &broker, &cmds, true, 2)?);
        progress(&format!(
            "    round {}: {:.0} / {:.0} / {:.0} / {:.0} records/s",
            round + 1,
            flows[round].run.window_rate(),
            passes[round].window_rate(),
            drained[round].window_rate(),
            doubled[round].window_rate()
        ));
    }
    let flow = Rounds::of(flows, |f| f.run.window_rate());
    let pass = Rounds::of(passes, Run::window_rate);
    let pass_drained = Rounds::of(drained, Run::window_rate);
    let pass_doubled = Rounds::of(doubled, Run::window_rate);

    let rate = 0.5 * flow.median.run.window_rate();
    progress(&format!("3/5 latency at {rate:.0} commands/s for {} s each", latency_secs.as_secs()));
    let flow_latency = flow_latency(&rt, b, rate, latency_secs)?;
    let pass_latency = pass_through_latency(&rt, b, rate, latency_secs, false)?;
    let pass_drained_latency = pass_through_latency(&rt, b, rate, latency_secs, true)?;

    progress("4/5 journal restore rate");
    let journal = unique("restore-journal");
    write_journal(&rt, b, &journal, n)?;
    let restore = restore_rates(&rt, b, &journal, n)?;
    progress("5/5 table materialization and lookups");
    let table = e2e_table::run(&rt, &broker, table_keys)?;
    let total = started.elapsed();
    let broker_rss = broker.rss_mib();
    drop(broker);

    let report = Report {
        n,
        flow,
        pass,
        pass_drained,
        pass_doubled,
        flow_latency,
        pass_latency,
        pass_drained_latency,
        restore,
        table,
        total,
        broker_rss,
    };
    report.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------------------------

/// The cluster under test: ours (a noida-db process) or the one named by `EVENTSTAGE_TEST_BROKERS`.
struct Broker {
    brokers: String,
    own: Option<OwnBroker>,
}

struct OwnBroker {
    child: Child,
    /// The noida-db process (a child of `child`), once found.
    pid: std::sync::OnceLock<Option<u32>>,
    watchdog: Option<ChildStdin>,
    _data: tempfile::TempDir,
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        // Closing the watchdog's stdin makes it kill the broker and wait for it.
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.flush();
        }
        let _ = self.child.wait();
    }
}

impl Broker {
    fn start() -> Result<Self> {
        if let Ok(b) = std::env::var("EVENTSTAGE_TEST_BROKERS") {
            wait_ready(&b)?;
            return Ok(Self { brokers: b, own: None });
        }
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("find a free port")?.port();
        let data = tempfile::tempdir().context("create the broker's data directory")?;
        // `sh` runs the broker and waits for its stdin to close (this process exiting, or drop),
        // then stops the broker: no broker outlives the benchmark.
        let script = r#""$0" start --only kafka --host 127.0.0.1 --kafka-port "$1" --data-dir "$2" >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid; wait $pid"#;
        let mut child = Command::new("sh")
            .args(["-c", script])
            .arg(noida_bin()?)
            .arg(port.to_string())
            .arg(data.path())
            .stdin(Stdio::piped())
            .spawn()
            .context("start noida-db")?;
        let watchdog = child.stdin.take();
        let broker = Self {
            brokers: format!("127.0.0.1:{port}"),
            own: Some(OwnBroker { child, pid: Default::default(), watchdog, _data: data }),
        };
        wait_ready(&broker.brokers)?;
        Ok(broker)
    }

    /// CPU seconds the broker process used so far (our own broker on Linux only).
    fn cpu(&self) -> Option<f64> {
        stat_cpu(&format!("/proc/{}/stat", self.pid()?))
    }

    /// Resident memory of the broker process, in MiB.
    fn rss_mib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kib: u64 =
            status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib / 1024)
    }

    /// The broker's pid: the noida-db child of our watchdog shell.
    fn pid(&self) -> Option<u32> {
        let own = self.own.as_ref()?;
        let sh = own.child.id();
        *own.pid.get_or_init(|| {
            std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(')')?;
                let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
                (ppid == sh && comm.starts_with("noida")).then_some(pid)
            })
        })
    }
}

fn noida_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("NOIDA_DB_BIN") {
        return Ok(p.into());
    }
    let out = Command::new("python3")
        .args(["-c", "import noida_db,os;print(os.path.join(os.path.dirname(noida_db.__file__),'noida-db'))"])
        .output()
        .context("run python3 to find noida-db")?;
    if !out.status.success() {
        bail!(
            "noida-db is not installed: run `python3 -m pip install noida-db==0.2.3`, or set EVENTSTAGE_TEST_BROKERS"
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn wait_ready(brokers: &str) -> Result<()> {
    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let end = Instant::now() + Duration::from_secs(30);
    while client.fetch_metadata(None, Duration::from_millis(500)).is_err() {
        if Instant::now() >= end {
            bail!("the broker at {brokers} did not come up within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn unique(prefix: &str) -> String {
    format!("e2e-{prefix}-{:08x}", rand::random::<u32>())
}

fn create_topics(rt: &tokio::runtime::Runtime, brokers: &str, topics: &[&str]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), admin.create_topics(&new, &opts)).await })
        .context("create topics: timed out")??;
    for r in results {
        r.map_err(|(t, code)| anyhow!("create topic {t}: {code}"))?;
    }
    Ok(())
}

/// Deletes topics a measurement is done with (the broker keeps everything in memory); best effort.
fn delete_topics(rt: &tokio::runtime::Runtime, brokers: &str, topics: &[&str]) {
    let Ok(admin) = ClientConfig::new().set("bootstrap.servers", brokers).create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let deleted =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), admin.delete_topics(topics, &opts)).await });
    if !matches!(deleted, Ok(Ok(_))) {
        tracing::debug!(?topics, "could not delete topics");
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting (/proc)
// ---------------------------------------------------------------------------------------------

/// utime + stime of a /proc `stat` file, in seconds.
fn stat_cpu(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// CPU seconds of this process's threads whose `comm` is `name`.
fn thread_cpu(name: &str) -> Option<f64> {
    let mut total = None;
    for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            *total.get_or_insert(0.0) += stat_cpu(&dir.join("stat").to_string_lossy()).unwrap_or(0.0);
        }
    }
    total
}

/// CPU seconds used so far by this process, by one of its threads, and by the broker.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    process: Option<f64>,
    worker: Option<f64>,
    broker: Option<f64>,
}

impl Cpu {
    fn now(broker: &Broker, worker: &str) -> Self {
        Self { process: stat_cpu("/proc/self/stat"), worker: thread_cpu(worker), broker: broker.cpu() }
    }

    /// Cores used between `self` and `later` over `secs`.
    fn cores(&self, later: &Self, secs: f64) -> Self {
        let d = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / secs);
        Self {
            process: d(self.process, later.process),
            worker: d(self.worker, later.worker),
            broker: d(self.broker, later.broker),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workload, producing, reading
// ---------------------------------------------------------------------------------------------

fn account(i: usize) -> String {
    format!("acct-{i:04}")
}

fn wire(id: String, op: &str, amount: Option<u64>) -> Vec<u8> {
    serde_json::to_vec(&WireCommand { id, op: op.into(), amount }).unwrap_or_default()
}

/// `n` commands as (key, value): an `open` per account, then deposits to random accounts.
fn commands(n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            if i < ACCOUNTS {
                (account(i), wire(format!("open-{i}"), "open", None))
            } else {
                let key = account(rng.random_range(0..ACCOUNTS));
                (key, wire(format!("cmd-{i}"), "deposit", Some(rng.random_range(1..100))))
            }
        })
        .collect()
}

fn producer(brokers: &str, linger_ms: u32) -> Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", linger_ms.to_string())
        .create()?)
}

/// Sends one record, waiting while the producer's queue is full.
fn send_record<'a>(
    p: &ThreadedProducer<DefaultProducerContext>,
    mut rec: BaseRecord<'a, [u8], [u8]>,
) -> Result<(), KafkaError> {
    let end = Instant::now() + TXN_TIMEOUT;
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) if Instant::now() < end => {
                rec = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, value: &[u8]) -> Result<()> {
    send_record(p, BaseRecord::to(topic).key(key.as_bytes()).payload(value))
        .with_context(|| format!("produce to {topic}"))
}

/// Produces `cmds` to `topic` and waits until the broker has them all; returns the time taken.
fn feed(brokers: &str, topic: &str, cmds: &[(String, Vec<u8>)]) -> Result<Duration> {
    let started = Instant::now();
    let p = producer(brokers, 5)?;
    for (key, value) in cmds {
        send(&p, topic, key, value)?;
    }
    p.flush(Duration::from_secs(60)).context("flush the input producer")?;
    Ok(started.elapsed())
}

#[derive(Debug, Default, Clone, Copy)]
struct ReadStats {
    /// Distinct records read.
    records: u64,
    /// When `done` first held.
    done_at: Option<Instant>,
    /// Reconnects after a stall.
    reconnects: u32,
}

/// Reads every partition of `topic` from the beginning with read_committed, calling `on_record`
/// with each value once, until `done(records read)` holds (then reads on for `settle`, to catch
/// duplicates) or `deadline` passes (an error).
///
/// noida-db 0.2.3 sometimes stops serving a read_committed consumer whose fetch position sits on a
/// transaction marker, while a consumer reading from the start reads on (see tests/util/broker.rs):
/// after [`READER_STALL`] without a record the reader reconnects from the start and skips what it
/// has, and counts the reconnect.
fn read_committed(
    brokers: &str,
    topic: &str,
    deadline: Instant,
    settle: Duration,
    mut on_record: impl FnMut(&[u8]),
    mut done: impl FnMut(u64) -> bool,
) -> Result<ReadStats> {
    let connect = || -> Result<BaseConsumer> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            // A reader measuring latency should not sit in the broker's fetch wait.
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(consumer)
    };
    let mut positions: BTreeMap<i32, i64> = (0..PARTITIONS).map(|p| (p, 0)).collect();
    let mut consumer = connect()?;
    let mut stats = ReadStats::default();
    let mut last_record = Instant::now();
    loop {
        let now = Instant::now();
        match stats.done_at {
            Some(at) if now >= at + settle => return Ok(stats),
            Some(_) => {}
            None => {
                if done(stats.records) {
                    stats.done_at = Some(now);
                    continue;
                }
                if now >= deadline {
                    bail!("timed out reading {topic}: {} records so far", stats.records);
                }
                if now - last_record > READER_STALL {
                    consumer = connect()?;
                    stats.reconnects += 1;
                    last_record = now;
                }
            }
        }
        match consumer.poll(Duration::from_millis(5)) {
            Some(Ok(m)) => {
                last_record = Instant::now();
                let pos = positions.entry(m.partition()).or_default();
                if m.offset() < *pos {
                    continue;
                }
                *pos = m.offset() + 1;
                stats.records += 1;
                on_record(m.payload().unwrap_or_default());
            }
            Some(Err(e)) => tracing::debug!(error = %e, "reader error"),
            None => {}
        }
    }
}

/// A reader counting committed records on a thread of its own.
struct Counter {
    handle: JoinHandle<Result<ReadStats>>,
    /// Records seen so far.
    seen: Arc<AtomicU64>,
}

/// Counts committed records of `topic` on a thread of its own until `n` are visible.
fn count_committed(brokers: &str, topic: &str, n: u64) -> Counter {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    let seen = Arc::new(AtomicU64::new(0));
    let counted = seen.clone();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + RUN_DEADLINE;
        read_committed(
            &brokers,
            &topic,
            deadline,
            Duration::from_millis(500),
            |_| {},
            |c| {
                counted.store(c, Ordering::Relaxed);
                c >= n
            },
        )
    });
    Counter { handle, seen }
}

fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("a benchmark thread panicked"))?
}

// ---------------------------------------------------------------------------------------------
// 1 and 2. Throughput
// ---------------------------------------------------------------------------------------------

/// One throughput run.
#[derive(Debug, Clone, Copy)]
struct Run {
    n: u64,
    feed: Duration,
    /// Flow / pass-through started.
    start: Instant,
    /// First input record consumed.
    first: Instant,
    /// All input records consumed (not yet committed).
    processed: Instant,
    /// All outputs visible to read_committed.
    visible: Instant,
    /// Records the reader saw (n; more would be duplicates).
    read: u64,
    reconnects: u32,
    transactions: u64,
    aborts: u64,
    /// Mean and max commit latency (the flow only gives the max).
    commit_mean: Option<Duration>,
    commit_max: Duration,
    /// Cores used over the processing window.
    cores: Cpu,
}

impl Run {
    fn window(&self) -> Duration {
        self.visible.saturating_duration_since(self.first)
    }

    fn window_rate(&self) -> f64 {
        self.n as f64 / self.window().as_secs_f64()
    }

    fn total_rate(&self) -> f64 {
        self.n as f64 / self.visible.saturating_duration_since(self.start).as_secs_f64()
    }
}

/// Samples the consumed count every millisecond until the reader has seen `n` records: when the
/// first and the last input record were consumed, and the CPU used from the first record on.
struct Window {
    first: Option<Instant>,
    processed: Option<Instant>,
    cpu_first: Cpu,
    cpu_end: Cpu,
    end: Instant,
}

impl Window {
    /// Cores used from the first record to the end of the window.
    fn cores(&self) -> Cpu {
        let secs = self.first.map_or(0.0, |f| self.end.saturating_duration_since(f).as_secs_f64());
        self.cpu_first.cores(&self.cpu_end, secs)
    }
}

fn watch(
    broker: &Broker,
    worker: &str,
    n: u64,
    deadline: Instant,
    reader: &Counter,
    consumed: impl Fn() -> u64,
    stopped: impl Fn() -> bool,
) -> Window {
    let (mut first, mut processed, mut cpu_first) = (None, None, Cpu::default());
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
        }
        if c >= n && processed.is_none() {
            processed = Some(now);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Window { first, processed, cpu_first, cpu_end: Cpu::now(broker, worker), end: Instant::now() }
}

struct FlowRun {
    run: Run,
    metrics: FlowMetrics,
}

/// Repeated runs: the one with the median rate, and every rate.
struct Rounds<T> {
    median: T,
    rates: Vec<f64>,
}

impl<T> Rounds<T> {
    fn of(mut runs: Vec<T>, rate: impl Fn(&T) -> f64) -> Self {
        let rates = runs.iter().map(&rate).collect();
        runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
        let median = runs.swap_remove(runs.len() / 2);
        Self { median, rates }
    }

    fn rates(&self) -> String {
        self.rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
    }
}

/// The bank flow with the librdkafka properties of `EVENTSTAGE_E2E_FLOW_PRODUCER` and
/// `EVENTSTAGE_E2E_FLOW_CONSUMER` (`key=value,key=value`), for tuning experiments.
fn with_properties(
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

fn stop_flow(rt: &tokio::runtime::Runtime, flow: FlowControl) -> Result<()> {
    let stopper = flow.stopper();
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), flow.drain_and_shutdown()).await }) {
        Ok(r) => r.context("the flow stopped with an error"),
        Err(_) => {
            stopper.abort();
            bail!("the flow did not drain within 30 s (aborted)")
        }
    }
}

fn flow_throughput(rt: &tokio::runtime::Runtime, broker: &Broker, cmds: &[(String, Vec<u8>)]) -> Result<FlowRun> {
    let b = broker.brokers.as_str();
    let n = cmds.len() as u64;
    let topics = BankTopics { input: unique("cmds"), replies: unique("replies"), events: unique("events") };
    create_topics(rt, b, &[&topics.input, &topics.replies, &topics.events])?;
    let journal = unique("journal");
    let feed = feed(b, &topics.input, cmds)?;
    let reader = count_committed(b, &topics.replies, n);

    let start = Instant::now();
    let flow = with_properties(bank_flow(b, &unique("group"), topics.clone()))
        .journal_topic(&journal)
        .transactional_id(unique("txn"))
        .commit_interval(COMMIT_INTERVAL)
        .run()
        .context("start the flow")?;
    let deadline = start + RUN_DEADLINE + Duration::from_secs(5);
    let w = watch(broker, FLOW_THREAD, n, deadline, &reader, || flow.metrics().records_in, || false);
    let metrics = flow.metrics();
    let read = match join(reader.handle) {
        Ok(r) => r,
        Err(e) => {
            let stopped = stop_flow(rt, flow).err();
            return Err(e.context(format!("flow metrics {metrics:?}; flow: {stopped:?}")));
        }
    };
    stop_flow(rt, flow)?;
    delete_topics(rt, b, &[topics.input.as_str(), &topics.replies, &topics.events, &journal]);
    let visible = read.done_at.ok_or_else(|| anyhow!("the reader finished without seeing all replies"))?;
    let first = w.first.unwrap_or(start);
    let run = Run {
        n,
        feed,
        start,
        first,
        processed: w.processed.unwrap_or(visible),
        visible,
        read: read.records,
        reconnects: read.reconnects,
        transactions: metrics.transactions,
        aborts: metrics.aborts,
        commit_mean: None,
        commit_max: metrics.max_commit,
        cores: w.cores(),
    };
    Ok(FlowRun { run, metrics })
}

/// What a pass-through did.
#[derive(Debug, Default)]
struct PassStats {
    /// When the thread finished and the CPU seconds it had used.
    exit: Option<(Instant, f64)>,
    transactions: u64,
    commit_total: Duration,
    commit_max: Duration,
}

/// A bare transactional pass-through: `input` → `output`, the same key and value, committing every
/// [`COMMIT_INTERVAL`] with the consumed offsets. Runs until `n` records are committed (if given),
/// `stop` is set or `deadline` passes. With `await_deliveries`, waits until the producer has no
/// record in flight before `commit_transaction` (whose flush then has nothing to wait for).
struct PassThrough {
    brokers: String,
    input: String,
    output: String,
    n: Option<u64>,
    await_deliveries: bool,
    /// Topics each input record is also produced to (besides `output`).
    also: Vec<String>,
    deadline: Instant,
    /// Records consumed so far.
    consumed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl PassThrough {
    fn new(
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
            consumed: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs on a thread named [`PASS_THREAD`].
    fn spawn(self) -> Result<JoinHandle<Result<PassStats>>> {
        std::thread::Builder::new()
            .name(PASS_THREAD.into())
            .spawn(move || self.run())
            .context("start the pass-through thread")
    }

    fn run(&self) -> Result<PassStats> {
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
            if last_commit.elapsed() >= COMMIT_INTERVAL && consumed > committed {
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

fn pass_through_throughput(
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
    let stats = join(worker)?;
    let read = join(reader.handle)?;
    delete_topics(rt, b, &topics);
    let visible = read.done_at.ok_or_else(|| anyhow!("the reader finished without seeing all records"))?;
    let first = w.first.unwrap_or(start);
    Ok(Run {
        n,
        feed,
        start,
        first,
        processed: w.processed.unwrap_or(visible),
        visible,
        read: read.records,
        reconnects: read.reconnects,
        transactions: stats.transactions,
        aborts: 0,
        commit_mean: (stats.transactions > 0).then(|| stats.commit_total / stats.transactions as u32),
        commit_max: stats.commit_max,
        cores: Cpu {
            // The pass-through thread is gone by the end of the window: use its own last reading.
            worker: match (w.cpu_first.worker, stats.exit) {
                (Some(a), Some((at, b))) => Some((b - a) / at.saturating_duration_since(first).as_secs_f64()),
                _ => None,
            },
            ..w.cores()
        },
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Latency at half of the flow's peak
// ---------------------------------------------------------------------------------------------

fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// The command id of a reply (the flow) or of a copied command (the pass-through).
#[derive(serde::Deserialize)]
struct Id {
    id: String,
}

struct Latency {
    target_rate: f64,
    achieved_rate: f64,
    /// End-to-end latencies in microseconds, sorted.
    micros: Vec<u64>,
    reconnects: u32,
    transactions: u64,
    aborts: u64,
    /// Commit latencies seen (the flow: sampled from its metrics), sorted.
    commits: Vec<Duration>,
}

fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

impl Latency {
    fn at(&self, q: f64) -> Duration {
        Duration::from_micros(percentile(&self.micros, q))
    }
}

/// Measured while pacing: end-to-end latencies (sorted, µs), reader reconnects, achieved rate.
struct Paced {
    micros: Vec<u64>,
    reconnects: u32,
    achieved: f64,
}

/// Opens every account on `input` and waits for their outputs on `output` (so the consumer has
/// joined its group and restored), then produces deposits at `rate` for `secs`, each id
/// `<send time in ns since the epoch>-<n>`, while a read_committed reader of `output` records
/// `visible time - send time` per output. `tick` runs between sends.
fn paced(
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
        std::thread::spawn(move || -> Result<(Vec<u64>, u32)> {
            let mut micros = Vec::new();
            let stats = read_committed(
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
            Ok((micros, stats.reconnects))
        })
    };
    let fail = |what: String, reader: JoinHandle<Result<(Vec<u64>, u32)>>, expected: &AtomicU64| {
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
    let (micros, reconnects) = join(reader)?;
    if micros.len() as u64 != total {
        bail!("{total} commands sent, {} timed outputs read", micros.len());
    }
    Ok(Paced { micros, reconnects, achieved })
}

fn flow_latency(rt: &tokio::runtime::Runtime, brokers: &str, rate: f64, secs: Duration) -> Result<Latency> {
    let topics = BankTopics { input: unique("lat-cmds"), replies: unique("lat-replies"), events: unique("lat-events") };
    create_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events])?;
    let journal = unique("lat-journal");
    let flow = with_properties(bank_flow(brokers, &unique("lat-group"), topics.clone()))
        .journal_topic(&journal)
        .transactional_id(unique("lat-txn"))
        .commit_interval(COMMIT_INTERVAL)
        .run()
        .context("start the flow")?;
    // The flow's metrics give the latency of its last commit: sample it at each new transaction.
    let mut commits = Vec::new();
    let mut transactions = 0;
    let result = paced(brokers, &topics.input, &topics.replies, rate, secs, || {
        let m = flow.metrics();
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
        target_rate: rate,
        achieved_rate: paced.achieved,
        micros: paced.micros,
        reconnects: paced.reconnects,
        transactions: metrics.transactions,
        aborts: metrics.aborts,
        commits,
    })
}

fn pass_through_latency(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    rate: f64,
    secs: Duration,
    await_deliveries: bool,
) -> Result<Latency> {
    let (input, output) = (unique("lat-pt-in"), unique("lat-pt-out"));
    create_topics(rt, brokers, &[&input, &output])?;
    let deadline = Instant::now() + secs + RUN_DEADLINE;
    let pt = PassThrough::new(brokers, &input, &output, None, await_deliveries, deadline);
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
    delete_topics(rt, brokers, &[&input, &output]);
    let paced = result?;
    Ok(Latency {
        target_rate: rate,
        achieved_rate: paced.achieved,
        micros: paced.micros,
        reconnects: paced.reconnects,
        transactions: stats.transactions,
        aborts: 0,
        commits: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// 4. Restore rate
// ---------------------------------------------------------------------------------------------

struct Restore {
    records: u64,
    /// Median wall time of `restore_partition` over all partitions, one after the other.
    restore: Duration,
    /// Median wall time of `restore_partitions` over all partitions at once (what a flow does).
    restore_all: Duration,
    /// Median wall time of one bare consumer over all partitions at once.
    bare: Duration,
    /// Median wall time of bare consumers, one per partition, one after the other (as restore does).
    bare_sequential: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The bare consumers' context: reaching the end of a partition is how a read ends, not an error
/// worth logging (librdkafka reports some of those ends as global errors, outside `poll`).
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::error!(%error, reason, "bare consumer error");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// Reads `partitions` of `topic` with one read_committed consumer from the beginning to the end as
/// of the start, ending a partition the way `restore_partition` does (its high watermark reached,
/// or partition EOF); returns the records read.
fn bare_read(brokers: &str, topic: &str, partitions: &[i32]) -> Result<u64> {
    let consumer: BaseConsumer<QuietEof> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("bare"))
        .set("receive.message.max.bytes", "2000000000")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create_with_context(QuietEof)?;
    let mut open: BTreeMap<i32, i64> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(30))?;
        if high > low {
            open.insert(*p, high);
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let mut records = 0u64;
    let mut last = Instant::now();
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                records += 1;
                last = Instant::now();
                if open.get(&m.partition()).is_some_and(|high| m.offset() + 1 >= *high) {
                    open.remove(&m.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => bail!("bare read of {topic}: {e}"),
            None if last.elapsed() > Duration::from_secs(10) => {
                bail!("bare read of {topic} stalled after {records} records (partitions {open:?} not at their end)")
            }
            None => {}
        }
    }
    Ok(records)
}

/// Writes `n` journal records as a flow writes them (per record: a `Deposited` event and the
/// account's state after it), over [`ACCOUNTS`] keys, to a new journal topic.
fn write_journal(rt: &tokio::runtime::Runtime, brokers: &str, topic: &str, n: u64) -> Result<()> {
    use eventstage::journal::{Envelope, JournalEntry, SeqNo};
    use eventstage::stages::bank::{Account, BankEvent};
    use eventstage::{Codec, EventSourced};
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), KafkaJournal::ensure(config, topic, PARTITIONS)).await
    })
    .context("create the journal topic: timed out")??;
    let codec = Codec::Bincode;
    let p = producer(brokers, 5)?;
    let mut accounts = vec![(0u64, Account { open: true, balance: 0 }); ACCOUNTS];
    for i in 0..n {
        let a = (i as usize * 7919) % ACCOUNTS;
        let (seq, account) = &mut accounts[a];
        *seq += 1;
        account.balance += 10;
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let event = codec.encode(&BankEvent::Deposited { amount: 10 })?;
        let entry = JournalEntry {
            last_seq: SeqNo(*seq),
            events: vec![Envelope::event(codec.id(), eventstage::stages::bank::Bank::EVENT_VERSION, ts, event)],
            state: Some(Envelope::snapshot(
                codec.id(),
                eventstage::stages::bank::Bank::STATE_VERSION,
                ts,
                codec.encode(&*account)?,
            )),
        };
        send(&p, topic, &format!("acct-{a:06}"), &entry.encode())?;
    }
    p.flush(Duration::from_secs(60)).context("flush the journal producer")?;
    Ok(())
}

fn restore_rates(rt: &tokio::runtime::Runtime, brokers: &str, topic: &str, expected: u64) -> Result<Restore> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    let journal = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(60), KafkaJournal::ensure(config, topic, PARTITIONS)).await
        })
        .context("connect to the journal: timed out")??;
    let all: Vec<i32> = (0..PARTITIONS).collect();
    let (mut restore, mut restore_all, mut bare, mut bare_sequential) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut records = 0;
    for _ in 0..RESTORE_ROUNDS {
        let started = Instant::now();
        let (mut read, mut entries) = (0u64, 0u64);
        for p in 0..PARTITIONS {
            let stats = journal.restore_partition(p, Duration::from_secs(10), |_key, entry| {
                entries += u64::from(entry.is_some());
            })?;
            read += stats.records;
        }
        restore.push(started.elapsed());
        if read != expected || entries != expected {
            bail!("restore read {read} records ({entries} entries); the journal should hold {expected}");
        }
        let started = Instant::now();
        let mut entries = 0u64;
        let stats = journal.restore_partitions(&all, Duration::from_secs(10), |_p, _key, entry| {
            entries += u64::from(entry.is_some());
        })?;
        restore_all.push(started.elapsed());
        if stats.records != expected || entries != expected {
            bail!(
                "restore_partitions read {} records ({entries} entries); the journal should hold {expected}",
                stats.records
            );
        }
        records = read;

        let started = Instant::now();
        let read = bare_read(brokers, topic, &all)?;
        bare.push(started.elapsed());
        if read != expected {
            bail!("the bare consumer read {read} records; the journal should hold {expected}");
        }

        let started = Instant::now();
        let mut read = 0;
        for p in 0..PARTITIONS {
            read += bare_read(brokers, topic, &[p])?;
        }
        bare_sequential.push(started.elapsed());
        if read != expected {
            bail!("the bare per-partition consumers read {read} records; the journal should hold {expected}");
        }
    }
    Ok(Restore {
        records,
        restore: median(restore),
        restore_all: median(restore_all),
        bare: median(bare),
        bare_sequential: median(bare_sequential),
    })
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn cores(c: Option<f64>) -> String {
    c.map_or_else(|| "n/a".into(), |c| format!("{c:.2}"))
}

struct Report {
    n: u64,
    flow: Rounds<FlowRun>,
    pass: Rounds<Run>,
    pass_drained: Rounds<Run>,
    /// Awaiting deliveries, two output records per input: the bank flow's output volume.
    pass_doubled: Rounds<Run>,
    flow_latency: Latency,
    pass_latency: Latency,
    pass_drained_latency: Latency,
    restore: Restore,
    table: e2e_table::TableReport,
    total: Duration,
    broker_rss: Option<u64>,
}

impl Report {
    fn run(name: &str, worker: &str, r: &Run, rates: String) {
        println!("  {name}");
        println!("    rounds: {rates} records/s; the median round:");
        println!(
            "    committed throughput {:>9.0} records/s   ({} records in {}, first record consumed -> last output visible)",
            r.window_rate(),
            r.n,
            secs(r.window())
        );
        println!(
            "    incl. startup        {:>9.0} records/s   (startup {}: group join, restore, first fetch)",
            r.total_rate(),
            secs(r.first.saturating_duration_since(r.start))
        );
        println!(
            "    all consumed after {}, all visible {} later; {} transactions ({} aborted), commit latency {}max {}",
            secs(r.processed.saturating_duration_since(r.first)),
            ms(r.visible.saturating_duration_since(r.processed)),
            r.transactions,
            r.aborts,
            r.commit_mean.map_or_else(String::new, |m| format!("mean {}, ", ms(m))),
            ms(r.commit_max)
        );
        println!(
            "    cores used: {worker} thread {}, whole bench process {}, broker {}; reader saw {} records ({} reconnects); input produced in {}",
            cores(r.cores.worker),
            cores(r.cores.process),
            cores(r.cores.broker),
            r.read,
            r.reconnects,
            secs(r.feed)
        );
    }

    fn latency(name: &str, l: &Latency) {
        let budget = COMMIT_INTERVAL + Duration::from_millis(50);
        println!(
            "  {name}: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}   (p99 <= {}: {})",
            ms(l.at(0.5)),
            ms(l.at(0.9)),
            ms(l.at(0.99)),
            ms(l.at(0.999)),
            ms(l.at(1.0)),
            ms(budget),
            verdict(l.at(0.99) <= budget)
        );
        let commits = if l.commits.is_empty() {
            String::new()
        } else {
            format!(
                ", commit latency p50 {} p90 {} max {} ({} sampled)",
                ms(percentile(&l.commits, 0.5)),
                ms(percentile(&l.commits, 0.9)),
                ms(percentile(&l.commits, 1.0)),
                l.commits.len()
            )
        };
        println!(
            "    {} outputs at {:.0}/s (target {:.0}/s); {} transactions ({} aborted){commits}; reader reconnects {}",
            l.micros.len(),
            l.achieved_rate,
            l.target_rate,
            l.transactions,
            l.aborts,
            l.reconnects
        );
    }

    fn print(&self) {
        let ratio = |a: &Run, b: &Run| a.window_rate() / b.window_rate();
        println!();
        println!(
            "eventstage end-to-end benchmark: N = {}, {PARTITIONS} partitions, commit interval {COMMIT_INTERVAL:?}",
            self.n
        );
        println!();
        println!("1+2. committed throughput (all outputs visible to read_committed)");
        let flow = &self.flow.median.run;
        let (pass, pass_drained) = (&self.pass.median, &self.pass_drained.median);
        Self::run("bank flow (per command: reply + event + journal record)", "flow", flow, self.flow.rates());
        let m = &self.flow.median.metrics;
        println!(
            "    flow metrics: records_in {}, records_out {}, dead letters {}",
            m.records_in, m.records_out, m.dead_letters
        );
        Self::run(
            "bare transactional pass-through (one output record per input)",
            "pass-through",
            pass,
            self.pass.rates(),
        );
        Self::run(
            "bare transactional pass-through, delivery reports awaited before commit_transaction",
            "pass-through",
            pass_drained,
            self.pass_drained.rates(),
        );
        Self::run(
            "bare transactional pass-through, deliveries awaited, two output records per input (the flow's reply + event volume)",
            "pass-through",
            &self.pass_doubled.median,
            self.pass_doubled.rates(),
        );
        let r = ratio(flow, pass);
        println!("  ratio flow / pass-through (medians): {r:.2} (target >= 0.8: {})", verdict(r >= 0.8));
        println!("  ratio flow / pass-through awaiting deliveries (medians): {:.2}", ratio(flow, pass_drained));
        println!(
            "  ratio flow / pass-through with the flow's output volume (medians): {:.2}",
            ratio(flow, &self.pass_doubled.median)
        );
        println!();
        println!(
            "3. end-to-end latency, send -> output visible to read_committed, at 0.5 x {:.0} = {:.0} commands/s",
            flow.window_rate(),
            self.flow_latency.target_rate
        );
        Self::latency("bank flow", &self.flow_latency);
        Self::latency("pass-through (reference)", &self.pass_latency);
        Self::latency("pass-through awaiting deliveries (reference)", &self.pass_drained_latency);
        println!();
        let r = &self.restore;
        let rate = |d: Duration| r.records as f64 / d.as_secs_f64();
        println!("4. journal restore ({} records over {PARTITIONS} partitions, median of {RESTORE_ROUNDS})", r.records);
        println!(
            "  KafkaJournal::restore_partition, partition by partition {:>9.0} records/s ({})",
            rate(r.restore),
            ms(r.restore)
        );
        println!(
            "  KafkaJournal::restore_partitions, all at once (flows)  {:>9.0} records/s ({})",
            rate(r.restore_all),
            ms(r.restore_all)
        );
        println!(
            "  bare consumer, all partitions at once                  {:>9.0} records/s ({})",
            rate(r.bare),
            ms(r.bare)
        );
        println!(
            "  bare consumers, partition by partition                 {:>9.0} records/s ({})",
            rate(r.bare_sequential),
            ms(r.bare_sequential)
        );
        println!(
            "  ratio restore / bare: {:.2} all at once (as flows restore); {:.2} partition by partition",
            rate(r.restore_all) / rate(r.bare),
            rate(r.restore) / rate(r.bare_sequential)
        );
        println!();
        self.table.print();
        println!();
        println!(
            "total benchmark time {}; broker resident memory at the end {}",
            secs(self.total),
            self.broker_rss.map_or_else(|| "n/a".into(), |m| format!("{m} MiB"))
        );
    }
}
