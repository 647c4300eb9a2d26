//! Section 11 (`EVENTSTAGE_E2E_ONLY=uniform`): uniform random keys over K accounts (issue 24),
//! eventstage beside a Kafka Streams application of the same contract, on the same broker in the
//! same run.
//!
//! The two systems, each with fresh topics ([`PARTITIONS`] partitions), its own group (application
//! id) and state directory, one process each, committing every 100 ms with exactly-once:
//! - eventstage: `eventstage demo` in a child process with a Kafka journal, `--state-dir` and
//!   `--state-cache EVENTSTAGE_E2E_UNIFORM_MIB` MiB (default 128), as section 10 runs it;
//! - Kafka Streams: `benches/kstreams` (`BankStreams`, Processor API, one persistent key-value store
//!   = RocksDB, `processing.guarantee=exactly_once_v2`, `commit.interval.ms=100`,
//!   `num.stream.threads=1`, every other setting Kafka Streams' default) in `java -Xmx1g`. It is
//!   built on first use with `mvn compile dependency:copy-dependencies` in a copy of
//!   `benches/kstreams` under `target/eventstage-kstreams/<hash of its files>` (Maven Central,
//!   about 10 s; later runs only check a marker file);
//! - `kstreams-bounded`: the same with RocksDB bounded to eventstage's budget
//!   (`EVENTSTAGE_E2E_UNIFORM_MIB`) for all its stores, as Kafka Streams' documentation bounds it
//!   ("Bounded memory usage": one shared block cache holding index and filter blocks, memtables
//!   charged to it).
//!
//! For each: K `open` commands (one per account) are produced before the process starts; the open
//! rate is K over the time from the spawn to the last reply visible to a `read_committed` reader,
//! every reply checked (ok, balance 0). Then N deposits to accounts drawn uniformly from all K
//! (seeded: both systems get the same sequence) are produced at full speed while a reader on its
//! own thread reads the replies: every reply is checked against a model of the balances; the rate
//! is N over first send → last reply visible; a command's latency is reply visible to the reader −
//! its send (as section 3 measures it; with the input produced at full speed it is mostly the
//! backlog's wait). The child's resident memory is sampled every 250 ms, its peak reported per
//! phase; its CPU time per thread is taken at the phase boundaries (`cpu, opens:` and `cpu,
//! deposits:` lines: cores used, CPU per command, the busiest threads). At the end the child gets
//! SIGTERM and its topics are deleted.
//!
//! `EVENTSTAGE_E2E_UNIFORM_KEYS` (K, default 10^7), `EVENTSTAGE_E2E_UNIFORM_N` (N, default 10^6),
//! `EVENTSTAGE_E2E_UNIFORM_MIB` (eventstage's state cache, default 128; 0: none, every key in
//! memory),
//! `EVENTSTAGE_E2E_UNIFORM_SYSTEMS` (which and in what order, default `eventstage,kstreams`; also
//! `kstreams-bounded`).

use super::*;
use eventstage::stages::bank_flow::WireReply;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const POM: &str = include_str!("../kstreams/pom.xml");
const SOURCE: &str = include_str!("../kstreams/src/main/java/dev/eventstage/kstreams/BankStreams.java");
const LOG4J: &str = include_str!("../kstreams/src/main/resources/log4j2.properties");
const MAIN_CLASS: &str = "dev.eventstage.kstreams.BankStreams";
/// The Kafka Streams application's heap.
const KSTREAMS_HEAP: &str = "-Xmx1g";
/// Upper bound of each phase.
const PHASE_DEADLINE: Duration = Duration::from_secs(3 * 3600);

pub(crate) struct Row {
    pub(crate) system: String,
    pub(crate) open_rate: f64,
    pub(crate) open_peak_rss_mib: u64,
    pub(crate) rate: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) peak_rss_mib: u64,
    /// What the process printed when it stopped (eventstage's `metrics:` and `state:` lines, the
    /// Kafka Streams application's counts).
    pub(crate) summary: Vec<String>,
    /// Where the process's CPU went in each phase (see [`cpu_line`]).
    pub(crate) cpu: Vec<String>,
}

