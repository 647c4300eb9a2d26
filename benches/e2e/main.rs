//! End-to-end benchmark of the exactly-once Kafka flow against a real Kafka-protocol broker.
//!
//! `cargo bench --bench e2e` starts an Apache Kafka broker of its own (one KRaft node on free ports,
//! as the tests do but with full JIT and a 2 GiB heap; stopped when this process exits, however it
//! exits: a shell watchdog kills it when our end of its stdin closes), or uses the cluster named by
//! `EVENTSTAGE_TEST_BROKERS=host:port`. Every measurement gets fresh topics
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
//!    half of the flow's throughput from 1 (and, for reference, of both pass-throughs at that rate;
//!    with `EVENTSTAGE_E2E_ONLY=latency`, also of the pass-through producing the flow's reply +
//!    event volume, two records per input, at each commit interval);
//! 4. the restore rate of `KafkaJournal` over a journal topic of N records (written here the way a
//!    flow writes them: the bank's key, its events and its state after them, over 1000 accounts;
//!    the flow itself writes one record per key and commit interval, far fewer), against bare
//!    `read_committed` consumers reading the same topic to its end.
//!
//! Throughputs are over the processing window (first input record consumed → last output visible),
//! which the ratios use; the report also gives them including startup (group join, restore). The
//! three throughput runs are repeated (interleaved) and the median round is reported: with a 100 ms
//! commit interval a run of N = 100 000 lasts only a few commits. Before any of it (except with
//! `EVENTSTAGE_E2E_ONLY=table`), runs of the flow and of a pass-through warm the broker up
//! (internal topics, JIT; up to three rounds, until its JIT compilers use under a tenth of a core)
//! and are not counted. Topics are deleted once measured
//! (the broker's disk and page cache stay small). CPU figures come from /proc (Linux; 100 ticks/s).
//!
//! 5. KTable emulation: see `table.rs` (materialization vs a bare consumer, `get` latency,
//!    memory per key).
//! 6. at-least-once vs exactly-once bank flow, and async enrichment with 1 and 16 calls in flight:
//!    see `patterns.rs`.
//! 7. restarts of a flow whose journal holds K keys, with and without the local state store, after
//!    a clean drain and after SIGKILL: see `restart.rs`.
//! 8. the bank flow's throughput by storage: Kafka journal, Kafka journal with a local state
//!    store, sled journal: see `storage.rs`.
//! 9. the bank flow scaled out: 1, 2 and 4 instances in one group over 8 partitions, with the CPU
//!    per command: see `scaling.rs`.
//! 10. state larger than memory: the bank flow opening K new accounts with a local store, by state
//!     cache budget, its memory (peak and end) and rate: see `cache.rs`
//!     (`EVENTSTAGE_E2E_ONLY=cache`, `EVENTSTAGE_E2E_CACHE_KEYS`, default 10^6,
//!     `EVENTSTAGE_E2E_CACHE_MIB`, the budgets in MiB, 0 for none, default `0,128`;
//!     `EVENTSTAGE_E2E_CACHE_QUERYABLE=0,1` runs each budget also with the demo serving queries).
//! 11. uniform random keys over K accounts, eventstage beside a Kafka Streams application of the
//!     same contract (`benches/kstreams`: Processor API, RocksDB, `exactly_once_v2`; built with
//!     Maven on first use): K opens, then N deposits to uniformly random accounts; the rates,
//!     latency p50/p99 and peak memory of each, same broker, same run: see `uniform.rs`
//!     (`EVENTSTAGE_E2E_ONLY=uniform`, `EVENTSTAGE_E2E_UNIFORM_KEYS`, default 10^7,
//!     `EVENTSTAGE_E2E_UNIFORM_N`, default 10^6, `EVENTSTAGE_E2E_UNIFORM_MIB`, eventstage's state
//!     cache, default 128, `EVENTSTAGE_E2E_UNIFORM_SYSTEMS`, default `eventstage,kstreams`).
//! 12. a table larger than memory: K rows read by `eventstage table stats --store` with a row
//!     cache, its memory and rate, then reopened and looked up at random: see `table_cache.rs`
//!     (`EVENTSTAGE_E2E_ONLY=table-cache`, `EVENTSTAGE_E2E_TABLE_CACHE_KEYS`, default 10^7,
//!     `EVENTSTAGE_E2E_TABLE_CACHE_MIB`, default `64`).
//! 13. several stages in one application: the transfer saga (bank and transfers, steps routed
//!     through repartition topics) beside the one-stage bank flow, round by round: see
//!     `transfers.rs` (`EVENTSTAGE_E2E_ONLY=transfers`, `EVENTSTAGE_E2E_TRANSFERS`, default N/5).
//! 14. interactive queries: the bank flow's throughput plain, queryable, and queryable under 1 000
//!     queries/s, round by round; then two queryable instances at half the flow's rate, the
//!     commands' latency without and with queries, and the queries' latency answered locally and
//!     forwarded to the owner: see `queries.rs` (`EVENTSTAGE_E2E_ONLY=queries`).
//!
//! Environment: `EVENTSTAGE_E2E_RECORDS` (N, default 100 000), `EVENTSTAGE_E2E_ROUNDS` (default 3),
//! `EVENTSTAGE_E2E_TABLE_KEYS` (default 10^6), `EVENTSTAGE_E2E_RESTART_KEYS` (K of section 7, default `100000,1000000`),
//! `EVENTSTAGE_E2E_INSTANCES` (the instance counts of section 9, default `1,2,4`),
//! `EVENTSTAGE_E2E_ONLY=table|patterns|throughput|latency|restart|storage|scaling|cache|uniform|table-cache|transfers|queries`
//! (only section 5, 6, sections 1 and 2, or the flow's throughput and then section 3 at half of
//! it, or at `EVENTSTAGE_E2E_LATENCY_RATE` commands/s, or section 7, 8, 9, 10, 11, 12, 13, 14; sections
//! 10 to 13 run only so), `EVENTSTAGE_E2E_THREADS` (print the CPU
//! each thread used per record), `EVENTSTAGE_E2E_TIMELINE` (print the flow's progress in section
//! 3 four times a second: consumed commands, transactions, last commit latency),
//! `EVENTSTAGE_E2E_FLOW_PRODUCER` / `EVENTSTAGE_E2E_FLOW_CONSUMER` (librdkafka properties for the
//! bank flow's producer / consumer, `key=value,key=value`, for tuning experiments),
//! `EVENTSTAGE_E2E_TABLE_CONSUMER` (the same for the table's consumer in section 5),
//! `EVENTSTAGE_E2E_LATENCY_SECS` (default 10), `EVENTSTAGE_E2E_COMMIT_INTERVALS` (with
//! `EVENTSTAGE_E2E_ONLY=latency`: the commit intervals, in ms, the flow and the pass-through are
//! measured at, default `50,100,500`), `RUST_LOG` (tracing filter, default `warn`).

