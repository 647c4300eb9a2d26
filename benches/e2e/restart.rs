//! Section 7: restarting a flow whose Kafka journal holds K keys, with and without the local
//! state store (`--state-dir`).
//!
//! The flow is the `eventstage demo` binary in a child process (so that a crash is a real
//! SIGKILL). A journal of K keys is written directly (one record per key, as a flow writes it);
//! a probe command (a deposit to a key of the journal) is produced before each start, and the
//! figure is the time from spawning the process to the probe's reply being visible to a
//! `read_committed` reader, plus the journal records and local rows the process restored (from
//! its summary after a drain), and the process's resident memory at that reply (with the store,
//! only the keys used are in memory). The reply's balance is checked: the state was restored.
//!
//! Per K: a first start with an empty store (it reads the whole journal and fills the store),
//! then a restart after a clean drain, a restart after SIGKILL (one checkpoint interval after its
//! probe's reply), and a start without the store.
//!
//! Takeover: two instances A and B with local stores share the group (the largest K); A is
//! SIGKILLed, and B takes A's partitions once A's session times out (the demo's 10 s). The figures
//! are the time from the kill to the replies of probes to every partition, and B's restore of the
//! partitions it took over (journal records read and time, from B's log), with `--standby none`
//! (B reads A's partitions from the journal) and `--standby all` (B's store followed them).

use super::*;
use eventstage::stages::bank_flow::WireReply;
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

/// The demo's checkpoint interval here.
const CHECKPOINT: Duration = Duration::from_secs(1);

pub(crate) struct RestartRow {
    pub(crate) keys: u64,
    pub(crate) variant: &'static str,
    pub(crate) to_reply: Duration,
    /// Journal records and local rows restored (`None`: killed before it could say).
    pub(crate) restored: Option<(u64, u64)>,
    /// Resident memory of the flow process at its first reply, MiB.
    pub(crate) rss_mib: Option<u64>,
}

pub(crate) struct Restarts {
    pub(crate) rows: Vec<RestartRow>,
    pub(crate) takeovers: Vec<TakeoverRow>,
}

impl Restarts {
    pub(crate) fn print(&self) {
        println!(
            "restart of the bank flow (eventstage demo) whose Kafka journal holds K keys: spawn -> first new reply"
        );
        println!(
            "  {:>9}  {:<38} {:>10} {:>16} {:>12} {:>10}",
            "K", "start", "to reply", "journal records", "local rows", "RSS"
        );
        for r in &self.rows {
            let (records, rows) = match r.restored {
                Some((records, rows)) => (records.to_string(), rows.to_string()),
                None => ("(killed)".into(), "(killed)".into()),
            };
            let rss = r.rss_mib.map_or("-".into(), |m| format!("{m} MiB"));
            println!(
                "  {:>9}  {:<38} {:>10} {:>16} {:>12} {:>10}",
                r.keys,
                r.variant,
                ms(r.to_reply),
                records,
                rows,
                rss
            );
        }
        println!();
        println!("takeover after SIGKILL of one of two instances with local stores (session timeout 10 s)");
        println!(
            "  {:>9}  {:<10} {:>16} {:>16} {:>14}",
            "K", "--standby", "kill -> replies", "journal records", "restore"
        );
        for t in &self.takeovers {
            let (records, took) = match t.restore {
                Some((records, took)) => (records.to_string(), ms(took)),
                None => ("?".into(), "?".into()),
            };
            println!("  {:>9}  {:<10} {:>16} {:>16} {:>14}", t.keys, t.standby, ms(t.to_replies), records, took);
        }
    }
}

