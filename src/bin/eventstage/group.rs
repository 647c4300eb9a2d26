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

/// `reset`'s own flags.
#[derive(Debug, clap::Args)]
pub(crate) struct ResetArgs {
    #[command(flatten)]
    app: GroupArgs,
    /// Print what would be done and change nothing.
    #[arg(long)]
    dry_run: bool,
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
    /// The journal topic's owner and offsets; None when it does not exist.
    async fn journal_marks(&self) -> anyhow::Result<Option<JournalMarks>> {
        let (config, topic, timeout) = (self.config(), self.journal_topic(), self.timeout);
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

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    /// Every partition of the input topics, with the group's committed offset and its end.
    fn input_offsets(&self) -> anyhow::Result<Vec<InputOffset>> {
        let mut config = self.config();
        config.set("group.id", &self.group).set("enable.auto.commit", "false");
        let consumer: BaseConsumer = config.create()?;
        let mut tpl = TopicPartitionList::new();
        for topic in &self.input {
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

/// `eventstage describe --group G`.
pub(crate) async fn describe(args: GroupArgs) -> anyhow::Result<ExitCode> {
    let offsets = tokio::task::spawn_blocking({
        let args = args.clone();
        move || args.input_offsets()
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
    let topic = args.journal_topic();
    match args.journal_marks().await? {
        None => println!("journal {topic}: none (the next run creates it)"),
        Some(marks) => {
            let owner = marks.owner.map_or_else(|| "no recorded owner".to_string(), |o| format!("owned by group {o}"));
            println!("journal {topic} ({owner})");
            println!("{:<24} {:>9} {:>12} {:>12}", "journal", "partition", "start", "end");
            for (p, low, high) in marks.partitions {
                println!("{topic:<24} {p:>9} {low:>12} {high:>12}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `eventstage reset --group G`: deletes the group's committed offsets (its next run reads the
/// inputs from the start) and its Kafka journal topic (its next run creates it again and starts
/// with no state). The group must have no running member.
pub(crate) async fn reset(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let app = &args.app;
    let offsets = tokio::task::spawn_blocking({
        let a = app.clone();
        move || a.input_offsets()
    })
    .await??;
    let topic = app.journal_topic();
    let journal = app.journal_marks().await?;
    let committed = offsets.iter().filter(|o| o.committed.is_some()).count();
    let verb = if args.dry_run { "would" } else { "will" };
    println!(
        "{verb} delete the committed offsets of group {} ({committed} of {} input partitions have one): its next run reads {} from the start",
        app.group,
        offsets.len(),
        app.input.join(", ")
    );
    match &journal {
        Some(marks) => {
            let records: i64 = marks.partitions.iter().map(|(_, l, h)| h - l).sum();
            println!("{verb} delete journal {topic} ({records} records): the next run creates it again and starts with no state");
        }
        None => println!("journal {topic} does not exist: nothing to empty"),
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
    if journal.is_some() {
        // A compacted topic refuses DeleteRecords: the journal topic is deleted, and the next run
        // creates it again (empty). Deletion is asynchronous: wait until the topic is gone, so that
        // a run started right after does not find it half-deleted.
        for r in admin.delete_topics(&[&topic], &opts).await.context("deleting the journal topic")? {
            if let Err((_, code)) = r {
                if code != RDKafkaErrorCode::UnknownTopicOrPartition {
                    bail!("cannot delete journal topic {topic}: {code}");
                }
            }
        }
        let consumer: BaseConsumer = app.config().create()?;
        let deadline = std::time::Instant::now() + app.timeout;
        loop {
            let md = consumer.fetch_metadata(Some(&topic), app.timeout).context("reading metadata")?;
            let gone = md.topics().iter().all(|t| t.name() != topic || t.error().is_some());
            if gone {
                break;
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "journal topic {topic} is still being deleted after {}; run reset again",
                    humantime::format_duration(app.timeout)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("deleted journal {topic} (the next run creates it again, empty); a flow's local state store (--state-dir) notices and rebuilds");
    }
    Ok(ExitCode::SUCCESS)
}