pub(crate) fn print(rows: &[Row], keys: u64, n: u64) {
    println!(
        "uniform random deposits over {keys} accounts: {n} deposits after {keys} opens, {PARTITIONS} partitions, \
         exactly-once, commits every {COMMIT_INTERVAL:?}, one process each"
    );
    println!(
        "  {:<40} {:>9} {:>11} {:>9} {:>9} {:>15} {:>18}",
        "system", "opens/s", "deposits/s", "p50", "p99", "peak RSS opens", "peak RSS deposits"
    );
    for r in rows {
        println!(
            "  {:<40} {:>9.0} {:>11.0} {:>9} {:>9} {:>11} MiB {:>14} MiB",
            r.system,
            r.open_rate,
            r.rate,
            ms(r.p50),
            ms(r.p99),
            r.open_peak_rss_mib,
            r.peak_rss_mib
        );
        for line in r.summary.iter().chain(&r.cpu) {
            println!("      {line}");
        }
    }
    let Some(e) = rows.iter().find(|r| r.system.starts_with("eventstage")) else { return };
    for k in rows.iter().filter(|r| r.system.starts_with("Kafka Streams")) {
        println!(
            "  eventstage / {}: deposits/s {:.2}x, opens/s {:.2}x, p99 {:.2}x",
            k.system,
            e.rate / k.rate,
            e.open_rate / k.open_rate,
            e.p99.as_secs_f64() / k.p99.as_secs_f64().max(1e-9)
        );
    }
}

fn key(i: u64) -> String {
    format!("acct-{i:08}")
}

/// The deposits, the same for both systems: account, amount, and the balance the reply must say.
struct Deposits {
    account: Vec<u64>,
    amount: Vec<u64>,
    expected: Arc<Vec<u64>>,
}

impl Deposits {
    fn new(keys: u64, n: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(24);
        let mut balances = vec![0u64; keys as usize];
        let (mut account, mut amount, mut expected) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let a = rng.random_range(0..keys);
            let x = rng.random_range(1..100);
            balances[a as usize] += x;
            account.push(a);
            amount.push(x);
            expected.push(balances[a as usize]);
        }
        Self { account, amount, expected: Arc::new(expected) }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Eventstage,
    /// Kafka Streams' defaults.
    KafkaStreams,
    /// Kafka Streams with RocksDB bounded to eventstage's budget (`BankStreams --rocksdb-memory-mib`).
    KafkaStreamsBounded,
}

pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    keys: u64,
    n: u64,
    cache_mib: u64,
    systems: &str,
) -> Result<Vec<Row>> {
    let systems = systems
        .split(',')
        .map(|s| match s.trim() {
            "eventstage" => Ok(System::Eventstage),
            "kstreams" => Ok(System::KafkaStreams),
            "kstreams-bounded" => Ok(System::KafkaStreamsBounded),
            other => {
                bail!("EVENTSTAGE_E2E_UNIFORM_SYSTEMS: `{other}` is not eventstage, kstreams or kstreams-bounded")
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let jvm = systems.iter().any(|s| *s != System::Eventstage);
    let classpath = if jvm { Some(kstreams_classpath()?) } else { None };
    let deposits = Deposits::new(keys, n);
    let mut rows = Vec::new();
    for system in systems {
        let row = match system {
            System::Eventstage => {
                progress(&format!(
                    "  eventstage demo, state cache {}: {keys} opens, then {n} deposits",
                    if cache_mib > 0 { format!("{cache_mib} MiB") } else { "none".into() }
                ));
                let label = if cache_mib > 0 {
                    format!("eventstage ({cache_mib} MiB cache)")
                } else {
                    "eventstage (no cache)".into()
                };
                one(rt, brokers, keys, &deposits, &label, |s| {
                    let mut cmd = Command::new(env!("CARGO_BIN_EXE_eventstage"));
                    cmd.args(["demo", "--brokers", brokers, "--input", &s.topics.input])
                        .args(["--replies", &s.topics.replies, "--events", &s.topics.events, "--group", &s.group])
                        .args(["--journal", &format!("kafka:{}", s.internal), "--transactional-id", &s.txn])
                        .args(["--partitions", &PARTITIONS.to_string()])
                        .arg("--state-dir")
                        .arg(s.dir)
                        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
                    if cache_mib > 0 {
                        cmd.args(["--state-cache", &format!("{cache_mib}MiB")]);
                    }
                    cmd
                })?
            }
            System::KafkaStreams | System::KafkaStreamsBounded => {
                let bounded = (system == System::KafkaStreamsBounded).then_some(cache_mib.max(1));
                let label = match bounded {
                    Some(mib) => format!("Kafka Streams 4.1.1 (RocksDB, {mib} MiB)"),
                    None => "Kafka Streams 4.1.1 (RocksDB)".into(),
                };
                progress(&format!("  {label}, exactly_once_v2: {keys} opens, then {n} deposits"));
                let classpath = classpath.as_deref().unwrap_or_default();
                one(rt, brokers, keys, &deposits, &label, |s| {
                    let mut cmd = Command::new(java());
                    cmd.args([KSTREAMS_HEAP, "-cp", classpath, MAIN_CLASS, "--brokers", brokers])
                        .args(["--application-id", &s.group, "--input", &s.topics.input])
                        .args(["--replies", &s.topics.replies, "--events", &s.topics.events])
                        .arg("--state-dir")
                        .arg(s.dir)
                        .args(["--commit-interval-ms", &COMMIT_INTERVAL.as_millis().to_string(), "--threads", "1"]);
                    if let Some(mib) = bounded {
                        cmd.args(["--rocksdb-memory-mib", &mib.to_string()]);
                    }
                    cmd
                })?
            }
        };
        rows.push(row);
    }
    Ok(rows)
}

/// What a system's command line is made of.
struct Setup<'a> {
    topics: &'a BankTopics,
    group: String,
    txn: String,
    /// eventstage: the journal topic.
    internal: String,
    dir: &'a Path,
}

/// A child process killed (SIGKILL) unless stopped on purpose.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn one(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    keys: u64,
    deposits: &Deposits,
    system: &str,
    command: impl FnOnce(&Setup<'_>) -> Command,
) -> Result<Row> {
    let topics = BankTopics { input: unique("uni-in"), replies: unique("uni-replies"), events: unique("uni-events") };
    create_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events])?;
    let group = unique("uni-group");
    // Under target/, not the OS's temp directory (Kafka Streams warns about one).
    let states = target_dir().join("eventstage-uniform");
    std::fs::create_dir_all(&states).with_context(|| format!("create {}", states.display()))?;
    let dir = tempfile::tempdir_in(&states)?;
    let setup = Setup {
        topics: &topics,
        group: group.clone(),
        txn: unique("uni-txn"),
        internal: unique("uni-journal"),
        dir: dir.path(),
    };
    // eventstage's journal; Kafka Streams' changelog of the store `accounts`.
    let internal = [setup.internal.clone(), format!("{group}-accounts-changelog")];
    let result = measure(brokers, keys, deposits, system, command(&setup), &topics);
    delete_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events, &internal[0], &internal[1]]);
    result
}

fn measure(
    brokers: &str,
    keys: u64,
    deposits: &Deposits,
    system: &str,
    mut command: Command,
    topics: &BankTopics,
) -> Result<Row> {
    let fed = Instant::now();
    let p = producer(brokers, 20)?;
    for i in 0..keys {
        send(&p, &topics.input, &key(i), &wire(format!("open-{i}"), "open", None))?;
    }
    p.flush(Duration::from_secs(600)).context("flush the opens")?;
    drop(p);
    progress(&format!("    {keys} opens fed in {:.1} s; starting {system}", fed.elapsed().as_secs_f64()));

    let started = Instant::now();
    let mut guard = Guard(Some(command.stdout(Stdio::piped()).spawn().with_context(|| format!("start {system}"))?));
    let pid = guard.0.as_ref().map_or(0, Child::id);
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_mib(pid).unwrap_or(0), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let result = phases(brokers, keys, deposits, system, topics, &mut guard, &peak, started);
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let (open_rate, open_peak_rss_mib, rate, p50, p99, cpu) = result?;
    let peak_rss_mib = peak.load(Ordering::Relaxed);

    // Stop: SIGTERM, then wait.
    let mut child = guard.0.take().ok_or_else(|| anyhow!("no child"))?;
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    let status = child.wait()?;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    // A JVM stopped by SIGTERM exits 143 after its shutdown hooks.
    if !status.success() && status.code() != Some(143) {
        bail!("{system} exited with {status}: {out}");
    }
    let summary = out
        .lines()
        .filter(|l| ["metrics:", "state:", "store:", "bank-streams:"].iter().any(|p| l.starts_with(p)))
        .map(str::to_string)
        .collect();
    Ok(Row { system: system.to_string(), open_rate, open_peak_rss_mib, rate, p50, p99, peak_rss_mib, summary, cpu })
}

