//! `eventstage demo`: the bank stage on an embedded sled journal under load, then a restart.

use anyhow::{bail, Context};
use eventstage::journal::{EventQuery, Journal, Progress, SledStore};
use eventstage::stages::bank::{Account, Bank, BankCommand};
use eventstage::{rebuild, Durability, RuntimeConfig, StageRuntime};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DurabilityArg {
    /// Reply after fsync.
    Durable,
    /// Reply after the write; fsync in the background.
    Buffered,
}

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Keep the journal in DIR (reused across runs: the demo recovers what is there first).
    /// Default: a temporary directory, deleted at the end.
    #[arg(long, value_name = "DIR", conflicts_with = "brokers")]
    data: Option<PathBuf>,
    /// Number of accounts.
    #[arg(long, default_value_t = 1000, conflicts_with = "brokers")]
    accounts: u64,
    /// Number of commands to send.
    #[arg(long, default_value_t = 200_000, conflicts_with = "brokers")]
    commands: u64,
    /// Concurrent client tasks.
    #[arg(long, default_value_t = 64, conflicts_with = "brokers")]
    tasks: u64,
    /// When replies are sent.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Durable, conflicts_with = "brokers")]
    durability: DurabilityArg,
    /// Snapshot every N events per account (0: off).
    #[arg(long, default_value_t = 100, conflicts_with = "brokers")]
    snapshot_every: u64,
    /// Seed of the generated workload.
    #[arg(long, default_value_t = 42, conflicts_with = "brokers")]
    seed: u64,
    #[command(flatten)]
    flow: crate::flow_demo::FlowArgs,
}

