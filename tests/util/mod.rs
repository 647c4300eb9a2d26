//! Shared helpers of the integration tests.

pub mod broker;

use eventstage::journal::{
    Batch, Committed, EventQuery, EventRecord, Journal, JournalError, JournalStats, Progress, Recovered,
    SourcePosition, VerifyReport,
};
use futures::Stream;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Upper bound of every wait in these tests.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Sends the library's logs to the test's captured output (filter: `RUST_LOG`, default `warn`), so
/// a failing test shows what the flow said.
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// Polls `cond` until it holds; panics after [`DEADLINE`].
pub async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_within(what, DEADLINE, cond).await;
}

/// Polls `cond` until it holds; panics after `limit`.
pub async fn wait_until_within(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A journal wrapper that can hold flushes at a gate and fail appends on demand.
#[derive(Clone)]
pub struct Gated<J> {
    pub inner: J,
    gate: Arc<Semaphore>,
    gated: Arc<AtomicBool>,
    fail: Arc<AtomicBool>,
    pub appends: Arc<AtomicU64>,
    pub flushes: Arc<AtomicU64>,
}

impl<J: Journal + Clone> Gated<J> {
    pub fn new(inner: J) -> Self {
        Self {
            inner,
            gate: Arc::new(Semaphore::new(0)),
            gated: Arc::new(AtomicBool::new(false)),
            fail: Arc::new(AtomicBool::new(false)),
            appends: Arc::default(),
            flushes: Arc::default(),
        }
    }

    /// From now on, flushes wait until [`Gated::open_gate`].
    pub fn close_gate(&self) {
        self.gated.store(true, Ordering::SeqCst);
    }

    /// Lets every waiting and future flush through.
    pub fn open_gate(&self) {
        self.gated.store(false, Ordering::SeqCst);
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    /// Appends fail from now on.
    pub fn fail_appends(&self) {
        self.fail.store(true, Ordering::SeqCst);
    }
}

impl<J: Journal + Clone> Journal for Gated<J> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn append(&self, batch: Batch) -> impl Future<Output = Result<Committed, JournalError>> + Send {
        let this = self.clone();
        async move {
            if this.fail.load(Ordering::SeqCst) {
                return Err(JournalError::Io {
                    path: PathBuf::from("gated"),
                    source: std::io::Error::other("disk on fire"),
                });
            }
            this.appends.fetch_add(1, Ordering::SeqCst);
            this.inner.append(batch).await
        }
    }
    fn flush(&self) -> impl Future<Output = Result<(), JournalError>> + Send {
        let this = self.clone();
        async move {
            if this.gated.load(Ordering::SeqCst) {
                let _permit = this.gate.acquire().await.expect("gate");
            }
            this.flushes.fetch_add(1, Ordering::SeqCst);
            this.inner.flush().await
        }
    }
    fn events(&self, q: EventQuery) -> impl Stream<Item = Result<Vec<EventRecord>, JournalError>> + Send + 'static {
        self.inner.events(q)
    }
    fn recover(&self) -> impl Stream<Item = Result<Vec<Recovered>, JournalError>> + Send + 'static {
        self.inner.recover()
    }
    fn recover_keys(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> impl Stream<Item = Result<Vec<Recovered>, JournalError>> + Send + 'static {
        self.inner.recover_keys(keys)
    }
    fn key_count(&self) -> impl Future<Output = Result<u64, JournalError>> + Send {
        self.inner.key_count()
    }
    fn positions(&self) -> impl Future<Output = Result<Vec<SourcePosition>, JournalError>> + Send {
        self.inner.positions()
    }
    fn meta(&self, key: &[u8]) -> impl Future<Output = Result<Option<Vec<u8>>, JournalError>> + Send {
        self.inner.meta(key)
    }
    fn stats(&self) -> impl Future<Output = Result<JournalStats, JournalError>> + Send {
        self.inner.stats()
    }
    fn verify(&self, p: Progress) -> impl Future<Output = Result<VerifyReport, JournalError>> + Send {
        self.inner.verify(p)
    }
}

/// The `eventstage` binary built for these tests.
pub fn eventstage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_eventstage"))
}

/// Runs the binary with `args`; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let Output { status, stdout, stderr } = eventstage().args(args).output().expect("run eventstage");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A GET of `path` on an instance's HTTP server (`demo --http-addr`): (status code, head, body).
pub(crate) fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, head.to_string(), body.to_string())
}