/// The opens (the spawn to the K-th reply), then the deposits; returns the open rate, the peak RSS
/// while opening, the deposit rate, its p50 and p99 latency, and where the child's CPU went in
/// each phase.
#[allow(clippy::too_many_arguments)]
fn phases(
    brokers: &str,
    keys: u64,
    deposits: &Deposits,
    system: &str,
    topics: &BankTopics,
    guard: &mut Guard,
    peak: &AtomicU64,
    started: Instant,
) -> Result<(f64, u64, f64, Duration, Duration, Vec<String>)> {
    let child = guard.0.as_mut().ok_or_else(|| anyhow!("no child"))?;
    let pid = child.id();
    let mut wrong = 0u64;
    let mut first_wrong = None;
    let mut exited = None;
    read_committed(
        brokers,
        &topics.replies,
        Instant::now() + PHASE_DEADLINE,
        Duration::ZERO,
        |v| match serde_json::from_slice::<WireReply>(v) {
            Ok(r) if r.ok && r.balance == Some(0) => {}
            other => {
                wrong += 1;
                first_wrong.get_or_insert_with(|| format!("{other:?}"));
            }
        },
        |n| {
            if exited.is_none() {
                exited = child.try_wait().ok().flatten();
            }
            n >= keys || exited.is_some()
        },
    )?;
    if let Some(status) = exited {
        bail!("{system} exited with {status} while opening the accounts");
    }
    let open_took = started.elapsed();
    let open_rate = keys as f64 / open_took.as_secs_f64();
    let open_peak = peak.swap(0, Ordering::Relaxed);
    if wrong > 0 {
        bail!("{system}: {wrong} of {keys} replies to `open` were not ok with balance 0, the first: {first_wrong:?}");
    }
    progress(&format!("    {keys} accounts open in {:.1} s ({open_rate:.0}/s); deposits", open_took.as_secs_f64()));
    let opened = threads_of(&pid.to_string());
    let mut cpu = vec![cpu_line(&BTreeMap::new(), &opened, open_took, keys, "opens")];

    // The replies written from now on (the topic holds the K replies to the opens).
    let replies = reader_at_end(brokers, &topics.replies)?;
    let n = deposits.account.len();
    let base = Instant::now();
    let abort = Arc::new(AtomicBool::new(false));
    let reader = {
        let (expected, abort) = (deposits.expected.clone(), abort.clone());
        std::thread::spawn(move || -> Result<Vec<u64>> {
            // When each reply was visible, in ns since `base`; 0: not yet.
            let mut visible = vec![0u64; n];
            let mut seen = 0;
            let deadline = Instant::now() + PHASE_DEADLINE;
            while seen < n {
                if abort.load(Ordering::Relaxed) {
                    bail!("stopped after {seen} of {n} replies");
                }
                if Instant::now() > deadline {
                    bail!("{seen} of {n} deposits answered within {PHASE_DEADLINE:?}");
                }
                let Some(m) = replies.poll(Duration::from_millis(5)) else { continue };
                let m = m.context("read the replies")?;
                let at = base.elapsed().as_nanos() as u64;
                let r: WireReply = serde_json::from_slice(m.payload().unwrap_or_default())
                    .with_context(|| format!("a reply that is not a reply: {:?}", m.payload()))?;
                let Some(i) = r.id.strip_prefix("u-").and_then(|i| i.parse::<usize>().ok()).filter(|&i| i < n) else {
                    bail!("a reply to a command not sent: {r:?}");
                };
                if !r.ok || r.balance != Some(expected[i]) {
                    bail!("the reply to {} is {r:?}, not ok with balance {}", r.id, expected[i]);
                }
                if visible[i] != 0 {
                    bail!("a second reply to {}", r.id);
                }
                visible[i] = at.max(1);
                seen += 1;
            }
            Ok(visible)
        })
    };
    let mut sent = Vec::with_capacity(n);
    let p = producer(brokers, 5)?;
    let produced = (|| -> Result<()> {
        for i in 0..n {
            sent.push(base.elapsed().as_nanos() as u64);
            let value = wire(format!("u-{i}"), "deposit", Some(deposits.amount[i]));
            send(&p, &topics.input, &key(deposits.account[i]), &value)?;
        }
        p.flush(Duration::from_secs(120)).context("flush the deposits")?;
        Ok(())
    })();
    if let Err(e) = produced {
        abort.store(true, Ordering::Relaxed);
        let _ = join(reader);
        return Err(e);
    }
    while !reader.is_finished() {
        if let Ok(Some(status)) = child.try_wait() {
            abort.store(true, Ordering::Relaxed);
            let r = join(reader).err();
            bail!("{system} exited with {status} during the deposits ({r:?})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let visible = join(reader).with_context(|| format!("{system}: the deposits"))?;
    cpu.push(cpu_line(&opened, &threads_of(&pid.to_string()), base.elapsed(), n as u64, "deposits"));
    let last = visible.iter().copied().max().unwrap_or(0);
    let rate = n as f64 / Duration::from_nanos(last.saturating_sub(sent[0])).as_secs_f64();
    let mut micros: Vec<u64> = visible.iter().zip(&sent).map(|(v, s)| v.saturating_sub(*s) / 1000).collect();
    micros.sort_unstable();
    let (p50, p99) =
        (Duration::from_micros(percentile(&micros, 0.5)), Duration::from_micros(percentile(&micros, 0.99)));
    progress(&format!("    {n} deposits: {rate:.0}/s, p50 {} p99 {}", ms(p50), ms(p99)));
    Ok((open_rate, open_peak, rate, p50, p99, cpu))
}

/// One line of where a process's CPU went between two [`threads_of`] snapshots taken `wall`
/// apart: the cores it used, the CPU per command, and its busiest threads in cores. CPU per
/// command does not depend on what else ran on the machine (the rates do).
fn cpu_line(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    wall: Duration,
    commands: u64,
    phase: &str,
) -> String {
    let used = used(before, after);
    let total: f64 = used.iter().map(|(_, t)| t).sum();
    let secs = wall.as_secs_f64().max(1e-9);
    let threads: Vec<String> = used.iter().take(6).map(|(name, t)| format!("{name} {:.2}", t / secs)).collect();
    format!(
        "cpu, {phase}: {:.2} cores, {:.1} µs per command; {}",
        total / secs,
        total / commands.max(1) as f64 * 1e6,
        threads.join(", ")
    )
}

/// The cargo target directory.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
    }
}

/// `java`: `$JAVA_HOME/bin/java` or the one on PATH.
fn java() -> PathBuf {
    match std::env::var_os("JAVA_HOME") {
        Some(home) if Path::new(&home).join("bin/java").exists() => Path::new(&home).join("bin/java"),
        _ => PathBuf::from("java"),
    }
}

/// The Kafka Streams application's classpath (`libs/*:target/classes`), built on first use in a
/// copy of `benches/kstreams` under `target/eventstage-kstreams/<hash of its files>`: in a
/// directory of this process's own, renamed into place when Maven is done (a concurrent build
/// loses the race and is thrown away); later calls find the directory.
fn kstreams_classpath() -> Result<String> {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for b in POM.bytes().chain(SOURCE.bytes()).chain(LOG4J.bytes()) {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let parent = target_dir().join("eventstage-kstreams");
    let dir = parent.join(format!("{hash:016x}"));
    let classpath = format!("{}/*:{}", dir.join("libs").display(), dir.join("target/classes").display());
    if dir.exists() {
        return Ok(classpath);
    }
    let build = parent.join(format!("{hash:016x}.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&build);
    let java_dir = build.join("src/main/java/dev/eventstage/kstreams");
    let resources = build.join("src/main/resources");
    std::fs::create_dir_all(&java_dir).with_context(|| format!("create {}", java_dir.display()))?;
    std::fs::create_dir_all(&resources)?;
    std::fs::write(build.join("pom.xml"), POM)?;
    std::fs::write(java_dir.join("BankStreams.java"), SOURCE)?;
    std::fs::write(resources.join("log4j2.properties"), LOG4J)?;
    progress(&format!("building the Kafka Streams application with Maven into {} (once)", dir.display()));
    let out = Command::new("mvn")
        .args(["-B", "-q", "-f"])
        .arg(build.join("pom.xml"))
        .args(["compile", "dependency:copy-dependencies", "-DincludeScope=runtime"])
        .arg(format!("-DoutputDirectory={}", build.join("libs").display()))
        .output()
        .context("run mvn (Apache Maven; Debian: `apt-get install maven`)")?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let tail: Vec<&str> = text.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("Maven could not build the Kafka Streams application in {}:\n{}", build.display(), tail.join("\n"));
    }
    if std::fs::rename(&build, &dir).is_err() && dir.exists() {
        // Another process finished first.
        let _ = std::fs::remove_dir_all(&build);
    }
    if !dir.exists() {
        bail!("could not move {} to {}", build.display(), dir.display());
    }
    Ok(classpath)
}