/// Progress on stderr, only on a terminal and without `--quiet`: a bar towards `len`, or a
/// spinner counting records.
fn progress(len: Option<u64>, what: &str) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) || eventstage::cli::quiet() {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(n) => (indicatif::ProgressBar::new(n), "{msg} {wide_bar} {human_pos}/{human_len} ({per_sec}, {eta} left)"),
        None => (indicatif::ProgressBar::new_spinner(), "{spinner} {msg}: {human_pos} records ({per_sec}) {elapsed}"),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn command(rng: &mut StdRng) -> BankCommand {
    match rng.random_range(0..100) {
        0..10 => BankCommand::Open,
        10..60 => BankCommand::Deposit(rng.random_range(1..=1000)),
        60..95 => BankCommand::Withdraw(rng.random_range(1..=800)),
        _ => BankCommand::Close,
    }
}

/// The process's resident memory and its peak so far in bytes (`VmRSS`, `VmHWM`), where the OS
/// says (Linux).
fn memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let kb = status.lines().find_map(|l| l.strip_prefix(name))?.trim().trim_end_matches("kB").trim();
        Some(kb.parse::<u64>().ok()? * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn plain(states: BTreeMap<String, Arc<Account>>) -> BTreeMap<String, Account> {
    states.into_iter().map(|(k, v)| (k, Account::clone(&v))).collect()
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.flow.brokers.is_some() {
        return crate::flow_demo::run(args.flow).await;
    }
    if args.accounts == 0 || args.tasks == 0 {
        bail!("--accounts and --tasks must be at least 1");
    }
    let temp;
    let dir = match &args.data {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir().context("cannot create a temporary directory; pass --data DIR")?;
            temp.path().join("journal")
        }
    };
    let durability = match args.durability {
        DurabilityArg::Durable => Durability::Durable,
        DurabilityArg::Buffered => Durability::Buffered,
    };
    let mut config = RuntimeConfig::default().durability(durability).snapshot_every(args.snapshot_every);
    if let Some(bytes) = args.flow.state_cache {
        config = config.state_cache(bytes);
    }
    println!("eventstage demo: bank stage on a sled journal at {}", dir.display());

    let store = SledStore::open(&dir).with_context(|| format!("cannot open the journal at {}", dir.display()))?;
    let journal = store.journal("bank")?;
    let bar = progress(None, "recovering");
    let b = bar.clone();
    let recovering = config.clone().recovery_progress(Progress::new(move |n| b.set_position(n)));
    let runtime = StageRuntime::open(Bank, journal.clone(), recovering).await?;
    bar.finish_and_clear();
    match args.flow.state_cache {
        // Nothing was read: keys are read when first used.
        Some(bytes) => println!(
            "state cache: {} (accounts are read from the journal when first used)",
            bytesize::ByteSize::b(bytes).display().iec()
        ),
        None if !runtime.handle().is_empty().await? => {
            println!("recovered {} accounts from an earlier run", runtime.handle().len().await?)
        }
        None => {}
    }

    println!(
        "running:  {} commands over {} accounts from {} tasks ({} events recovered in {:.1} ms)",
        args.commands,
        args.accounts,
        args.tasks,
        runtime.recovery().events + runtime.recovery().snapshots,
        runtime.recovery().elapsed.as_secs_f64() * 1000.0
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    let bar = progress(Some(args.commands), "commands");
    let accepted = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..args.tasks {
        let handle = runtime.handle();
        let n = args.commands / args.tasks + u64::from(t < args.commands % args.tasks);
        let (accepted, rejected, bar) = (accepted.clone(), rejected.clone(), bar.clone());
        let (accounts, seed) = (args.accounts, args.seed);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(t));
            for _ in 0..n {
                let key = format!("acct-{:06}", rng.random_range(0..accounts));
                match handle.ask(key, command(&mut rng)).await? {
                    Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                    Err(_) => rejected.fetch_add(1, Ordering::Relaxed),
                };
                bar.inc(1);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    // Before the checks below, which read every account.
    let memory = memory();
    let cache = runtime.handle().cache_stats();
    let live = plain(runtime.handle().snapshot().await?);
    let stats = journal.stats().await?;
    runtime.shutdown().await?;
    drop(journal);
    drop(store);

    let (acc, rej) = (accepted.load(Ordering::Relaxed), rejected.load(Ordering::Relaxed));
    let secs = elapsed.as_secs_f64();
    println!(
        "live:     {} commands from {} tasks in {:.2} s = {:.0} commands/s ({} accepted, {} rejected), durability {}",
        args.commands,
        args.tasks,
        secs,
        args.commands as f64 / secs,
        acc,
        rej,
        match args.durability {
            DurabilityArg::Durable => "durable (replies after fsync)",
            DurabilityArg::Buffered => "buffered (replies after the write, fsync in the background)",
        }
    );
    println!(
        "journal:  {} events in {} batches (mean {:.1} events per durable write), {} snapshots, {} keys",
        stats.events,
        stats.batches,
        stats.events as f64 / stats.batches.max(1) as f64,
        stats.snapshots,
        stats.keys
    );
    if let Some((rss, peak)) = memory {
        println!(
            "memory:   {} resident after the commands, {} at the peak (the whole process)",
            bytesize::ByteSize::b(rss).display().iec(),
            bytesize::ByteSize::b(peak).display().iec()
        );
    }
    if let Some(c) = cache {
        println!(
            "cache:    {} accounts in memory ({} of {}), {} hits, {} read from the journal, {} evicted",
            c.entries,
            bytesize::ByteSize::b(c.bytes).display().iec(),
            bytesize::ByteSize::b(c.budget).display().iec(),
            c.hits,
            c.misses,
            c.evictions
        );
    }

    let restart = Instant::now();
    let store = SledStore::open(&dir)?;
    let journal = store.journal("bank")?;
    let reopened = StageRuntime::open(Bank, journal.clone(), config).await?;
    let restart_time = restart.elapsed();
    let reading = Instant::now();
    let recovered = plain(reopened.handle().snapshot().await?);
    let rec = reopened.recovery();
    if args.flow.state_cache.is_some() {
        println!(
            "restart:  {:.1} ms to reopen (nothing read); reading all {} accounts back from the journal took {:.1} ms",
            restart_time.as_secs_f64() * 1000.0,
            recovered.len(),
            reading.elapsed().as_secs_f64() * 1000.0
        );
    } else {
        println!(
            "restart:  {:.1} ms to reopen and recover {} accounts ({} snapshots + {} tail events)",
            restart_time.as_secs_f64() * 1000.0,
            rec.keys,
            rec.snapshots,
            rec.events
        );
    }
    let from_events: BTreeMap<String, Account> = rebuild::<Bank, _>(&journal, EventQuery::all(), &Progress::none())
        .await?
        .into_iter()
        .map(|(k, (s, _))| (k, s))
        .collect();
    reopened.shutdown().await?;

    let open = live.values().filter(|a| a.open).count();
    let total: u64 = live.values().map(|a| a.balance).sum();
    if recovered == live && from_events == live {
        println!(
            "replayed state equals live state: yes ({} accounts, {open} open, total balance {total}; snapshots+tail and full event replay both match)",
            live.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        let diff = live.iter().find(|(k, v)| recovered.get(*k) != Some(v) || from_events.get(*k) != Some(v));
        println!("replayed state equals live state: NO; first difference: {diff:?}");
        Ok(ExitCode::from(1))
    }
}
