//! `eventstage describe --group G` and `eventstage reset --group G`: what Kafka Streams' reset tool
//! and kafka-consumer-groups give for a flow's application: committed input offsets, lag and
//! journal positions per partition; and a reset that makes the next run start from scratch.

use anyhow::{bail, Context};
use eventstage_journal::KafkaJournal;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

/// The application a group runs: its group, input topics and journal.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct GroupArgs {
    /// The Kafka cluster (`host:port,...`).
    #[arg(long, value_name = "HOST:PORT", env = "EVENTSTAGE_BROKERS")]
    brokers: String,
    /// The flow's consumer group.
    #[arg(long)]
    group: String,
    /// The flow's input topics (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "bank-commands")]
    input: Vec<String>,
    /// The flow's Kafka journal topic. Default: <group>-journal (the demo's).
    #[arg(long, value_name = "TOPIC")]
    journal: Option<String>,
    /// How long to wait for the cluster.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// `describe`'s own flags.
#[derive(Debug, clap::Args)]
pub(crate) struct DescribeArgs {
    #[command(flatten)]
    app: GroupArgs,
    /// Running instances of the flow to ask for their state: the addresses they serve `/metrics`
    /// on (`demo --metrics-addr`), comma-separated. Each shows its partitions, lag, state cache
    /// (bytes, entries, hits, misses, evictions) and local store (rows read, lag).
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT")]
    instances: Vec<String>,
}

/// `reset`'s own flags.
#[derive(Debug, clap::Args)]
pub(crate) struct ResetArgs {
    #[command(flatten)]
    app: GroupArgs,
    /// Print what would be done and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// An application's own topics (see [`GroupArgs::application_topics`]).
struct AppTopics {
    repartition: Vec<String>,
    /// Its stages' durable timers (`<group>-<stage>-timers`).
    timers: Vec<String>,
    /// `--journal`'s first.
    journals: Vec<String>,
}

/// One input partition of the group.
struct InputOffset {
    topic: String,
    partition: i32,
    /// The group's committed offset (None: nothing committed).
    committed: Option<i64>,
    end: i64,
}

/// A Kafka journal's owner and, per partition, its first and end offsets.
struct JournalMarks {
    owner: Option<String>,
    partitions: Vec<(i32, i64, i64)>,
}

impl GroupArgs {
    /// Journal `topic`'s owner and offsets; None when it does not exist.
    async fn journal_marks(&self, topic: &str) -> anyhow::Result<Option<JournalMarks>> {
        let (config, topic, timeout) = (self.config(), topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let journal = match KafkaJournal::existing(config, &topic, timeout) {
                Ok(j) => j,
                Err(e) if e.to_string().contains("does not exist") => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let parts: Vec<i32> = (0..journal.partitions()).collect();
            let partitions = journal.watermarks(&parts)?.into_iter().map(|(p, (low, high))| (p, low, high)).collect();
            Ok(Some(JournalMarks { owner: journal.owner()?, partitions }))
        })
        .await?
    }

    fn journal_topic(&self) -> String {
        self.journal.clone().unwrap_or_else(|| format!("{}-journal", self.group))
    }

