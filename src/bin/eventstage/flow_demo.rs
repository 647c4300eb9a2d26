//! `eventstage demo --brokers HOST:PORT`: the bank stage as an exactly-once Kafka flow.

use anyhow::bail;
#[cfg(feature = "kafka")]
use anyhow::Context;
#[cfg(feature = "kafka")]
use eventstage::flow::FlowMetrics;
#[cfg(feature = "query")]
use eventstage::query::Queries;
#[cfg(feature = "kafka")]
use eventstage::stages::bank_flow::{bank_flow, BankTopics};
#[cfg(feature = "kafka")]
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
#[cfg(feature = "kafka")]
use rdkafka::client::DefaultClientContext;
#[cfg(feature = "kafka")]
use rdkafka::types::RDKafkaErrorCode;
#[cfg(feature = "kafka")]
use rdkafka::ClientConfig;
use std::process::ExitCode;
use std::time::Duration;

/// Without the `query` feature nothing is queryable.
#[cfg(not(feature = "query"))]
type Queries = ();

/// Flow settings of the demo.
#[derive(Debug, clap::Args)]
pub(crate) struct FlowArgs {
    /// Run the bank stage as a Kafka flow against this Kafka cluster (`host:port,...`).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) brokers: Option<String>,
    /// Input topic (commands). Records that are not commands go to the dead-letter topic
    /// `<input>.dlq`, with their source topic, partition, offset and the error in headers.
    #[arg(long, default_value = "bank-commands", requires = "brokers")]
    input: String,
    /// Replies topic.
    #[arg(long, default_value = "bank-replies", requires = "brokers")]
    replies: String,
    /// Events topic.
    #[arg(long, default_value = "bank-events", requires = "brokers")]
    events: String,
    /// Consumer group.
    #[arg(long, default_value = "eventstage-bank", requires = "brokers")]
    group: String,
    /// Journal: `kafka:TOPIC` (a compacted topic, created if missing; it belongs to the group that
    /// first runs on it) or `sled:DIR` (a local store with the consumed positions and an outbox;
    /// one instance only). Default: kafka:<group>-journal.
    #[arg(long, requires = "brokers")]
    journal: Option<String>,
    /// Take over a Kafka journal another group owns: continue from its state and from that
    /// group's committed input offsets (the other group is refused from then on).
    #[arg(long, requires = "brokers")]
    take_over_journal: bool,
    /// With a Kafka journal: keep a local state store in DIR (one per instance), a checkpoint of
    /// the journal, so that a restart or a partition taken over reads only the journal's records
    /// after the checkpoint. A damaged or foreign store is dropped with a warning and rebuilt.
    #[arg(long, value_name = "DIR", requires = "brokers")]
    state_dir: Option<std::path::PathBuf>,
    /// Hold at most this much state in memory (e.g. `256MiB`); other keys are read when used.
    /// Embedded: from the sled journal (nothing is read at start). With --brokers (needs
    /// --state-dir): committed state, one budget for all partitions, read from the local store.
    /// Default: every key (of the owned partitions) stays in memory.
    #[arg(long, value_name = "BYTES", value_parser = eventstage::cli::parse_bytes)]
    pub(crate) state_cache: Option<u64>,
    /// With --state-dir: how often the local store is checkpointed while the journal changes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, requires = "brokers")]
    checkpoint_interval: Duration,
    /// With --state-dir, standby replicas: `none` (only owned partitions), `recent` (partitions this
    /// instance owned before stay current after they go) or `all` (every partition: any takeover
    /// reads almost nothing; every instance reads the whole journal).
    #[arg(long, default_value = "none", value_parser = ["none", "recent", "all"], requires = "brokers")]
    standby: String,
    /// How often a transaction commits (at-least-once: the longest a batch stays open).
    #[arg(long, default_value = "100ms", value_parser = positive_duration, requires = "brokers")]
    commit_interval: Duration,
    /// `exactly-once` (Kafka transactions) or `at-least-once` (no transactions: offsets committed
    /// after the outputs and the journal are acknowledged; replies may repeat after a crash, events
    /// are never applied twice).
    #[arg(long, default_value = "exactly-once", value_parser = ["exactly-once", "at-least-once"], requires = "brokers")]
    guarantee: String,
    /// The producer's transactional id, stable per instance: a restart with the same id fences its
    /// predecessor and takes its place in the group at once (static membership). Two live instances
    /// must not share one. Default: <group>-<host>-<pid>, unique per process, without static
    /// membership.
    #[arg(long, requires = "brokers")]
    transactional_id: Option<String>,
    /// Serve HTTP on ADDR: the flow's committed state (GET /state/{stage}/{key}, answered for
    /// every key by whichever instance is asked: it forwards to the owner; GET
    /// /state/{stage}?prefix=P for this instance's keys), Prometheus metrics on /metrics, /health
    /// (200 while the flow runs) and /ready (200 once its partitions are restored and it polls).
    /// Port 0 picks a free port; the start-up line says which.
    #[arg(long = "http-addr", visible_alias = "metrics-addr", value_name = "HOST:PORT", requires = "brokers")]
    http_addr: Option<std::net::SocketAddr>,
    /// The address the other instances and `eventstage query` reach this instance's HTTP server
    /// on, published in the group. Default: the bound address (the host's name with its port
    /// when bound to all interfaces).
    #[arg(long, value_name = "HOST:PORT", requires = "http_addr")]
    advertise: Option<String>,
    /// How long to try to reach the brokers at start-up before giving up: for the demo's topics,
    /// then for the flow's setup (`FlowBuilder::setup_timeout`: metadata, journal topic,
    /// transactions), each; then the command exits 2 with an error that names the brokers.
    #[arg(long, default_value = "30s", value_parser = positive_duration, requires = "brokers")]
    timeout: Duration,
    /// Partitions of topics the demo creates when they are missing.
    #[arg(long, default_value_t = 4, requires = "brokers")]
    partitions: i32,
    /// Also run the transfer saga, in one application with the bank: transfers
    /// (`{"id":"t1","from":"acct-1","to":"acct-2","amount":5}`) read from TOPIC withdraw from the
    /// source account, then deposit to the target (a refused deposit refunds the source); one reply
    /// per transfer on `<TOPIC>.replies`. Each stage has its own journal (`<group>-transfer-journal`
    /// for the transfers) and, with --state-dir, its own store in a subdirectory.
    #[arg(long, value_name = "TOPIC", requires = "brokers", conflicts_with = "limits")]
    transfers: Option<String>,
    /// With --transfers: how long a transfer waits for its withdrawal before it is rejected as
    /// timed out (a durable timer; a withdrawal that comes later is deposited back).
    #[arg(long, default_value = "30s", value_parser = positive_duration, requires = "transfers")]
    transfer_timeout: Duration,
    /// Withdrawal limits: a compacted topic (key = account id, value = the largest withdrawal, a
    /// JSON number) joined into every command; a withdrawal over the limit is rejected.
    #[arg(long, value_name = "TOPIC", requires = "brokers")]
    limits: Option<String>,
}

