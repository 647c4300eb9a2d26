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

    /// Resident memory of the broker process, in MiB.
    pub(crate) fn rss_mib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kib: u64 =
            status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib / 1024)
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
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), admin.create_topics(&new, &opts)).await })
        .context("create topics: timed out")??;
    for r in results {
        r.map_err(|(t, code)| anyhow!("create topic {t}: {code}"))?;
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