    /// The topics of the group's application, found on the cluster by the names an
    /// [`Application`](eventstage::flow::Application) gives them: its stages' repartition topics
    /// (`<group>-<stage>-commands`), timers (`<group>-<stage>-timers`) and journals
    /// (`<group>-<stage>-journal`, beside the `--journal` one).
    fn application_topics(&self) -> anyhow::Result<AppTopics> {
        let consumer: BaseConsumer = self.config().create()?;
        let md = consumer
            .fetch_metadata(None, self.timeout)
            .with_context(|| format!("cannot reach the brokers at {}", self.brokers))?;
        let prefix = format!("{}-", self.group);
        let stage_topic = |name: &str, suffix: &str| {
            name.strip_prefix(&prefix).and_then(|n| n.strip_suffix(suffix)).is_some_and(|stage| !stage.is_empty())
        };
        let mut found = AppTopics { repartition: Vec::new(), timers: Vec::new(), journals: vec![self.journal_topic()] };
        for t in md.topics().iter().filter(|t| t.error().is_none()) {
            if stage_topic(t.name(), "-commands") {
                found.repartition.push(t.name().to_string());
            } else if stage_topic(t.name(), "-timers") {
                found.timers.push(t.name().to_string());
            } else if stage_topic(t.name(), "-journal") && !found.journals.iter().any(|j| j == t.name()) {
                found.journals.push(t.name().to_string());
            }
        }
        found.repartition.sort();
        found.timers.sort();
        found.journals[1..].sort();
        Ok(found)
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    /// Every partition of the input topics and of `more` (an application's repartition topics),
    /// with the group's committed offset and its end.
    fn input_offsets(&self, more: &[String]) -> anyhow::Result<Vec<InputOffset>> {
        let mut config = self.config();
        config.set("group.id", &self.group).set("enable.auto.commit", "false");
        let consumer: BaseConsumer = config.create()?;
        let mut tpl = TopicPartitionList::new();
        for topic in self.input.iter().chain(more) {
            let md = consumer
                .fetch_metadata(Some(topic), self.timeout)
                .with_context(|| format!("cannot reach the brokers at {}", self.brokers))?;
            let t = md.topics().iter().find(|t| t.name() == topic && t.error().is_none());
            let Some(t) = t.filter(|t| !t.partitions().is_empty()) else {
                bail!("input topic `{topic}` does not exist on {}: check --input", self.brokers);
            };
            for p in t.partitions() {
                tpl.add_partition(topic, p.id());
            }
        }
        // Reads the group's offsets without joining it.
        let committed =
            consumer.committed_offsets(tpl, self.timeout).context("reading the group's committed offsets")?;
        committed
            .elements()
            .iter()
            .map(|e| {
                let (_, high) = consumer.fetch_watermarks(e.topic(), e.partition(), self.timeout)?;
                let committed = match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                };
                Ok(InputOffset { topic: e.topic().to_string(), partition: e.partition(), committed, end: high })
            })
            .collect()
    }
}

/// `eventstage describe --group G [--instances HOST:PORT,...]`.
pub(crate) async fn describe(describe: DescribeArgs) -> anyhow::Result<ExitCode> {
    let args = describe.app;
    let (offsets, topics) = tokio::task::spawn_blocking({
        let args = args.clone();
        move || {
            let topics = args.application_topics()?;
            anyhow::Ok((args.input_offsets(&topics.repartition)?, topics))
        }
    })
    .await??;
    println!("group {} on {}", args.group, args.brokers);
    println!("{:<24} {:>9} {:>12} {:>12} {:>10}", "input", "partition", "committed", "end", "lag");
    let mut total = 0i64;
    for o in &offsets {
        let lag = o.end - o.committed.unwrap_or(0).max(0);
        total += lag;
        let shown = o.committed.map_or_else(|| "-".to_string(), |c| c.to_string());
        println!("{:<24} {:>9} {shown:>12} {:>12} {lag:>10}", o.topic, o.partition, o.end);
    }
    println!("lag in total: {total}");
    if !topics.repartition.is_empty() {
        println!("(a topic written in transactions, as a repartition topic is, counts its transaction markers and aborted records as lag: a few per partition at rest)");
    }
    for topic in &topics.timers {
        println!("timers {topic} (each entity's pending durable timers; `eventstage_flow_timers_pending` of a running instance counts them)");
    }
    for topic in &topics.journals {
        match args.journal_marks(topic).await? {
            None => println!("journal {topic}: none (the next run creates it)"),
            Some(marks) => {
                let owner =
                    marks.owner.map_or_else(|| "no recorded owner".to_string(), |o| format!("owned by group {o}"));
                println!("journal {topic} ({owner})");
                println!("{:<24} {:>9} {:>12} {:>12}", "journal", "partition", "start", "end");
                for (p, low, high) in marks.partitions {
                    println!("{topic:<24} {p:>9} {low:>12} {high:>12}");
                }
            }
        }
    }
    let mut unreachable = 0;
    for addr in &describe.instances {
        match instance_metrics(addr, args.timeout).await {
            Ok(body) => println!("{}", InstanceFigures::parse(&body, &args.group).describe(addr)),
            Err(e) => {
                unreachable += 1;
                eprintln!("instance {addr}: cannot read its metrics ({e:#}): is an instance of group {} running with --metrics-addr {addr}?", args.group);
            }
        }
    }
    Ok(if unreachable > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// `GET /metrics` of a running instance (its Prometheus text).
async fn instance_metrics(addr: &str, timeout: Duration) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.context("connecting")?;
        stream
            .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(timeout, get).await.context("no answer within --timeout")??;
    let (head, body) = response.split_once("\r\n\r\n").context("not an HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("none");
    if status != "200" {
        bail!("GET /metrics answered {status}");
    }
    Ok(body.to_string())
}

/// What a running instance's metrics say about a group's flow (summed over its stages), and per
/// stage of an application.
#[derive(Debug, Default, PartialEq)]
struct InstanceFigures {
    /// Whether any sample of the group was found.
    found: bool,
    /// Per stage: partitions, lag, timers pending, inputs forwarded.
    stages: BTreeMap<String, [f64; 4]>,
    partitions: f64,
    lag: f64,
    cache_bytes: f64,
    cache_entries: f64,
    unstored: f64,
    hits: f64,
    misses: f64,
    evictions: f64,
    store_rows: f64,
    store_lag: f64,
}

impl InstanceFigures {
    /// The figures of `group` in a Prometheus text `body`.
    fn parse(body: &str, group: &str) -> Self {
        use eventstage::flow::metric_names as n;
        let label = format!("group=\"{group}\"");
        let mut f = Self::default();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else { continue };
            let Some((name, labels)) = key.strip_suffix('}').and_then(|k| k.split_once('{')) else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            if !labels.split(',').any(|l| l == label) {
                continue;
            }
            // A gauge also published per partition (the lag): its total is the sample without one.
            if labels.split(',').any(|l| l.starts_with("partition=")) {
                continue;
            }
            let stage = labels.split(',').find_map(|l| l.strip_prefix("stage=\"")?.strip_suffix('"'));
            let per_stage = match name {
                n::ASSIGNED_PARTITIONS => Some(0),
                n::LAG => Some(1),
                n::TIMERS_PENDING => Some(2),
                n::FORWARDED => Some(3),
                _ => None,
            };
            if let (Some(stage), Some(i)) = (stage, per_stage) {
                f.stages.entry(stage.to_string()).or_default()[i] += value;
                f.found = true;
            }
            let field = match name {
                n::ASSIGNED_PARTITIONS => &mut f.partitions,
                n::LAG => &mut f.lag,
                n::CACHE_BYTES => &mut f.cache_bytes,
                n::CACHE_ENTRIES => &mut f.cache_entries,
                n::CACHE_UNSTORED => &mut f.unstored,
                n::CACHE_HITS => &mut f.hits,
                n::CACHE_MISSES => &mut f.misses,
                n::CACHE_EVICTIONS => &mut f.evictions,
                n::STORE_ROWS => &mut f.store_rows,
                n::STORE_LAG => &mut f.store_lag,
                _ => continue,
            };
            *field += value;
            f.found = true;
        }
        f
    }

    /// Its lines in `describe`'s output.
    fn describe(&self, addr: &str) -> String {
        if !self.found {
            return format!("instance {addr}: runs no flow of this group (no metrics labelled with it)");
        }
        let lookups = self.hits + self.misses;
        let hit_rate = if lookups > 0.0 { format!("{:.1} %", 100.0 * self.hits / lookups) } else { "-".into() };
        format!(
            "instance {addr}: {} partitions, lag {}\n  state cache: {} in {} entries (+{} committed, not yet in the local store), {} hits, {} misses ({hit_rate} hits), {} evictions\n  local store: {} rows read, {} journal records behind",
            self.partitions,
            self.lag,
            bytesize::ByteSize::b(self.cache_bytes as u64).display().iec(),
            self.cache_entries,
            self.unstored,
            self.hits,
            self.misses,
            self.evictions,
            self.store_rows,
            self.store_lag,
        ) + &self.per_stage()
    }

    /// An application's lines per stage (none for a flow of one stage).
    fn per_stage(&self) -> String {
        if self.stages.len() < 2 {
            return String::new();
        }
        self.stages
            .iter()
            .map(|(stage, [partitions, lag, timers, forwarded])| {
                format!("\n  stage {stage}: {partitions} partitions, lag {lag}, {timers} timers pending, {forwarded} inputs forwarded")
            })
            .collect()
    }
}

/// `eventstage reset --group G`: deletes the group's committed offsets (its next run reads the
/// inputs from the start), its Kafka journal topics (its next run creates them again and starts
/// with no state) and an application's repartition topics (the commands in flight in them belong
/// to the run being reset). The group must have no running member.
pub(crate) async fn reset(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let app = &args.app;
    let (offsets, topics) = tokio::task::spawn_blocking({
        let a = app.clone();
        move || {
            let topics = a.application_topics()?;
            anyhow::Ok((a.input_offsets(&topics.repartition)?, topics))
        }
    })
    .await??;
    let mut journals = Vec::new();
    for topic in &topics.journals {
        journals.push((topic.clone(), app.journal_marks(topic).await?));
    }
    let committed = offsets.iter().filter(|o| o.committed.is_some()).count();
    let verb = if args.dry_run { "would" } else { "will" };
    println!(
        "{verb} delete the committed offsets of group {} ({committed} of {} input partitions have one): its next run reads {} from the start",
        app.group,
        offsets.len(),
        app.input.join(", ")
    );
    for (topic, marks) in &journals {
        match marks {
            Some(marks) => {
                let records: i64 = marks.partitions.iter().map(|(_, l, h)| h - l).sum();
                println!("{verb} delete journal {topic} ({records} records): the next run creates it again and starts with no state");
            }
            None => println!("journal {topic} does not exist: nothing to empty"),
        }
    }
    for topic in &topics.repartition {
        println!("{verb} delete repartition topic {topic}: the commands in flight in it belong to the run being reset; the next run creates it again");
    }
    for topic in &topics.timers {
        println!("{verb} delete timers topic {topic}: its pending timers belong to the run being reset; the next run creates it again");
    }
    if args.dry_run {
        println!("dry run: nothing changed");
        return Ok(ExitCode::SUCCESS);
    }
    let admin: AdminClient<DefaultClientContext> = app.config().create()?;
    let opts = AdminOptions::new().operation_timeout(Some(app.timeout)).request_timeout(Some(app.timeout));
    if committed > 0 {
        for r in admin.delete_groups(&[&app.group], &opts).await.context("deleting the group's offsets")? {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                Err((_, RDKafkaErrorCode::NonEmptyGroup)) => bail!(
                    "group {} has running members: stop every instance of the flow first (a reset under a running flow would mix old and new state)",
                    app.group
                ),
                Err((_, code)) => bail!("cannot delete the offsets of group {}: {code}", app.group),
            }
        }
        println!("deleted the committed offsets of group {}", app.group);
    }
    // A compacted topic refuses DeleteRecords: a journal topic is deleted, and the next run
    // creates it again (empty); a repartition topic too.
    let doomed: Vec<&str> = journals
        .iter()
        .filter(|(_, marks)| marks.is_some())
        .map(|(t, _)| t.as_str())
        .chain(topics.repartition.iter().map(String::as_str))
        .chain(topics.timers.iter().map(String::as_str))
        .collect();
    if doomed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for r in admin.delete_topics(&doomed, &opts).await.context("deleting the application's topics")? {
        if let Err((topic, code)) = r {
            if code != RDKafkaErrorCode::UnknownTopicOrPartition {
                bail!("cannot delete topic {topic}: {code}");
            }
        }
    }
    // Deletion is asynchronous: wait until the topics are gone, so that a run started right
    // after does not find one half-deleted.
    let consumer: BaseConsumer = app.config().create()?;
    let deadline = std::time::Instant::now() + app.timeout;
    for topic in &doomed {
        loop {
            let md = consumer.fetch_metadata(Some(topic), app.timeout).context("reading metadata")?;
            if md.topics().iter().all(|t| t.name() != *topic || t.error().is_some()) {
                break;
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "topic {topic} is still being deleted after {}; run reset again",
                    humantime::format_duration(app.timeout)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if journals.iter().any(|(t, _)| t == topic) {
            println!("deleted journal {topic} (the next run creates it again, empty); a flow's local state store (--state-dir) notices and rebuilds");
        } else if topics.timers.iter().any(|t| t == topic) {
            println!("deleted timers topic {topic}");
        } else {
            println!("deleted repartition topic {topic}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instances_figures_are_those_of_the_group_summed_over_its_stages() {
        let body = "# TYPE eventstage_flow_cache_hits_total counter
eventstage_flow_cache_hits_total{group=\"g1\",stage=\"bank\"} 900
eventstage_flow_cache_hits_total{group=\"g1\",stage=\"other\"} 100
eventstage_flow_cache_hits_total{group=\"g10\",stage=\"bank\"} 5
eventstage_flow_cache_misses_total{stage=\"bank\",group=\"g1\"} 250
eventstage_flow_cache_bytes{group=\"g1\"} 1048576
eventstage_flow_assigned_partitions{group=\"g1\",stage=\"bank\"} 2
eventstage_flow_lag_records{group=\"g1\",stage=\"bank\"} 7
eventstage_flow_lag_records{group=\"g1\",stage=\"bank\",topic=\"t\",partition=\"0\"} 4
eventstage_flow_lag_records{group=\"g1\",stage=\"bank\",topic=\"t\",partition=\"1\"} 3
eventstage_flow_commit_seconds_bucket{group=\"g1\",stage=\"bank\",le=\"0.1\"} 7
not a sample
";
        let f = InstanceFigures::parse(body, "g1");
        assert_eq!((f.hits, f.misses, f.cache_bytes, f.partitions), (1000.0, 250.0, 1048576.0, 2.0));
        // The lag's total, not its per-partition samples added to it.
        assert_eq!(f.lag, 7.0);
        let text = f.describe("h:1");
        assert!(text.contains("1000 hits, 250 misses (80.0 % hits)") && text.contains("1.0 MiB"), "{text}");
        assert!(InstanceFigures::parse(body, "g2").describe("h:1").contains("runs no flow of this group"));
        // An application's stages, each on a line of its own.
        let app = "eventstage_flow_assigned_partitions{group=\"a\",stage=\"bank\"} 2
eventstage_flow_assigned_partitions{group=\"a\",stage=\"transfer\"} 2
eventstage_flow_lag_records{group=\"a\",stage=\"transfer\"} 5
eventstage_flow_timers_pending{group=\"a\",stage=\"transfer\"} 3
eventstage_flow_forwarded_total{group=\"a\",stage=\"bank\"} 9
";
        let text = InstanceFigures::parse(app, "a").describe("h:1");
        assert!(text.contains("instance h:1: 4 partitions, lag 5"), "{text}");
        assert!(text.contains("stage bank: 2 partitions, lag 0, 0 timers pending, 9 inputs forwarded"), "{text}");
        assert!(text.contains("stage transfer: 2 partitions, lag 5, 3 timers pending, 0 inputs forwarded"), "{text}");
    }
}