/// Writes one journal record per key (`acct-NNNNNNN`, an open account with balance 10).
fn write_keys(rt: &tokio::runtime::Runtime, brokers: &str, topic: &str, keys: u64) -> Result<()> {
    use eventstage::journal::{Envelope, JournalEntry, SeqNo};
    use eventstage::stages::bank::{Account, Bank, BankEvent};
    use eventstage::{Codec, EventSourced};
    create_journal_topic(rt, brokers, topic)?;
    let codec = Codec::Bincode;
    let p = producer(brokers, 20)?;
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let event = codec.encode(&BankEvent::Deposited { amount: 10 })?;
    let state = codec.encode(&Account { open: true, balance: 10 })?;
    let entry = JournalEntry {
        last_seq: SeqNo(1),
        events: vec![Envelope::event(codec.id(), Bank::EVENT_VERSION, ts, event)],
        state: Some(Envelope::snapshot(codec.id(), Bank::STATE_VERSION, ts, state)),
        sources: Vec::new(),
    }
    .encode();
    for i in 0..keys {
        send(&p, topic, &key(i), &entry)?;
    }
    p.flush(Duration::from_secs(120)).context("flush the journal producer")?;
    Ok(())
}

fn key(i: u64) -> String {
    format!("acct-{i:07}")
}

struct Run<'a> {
    brokers: &'a str,
    topics: BankTopics,
    journal: String,
    group: String,
    txn: String,
    /// Probes sent so far (each deposits 1 to the same key).
    probes: u64,
}

struct Demo {
    child: Child,
    out: BufReader<ChildStdout>,
    /// Its log lines (stderr), when captured.
    log: Option<Arc<Mutex<Vec<String>>>>,
}

impl Demo {
    /// Resident memory of the process now, MiB.
    fn rss_mib(&self) -> Option<u64> {
        rss_mib(self.child.id())
    }

    fn drain(mut self) -> Result<(u64, u64)> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let status = self.child.wait()?;
        let mut rest = String::new();
        self.out.read_to_string(&mut rest)?;
        if !status.success() {
            bail!("the demo exited with {status}: {rest}");
        }
        let line = rest.lines().find(|l| l.starts_with("metrics:")).unwrap_or_default().to_string();
        let words: Vec<&str> = line.split_whitespace().collect();
        let before = |word: &str| -> Result<u64> {
            let at = words.iter().position(|w| *w == word).ok_or_else(|| anyhow!("no `{word}` in: {rest}"))?;
            Ok(words[at - 1].parse()?)
        };
        Ok((before("journal")?, before("local")?))
    }

    fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Run<'_> {
    /// Sends a probe, starts the demo (with the local store in `dir`, if any) and returns it once
    /// the probe's reply is visible, with the time that took.
    fn start(&mut self, dir: Option<&std::path::Path>) -> Result<(Demo, Duration)> {
        self.probes += 1;
        let id = format!("probe-{}", self.probes);
        self.probe(&[(id.clone(), key(1))])?;
        let started = Instant::now();
        let demo = self.spawn(dir, &self.txn, &[], false)?;
        self.await_replies(&[(id, 10 + self.probes)])?;
        Ok((demo, started.elapsed()))
    }

    /// Produces a deposit of 1 to each `(id, key)`.
    fn probe(&self, probes: &[(String, String)]) -> Result<()> {
        let p = producer(self.brokers, 0)?;
        for (id, key) in probes {
            send(&p, &self.topics.input, key, &wire(id.clone(), "deposit", Some(1)))?;
        }
        p.flush(Duration::from_secs(30)).context("flush the probes")
    }

    /// Starts the demo with transactional id `txn`, the local store in `dir` (if any) and `extra`
    /// arguments; `log`: its stderr is captured (with the local store's restores at INFO).
    fn spawn(&self, dir: Option<&std::path::Path>, txn: &str, extra: &[&str], log: bool) -> Result<Demo> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_eventstage"));
        cmd.args(["demo", "--brokers", self.brokers, "--input", &self.topics.input])
            .args(["--replies", &self.topics.replies, "--events", &self.topics.events, "--group", &self.group])
            .args(["--journal", &format!("kafka:{}", self.journal), "--transactional-id", txn])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(["--checkpoint-interval", &format!("{}ms", CHECKPOINT.as_millis())])
            .args(extra);
        if let Some(dir) = dir {
            cmd.arg("--state-dir").arg(dir);
        }
        let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let level = if log { format!("{level},eventstage::flow::engine::kafka_storage=info") } else { level };
        let mut child = cmd
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(if log { Stdio::piped() } else { Stdio::inherit() })
            .spawn()
            .context("start eventstage demo")?;
        let out = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
        let log = match child.stderr.take() {
            Some(err) => {
                let lines = Arc::new(Mutex::new(Vec::new()));
                let sink = lines.clone();
                std::thread::spawn(move || {
                    use std::io::BufRead;
                    for line in BufReader::new(err).lines().map_while(std::io::Result::ok) {
                        sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                    }
                });
                Some(lines)
            }
            None => None,
        };
        Ok(Demo { child, out, log })
    }

    /// Waits until the reply to each `(id, balance)` is visible and says that balance.
    fn await_replies(&self, expected: &[(String, u64)]) -> Result<()> {
        let wanted: HashMap<&str, u64> = expected.iter().map(|(id, b)| (id.as_str(), *b)).collect();
        let replies = std::cell::RefCell::new(HashMap::new());
        read_committed(
            self.brokers,
            &self.topics.replies,
            Instant::now() + RUN_DEADLINE,
            Duration::ZERO,
            |v| {
                if let Ok(r) = serde_json::from_slice::<WireReply>(v) {
                    if wanted.contains_key(r.id.as_str()) {
                        replies.borrow_mut().insert(r.id.clone(), r.balance);
                    }
                }
            },
            |_| replies.borrow().len() == wanted.len(),
        )?;
        for (id, balance) in replies.into_inner() {
            if balance != Some(wanted[id.as_str()]) {
                bail!(
                    "the reply to {id} says balance {balance:?}, not {}: the state was not restored",
                    wanted[id.as_str()]
                );
            }
        }
        Ok(())
    }
}

