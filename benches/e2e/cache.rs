//! Section 10 (`EVENTSTAGE_E2E_ONLY=cache`): state larger than memory (issue 24). The bank flow
//! (`eventstage demo` in a child process, with a local store) opens K accounts, one `open` command
//! per new key, fed before it starts, with each state cache budget of `EVENTSTAGE_E2E_CACHE_MIB`
//! (0: no cache, every key in memory). The figures: the process's resident memory sampled every
//! 250 ms (its peak, and when the last reply is visible), the rate (K over the time from the
//! spawn to the last reply), and the flow's own summary after a drain (keys in memory, evictions,
//! the local store's lag). Every reply is checked: each `open` answered ok with balance 0. Then a
//! restart after SIGKILL, a hot 1 %, and a new instance of the group with an empty local store
//! (the whole journal restored): the time to its first reply and its peak RSS.

use super::*;
use eventstage::stages::bank_flow::WireReply;
use std::io::Read;
use std::process::{Command, Stdio};

pub(crate) struct CacheRow {
    pub(crate) keys: u64,
    pub(crate) budget_mib: u64,
    /// The demo served queries (`--http-addr`): its flow kept a committed view.
    pub(crate) queryable: bool,
    pub(crate) rate: f64,
    pub(crate) peak_rss_mib: u64,
    pub(crate) end_rss_mib: u64,
    /// The restart after SIGKILL: spawn to the probe's reply, RSS then, and the restarted
    /// instance's `metrics:` line.
    pub(crate) restart: Duration,
    pub(crate) restart_rss_mib: u64,
    pub(crate) restart_metrics: String,
    /// The hot working set: deposits per second, and the RSS at the end.
    pub(crate) hot_rate: f64,
    pub(crate) hot_rss_mib: u64,
    /// The restarted demo's `state:` line after its drain.
    pub(crate) state: String,
    /// A new instance with an empty local store (a new machine, a takeover without standbys):
    /// spawn to the reply to a probe, its peak RSS meanwhile, and its `metrics:` line.
    pub(crate) fresh: Duration,
    pub(crate) fresh_peak_rss_mib: u64,
    pub(crate) fresh_metrics: String,
}

pub(crate) fn print(rows: &[CacheRow]) {
    println!("the bank flow opening K new accounts with a local store: memory by state cache budget");
    println!("  {:>9}  {:>12} {:>10} {:>10} {:>10}", "K", "cache", "cmds/s", "peak RSS", "end RSS");
    for r in rows {
        let budget = if r.budget_mib == 0 { "none".to_string() } else { format!("{} MiB", r.budget_mib) };
        let budget = if r.queryable { format!("{budget}, queryable") } else { budget };
        println!("  {:>9}  {:>12} {:>10.0} {:>6} MiB {:>6} MiB", r.keys, budget, r.rate, r.peak_rss_mib, r.end_rss_mib);
        println!(
            "             restart after SIGKILL: {} ms to the first reply, RSS {} MiB",
            r.restart.as_millis(),
            r.restart_rss_mib
        );
        println!("             {}", r.restart_metrics);
        println!("             hot 1 %: {:.0} deposits/s, RSS {} MiB at the end", r.hot_rate, r.hot_rss_mib);
        println!("             {}", r.state);
        println!(
            "             a new instance with an empty store: {} ms to the first reply, peak RSS {} MiB",
            r.fresh.as_millis(),
            r.fresh_peak_rss_mib
        );
        println!("             {}", r.fresh_metrics);
    }
}

fn key(i: u64) -> String {
    format!("acct-{i:08}")
}

/// Each budget, plain and (`queryable`) with the demo serving queries, one after the other.
pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    keys: u64,
    budgets: &[u64],
    queryable: &[bool],
) -> Result<Vec<CacheRow>> {
    let mut rows = Vec::new();
    for &budget_mib in budgets {
        for &q in queryable {
            let how = if q { ", queryable" } else { "" };
            progress(&format!("  {keys} accounts, state cache {budget_mib} MiB (0: none){how}"));
            rows.push(one(rt, brokers, keys, budget_mib, q)?);
        }
    }
    Ok(rows)
}