// Allocation-heavy work (tables of a million rows, sled's recovery) runs several times faster
// with mimalloc than with glibc's malloc, whose free lists fragment; applications choose their
// allocator, and the README recommends this one (the `eventstage` binary uses it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod broker;
mod cache;
mod cpu;
mod io;
mod latency;
mod patterns;
mod queries;
mod report;
mod restart;
mod restore;
mod scaling;
#[path = "../shared.rs"]
mod shared;
mod storage;
mod table;
mod table_cache;
mod throughput;
mod transfers;
mod uniform;

use broker::*;
use cpu::*;
use io::*;
use latency::*;
use report::*;
use restore::*;
use throughput::*;

use anyhow::{anyhow, bail, Context, Result};
use eventstage::flow::{FlowControl, FlowMetrics, Guarantee};
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PARTITIONS: i32 = 4;
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
const ACCOUNTS: usize = 1000;
/// Upper bound of one throughput run (producing the input excluded).
const RUN_DEADLINE: Duration = Duration::from_secs(150);
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

/// A comma-separated list of numbers from the environment.
fn env_list(name: &str, default: &str) -> Result<Vec<u64>> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|k| k.trim().replace('_', "").parse().with_context(|| format!("{name}: `{k}` is not a number")))
        .collect()
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
        if broker.own.is_some() { "Apache Kafka started by this benchmark" } else { "EVENTSTAGE_TEST_BROKERS" }
    ));
    let table_keys = env_number("EVENTSTAGE_E2E_TABLE_KEYS", 1_000_000)?.max(1);
    let only = std::env::var("EVENTSTAGE_E2E_ONLY").ok();
    let restart_keys = env_list("EVENTSTAGE_E2E_RESTART_KEYS", "100000,1000000")?;
    if only.as_deref() == Some("restart") {
        progress("7/7 restart with and without the local store (EVENTSTAGE_E2E_ONLY=restart)");
        let restarts = restart::run(&rt, b, &restart_keys)?;
        println!();
        restarts.print();
        return Ok(());
    }
    if only.as_deref() == Some("cache") {
        progress("10/10 state larger than memory (EVENTSTAGE_E2E_ONLY=cache)");
        let keys = env_number("EVENTSTAGE_E2E_CACHE_KEYS", 1_000_000)?.max(1);
        let queryable: Vec<bool> =
            env_list("EVENTSTAGE_E2E_CACHE_QUERYABLE", "0")?.into_iter().map(|q| q != 0).collect();
        let rows = cache::run(&rt, b, keys, &env_list("EVENTSTAGE_E2E_CACHE_MIB", "0,128")?, &queryable)?;
        println!();
        cache::print(&rows);
        return Ok(());
    }
    if only.as_deref() == Some("table-cache") {
        progress("12/12 a table larger than memory (EVENTSTAGE_E2E_ONLY=table-cache)");
        let rows = table_cache::run(&rt, b)?;
        println!();
        table_cache::print(&rows);
        return Ok(());
    }
    if only.as_deref() == Some("uniform") {
        progress("11/11 uniform random keys, eventstage and Kafka Streams (EVENTSTAGE_E2E_ONLY=uniform)");
        let keys = env_number("EVENTSTAGE_E2E_UNIFORM_KEYS", 10_000_000)?.max(1);
        let n = env_number("EVENTSTAGE_E2E_UNIFORM_N", 1_000_000)?.max(1);
        let mib = env_number("EVENTSTAGE_E2E_UNIFORM_MIB", 128)?;
        let systems = std::env::var("EVENTSTAGE_E2E_UNIFORM_SYSTEMS").unwrap_or_else(|_| "eventstage,kstreams".into());
        let rows = uniform::run(&rt, b, keys, n, mib, &systems)?;
        println!();
        uniform::print(&rows, keys, n);
        progress(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));
        return Ok(());
    }
    if only.as_deref() == Some("table") {
        progress("5/6 table materialization and lookups (EVENTSTAGE_E2E_ONLY=table)");
        let table = table::run(&rt, &broker, table_keys)?;
        println!();
        table.print();
        return Ok(());
    }
    let cmds = commands(n as usize, 7);
    progress("warm-up of the broker: runs of the bank flow and of a pass-through, not counted");
    warm_up(&rt, &broker, &cmds)?;
    if only.as_deref() == Some("throughput") {
        progress("1+2/6 throughput only (EVENTSTAGE_E2E_ONLY=throughput)");
        let throughput = Throughput::measure(&rt, &broker, &cmds, rounds)?;
        println!();
        throughput.print();
        return Ok(());
    }
    if only.as_deref() == Some("latency") {
        progress("1+3/6 the flow's throughput, then latency at half of it (EVENTSTAGE_E2E_ONLY=latency)");
        let flows = (0..rounds)
            .map(|_| flow_throughput(&rt, &broker, &cmds, Guarantee::ExactlyOnce))
            .collect::<Result<Vec<_>>>()?;
        let flow = Rounds::of(flows, |f| f.run.window_rate());
        let half = 0.5 * flow.median.run.window_rate();
        let rate = env_number("EVENTSTAGE_E2E_LATENCY_RATE", half as u64)? as f64;
        println!("  bank flow {} commands/s (median of {}); latency at {rate:.0}/s", flow.rates(), rounds);
        for interval in env_list("EVENTSTAGE_E2E_COMMIT_INTERVALS", "50,100,500")? {
            let interval = Duration::from_millis(interval);
            progress(&format!("  latency with commits every {interval:?}"));
            Report::latency("bank flow", &flow_latency(&rt, b, rate, latency_secs, interval)?);
            let pass = pass_through_latency(&rt, b, rate, latency_secs, true, interval, 1)?;
            Report::latency("pass-through awaiting deliveries", &pass);
            let volume = pass_through_latency(&rt, b, rate, latency_secs, true, interval, 2)?;
            Report::latency(
                "pass-through awaiting deliveries, two output records per input (the flow's reply + event volume)",
                &volume,
            );
        }
        return Ok(());
    }
    if only.as_deref() == Some("queries") {
        progress("14/14 interactive queries: throughput with and without a query load, query latency (EVENTSTAGE_E2E_ONLY=queries)");
        let report = queries::run(&rt, &broker, &cmds, rounds, latency_secs)?;
        println!();
        report.print();
        return Ok(());
    }
    if only.as_deref() == Some("transfers") {
        progress("13/13 several stages in one application: the transfer saga beside the bank flow (EVENTSTAGE_E2E_ONLY=transfers)");
        let transfers = env_number("EVENTSTAGE_E2E_TRANSFERS", n / 5)?.max(1);
        let report = transfers::run(&rt, &broker, &cmds, transfers, rounds, latency_secs)?;
        println!();
        report.print();
        return Ok(());
    }
    if only.as_deref() == Some("storage") {
        progress("8/8 throughput by storage (EVENTSTAGE_E2E_ONLY=storage)");
        let storage = storage::run(&rt, &broker, &cmds, rounds)?;
        println!();
        storage.print();
        return Ok(());
    }
    let scale = env_list("EVENTSTAGE_E2E_INSTANCES", "1,2,4")?;
    if only.as_deref() == Some("scaling") {
        progress("9/9 scaling with instances (EVENTSTAGE_E2E_ONLY=scaling)");
        let scaling = scaling::run(&rt, &broker, &cmds, rounds, &scale)?;
        println!();
        scaling.print();
        return Ok(());
    }
    if only.as_deref() == Some("patterns") {
        progress("6/6 at-least-once vs exactly-once, enrichment (EVENTSTAGE_E2E_ONLY=patterns)");
        let patterns = patterns::run(&rt, &broker, &cmds, rounds)?;
        println!();
        patterns.print();
        return Ok(());
    }

    progress(&format!(
        "1+2/6 throughput, {rounds} rounds of: bank flow, pass-through, pass-through awaiting deliveries, the same with 2 outputs per input"
    ));
    let throughput = Throughput::measure(&rt, &broker, &cmds, rounds)?;
    let rate = 0.5 * throughput.flow.median.run.window_rate();
    progress(&format!("3/6 latency at {rate:.0} commands/s for {} s each", latency_secs.as_secs()));
    let flow_latency = flow_latency(&rt, b, rate, latency_secs, COMMIT_INTERVAL)?;
    let pass_latency = pass_through_latency(&rt, b, rate, latency_secs, false, COMMIT_INTERVAL, 1)?;
    let pass_drained_latency = pass_through_latency(&rt, b, rate, latency_secs, true, COMMIT_INTERVAL, 1)?;

    progress("4/6 journal restore rate");
    let journal = unique("restore-journal");
    write_journal(&rt, b, &journal, n)?;
    let restore = restore_rates(&rt, b, &journal, n)?;
    progress("5/6 table materialization and lookups");
    let table = table::run(&rt, &broker, table_keys)?;
    progress("6/6 at-least-once vs exactly-once, enrichment");
    let patterns = patterns::run(&rt, &broker, &cmds, rounds)?;
    let restarts = restart::run(&rt, b, &restart_keys)?;
    progress("8/8 throughput by storage");
    let storage = storage::run(&rt, &broker, &cmds, rounds)?;
    progress("9/9 scaling with instances");
    let scaling = scaling::run(&rt, &broker, &cmds, rounds, &scale)?;
    let total = started.elapsed();
    let broker_rss = broker.rss_mib();
    drop(broker);

    let report = Report {
        n,
        throughput,
        flow_latency,
        pass_latency,
        pass_drained_latency,
        restore,
        table,
        patterns,
        total,
        broker_rss,
    };
    report.print();
    restarts.print();
    storage.print();
    scaling.print();
    Ok(())
}