pub(crate) struct TakeoverRow {
    pub(crate) keys: u64,
    pub(crate) standby: &'static str,
    /// From A's SIGKILL to the replies of probes to every partition.
    pub(crate) to_replies: Duration,
    /// B's restore when it took A's partitions: journal records read and time.
    pub(crate) restore: Option<(u64, Duration)>,
}

/// The last restore in a demo's log: journal records read and time.
fn last_restore(log: &[String]) -> Option<(u64, Duration)> {
    let plain = |line: &str| {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| c.is_ascii_alphabetic());
            } else {
                out.push(c);
            }
        }
        out
    };
    let field = |line: &str, name: &str| -> Option<u64> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    log.iter()
        .rev()
        .map(|l| plain(l))
        .find(|l| l.contains("read the journal"))
        .and_then(|l| Some((field(&l, "journal_records")?, Duration::from_millis(field(&l, "elapsed_ms")?))))
}

/// One takeover (see the module documentation) with `--standby standby`.
pub(crate) fn takeover(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    keys: u64,
    standby: &'static str,
) -> Result<TakeoverRow> {
    let topics = BankTopics { input: unique("to-cmds"), replies: unique("to-replies"), events: unique("to-events") };
    create_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events])?;
    let journal = unique("to-journal");
    progress(&format!("7/7 takeover: writing a journal of {keys} keys"));
    write_keys(rt, brokers, &journal, keys)?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut run = Run {
        brokers,
        topics: topics.clone(),
        journal: journal.clone(),
        group: unique("to-group"),
        txn: unique("to-txn-a"),
        probes: 0,
    };
    let args = ["--standby", standby];
    let (a, _) = {
        run.probes += 1;
        let id = format!("probe-{}", run.probes);
        run.probe(&[(id.clone(), key(1))])?;
        let started = Instant::now();
        let a = run.spawn(Some(dir_a.path()), &run.txn, &args, false)?;
        run.await_replies(&[(id, 11)])?;
        (a, started.elapsed())
    };
    // B joins; both serve once probes to keys of every partition are answered.
    let b = run.spawn(Some(dir_b.path()), &unique("to-txn-b"), &args, true)?;
    let joined: Vec<(String, String)> = (200..216).map(|i| (format!("join-{i}"), key(i))).collect();
    run.probe(&joined)?;
    run.await_replies(&joined.iter().map(|(id, _)| (id.clone(), 11)).collect::<Vec<_>>())?;
    // Standbys follow the partitions they do not own in the background: give them time to reach
    // the journal's end (B's log has no line for it; a bench, not a test, may wait).
    std::thread::sleep(CHECKPOINT * 2 + Duration::from_millis(keys / 100));
    let killed = Instant::now();
    a.kill()?;
    let probes: Vec<(String, String)> = (100..116).map(|i| (format!("takeover-{i}"), key(i))).collect();
    run.probe(&probes)?;
    run.await_replies(&probes.iter().map(|(id, _)| (id.clone(), 11)).collect::<Vec<_>>())?;
    let to_replies = killed.elapsed();
    let restore = b.log.as_ref().and_then(|log| last_restore(&log.lock().unwrap_or_else(|p| p.into_inner())));
    b.drain()?;
    progress(&format!(
        "7/7 takeover, {keys} keys, --standby {standby}: {} from SIGKILL to the replies, B's restore {restore:?}",
        ms(to_replies)
    ));
    delete_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events, &journal]);
    Ok(TakeoverRow { keys, standby, to_replies, restore })
}