fn one(rt: &tokio::runtime::Runtime, brokers: &str, keys: u64, budget_mib: u64, queryable: bool) -> Result<CacheRow> {
    let topics =
        BankTopics { input: unique("cache-in"), replies: unique("cache-replies"), events: unique("cache-events") };
    create_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events])?;
    let (journal, group) = (unique("cache-journal"), unique("cache-group"));
    let p = producer(brokers, 20)?;
    for i in 0..keys {
        send(&p, &topics.input, &key(i), &wire(format!("open-{i}"), "open", None))?;
    }
    p.flush(Duration::from_secs(300)).context("flush the opens")?;
    drop(p);
    let dir = tempfile::tempdir()?;
    let txn = unique("cache-txn");
    let spawn_in = |dir: &std::path::Path| -> Result<std::process::Child> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_eventstage"));
        cmd.args(["demo", "--brokers", brokers, "--input", &topics.input])
            .args(["--replies", &topics.replies, "--events", &topics.events, "--group", &group])
            .args(["--journal", &format!("kafka:{journal}"), "--transactional-id", &txn])
            .args(["--partitions", &PARTITIONS.to_string()])
            .arg("--state-dir")
            .arg(dir);
        if budget_mib > 0 {
            cmd.args(["--state-cache", &format!("{budget_mib}MiB")]);
        }
        if queryable {
            cmd.args(["--http-addr", "127.0.0.1:0"]);
        }
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .spawn()
            .context("start eventstage demo")
    };
    let spawn = || spawn_in(dir.path());
    let started = Instant::now();
    let mut child = spawn()?;
    let pid = child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = rss_mib(pid).unwrap_or(0).max(peak);
                std::thread::sleep(Duration::from_millis(250));
            }
            peak
        })
    };
    let mut wrong = 0u64;
    let read = read_committed(
        brokers,
        &topics.replies,
        Instant::now() + Duration::from_secs(3600),
        Duration::ZERO,
        |v| match serde_json::from_slice::<WireReply>(v) {
            Ok(r) if r.ok && r.balance == Some(0) => {}
            _ => wrong += 1,
        },
        |n| n >= keys,
    );
    let took = started.elapsed();
    let end_rss_mib = rss_mib(pid).unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    let peak_rss_mib = sampler.join().map_err(|_| anyhow!("the sampler panicked"))?.max(end_rss_mib);
    child.kill()?;
    child.wait()?;
    read?;
    if wrong > 0 {
        bail!("{wrong} of {keys} replies were not `ok` with balance 0");
    }

    // The restart: a deposit of 1 to an account, fed before the spawn.
    let p = producer(brokers, 0)?;
    send(&p, &topics.input, &key(keys / 2), &wire("probe".into(), "deposit", Some(1)))?;
    p.flush(Duration::from_secs(30)).context("flush the probe")?;
    // The replies written from now on (the topic holds K already).
    let replies = reader_at_end(brokers, &topics.replies)?;
    let restarted = Instant::now();
    let mut child = spawn()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let probe = loop {
        if Instant::now() > deadline {
            bail!("no reply to the probe within 10 minutes of the restart");
        }
        let Some(Ok(m)) = replies.poll(Duration::from_millis(5)) else { continue };
        match m.payload().map(serde_json::from_slice::<WireReply>) {
            Some(Ok(r)) if r.id == "probe" => break r.balance,
            _ => {}
        }
    };
    let restart = restarted.elapsed();
    let restart_rss_mib = rss_mib(child.id()).unwrap_or(0);
    if probe != Some(1) {
        bail!("the probe's reply says balance {probe:?}, not 1: the state was not restored");
    }
    let (hot_rate, hot_rss_mib) = hot(brokers, &topics, keys, &replies, child.id())?;
    let out = drain(&mut child, "the demo")?;
    let (fresh, fresh_peak_rss_mib, fresh_metrics) = fresh_instance(brokers, &topics, keys, &replies, &spawn_in)?;
    delete_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events, &journal]);
    Ok(CacheRow {
        keys,
        budget_mib,
        queryable,
        rate: keys as f64 / took.as_secs_f64(),
        peak_rss_mib,
        end_rss_mib,
        restart,
        restart_rss_mib,
        restart_metrics: line(&out, "metrics:"),
        hot_rate,
        hot_rss_mib,
        state: line(&out, "state:"),
        fresh,
        fresh_peak_rss_mib,
        fresh_metrics,
    })
}

