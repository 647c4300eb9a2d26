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

use super::*;
use eventstage::stages::bank_flow::WireReply;
use std::io::{BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};

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
        let p = producer(self.brokers, 0)?;
        send(&p, &self.topics.input, &key(1), &wire(id.clone(), "deposit", Some(1)))?;
        p.flush(Duration::from_secs(30)).context("flush the probe")?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_eventstage"));
        cmd.args(["demo", "--brokers", self.brokers, "--input", &self.topics.input])
            .args(["--replies", &self.topics.replies, "--events", &self.topics.events, "--group", &self.group])
            .args(["--journal", &format!("kafka:{}", self.journal), "--transactional-id", &self.txn])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(["--checkpoint-interval", &format!("{}ms", CHECKPOINT.as_millis())]);
        if let Some(dir) = dir {
            cmd.arg("--state-dir").arg(dir);
        }
        let started = Instant::now();
        let mut child = cmd
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start eventstage demo")?;
        let out = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
        let demo = Demo { child, out };
        let reply = std::cell::RefCell::new(None);
        read_committed(
            self.brokers,
            &self.topics.replies,
            Instant::now() + RUN_DEADLINE,
            Duration::ZERO,
            |v| {
                if let Ok(r) = serde_json::from_slice::<WireReply>(v) {
                    if r.id == id {
                        *reply.borrow_mut() = Some(r);
                    }
                }
            },
            |_| reply.borrow().is_some(),
        )?;
        let took = started.elapsed();
        let r = reply.into_inner().ok_or_else(|| anyhow!("no reply to {id}"))?;
        if r.balance != Some(10 + self.probes) {
            bail!(
                "the reply to {id} says balance {:?}, not {}: the state was not restored",
                r.balance,
                10 + self.probes
            );
        }
        Ok((demo, took))
    }
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
    Ok(Restarts { rows })
}
