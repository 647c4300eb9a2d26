//! Flows in child processes: the `eventstage demo` helper, and crash loops that SIGKILL it.

use crate::flow::{
    await_replies, check_replies_at_least_once, expected, feed, journal_state, setup, sled_state, workload, Setup,
};
use crate::util::broker::unique;
use rand::{Rng, SeedableRng};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Stdio};
use std::time::Duration;

/// Invariant 2: a child process runs the bank flow and is SIGKILLed at random moments (at least 10
/// times) while a producer feeds thousands of commands; after a final clean drain, a read_committed
/// consumer sees exactly one reply per command id, each as the reference model says, and the
/// journal rebuilds the model's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_with_the_kafka_journal() {
    crash_loop(false, "exactly-once").await;
}

/// The same with the sled journal: positions stored with the events, outputs produced again from
/// the outbox after a crash between the sled write and the Kafka commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_with_the_sled_journal() {
    crash_loop(true, "exactly-once").await;
}

/// Issue 24: the same with a local store and a state cache with room for a few of each
/// partition's accounts: keys are evicted on every commit and read back from a store its follower
/// writes behind the flow, across SIGKILLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_with_a_small_state_cache() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().display().to_string();
    let cache = ["--state-dir", &dir, "--state-cache", "4KiB", "--checkpoint-interval", "300ms"];
    let out = crash_loop_with(false, "exactly-once", &cache, 600).await;
    // "state: ... N found in memory, M read from the local store, K evicted, ..."
    // "store: N rows handed over by the flow ..., M journal records read from the broker"
    let count = |line: &str, what: &str| -> u64 {
        let line = out.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("no {line} line: {out}"));
        let before = line.split(what).next().unwrap();
        let number = before.rsplit([',', ' ']).find(|w| !w.is_empty()).unwrap_or_default();
        number.parse().unwrap_or_else(|_| panic!("{what} in {line}"))
    };
    assert!(count("state:", " evicted") > 0 && count("state:", " read from the local store") > 0, "{out}");
    // The last instance's own commits reach its store from the flow, not read back from the broker.
    assert!(count("store:", " rows handed over") > 0, "{out}");
}

/// The bank flow (`eventstage demo`) SIGKILLed at 10 random moments and restarted, then drained.
/// Exactly-once: one reply per command, as the model says. At-least-once: at least one, every
/// copy as the model says (a command handled twice would answer from a state that already
/// includes it). Both: the journal's state equals the model (no event applied twice).
pub(crate) async fn crash_loop(sled: bool, guarantee: &str) {
    crash_loop_with(sled, guarantee, &[], 0).await;
}

/// [`crash_loop`] with the demo's `extra` arguments, the last `fed_last` commands fed slowly to
/// the last instance; returns what it printed when drained.
async fn crash_loop_with(sled: bool, guarantee: &str, extra: &[&str], fed_last: usize) -> String {
    let s = setup(4).await;
    let txn = unique("txn");
    let sled_dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let journal =
        if sled { format!("sled:{}", sled_dir.path().join("j").display()) } else { format!("kafka:{}", s.journal) };
    let mut args: Vec<String> =
        ["--journal", &journal, "--commit-interval", "50ms", "--guarantee", guarantee].map(String::from).to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    let cmds = workload(3000, 60, 7);
    let (replies, accounts) = expected(&cmds);
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (during, last) = cmds.split_at(cmds.len() - fed_last);
    let feeder = std::thread::spawn({
        let (b, t, c) = (s.brokers.clone(), s.topics.input.clone(), during.to_vec());
        move || {
            for chunk in c.chunks(100) {
                feed(&b, &t, chunk);
                std::thread::sleep(Duration::from_millis(150));
            }
        }
    });
    for _ in 0..10 {
        let demo = Demo::start(&s, &txn, &args, logs.path());
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        demo.kill();
    }
    feeder.join().unwrap();
    let demo = Demo::start(&s, &txn, &args, logs.path());
    for chunk in last.chunks(50) {
        feed(&s.brokers, &s.topics.input, chunk);
        std::thread::sleep(Duration::from_millis(100));
    }
    if guarantee == "at-least-once" {
        let s = s.clone();
        let checked = tokio::task::spawn_blocking(move || check_replies_at_least_once(&s, &replies)).await;
        if let Err(failed) = checked {
            // What the instances logged is what explains a wrong reply: kept for a look.
            let kept = logs.keep();
            panic!("seed {seed}: {failed}; the instances' logs are kept in {}", kept.display());
        }
    } else {
        await_replies(&s, replies).await;
    }
    // A clean drain on SIGTERM.
    let out = demo.drain();
    if sled {
        assert_eq!(sled_state(&sled_dir.path().join("j"), 4).await, accounts, "seed {seed}");
    } else {
        assert_eq!(tokio::task::spawn_blocking(move || journal_state(&s, 4)).await.unwrap(), accounts, "seed {seed}");
    }
    out
}

/// `eventstage demo` as a child process of the test.
pub(crate) struct Demo {
    pub(crate) child: Child,
    out: BufReader<ChildStdout>,
    /// Where its stderr (logs) goes.
    pub(crate) stderr: std::path::PathBuf,
    /// Its "flow running" line.
    pub(crate) running: String,
}

impl Demo {
    /// Starts the bank flow demo (on `s`'s topics and group, with transactional id `txn` (empty:
    /// the default) and `args`; its log in `logs`) and waits until it runs.
    pub(crate) fn start(s: &Setup, txn: &str, args: &[String], logs: &std::path::Path) -> Self {
        let stderr = logs.join(format!("{txn}-{}.log", rand::random::<u32>()));
        let id: &[&str] = if txn.is_empty() { &[] } else { &["--transactional-id", txn] };
        let mut child = crate::util::eventstage()
            .args(["demo", "--brokers", &s.brokers, "--input", &s.topics.input, "--replies", &s.topics.replies])
            .args(["--events", &s.topics.events, "--group", &s.group])
            .args(id)
            .args(["--partitions", "4"])
            .args(args)
            .env("RUST_LOG", std::env::var("EVENTSTAGE_CHILD_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("flow running") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the flow exited before running: {}", tail(&stderr));
        }
        Self { child, out, stderr, running: line }
    }

    /// Its HTTP address (`--http-addr`), from its start-up line.
    pub(crate) fn http_addr(&self) -> String {
        self.running
            .split("HTTP on http://")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("the start-up line names the HTTP address: {}", self.running))
            .to_string()
    }

    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(std::process::Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }

    /// SIGKILL, and wait for it.
    pub(crate) fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM: the flow drains and stops; returns what it printed.
    pub(crate) fn drain(mut self) -> String {
        self.signal("-TERM");
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        assert!(status.success() && rest.contains("flow stopped after draining"), "{status}: {rest}");
        rest
    }
}

impl Drop for Demo {
    /// A test that fails (panics) leaves no flow process running behind it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