/// A new instance of the group with an empty local store: the whole journal is restored (through
/// the store when it is larger than the cache). A deposit to an account, fed before the spawn, is
/// the probe; returns the time from the spawn to its reply, the peak RSS meanwhile, and the
/// instance's `metrics:` line after a drain.
fn fresh_instance(
    brokers: &str,
    topics: &BankTopics,
    keys: u64,
    replies: &BaseConsumer,
    spawn_in: &dyn Fn(&std::path::Path) -> Result<std::process::Child>,
) -> Result<(Duration, u64, String)> {
    let p = producer(brokers, 0)?;
    send(&p, &topics.input, &key(keys / 3), &wire("fresh-probe".into(), "deposit", Some(1)))?;
    p.flush(Duration::from_secs(30)).context("flush the probe")?;
    let empty = tempfile::tempdir()?;
    let started = Instant::now();
    let mut child = spawn_in(empty.path())?;
    let pid = child.id();
    let mut peak = 0;
    let mut sampled = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let balance = loop {
        if Instant::now() > deadline {
            bail!("no reply to the probe within 30 minutes of the new instance's start");
        }
        if sampled.elapsed() >= Duration::from_millis(250) {
            peak = rss_mib(pid).unwrap_or(0).max(peak);
            sampled = Instant::now();
        }
        let Some(Ok(m)) = replies.poll(Duration::from_millis(5)) else { continue };
        match m.payload().map(serde_json::from_slice::<WireReply>) {
            Some(Ok(r)) if r.id == "fresh-probe" => break r.balance,
            _ => {}
        }
    };
    let took = started.elapsed();
    peak = rss_mib(pid).unwrap_or(0).max(peak);
    if balance != Some(1) {
        bail!("the new instance's probe reply says balance {balance:?}, not 1");
    }
    let out = drain(&mut child, "the new instance")?;
    Ok((took, peak, line(&out, "metrics:")))
}

/// Stops a demo with SIGTERM (it drains and prints its summary) and returns what it printed.
fn drain(child: &mut std::process::Child, what: &str) -> Result<String> {
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    let status = child.wait()?;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    if !status.success() {
        bail!("{what} exited with {status}: {out}");
    }
    Ok(out)
}

/// The first line of `out` that starts with `prefix`.
fn line(out: &str, prefix: &str) -> String {
    out.lines().find(|l| l.starts_with(prefix)).unwrap_or("(none)").to_string()
}

/// The hot working set (see the module documentation): deposits to the hottest 1 % of `keys`
/// accounts, read back from `replies` (positioned after the probe's reply); returns the rate and
/// the RSS of process `pid` at the end.
fn hot(brokers: &str, topics: &BankTopics, keys: u64, replies: &BaseConsumer, pid: u32) -> Result<(f64, u64)> {
    let n = env_number("EVENTSTAGE_E2E_CACHE_HOT", 1_000_000)?;
    let hot = (keys / 100).max(1);
    let mut rng = StdRng::seed_from_u64(24);
    let mut balances: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    // The probe deposited 1 to the middle account.
    balances.insert(keys / 2, 1);
    let mut expected = Vec::with_capacity(n as usize);
    let started = Instant::now();
    let p = producer(brokers, 5)?;
    for i in 0..n {
        // The hottest 1 %: accounts spread over the key space (every 100th).
        let account = rng.random_range(0..hot) * 100;
        let amount = rng.random_range(1..100);
        let balance = balances.entry(account).or_default();
        *balance += amount;
        expected.push(*balance);
        send(&p, &topics.input, &key(account), &wire(format!("hot-{i}"), "deposit", Some(amount)))?;
    }
    p.flush(Duration::from_secs(120)).context("flush the deposits")?;
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while seen < n {
        if Instant::now() > deadline {
            bail!("{seen} of {n} deposits answered within 30 minutes");
        }
        let Some(Ok(m)) = replies.poll(Duration::from_millis(5)) else { continue };
        let Some(Ok(r)) = m.payload().map(serde_json::from_slice::<WireReply>) else { continue };
        let Some(i) = r.id.strip_prefix("hot-").and_then(|i| i.parse::<usize>().ok()) else { continue };
        if r.balance != Some(expected[i]) {
            bail!("the reply to {} says balance {:?}, not {}", r.id, r.balance, expected[i]);
        }
        seen += 1;
    }
    Ok((n as f64 / started.elapsed().as_secs_f64(), rss_mib(pid).unwrap_or(0)))
}