pub(crate) fn run(rt: &tokio::runtime::Runtime, brokers: &str, sizes: &[u64]) -> Result<Restarts> {
    let mut rows = Vec::new();
    for &keys in sizes {
        let topics =
            BankTopics { input: unique("rs-cmds"), replies: unique("rs-replies"), events: unique("rs-events") };
        create_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events])?;
        let journal = unique("rs-journal");
        progress(&format!("7/7 restart: writing a journal of {keys} keys"));
        write_keys(rt, brokers, &journal, keys)?;
        let dir = tempfile::tempdir()?;
        let mut run = Run {
            brokers,
            topics: topics.clone(),
            journal: journal.clone(),
            group: unique("rs-group"),
            txn: unique("rs-txn"),
            probes: 0,
        };
        let mut row = |variant: &'static str, to_reply: Duration, demo: Demo| -> Result<()> {
            let rss_mib = demo.rss_mib();
            let restored = Some(demo.drain()?);
            progress(&format!(
                "7/7 restart, {keys} keys, {variant}: {} to the first reply, restored {restored:?}, RSS {rss_mib:?} MiB",
                ms(to_reply)
            ));
            rows.push(RestartRow { keys, variant, to_reply, restored, rss_mib });
            Ok(())
        };

        let (demo, took) = run.start(Some(dir.path()))?;
        row("first start, empty store", took, demo)?;

        let (demo, took) = run.start(Some(dir.path()))?;
        row("store, after a clean drain", took, demo)?;

        let (demo, _) = run.start(Some(dir.path()))?;
        std::thread::sleep(CHECKPOINT * 2);
        demo.kill()?;
        let (demo, took) = run.start(Some(dir.path()))?;
        row("store, after SIGKILL", took, demo)?;

        let (demo, took) = run.start(None)?;
        row("no store", took, demo)?;
        delete_topics(rt, brokers, &[&topics.input, &topics.replies, &topics.events, &journal]);
    }
    let mut takeovers = Vec::new();
    if let Some(&keys) = sizes.iter().max() {
        for standby in ["none", "all"] {
            takeovers.push(takeover(rt, brokers, keys, standby)?);
        }
    }
    Ok(Restarts { rows, takeovers })
}
