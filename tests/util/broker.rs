//! The Kafka cluster of the tests: the one named by `EVENTSTAGE_TEST_BROKERS`, or Apache Kafka
//! started by this process (`eventstage-testkafka`: one shared node for the binary, or a cluster of
//! a test's own), stopped when this process exits.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

pub use eventstage_testkafka::{free_port, Cluster, Settings};

use super::DEADLINE;

/// `bootstrap.servers` of the test cluster shared by the whole binary.
pub fn brokers() -> String {
    eventstage_testkafka::shared()
}

/// A cluster of the test's own, for tests that stop, kill or restart brokers.
pub fn own_cluster(settings: Settings) -> Cluster {
    Cluster::start(settings).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until `brokers` answers a metadata request.
pub fn wait_ready(brokers: &str) {
    eventstage_testkafka::wait_ready(brokers, 1, DEADLINE * 2).unwrap_or_else(|e| panic!("{e:#}"));
}

/// A topic name of its own for one test.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    // -1: the cluster's default.replication.factor (1 on one node, 3 on three).
    let mut t = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    for (k, v) in config {
        t = t.set(k, v);
    }
    let r = admin.create_topics(&[t], &AdminOptions::new()).await.unwrap();
    r.into_iter().for_each(|r| {
        r.unwrap();
    });
}

/// A plain idempotent producer for feeding inputs.
pub fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

pub fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, value: &[u8]) {
    loop {
        match p.send(BaseRecord::to(topic).key(key).payload(value)) {
            Ok(()) => return,
            Err((_, _)) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

pub fn flush(p: &ThreadedProducer<DefaultProducerContext>) {
    p.flush(Duration::from_secs(30)).unwrap();
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Rec {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Reads `topic` from the beginning with read_committed until `done(records)` holds (or panics at
/// the deadline), then reads on for `settle` to catch duplicates.
pub fn read_committed(brokers: &str, topic: &str, done: impl Fn(&[Rec]) -> bool, settle: Duration) -> Vec<Rec> {
    let consumer: BaseConsumer = eventstage_testkafka::read_committed_reader(brokers).create().unwrap();
    let partitions =
        consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap().topics()[0].partitions().len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let end = Instant::now() + DEADLINE * 4;
    let mut settle_until: Option<Instant> = None;
    loop {
        if let Some(s) = settle_until {
            if Instant::now() >= s {
                break;
            }
        } else if done(&out) {
            settle_until = Some(Instant::now() + settle);
        }
        assert!(Instant::now() < end, "timed out reading {topic}: {} records so far", out.len());
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
                .unwrap_or_default();
            out.push(Rec { key: m.key().map(<[u8]>::to_vec), value: m.payload().map(<[u8]>::to_vec), headers });
        }
    }
    out
}
