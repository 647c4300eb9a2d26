//! The Kafka broker of the tests: the cluster named by `EVENTSTAGE_TEST_BROKERS`, or a noida-db
//! broker this process starts on a free port (killed when this process exits).

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::DEADLINE;

/// `bootstrap.servers` of the test cluster.
pub fn brokers() -> String {
    if let Ok(b) = std::env::var("EVENTSTAGE_TEST_BROKERS") {
        return b;
    }
    static SHARED: OnceLock<String> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let b = LocalBroker::start();
            let addr = b.brokers.clone();
            // Kept for the life of the process; its watchdog kills the broker when we exit.
            std::mem::forget(b);
            addr
        })
        .clone()
}

fn noida_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NOIDA_DB_BIN") {
        return p.into();
    }
    let out = Command::new("python3")
        .args(["-c", "import noida_db,os;print(os.path.join(os.path.dirname(noida_db.__file__),'noida-db'))"])
        .output()
        .expect("python3 (noida-db is installed with `python3 -m pip install noida-db==0.2.3`; .ci/run does it)");
    assert!(
        out.status.success(),
        "noida-db is not installed: run `python3 -m pip install noida-db==0.2.3`, or set EVENTSTAGE_TEST_BROKERS"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A noida-db broker process of our own.
pub struct LocalBroker {
    pub brokers: String,
    pub data: tempfile::TempDir,
    child: Child,
    watchdog: Option<ChildStdin>,
}

impl LocalBroker {
    /// Starts a broker on a free port and waits until it answers metadata requests.
    pub fn start() -> Self {
        let b = Self::spawn(free_port(), tempfile::tempdir().unwrap());
        wait_ready(&b.brokers);
        b
    }

    /// Starts a broker on `port` with `data` and does not wait.
    pub fn spawn(port: u16, data: tempfile::TempDir) -> Self {
        // `sh` runs the broker and waits for its stdin to close (this process exiting, or `stop`),
        // then stops the broker: no broker outlives the tests.
        let script = r#""$0" start --only kafka --host 127.0.0.1 --kafka-port "$1" --data-dir "$2" >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid; wait $pid"#;
        let mut child = Command::new("sh")
            .args(["-c", script])
            .arg(noida_bin())
            .arg(port.to_string())
            .arg(data.path())
            .stdin(Stdio::piped())
            .spawn()
            .expect("start noida-db");
        let watchdog = child.stdin.take();
        Self { brokers: format!("127.0.0.1:{port}"), data, child, watchdog }
    }

    /// Stops the broker (its data stays in `data`).
    pub fn stop(mut self) -> tempfile::TempDir {
        drop(self.watchdog.take());
        let _ = self.child.wait();
        std::mem::replace(&mut self.data, tempfile::tempdir().unwrap())
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.flush();
        }
        let _ = self.child.wait();
    }
}

/// Waits until `brokers` answers a metadata request.
pub fn wait_ready(brokers: &str) {
    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let end = Instant::now() + DEADLINE;
    while client.fetch_metadata(None, Duration::from_millis(500)).is_err() {
        assert!(Instant::now() < end, "the broker at {brokers} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A topic name of its own for one test.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let mut t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
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
///
/// noida-db 0.2.3 sometimes stops serving a read_committed consumer whose fetch position sits on a
/// transaction marker (a fetch from that exact offset returns nothing, forever), while a consumer
/// reading from the start reads on. So after a stall the reader reconnects from the start and skips
/// what it has: no record is counted twice or skipped.
pub fn read_committed(brokers: &str, topic: &str, done: impl Fn(&[Rec]) -> bool, settle: Duration) -> Vec<Rec> {
    let connect = |positions: &BTreeMap<i32, i64>| {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in positions.keys() {
            tpl.add_partition_offset(topic, *p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        consumer
    };
    let partitions = {
        let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
        let md = probe.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        md.topics()[0].partitions().len() as i32
    };
    let mut positions: BTreeMap<i32, i64> = (0..partitions).map(|p| (p, 0)).collect();
    let mut consumer = connect(&positions);
    let mut out = Vec::new();
    let end = Instant::now() + DEADLINE * 4;
    let mut settle_until: Option<Instant> = None;
    let mut last_record = Instant::now();
    loop {
        if let Some(s) = settle_until {
            if Instant::now() >= s {
                break;
            }
        } else if done(&out) {
            settle_until = Some(Instant::now() + settle);
        }
        assert!(Instant::now() < end, "timed out reading {topic}: {} records so far", out.len());
        if last_record.elapsed() > Duration::from_secs(5) {
            consumer = connect(&positions);
            last_record = Instant::now();
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            last_record = Instant::now();
            if m.offset() < positions[&m.partition()] {
                continue;
            }
            positions.insert(m.partition(), m.offset() + 1);
            let headers = m
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
                .unwrap_or_default();
            out.push(Rec { key: m.key().map(<[u8]>::to_vec), value: m.payload().map(<[u8]>::to_vec), headers });
        }
    }
    out
}
