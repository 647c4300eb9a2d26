//! Apache Kafka for eventstage's tests and benchmarks: resolves the broker's jars with Maven on first
//! use (cached under `target/`), formats KRaft log directories and runs one node or a three-node
//! cluster on 127.0.0.1 and free ports. No broker outlives the process that started it.
//!
//! - [`shared`]: the cluster of a whole test binary: `EVENTSTAGE_TEST_BROKERS` if set, otherwise
//!   one node started on first use.
//! - [`Cluster::start`]: a cluster of one's own, for tests that stop, kill or restart brokers.
//!
//! What it needs on the machine: a Java 17+ runtime (`java`) and Apache Maven (`mvn`) with access to
//! Maven Central on the first run; a missing one is an error that names the fix.

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The pom that names the broker's jars (Kafka version pinned there).
const POM: &str = include_str!("../pom.xml");
const LOG4J: &str = include_str!("../log4j2.properties");

/// How long a cluster may take to answer metadata requests with all its brokers.
const START_DEADLINE: Duration = Duration::from_secs(90);

/// What kind of cluster to start.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Nodes, each a combined broker and controller (1 or 3).
    pub nodes: usize,
    /// Heap per node, in MiB.
    pub heap_mib: u32,
    /// Starts the JVM faster at the cost of peak speed (C1 only): for tests, not for benchmarks.
    pub quick_jit: bool,
    /// Broker properties added to (or replacing) the defaults of [`Cluster::start`].
    pub properties: Vec<(String, String)>,
}

impl Settings {
    /// One node, as the tests use it.
    pub fn single() -> Self {
        Self { nodes: 1, heap_mib: 1024, quick_jit: true, properties: Vec::new() }
    }

    /// Three nodes, replication factor 3, `min.insync.replicas=2`; brokers fenced 2 s after they die.
    pub fn three() -> Self {
        Self { nodes: 3, heap_mib: 512, quick_jit: true, properties: Vec::new() }
    }

    /// One node tuned for measurements: full JIT, a larger heap.
    pub fn bench() -> Self {
        Self { nodes: 1, heap_mib: 2048, quick_jit: false, properties: Vec::new() }
    }

    /// Sets a broker property.
    pub fn property(mut self, key: &str, value: &str) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }
}

/// `bootstrap.servers` of the test binary's cluster: `EVENTSTAGE_TEST_BROKERS`, or one node started
/// on first use and kept until the process exits (its watchdog stops it and removes its data then).
///
/// # Panics
/// If the broker cannot be started: the message names what is missing and the fix.
pub fn shared() -> String {
    static SHARED: OnceLock<String> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Ok(b) = std::env::var("EVENTSTAGE_TEST_BROKERS") {
                return b;
            }
            let cluster = Cluster::start(Settings::single()).unwrap_or_else(|e| panic!("{e:#}"));
            let brokers = cluster.bootstrap();
            cluster.leak();
            brokers
        })
        .clone()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind a free port")
}

/// The configuration of a consumer that reads what `read_committed` consumers see, from the
/// beginning, in a group of its own (a random id) that commits nothing: how the tests and the bench
/// read a flow's outputs.
pub fn read_committed_reader(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{:016x}", rand::random::<u64>()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    config
}

