//! Opening a store directory: header, sled, the background flusher, named journals.

use super::archive::Archive;
use super::{be_u64, lock, JournalInner, SledJournal, ARCHIVABLE_KEY, ARCHIVE_KEY, BATCH_KEY, TREE_PREFIX};
use crate::error::{JournalError, Result};
use crate::mark::{read_mark, MarkFile};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

/// The store format this build writes and reads. 2: event records may be groups
/// ([`RecordKind::Events`](crate::RecordKind::Events), written by
/// [`SledJournal::append_grouped`](crate::SledJournal::append_grouped)); a store of format 1 is
/// marked 2 when the first group is written to it, so that older builds refuse it instead of
/// reading groups as damage. 3: a journal may have a history archive (see
/// [`SledStoreBuilder::archive_history`]); a store is marked 3 before its first move to one.
pub const STORE_FORMAT_VERSION: u32 = 3;
const HEADER_FILE: &str = "eventstage-journal.json";

fn hex(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The journal name of a commit mark's file name (`None`: not one [`hex`] wrote).
fn unhex(file: &str) -> Option<String> {
    let digits = file.strip_suffix(".mark")?;
    if digits.len() % 2 != 0 || !digits.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..digits.len()).step_by(2).map(|i| u8::from_str_radix(&digits[i..i + 2], 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoreHeader {
    format: String,
    format_version: u32,
}

/// Opens a [`SledStore`]; see [`SledStore::builder`].
#[derive(Debug, Clone)]
pub struct SledStoreBuilder {
    path: PathBuf,
    create: bool,
    cache_capacity: u64,
    flush_every: Option<Duration>,
    mark_lost: bool,
    archive_history: Option<u64>,
}

impl SledStoreBuilder {
    /// Create the store if the directory does not exist or is empty. Default: true.
    #[must_use]
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// sled's page cache size in bytes. Default: 256 MiB.
    #[must_use]
    pub fn cache_capacity(mut self, bytes: u64) -> Self {
        self.cache_capacity = bytes;
        self
    }

    /// Flush (fsync) every applied batch in the background at this interval, for writers that do not
    /// call [`Journal::flush`](crate::Journal::flush) themselves (`Durability::Buffered`). `None` disables it. Default: 200 ms.
    #[must_use]
    pub fn flush_every(mut self, every: Option<Duration>) -> Self {
        self.flush_every = every;
        self
    }

    /// The commit marks of journals with committed batches are known to be gone (a store copied
    /// without its `marks` directory): [`Journal::verify`](crate::Journal::verify) does not report
    /// their absence. Without it, a journal that holds batches but has no mark is reported by
    /// `verify` and warned about on open: sled dropping a log tail could no longer be detected.
    /// Default: false.
    #[must_use]
    pub fn mark_lost(mut self, lost: bool) -> Self {
        self.mark_lost = lost;
        self
    }

    /// Move the event records a key's snapshot covers out of sled into the journal's history
    /// archive, in the background: when the journal is idle (no batch for a second), or, while it
    /// is busy, once `after` event records were written since the last move
    /// (see [`SledJournal::archive_history`](super::SledJournal::archive_history)); `None` keeps
    /// all history in sled. sled holds about 190 bytes of memory per page of its trees while open
    /// (8 to 16 records a page), so without this a store's memory and opening time grow with its
    /// history rather than with its state; with it, sled holds the snapshots, the events after
    /// them, and at most about `after` records more. Reads see the same events either way. A move
    /// rewrites what it moves once (sled removes each record), so a smaller `after` does not cost
    /// more in total, but moves more often. Default: [`DEFAULT_ARCHIVE_AFTER`] records.
    #[must_use]
    pub fn archive_history(mut self, after: Option<u64>) -> Self {
        self.archive_history = after;
        self
    }

    /// Opens (or creates) the store.
    ///
    /// # Errors
    /// [`JournalError::NotAJournal`] when the path exists but is not a store (or does not exist and
    /// `create` is false), [`JournalError::NewerFormat`] when a newer eventstage wrote it,
    /// [`JournalError::Storage`] / [`JournalError::Damaged`] when sled cannot open its files.
    pub fn open(self) -> Result<SledStore> {
        let path = self.path.clone();
        let header_path = path.join(HEADER_FILE);
        let io = |p: &Path, source| JournalError::Io { path: p.to_path_buf(), source };
        if path.is_file() {
            return Err(JournalError::NotAJournal { path, why: "it is a file, not a directory".into() });
        }
        let exists = path.is_dir();
        let empty = !exists || std::fs::read_dir(&path).map_err(|e| io(&path, e))?.next().is_none();
        let mut found_version = STORE_FORMAT_VERSION;
        if header_path.is_file() {
            // Bytes, not a string: a header that is not UTF-8 is not a journal header (not an I/O error).
            let text = std::fs::read(&header_path).map_err(|e| io(&header_path, e))?;
            let header: StoreHeader = serde_json::from_slice(&text).map_err(|e| JournalError::NotAJournal {
                path: path.clone(),
                why: format!("{HEADER_FILE} is not a journal header: {e}"),
            })?;
            if header.format != "eventstage-journal" {
                return Err(JournalError::NotAJournal {
                    path,
                    why: format!("{HEADER_FILE} names format `{}`", header.format),
                });
            }
            if header.format_version > STORE_FORMAT_VERSION {
                return Err(JournalError::NewerFormat {
                    path,
                    found: header.format_version,
                    supported: STORE_FORMAT_VERSION,
                });
            }
            found_version = header.format_version;
        } else if empty && self.create {
            std::fs::create_dir_all(path.join("marks")).map_err(|e| io(&path, e))?;
            let header = StoreHeader { format: "eventstage-journal".into(), format_version: STORE_FORMAT_VERSION };
            let text = serde_json::to_string_pretty(&header).unwrap_or_default();
            std::fs::write(&header_path, text).map_err(|e| io(&header_path, e))?;
        } else if !exists {
            return Err(JournalError::NotAJournal { path, why: "it does not exist".into() });
        } else {
            return Err(JournalError::NotAJournal { path, why: format!("it has no {HEADER_FILE}") });
        }
        std::fs::create_dir_all(path.join("marks")).map_err(|e| io(&path, e))?;
        let config = sled::Config::new()
            .path(path.join("sled"))
            .cache_capacity(self.cache_capacity)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None);
        let db = open_sled(&path, &config)?;
        let inner = Arc::new(StoreInner {
            path,
            db,
            journals: Mutex::default(),
            format_version: std::sync::atomic::AtomicU32::new(found_version),
            mark_lost: self.mark_lost,
            archive_history: self.archive_history,
        });
        if let Some(every) = self.flush_every {
            spawn_flusher(Arc::downgrade(&inner), every);
        }
        if self.archive_history.is_some() {
            spawn_archiver(Arc::downgrade(&inner));
        }
        Ok(SledStore { inner })
    }
}

/// How long to wait for the file lock a just-dropped handle of this process may still hold (its last
/// reader threads finish asynchronously).
const LOCK_WAIT: Duration = Duration::from_secs(2);

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn open_sled(path: &Path, config: &sled::Config) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        // sled 0.34 can panic on some kinds of damaged files instead of returning an error; a damaged
        // journal must give a clear error, never a crash.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
        match opened {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(e)) if is_lock_error(&e) => {
                if std::time::Instant::now() >= deadline {
                    return Err(JournalError::Storage {
                        path: path.to_path_buf(),
                        message: "the journal is locked by another process (or another open handle in this one); stop it first".into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(Err(e)) => return Err(storage_error(path, e)),
            Err(_) => {
                return Err(JournalError::Damaged {
                    journal: path.display().to_string(),
                    what: "sled panicked while opening its files (they are damaged)".into(),
                })
            }
        }
    }
}

pub(super) fn storage_error(path: &Path, e: sled::Error) -> JournalError {
    match e {
        sled::Error::Io(source) => JournalError::Io { path: path.to_path_buf(), source },
        // sled's own text ends in a backtrace placeholder ("... backtrace ()").
        sled::Error::Corruption { at, .. } => JournalError::Damaged {
            journal: path.display().to_string(),
            what: match at {
                Some(at) => format!("sled found corrupted data in its files (at {at:?})"),
                None => "sled found corrupted data in its files".into(),
            },
        },
        other => JournalError::Storage { path: path.to_path_buf(), message: other.to_string() },
    }
}

/// Background flushing for buffered writers. The thread holds only a weak reference and ends when the
/// store is dropped.
fn spawn_flusher(store: Weak<StoreInner>, every: Duration) {
    let spawned = std::thread::Builder::new().name("eventstage-sled-flush".into()).spawn(move || loop {
        std::thread::sleep(every);
        let Some(store) = store.upgrade() else { return };
        for journal in store.live_journals() {
            if let Err(e) = journal.flush_blocking() {
                tracing::error!(journal = %journal.name, error = %e, "background flush failed");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the background flush thread; buffered writes are flushed only on close");
    }
}

/// Event records written after which covered history moves to the archive while the journal is
/// busy, by default: none, so history moves within a second of the snapshot that covers it. A
/// move costs about as much CPU as writing the records did (sled removes each; the embedded demo's
/// sustained throughput drops by about a fifth while moves run), but moving in bulk later does
/// not save that work and is worse in every other way: with moves every 2^20 records, a
/// 2.7M-event journal left a 713 MB sled file (sled reclaims the space late), opened in 1.5 s and
/// was scanned in 149 MB, against 167 MB, 0.4 s and 78 MB with moves every second.
pub const DEFAULT_ARCHIVE_AFTER: u64 = 0;

/// How often the archiver moves the history that new snapshots cover.
const ARCHIVE_EVERY: Duration = Duration::from_secs(1);

/// Background moves of covered history into the archives. The thread holds only a weak reference
/// and ends when the store is dropped.
fn spawn_archiver(store: Weak<StoreInner>) {
    let spawned = std::thread::Builder::new().name("eventstage-sled-archive".into()).spawn(move || {
        lowest_priority();
        archive_loop(&store);
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the history archive thread; history stays in sled");
    }
}

/// Runs the calling thread at the lowest CPU priority: moving history is background work (as
/// RocksDB's compactions are), and on a busy machine it waits for idle time instead of taking
/// a third of the writers' throughput; the history then stays in sled until there is time.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread, with no pointers.
        let done = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19)
        };
        if done != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the archive thread's priority");
        }
    }
}

fn archive_loop(store: &Weak<StoreInner>) {
    loop {
        std::thread::sleep(ARCHIVE_EVERY);
        let Some(store) = store.upgrade() else { return };
        for journal in store.live_journals() {
            // The archiver's is the only handle left: the journal is being closed.
            let closing = || Arc::strong_count(&journal) == 1;
            match journal.archive_pending(&closing) {
                Ok(0) => {}
                Ok(moved) => tracing::debug!(journal = %journal.name, records = moved, "history moved to the archive"),
                // Nothing is lost: the records stay in sled, and the next snapshot of the key tries again.
                Err(e) => {
                    tracing::warn!(journal = %journal.name, error = %e, "moving history to the archive failed; it stays in sled")
                }
            }
        }
    }
}

/// A directory holding any number of named sled journals (one per stage, or per stage and partition).
#[derive(Debug, Clone)]
pub struct SledStore {
    pub(super) inner: Arc<StoreInner>,
}

#[derive(Debug)]
pub(super) struct StoreInner {
    pub(super) path: PathBuf,
    pub(super) db: sled::Db,
    // One JournalInner per name, so every handle shares the write lock and batch counter.
    journals: Mutex<HashMap<String, Weak<JournalInner>>>,
    /// The format version its header says.
    format_version: std::sync::atomic::AtomicU32,
    /// See [`SledStoreBuilder::mark_lost`].
    pub(super) mark_lost: bool,
    /// See [`SledStoreBuilder::archive_history`].
    pub(super) archive_history: Option<u64>,
}

impl StoreInner {
    /// Marks the store as of format `version` at least (before writing what needs it).
    pub(super) fn require_version(&self, version: u32) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.format_version.load(Ordering::Acquire) >= version {
            return Ok(());
        }
        let header_path = self.path.join(HEADER_FILE);
        let header = StoreHeader { format: "eventstage-journal".into(), format_version: version };
        let text = serde_json::to_string_pretty(&header).unwrap_or_default();
        std::fs::write(&header_path, text).map_err(|source| JournalError::Io { path: header_path, source })?;
        self.format_version.fetch_max(version, Ordering::AcqRel);
        Ok(())
    }

    pub(super) fn live_journals(&self) -> Vec<Arc<JournalInner>> {
        lock(&self.journals).values().filter_map(Weak::upgrade).collect()
    }
}

impl SledStore {
    /// A builder for the store at `path`.
    pub fn builder(path: impl Into<PathBuf>) -> SledStoreBuilder {
        SledStoreBuilder {
            path: path.into(),
            create: true,
            cache_capacity: 256 << 20,
            flush_every: Some(Duration::from_millis(200)),
            mark_lost: false,
            archive_history: Some(DEFAULT_ARCHIVE_AFTER),
        }
    }

    /// Opens or creates the store at `path` with default settings.
    ///
    /// # Errors
    /// See [`SledStoreBuilder::open`].
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::builder(path).open()
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The names of the journals in the store, and of those its commit marks say it held (a journal
    /// sled lost: opening it reports [`JournalError::MissingBatches`]).
    pub fn journal_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .db
            .tree_names()
            .iter()
            .filter_map(|n| std::str::from_utf8(n).ok()?.strip_prefix(TREE_PREFIX).map(str::to_owned))
            .collect();
        // Journals whose commit marks say they committed batches, even if sled lost them: opening
        // one reports the missing batches instead of the store looking empty.
        let marks = std::fs::read_dir(self.inner.path.join("marks")).into_iter().flatten().flatten();
        for entry in marks {
            let Some(name) = entry.file_name().to_str().and_then(unhex) else { continue };
            if !names.contains(&name) && read_mark(&entry.path()).ok().flatten().is_some_and(|m| m > 0) {
                names.push(name);
            }
        }
        names.sort();
        names
    }

    /// Opens the journal `name`, creating it if needed.
    ///
    /// # Errors
    /// [`JournalError::MissingBatches`] when the store lost batches the commit mark recorded.
    pub fn journal(&self, name: &str) -> Result<SledJournal> {
        self.open_journal(name, true, true)
    }

    /// Opens an existing journal `name`.
    ///
    /// # Errors
    /// [`JournalError::UnknownJournal`] when there is none; otherwise as [`SledStore::journal`].
    pub fn existing_journal(&self, name: &str) -> Result<SledJournal> {
        self.open_journal(name, false, true)
    }

    /// Opens an existing journal for inspection even when it lost committed batches: reads work and
    /// [`Journal::verify`](crate::Journal::verify) reports the loss. Do not write to it.
    ///
    /// # Errors
    /// [`JournalError::UnknownJournal`] when there is none.
    pub fn inspect_journal(&self, name: &str) -> Result<SledJournal> {
        self.open_journal(name, false, false)
    }

    fn open_journal(&self, name: &str, create: bool, check_mark: bool) -> Result<SledJournal> {
        let mut journals = lock(&self.inner.journals);
        if let Some(inner) = journals.get(name).and_then(Weak::upgrade) {
            return Ok(SledJournal { inner });
        }
        let tree_name = format!("{TREE_PREFIX}{name}");
        let mark_path = self.inner.path.join("marks").join(format!("{}.mark", hex(name)));
        let exists = self.inner.db.tree_names().iter().any(|n| n.as_ref() == tree_name.as_bytes());
        let mark = read_mark(&mark_path)?;
        let marked = mark.unwrap_or(0);
        if !exists && !create && marked == 0 {
            let available = self.journal_names().join(", ");
            return Err(JournalError::UnknownJournal {
                name: name.into(),
                path: self.inner.path.clone(),
                available: if available.is_empty() { "none".into() } else { available },
            });
        }
        let path = &self.inner.path;
        let tree = self.inner.db.open_tree(&tree_name).map_err(|e| storage_error(path, e))?;
        let stored = tree.get(BATCH_KEY).map_err(|e| storage_error(path, e))?;
        let found = match stored {
            Some(v) => be_u64(&v).ok_or_else(|| JournalError::Damaged {
                journal: name.into(),
                what: "the batch counter is not 8 bytes".into(),
            })?,
            None => 0,
        };
        if check_mark && marked > found {
            return Err(JournalError::MissingBatches { journal: name.into(), path: path.clone(), marked, found });
        }
        let archived = match tree.get(ARCHIVE_KEY).map_err(|e| storage_error(path, e))? {
            Some(v) => be_u64(&v).ok_or_else(|| JournalError::Damaged {
                journal: name.into(),
                what: "the history archive's length is not 8 bytes".into(),
            })?,
            None => 0,
        };
        let unarchived = match tree.get(ARCHIVABLE_KEY).map_err(|e| storage_error(path, e))? {
            Some(v) => be_u64(&v).unwrap_or(0),
            None => 0,
        };
        let archive = Archive::open(path.join("archive").join(format!("{}.log", hex(name))), archived)?;
        let mark_missing = mark.is_none() && found > 0;
        if mark_missing && !self.inner.mark_lost {
            tracing::warn!(journal = name, path = %path.display(), batches = found, mark = %mark_path.display(),
                "the journal holds committed batches but its commit mark is missing: batches sled loses can no longer be detected; restore the marks directory from the same backup, or accept it (`journal verify --mark-lost`); the mark is written again with the next batch");
        }
        let inner = Arc::new(JournalInner {
            name: name.into(),
            store: self.inner.clone(),
            tree,
            write: Mutex::new(found),
            applied: AtomicU64::new(found),
            durable: AtomicU64::new(found.min(marked.max(found))),
            mark: Mutex::new(MarkFile::new(mark_path, marked)),
            marked,
            mark_missing,
            archive: RwLock::new(archive),
            to_archive: Mutex::default(),
            unarchived: AtomicU64::new(unarchived),
            swept: std::sync::atomic::AtomicBool::new(false),
            archiver_seen: AtomicU64::new(u64::MAX),
        });
        journals.insert(name.into(), Arc::downgrade(&inner));
        Ok(SledJournal { inner })
    }

    /// Flushes every open journal of the store.
    ///
    /// # Errors
    /// When sled or the mark file cannot be written.
    pub fn flush(&self) -> Result<()> {
        for j in self.inner.live_journals() {
            j.flush_blocking()?;
        }
        Ok(())
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// The underlying sled database, for benchmarks and tools that compare against raw sled.
    pub fn sled_db(&self) -> &sled::Db {
        &self.inner.db
    }
}
