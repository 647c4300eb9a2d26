//! The broker under test: Apache Kafka started here (`eventstage-testkafka`, one node tuned for
//! measurements, stopped when this process exits) or EVENTSTAGE_TEST_BROKERS; topic admin.

use super::*;
use eventstage_testkafka::{Cluster, Settings};

/// The cluster under test: ours (one Apache Kafka node) or the one named by `EVENTSTAGE_TEST_BROKERS`.
pub(crate) struct Broker {
    pub(crate) brokers: String,
    pub(crate) own: Option<Cluster>,
}

impl Broker {
    pub(crate) fn start() -> Result<Self> {
        if let Ok(b) = std::env::var("EVENTSTAGE_TEST_BROKERS") {
            wait_ready(&b)?;
            return Ok(Self { brokers: b, own: None });
        }
        // Full JIT and a 2 GiB heap (the tests' quick start would cost throughput).
        let cluster = Cluster::start(Settings::bench())?;
        Ok(Self { brokers: cluster.bootstrap(), own: Some(cluster) })
    }

    /// CPU seconds the broker process used so far (our own broker on Linux only).
    pub(crate) fn cpu(&self) -> Option<f64> {
        stat_cpu(&format!("/proc/{}/stat", self.pid()?))
    }

    /// CPU seconds the broker JVM's JIT compiler threads (`C1`/`C2 CompilerThread`) used so far.
    pub(crate) fn jit_cpu(&self) -> Option<f64> {
        tasks_cpu(&self.pid()?.to_string(), |comm| comm.contains("CompilerThre"))
    }

    /// Resident memory of the broker process, in MiB.
    pub(crate) fn rss_mib(&self) -> Option<u64> {
        rss_mib(self.pid()?)
    }

    /// The broker's JVM pid.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.own.as_ref()?.pid(0)
    }
}

pub(crate) fn wait_ready(brokers: &str) -> Result<()> {
    eventstage_testkafka::wait_ready(brokers, 1, Duration::from_secs(30))
}

pub(crate) fn unique(prefix: &str) -> String {
    format!("e2e-{prefix}-{:08x}", rand::random::<u32>())
}

pub(crate) fn create_topics(rt: &tokio::runtime::Runtime, brokers: &str, topics: &[&str]) -> Result<()> {
    create_topics_with(rt, brokers, topics, &[])
}

/// Creates a flow's journal topic as `KafkaJournal::ensure` would (compacted, [`PARTITIONS`]
/// partitions), before the flow starts: like the other topics of a run, its creation is not part of
/// the figures measured from the flow's start.
pub(crate) fn create_journal_topic(rt: &tokio::runtime::Runtime, brokers: &str, topic: &str) -> Result<()> {
    create_topics_with(rt, brokers, &[topic], &[("cleanup.policy", "compact")])
}

/// Creates `topics` with [`PARTITIONS`] partitions and the topic configs `config`, then waits until
/// the broker's metadata lists every partition of each with a leader. Kafka creates topics
/// asynchronously: CreateTopics answers once the controller has the topic, and metadata can lack it
/// for a moment after.
pub(crate) fn create_topics_with(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topics: &[&str],
    config: &[(&str, &str)],
) -> Result<()> {
    create_topics_of(rt, brokers, topics, PARTITIONS, config)
}

/// [`create_topics_with`] with `partitions` partitions.
pub(crate) fn create_topics_of(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topics: &[&str],
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| config.iter().fold(NewTopic::new(t, partitions, TopicReplication::Fixed(1)), |n, (k, v)| n.set(k, v)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), admin.create_topics(&new, &opts)).await })
        .context("create topics: timed out")??;
    for r in results {
        r.map_err(|(t, code)| anyhow!("create topic {t}: {code}"))?;
    }
    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let end = Instant::now() + Duration::from_secs(30);
    for topic in topics {
        loop {
            let ready = client.fetch_metadata(Some(topic), Duration::from_secs(5)).is_ok_and(|md| {
                md.topics().iter().any(|t| {
                    t.name() == *topic
                        && t.error().is_none()
                        && t.partitions().len() == partitions as usize
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                })
            });
            if ready {
                break;
            }
            if Instant::now() >= end {
                bail!("topic {topic} was created but is not in the broker's metadata with {partitions} partitions after 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Deletes topics a measurement is done with (keeps the broker's disk and page cache small); best effort.
pub(crate) fn delete_topics(rt: &tokio::runtime::Runtime, brokers: &str, topics: &[&str]) {
    let Ok(admin) = ClientConfig::new().set("bootstrap.servers", brokers).create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let deleted =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), admin.delete_topics(topics, &opts)).await });
    if !matches!(deleted, Ok(Ok(_))) {
        tracing::debug!(?topics, "could not delete topics");
    }
}

/// Resident memory of process `pid`, in MiB (Linux).
pub(crate) fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024)
}