/// Waits until `brokers` answers a metadata request listing at least `count` brokers.
pub fn wait_ready(brokers: &str, count: usize, deadline: Duration) -> Result<()> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("log_level", "0")
        .create()
        .context("create a metadata client")?;
    let end = Instant::now() + deadline;
    loop {
        let seen = match client.fetch_metadata(None, Duration::from_millis(500)) {
            Ok(md) => md.brokers().len(),
            Err(_) => 0,
        };
        if seen >= count {
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("the Kafka cluster at {brokers} did not answer metadata with {count} broker(s) within {deadline:?} (saw {seen})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The resolved jars of the pinned Kafka version (a directory for `java -cp DIR/*`).
///
/// Resolved once per pom with `mvn dependency:copy-dependencies` into
/// `target/eventstage-kafka/<pom hash>/libs` (`EVENTSTAGE_KAFKA_LIBS` names a directory of jars
/// instead); later calls only check a marker file. Concurrent processes wait for one another.
pub fn jars() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("EVENTSTAGE_KAFKA_LIBS") {
        return Ok(PathBuf::from(dir));
    }
    let cache = target_dir().join("eventstage-kafka").join(format!("{:016x}", fnv1a(POM.as_bytes())));
    let libs = cache.join("libs");
    let done = cache.join("resolved");
    if done.exists() {
        return Ok(libs);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let lock =
        std::fs::File::create(cache.join("lock")).with_context(|| format!("create a lock in {}", cache.display()))?;
    lock.lock().with_context(|| format!("lock {}", cache.display()))?;
    if done.exists() {
        return Ok(libs);
    }
    which("mvn").ok_or_else(|| {
        anyhow!(
            "Apache Maven (`mvn`) is not on PATH; the tests need it once to fetch Apache Kafka's jars from \
             Maven Central. Install it (Debian: `apt-get install maven`), or point EVENTSTAGE_KAFKA_LIBS at a \
             directory of Kafka's jars, or run against a cluster of yours with EVENTSTAGE_TEST_BROKERS=host:port"
        )
    })?;
    let pom = cache.join("pom.xml");
    std::fs::write(&pom, POM).with_context(|| format!("write {}", pom.display()))?;
    let _ = std::fs::remove_dir_all(&libs);
    eprintln!("eventstage-testkafka: resolving Apache Kafka's jars with Maven into {} (once)", libs.display());
    let out = Command::new("mvn")
        .args(["-B", "-q", "-f"])
        .arg(&pom)
        .args(["dependency:copy-dependencies", "-DincludeScope=runtime"])
        .arg(format!("-DoutputDirectory={}", libs.display()))
        .output()
        .context("run mvn")?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!(
            "Maven could not resolve Apache Kafka's jars ({}): is Maven Central (https://repo.maven.apache.org) \
             reachable from here (proxy settings in ~/.m2/settings.xml)? Or point EVENTSTAGE_KAFKA_LIBS at a \
             directory of Kafka's jars. Maven said:\n{}",
            pom.display(),
            tail.join("\n")
        );
    }
    std::fs::write(&done, b"").with_context(|| format!("write {}", done.display()))?;
    Ok(libs)
}

/// `java`, checked to be 17 or newer (Kafka 4 brokers need it).
fn java() -> Result<PathBuf> {
    static JAVA: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    JAVA.get_or_init(|| {
        let java = match std::env::var_os("JAVA_HOME") {
            Some(home) if Path::new(&home).join("bin/java").exists() => Path::new(&home).join("bin/java"),
            _ => which("java").ok_or(
                "no `java` on PATH: Apache Kafka 4 needs a Java 17+ runtime (Debian: `apt-get install \
                 openjdk-17-jre-headless`; or set JAVA_HOME), or run against a cluster of yours with \
                 EVENTSTAGE_TEST_BROKERS=host:port",
            )?,
        };
        let out = Command::new(&java).arg("-version").output().map_err(|e| format!("run {}: {e}", java.display()))?;
        let text = String::from_utf8_lossy(&out.stderr);
        let major = text
            .split('"')
            .nth(1)
            .and_then(|v| v.split(['.', '-', '+']).next())
            .and_then(|m| m.parse::<u32>().ok())
            .unwrap_or(0);
        if major < 17 {
            return Err(format!(
                "{} is not Java 17 or newer ({}): Apache Kafka 4 needs 17+; set JAVA_HOME to one",
                java.display(),
                text.lines().next().unwrap_or("no version")
            ));
        }
        Ok(java)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// The cargo target directory of this workspace.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A random KRaft cluster id: 16 random bytes, base64url without padding (as `Uuid.toString`),
/// never starting with `-` (Kafka refuses those as command-line arguments).
fn cluster_id() -> String {
    use base64::Engine as _;
    loop {
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
        if !id.starts_with('-') {
            return id;
        }
    }
}

/// One node of a [`Cluster`].
struct Node {
    id: usize,
    port: u16,
    controller_port: u16,
    dir: PathBuf,
    process: Option<Process>,
}

/// A running broker JVM under its watchdog shell.
struct Process {
    /// `sh` that started the JVM and stops it when its stdin closes (we exit or stop it).
    watchdog: Child,
    stdin: Option<ChildStdin>,
    /// The JVM's pid.
    pid: u32,
}

/// How [`Process::stop`] ends a node.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// SIGTERM (a controlled shutdown; SIGKILL 10 s later if it hangs); the data stays.
    Clean,
    /// SIGKILL; the data stays.
    Kill,
    /// SIGKILL, and the node's data is removed.
    Discard,
}

impl Process {
    /// Closes the watchdog's stdin (with its orders) and waits until it has stopped the JVM.
    fn stop(mut self, how: Stop) {
        if let Some(mut stdin) = self.stdin.take() {
            let orders = match how {
                Stop::Clean => "term\nkeep\n",
                Stop::Kill => "kill\nkeep\n",
                Stop::Discard => "",
            };
            let _ = stdin.write_all(orders.as_bytes());
        }
        let _ = self.watchdog.wait();
    }
}

/// A Kafka cluster of one or three KRaft nodes (each broker and controller) started by this
/// process. Dropping it stops every node and removes the data.
pub struct Cluster {
    settings: Settings,
    cluster_id: String,
    nodes: Vec<Node>,
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Resolves the jars, formats a fresh log directory per node, starts every node and waits until
    /// a metadata request lists them all.
    pub fn start(settings: Settings) -> Result<Self> {
        if settings.nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        java()?;
        jars()?;
        let dir =
            tempfile::Builder::new().prefix("eventstage-kafka-").tempdir().context("create the cluster's directory")?;
        let nodes = (1..=settings.nodes)
            .map(|id| Node {
                id,
                port: free_port(),
                controller_port: free_port(),
                dir: dir.path().join(format!("node-{id}")),
                process: None,
            })
            .collect();
        let mut cluster = Self { settings, cluster_id: cluster_id(), nodes, dir: Some(dir) };
        for i in 0..cluster.nodes.len() {
            cluster.format(i)?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// `bootstrap.servers` for clients: every node.
    pub fn bootstrap(&self) -> String {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// The address of node `i` (0-based; its broker id is `i + 1`).
    pub fn address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].port)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The JVM pid of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].process.as_ref().map(|p| p.pid)
    }

    /// Index of the node whose broker id is `id`.
    pub fn node_of_broker(&self, id: i32) -> Option<usize> {
        self.nodes.iter().position(|n| n.id as i32 == id)
    }

    /// The node's log file (broker output), for diagnosing a failure.
    pub fn log_file(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("server.log")
    }

    /// Stops node `i` cleanly (SIGTERM, controlled shutdown) and waits for its JVM to exit. Its data stays.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].process.take() {
            p.stop(Stop::Clean);
        }
    }

    /// Kills node `i` with SIGKILL (no shutdown at all) and waits for its JVM to be gone. Its data stays.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].process.take() {
            p.stop(Stop::Kill);
        }
    }

    /// Starts node `i` again on its ports and data (after [`stop_node`](Self::stop_node) or
    /// [`kill_node`](Self::kill_node)) and does not wait for it.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].process.is_some() {
            bail!("node {} is running", self.nodes[i].id);
        }
        self.spawn(i)
    }

    /// Waits until a metadata request lists every running node.
    pub fn wait_ready(&self) -> Result<()> {
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.process.is_some()).collect();
        let bootstrap = running.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",");
        wait_ready(&bootstrap, running.len(), START_DEADLINE).map_err(|e| {
            let mut logs = String::new();
            for n in &running {
                let _ = write!(
                    logs,
                    "\n--- {} (last lines) ---\n{}",
                    n.dir.join("server.log").display(),
                    tail(&n.dir.join("server.log"), 20)
                );
            }
            anyhow!("{e:#}{logs}")
        })
    }

    /// Waits until every replica of every partition is in sync (no under-replicated partition),
    /// as an operator waits between the steps of a rolling restart: a broker that was just
    /// restarted answers metadata long before it has caught up and rejoined the ISRs.
    pub fn wait_in_sync(&self, deadline: Duration) -> Result<()> {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("log_level", "0")
            .create()
            .context("create a metadata client")?;
        let end = Instant::now() + deadline;
        loop {
            let lagging: Vec<String> = match client.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(md) => md
                    .topics()
                    .iter()
                    .flat_map(|t| {
                        t.partitions()
                            .iter()
                            .filter(|p| p.leader() < 0 || p.isr().len() < p.replicas().len())
                            .map(move |p| format!("{}[{}]", t.name(), p.id()))
                    })
                    .collect(),
                Err(e) => vec![e.to_string()],
            };
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() >= end {
                bail!("partitions still under-replicated after {deadline:?}: {}", lagging.join(", "));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Keeps the cluster running until this process exits: then the watchdogs kill the nodes and
    /// remove their data.
    pub fn leak(mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        std::mem::forget(self);
    }

    /// The node's `server.properties`.
    fn properties(&self, node: &Node) -> String {
        let voters: Vec<String> =
            self.nodes.iter().map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port)).collect();
        let rf = self.nodes.len().min(3);
        let min_isr = if rf >= 3 { 2 } else { 1 };
        let mut props: Vec<(String, String)> = [
            ("process.roles", "broker,controller".to_string()),
            ("node.id", node.id.to_string()),
            ("controller.quorum.voters", voters.join(",")),
            (
                "listeners",
                format!("PLAINTEXT://127.0.0.1:{},CONTROLLER://127.0.0.1:{}", node.port, node.controller_port),
            ),
            ("advertised.listeners", format!("PLAINTEXT://127.0.0.1:{}", node.port)),
            ("inter.broker.listener.name", "PLAINTEXT".into()),
            ("controller.listener.names", "CONTROLLER".into()),
            ("listener.security.protocol.map", "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".into()),
            ("log.dirs", node.dir.join("data").display().to_string()),
            ("num.partitions", "1".into()),
            ("default.replication.factor", rf.to_string()),
            ("min.insync.replicas", min_isr.to_string()),
            ("offsets.topic.replication.factor", rf.to_string()),
            ("offsets.topic.num.partitions", "5".into()),
            ("transaction.state.log.replication.factor", rf.to_string()),
            ("transaction.state.log.min.isr", min_isr.to_string()),
            ("transaction.state.log.num.partitions", "5".into()),
            ("share.coordinator.state.topic.replication.factor", rf.to_string()),
            ("share.coordinator.state.topic.min.isr", min_isr.to_string()),
            ("group.initial.rebalance.delay.ms", "0".into()),
            ("num.network.threads", "2".into()),
            ("num.io.threads", "4".into()),
            ("num.recovery.threads.per.data.dir", "2".into()),
            // Compaction in seconds, not minutes (tests make their topics roll segments quickly).
            ("log.cleaner.backoff.ms", "100".into()),
            ("log.cleaner.threads", "1".into()),
            ("log.cleaner.dedupe.buffer.size", "16777216".into()),
            // A transaction past its timeout is aborted within a second (default: 10 s).
            ("transaction.abort.timed.out.transaction.cleanup.interval.ms", "1000".into()),
            // KIP-848 groups (group.protocol=consumer) notice members and leaves quickly.
            ("group.consumer.heartbeat.interval.ms", "1000".into()),
            ("group.consumer.min.heartbeat.interval.ms", "500".into()),
            ("group.consumer.session.timeout.ms", "10000".into()),
            ("group.consumer.min.session.timeout.ms", "6000".into()),
            // A killed broker is fenced (its leaderships move) within two seconds.
            ("broker.session.timeout.ms", "2000".into()),
            ("broker.heartbeat.interval.ms", "500".into()),
            ("controlled.shutdown.enable", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in &self.settings.properties {
            props.retain(|(key, _)| key != k);
            props.push((k.clone(), v.clone()));
        }
        props.into_iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }

    /// Writes node `i`'s configuration and formats its log directory with the cluster's id.
    fn format(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        std::fs::create_dir_all(&node.dir).with_context(|| format!("create {}", node.dir.display()))?;
        std::fs::write(node.dir.join("server.properties"), self.properties(node))?;
        std::fs::write(node.dir.join("log4j2.properties"), LOG4J)?;
        let out = Command::new(java()?)
            .args(["-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp"])
            .arg(jars()?.join("*"))
            .args(["kafka.tools.StorageTool", "format", "-t", &self.cluster_id, "-c"])
            .arg(node.dir.join("server.properties"))
            .output()
            .context("run Kafka's StorageTool")?;
        if !out.status.success() {
            bail!(
                "formatting {} failed: {}{}",
                node.dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts node `i`'s JVM under a watchdog shell: when the watchdog's stdin closes (this process
    /// exits, however it exits, or the node is stopped), it stops the JVM and, if it was given a
    /// directory on its stdin, removes it.
    fn spawn(&mut self, i: usize) -> Result<()> {
        let java = java()?;
        let jars = jars()?;
        let node = &self.nodes[i];
        let mut args: Vec<String> = vec![
            format!("-Xms{}m", self.settings.heap_mib.min(256)),
            format!("-Xmx{}m", self.settings.heap_mib),
            "-XX:+UseG1GC".into(),
            "-XX:MaxGCPauseMillis=20".into(),
            "-XX:+ExitOnOutOfMemoryError".into(),
            "-Djava.awt.headless=true".into(),
            format!("-Dlog4j2.configurationFile={}", node.dir.join("log4j2.properties").display()),
        ];
        if self.settings.quick_jit {
            args.push("-XX:TieredStopAtLevel=1".into());
        }
        args.extend(["-cp".into(), jars.join("*").display().to_string(), "kafka.Kafka".into()]);
        args.push(node.dir.join("server.properties").display().to_string());
        // Orders on stdin, read once it closes: `term` (a controlled shutdown) or SIGKILL by
        // default; `keep` keeps the node's data (a restart follows), otherwise it is removed, and
        // the cluster's directory with the last node's. With no orders at all (this process died,
        // however it died), the JVM is killed and its data removed.
        let script = r#"log="$1"; dir="$2"; shift 2
"$@" >>"$log" 2>&1 &
pid=$!
echo "$pid"
orders=$(cat)
case "$orders" in
  *term*) kill -TERM "$pid" 2>/dev/null ;;
  *) kill -KILL "$pid" 2>/dev/null ;;
esac
( sleep 10; kill -KILL "$pid" 2>/dev/null ) &
killer=$!
wait "$pid"
kill "$killer" 2>/dev/null
case "$orders" in
  *keep*) ;;
  *) rm -rf "$dir"; rmdir "$(dirname "$dir")" 2>/dev/null ;;
esac
exit 0"#;
        let mut watchdog = Command::new("sh")
            .args(["-c", script, "eventstage-kafka-watchdog"])
            .arg(node.dir.join("server.log"))
            .arg(&node.dir)
            .arg(&java)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start the broker's watchdog shell")?;
        let stdin = watchdog.stdin.take();
        let mut line = String::new();
        BufReader::new(watchdog.stdout.take().context("the watchdog's stdout")?)
            .read_line(&mut line)
            .context("read the broker's pid")?;
        let pid = line.trim().parse().with_context(|| format!("the broker's pid: {line:?}"))?;
        self.nodes[i].process = Some(Process { watchdog, stdin, pid });
        Ok(())
    }
}

impl Drop for Cluster {
    /// Kills every node and removes its data (a controlled shutdown would only cost time).
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(p) = n.process.take() {
                p.stop(Stop::Discard);
            }
        }
    }
}

/// The last `lines` lines of a file (for error messages).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