/// A duration of at least 1 ms (`100ms`, `2s`).
fn positive_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(1) {
        return Err("must be at least 1ms".into());
    }
    Ok(d)
}

#[cfg(not(feature = "kafka"))]
pub(crate) async fn run(_args: FlowArgs) -> anyhow::Result<ExitCode> {
    bail!("this eventstage was built without Kafka support; rebuild with `--features kafka` (a default feature)")
}

#[cfg(feature = "kafka")]
async fn ensure_topics(brokers: &str, topics: &[&str], partitions: i32, timeout: Duration) -> anyhow::Result<()> {
    if !eventstage::cli::quiet() {
        eprintln!(
            "connecting to Kafka at {brokers} (giving up after {}; --timeout)",
            humantime::format_duration(timeout)
        );
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    // Metadata first: an unreachable cluster is named within --timeout, not after librdkafka's
    // own minute-long request timeout.
    // (Blocking, before anything else runs on this runtime.)
    admin.inner().fetch_metadata(None, timeout).map_err(|e| anyhow::anyhow!("{e}")).with_context(|| {
        format!(
            "cannot reach the brokers at {brokers} within {}: check --brokers and that Kafka runs there",
            humantime::format_duration(timeout)
        )
    })?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(timeout)).request_timeout(Some(timeout));
    let created = admin
        .create_topics(&new, &opts)
        .await
        .with_context(|| format!("cannot create the demo's topics at {brokers}"))?;
    for r in created {
        match r {
            Ok(t) => println!("created topic {t} ({partitions} partitions)"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => bail!("cannot create topic {t}: {code}"),
        }
    }
    Ok(())
}

#[cfg(feature = "kafka")]
fn print_metrics(m: &FlowMetrics, exactly_once: bool) {
    // At-least-once, a "transaction" is a batch whose offsets were committed.
    let commits = if exactly_once {
        format!("{} transactions ({} aborted)", m.transactions, m.aborts)
    } else {
        format!("{} offset commits", m.transactions)
    };
    println!(
        "metrics:  {} records in, {} out, {} dead letters, {commits}, last commit {} ms, slowest {} ms, {} journal records and {} local store rows restored, lag {}",
        m.records_in,
        m.records_out,
        m.dead_letters,
        m.last_commit.as_millis(),
        m.max_commit.as_millis(),
        m.restored_records,
        m.store_rows,
        m.lag
    );
    if m.cache_hits + m.cache_misses > 0 {
        println!(
            "state:    {} keys in memory ({} in the cache, {} not yet in the local store), {} found in memory, {} read from the local store, {} evicted, local store {} journal records behind",
            m.cache_entries + m.cache_unstored,
            bytesize::ByteSize(m.cache_bytes).display().iec(),
            m.cache_unstored,
            m.cache_hits,
            m.cache_misses,
            m.cache_evictions,
            m.store_lag
        );
    }
    if m.store_handed_rows + m.store_read_records > 0 {
        println!(
            "store:    {} rows handed over by the flow as their transactions committed, {} journal records read from the broker",
            m.store_handed_rows, m.store_read_records
        );
    }
}

/// The demo's journal, transactional id and group settings on a bank flow.
#[cfg(feature = "kafka")]
fn configure<S: eventstage::EventSourced>(
    flow: eventstage::flow::FlowBuilder<S>,
    journal: Option<&eventstage::flow::FlowJournal>,
    txn: &str,
    args: &FlowArgs,
    state_dir: Option<std::path::PathBuf>,
    queries: Option<&Queries>,
) -> eventstage::flow::FlowBuilder<S> {
    #[cfg(feature = "query")]
    let flow = match queries {
        Some(q) => flow.queryable(q),
        None => flow,
    };
    #[cfg(not(feature = "query"))]
    let _ = queries;
    let guarantee = if args.guarantee == "at-least-once" {
        eventstage::flow::Guarantee::AtLeastOnce
    } else {
        eventstage::flow::Guarantee::ExactlyOnce
    };
    let flow = if args.take_over_journal { flow.take_over_journal() } else { flow };
    let flow = match journal {
        Some(journal) => flow.journal(journal.clone()),
        None => flow,
    };
    let flow = flow
        .guarantee(guarantee)
        .transactional_id(txn)
        .commit_interval(args.commit_interval)
        .setup_timeout(args.timeout)
        .consumer_property("session.timeout.ms", "10000");
    let flow = match args.state_cache {
        Some(bytes) => flow.state_cache(bytes),
        None => flow,
    };
    let flow = match state_dir {
        Some(dir) => {
            flow.state_dir(dir).checkpoint_interval(args.checkpoint_interval).standby(match args.standby.as_str() {
                "all" => eventstage::flow::Standby::All,
                "recent" => eventstage::flow::Standby::Recent,
                _ => eventstage::flow::Standby::None,
            })
        }
        None => flow,
    };
    // With --transactional-id the instance is a static member of the group (the member id is the
    // transactional id): a restarted instance takes its old place at once. The default id is new
    // in every process: as a static member id it would stall the partitions at every restart.
    flow.static_membership(args.transactional_id.is_some())
}

/// The default transactional id: unique per host and process.
#[cfg(feature = "kafka")]
fn default_transactional_id(group: &str) -> String {
    // $HOSTNAME is a shell variable, usually not exported: the kernel's name first.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "local".into());
    format!("{group}-{host}-{}", std::process::id())
}

#[cfg(feature = "kafka")]
pub(crate) async fn run(args: FlowArgs) -> anyhow::Result<ExitCode> {
    let Some(brokers) = args.brokers.clone() else { bail!("--brokers is required for the flow demo") };
    if args.state_cache.is_some() && args.state_dir.is_none() {
        bail!("--state-cache with --brokers needs a local store to read evicted keys from: add --state-dir DIR");
    }
    let journal_arg = args.journal.clone().unwrap_or_else(|| format!("kafka:{}-journal", args.group));
    let journal = match journal_arg.split_once(':') {
        Some(("kafka", topic)) if !topic.is_empty() => eventstage::flow::FlowJournal::Kafka(topic.into()),
        Some(("sled", dir)) if !dir.is_empty() => eventstage::flow::FlowJournal::Sled(dir.into()),
        _ => bail!("--journal must be kafka:TOPIC or sled:DIR (got `{journal_arg}`)"),
    };
    if args.take_over_journal && !matches!(journal, eventstage::flow::FlowJournal::Kafka(_)) {
        bail!("--take-over-journal applies to a Kafka journal (--journal kafka:TOPIC); a sled journal belongs to its directory");
    }
    if args.transfers.is_some() && args.guarantee == "at-least-once" {
        bail!("--transfers needs --guarantee exactly-once: a transfer's withdrawal deadline is a durable timer, and a routed step sent again after a crash would move money twice");
    }
    if args.transfers.is_some() && !matches!(journal, eventstage::flow::FlowJournal::Kafka(_)) {
        bail!("--transfers runs the bank and the transfers as one application of several instances: it needs a Kafka journal (--journal kafka:TOPIC), not sled");
    }
    let mut topics_needed = vec![args.input.clone(), args.replies.clone(), args.events.clone()];
    if let Some(transfers) = &args.transfers {
        topics_needed.extend([transfers.clone(), eventstage::stages::transfer_flow::replies_topic(transfers)]);
    }
    let needed: Vec<&str> = topics_needed.iter().map(String::as_str).collect();
    ensure_topics(&brokers, &needed, args.partitions, args.timeout).await?;
    let txn = args.transactional_id.clone().unwrap_or_else(|| default_transactional_id(&args.group));
    let topics = BankTopics { input: args.input.clone(), replies: args.replies.clone(), events: args.events.clone() };
    // Before the flow starts: the flow registers its metrics as it starts.
    #[cfg(all(feature = "prometheus", feature = "query"))]
    let exporter = match args.http_addr {
        Some(addr) => Some(crate::serve::prepare(addr, args.advertise.clone()).await?),
        None => None,
    };
    #[cfg(all(feature = "prometheus", feature = "query"))]
    let queries = exporter.as_ref().map(|e| e.queries.clone());
    #[cfg(not(all(feature = "prometheus", feature = "query")))]
    let queries: Option<Queries> = None;
    let queries = queries.as_ref();
    let state_dir =
        |stage: &str| args.state_dir.as_ref().map(|d| if args.transfers.is_some() { d.join(stage) } else { d.clone() });
    let launched = match (&args.limits, &args.transfers) {
        (None, None) => Launched::flow(
            configure(
                bank_flow(&brokers, &args.group, topics),
                Some(&journal),
                &txn,
                &args,
                state_dir("bank"),
                queries,
            )
            .run()?,
        ),
        (None, Some(transfers)) => {
            let app = eventstage::stages::transfer_flow::transfer_app(
                &brokers,
                &args.group,
                topics,
                transfers,
                args.transfer_timeout,
            );
            let app = eventstage::stages::transfer_flow::TransferApp {
                bank: configure(app.bank, Some(&journal), &txn, &args, state_dir("bank"), queries),
                transfers: configure(
                    app.transfers,
                    None,
                    &format!("{txn}-transfer"),
                    &args,
                    state_dir("transfer"),
                    queries,
                ),
                app: app.app.setup_timeout(args.timeout),
            };
            Launched::application(app.into_application().start().await?)
        }
        #[cfg(not(feature = "sled"))]
        (Some(_), _) => bail!("--limits needs the `sled` feature (a default feature)"),
        #[cfg(feature = "sled")]
        (Some(limits), _) => {
            let table = eventstage::table::Table::builder(&brokers, limits)
                .keys(eventstage::table::Decoder::utf8())
                .values(eventstage::table::Decoder::<u64>::json())
                .open()
                .await
                .with_context(|| format!("opening the limits table `{limits}` (--limits)"))?;
            table.caught_up().await.with_context(|| format!("reading the limits table `{limits}`"))?;
            println!("limits:   {} accounts with a withdrawal limit in `{limits}`", table.len());
            #[cfg(feature = "query")]
            if let Some(q) = queries {
                q.table(&table);
            }
            let flow = eventstage::stages::bank_flow::bank_flow_with_limits(&brokers, &args.group, topics, table);
            Launched::flow(configure(flow, Some(&journal), &txn, &args, state_dir("bank"), queries).run()?)
        }
    };
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    #[cfg(all(feature = "prometheus", feature = "query"))]
    let served = match exporter {
        None => String::new(),
        Some(exporter) => {
            let advertised = exporter.queries.advertised().to_string();
            let bound =
                exporter.serve(crate::serve::Status { running: running.clone(), ready: launched.ready.clone() })?;
            format!(", HTTP on http://{bound} (/state, /metrics, /health, /ready; advertised as {advertised})")
        }
    };
    #[cfg(not(all(feature = "prometheus", feature = "query")))]
    let served = match args.http_addr {
        None => String::new(),
        Some(_) => bail!("--http-addr needs the `prometheus` and `query` features (default features)"),
    };
    let exactly_once = args.guarantee != "at-least-once";
    let id = if exactly_once { format!(", transactional id {txn}") } else { String::new() };
    let transfers = args.transfers.as_ref().map_or_else(String::new, |t| {
        format!(", transfers {t} -> {}", eventstage::stages::transfer_flow::replies_topic(t))
    });
    println!(
        "flow running: {} -> {} / {}{transfers}, {}, journal {}, group {}{id}, bad input to {}.dlq{served}; Ctrl-C or SIGTERM drains and stops",
        args.input, args.replies, args.events, args.guarantee, journal_arg, args.group, args.input
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    let Launched { drain: stopper, done, .. } = launched;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    let mut done = done;
    loop {
        tokio::select! {
            r = &mut done => {
                running.store(false, std::sync::atomic::Ordering::Release);
                let (result, metrics) = r;
                for (stage, m) in &metrics {
                    if metrics.len() > 1 {
                        println!("stage {stage}:");
                    }
                    print_metrics(m, exactly_once);
                }
                result?;
                println!("flow stopped after draining");
                return Ok(ExitCode::SUCCESS);
            }
            _ = tokio::signal::ctrl_c() => { println!("draining..."); stopper(); }
            _ = term.recv() => { println!("draining..."); stopper(); }
            _ = ticker.tick() => {}
        }
    }
}

/// How a flow or application ended, and each stage's last counters.
#[cfg(feature = "kafka")]
type Ended = (Result<(), eventstage::flow::FlowError>, Vec<(&'static str, FlowMetrics)>);

/// A running bank flow, or the bank and transfers application: how to drain it, whether it is
/// ready, and its end with each stage's counters.
#[cfg(feature = "kafka")]
struct Launched {
    drain: Box<dyn Fn() + Send>,
    ready: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
    done: futures::future::BoxFuture<'static, Ended>,
}

#[cfg(feature = "kafka")]
impl Launched {
    fn flow(flow: eventstage::flow::FlowControl) -> Self {
        let (stopper, status) = (flow.stopper(), flow.status());
        Self {
            drain: Box::new(move || stopper.drain()),
            ready: std::sync::Arc::new(move || status.ready()),
            done: Box::pin(async move {
                let (result, metrics) = flow.wait_with_metrics().await;
                (result, vec![("bank", metrics)])
            }),
        }
    }

    fn application(app: eventstage::flow::Running) -> Self {
        let (stopper, statuses) = (app.stopper(), app.statuses());
        let ready_statuses = statuses.clone();
        Self {
            drain: Box::new(move || stopper.drain()),
            ready: std::sync::Arc::new(move || ready_statuses.iter().all(|(_, s)| s.ready())),
            done: Box::pin(async move {
                let result = app.wait().await;
                (result, statuses.iter().map(|(name, s)| (*name, s.metrics())).collect())
            }),
        }
    }
}
