//! The broker under test: ours (noida-db, started and stopped here) or EVENTSTAGE_TEST_BROKERS; topic admin.

use super::*;

/// The cluster under test: ours (a noida-db process) or the one named by `EVENTSTAGE_TEST_BROKERS`.
pub(crate) struct Broker {
    pub(crate) brokers: String,
    pub(crate) own: Option<OwnBroker>,
}

pub(crate) struct OwnBroker {
    pub(crate) child: Child,
    /// The noida-db process (a child of `child`), once found.
    pub(crate) pid: std::sync::OnceLock<Option<u32>>,
    pub(crate) watchdog: Option<ChildStdin>,
    pub(crate) _data: tempfile::TempDir,
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        // Closing the watchdog's stdin makes it kill the broker and wait for it.
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.flush();
        }
        let _ = self.child.wait();
    }
}

impl Broker {
    pub(crate) fn start() -> Result<Self> {
        if let Ok(b) = std::env::var("EVENTSTAGE_TEST_BROKERS") {
            wait_ready(&b)?;
            return Ok(Self { brokers: b, own: None });
        }
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("find a free port")?.port();
        let data = tempfile::tempdir().context("create the broker's data directory")?;
        // `sh` runs the broker and waits for its stdin to close (this process exiting, or drop),
        // then stops the broker: no broker outlives the benchmark.
        let script = r#""$0" start --only kafka --host 127.0.0.1 --kafka-port "$1" --data-dir "$2" >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid; wait $pid"#;
        let mut child = Command::new("sh")
            .args(["-c", script])
            .arg(noida_bin()?)
            .arg(port.to_string())
            .arg(data.path())
            .stdin(Stdio::piped())
            .spawn()
            .context("start noida-db")?;
        let watchdog = child.stdin.take();
        let broker = Self {
            brokers: format!("127.0.0.1:{port}"),
            own: Some(OwnBroker { child, pid: Default::default(), watchdog, _data: data }),
        };
        wait_ready(&broker.brokers)?;
        Ok(broker)
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

    /// The broker's pid: the noida-db child of our watchdog shell.
    pub(crate) fn pid(&self) -> Option<u32> {
        let own = self.own.as_ref()?;
        let sh = own.child.id();
        *own.pid.get_or_init(|| {
            std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(')')?;
                let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
                (ppid == sh && comm.starts_with("noida")).then_some(pid)
            })
        })
    }
}

pub(crate) fn noida_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("NOIDA_DB_BIN") {
        return Ok(p.into());
    }
    let out = Command::new("python3")
        .args(["-c", "import noida_db,os;print(os.path.join(os.path.dirname(noida_db.__file__),'noida-db'))"])
        .output()
        .context("run python3 to find noida-db")?;
    if !out.status.success() {
        bail!(
            "noida-db is not installed: run `python3 -m pip install noida-db==0.2.3`, or set EVENTSTAGE_TEST_BROKERS"
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

pub(crate) fn wait_ready(brokers: &str) -> Result<()> {
    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let end = Instant::now() + Duration::from_secs(30);
    while client.fetch_metadata(None, Duration::from_millis(500)).is_err() {
        if Instant::now() >= end {
            bail!("the broker at {brokers} did not come up within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
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

/// Deletes topics a measurement is done with (the broker keeps everything in memory); best effort.
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
