//! A local state store over the Kafka journal: per journal partition, the newest journal entry of
//! each key and the journal offset the rows are complete up to. The compacted topic stays the
//! state of record; the store is a checkpoint of it, so that a restart or an assignment reads only
//! the journal's tail beyond the checkpoint instead of the whole partition.
//!
//! The store is written by a follower thread of its own that reads the journal partitions with
//! `read_committed`: it only ever holds committed transactions, and the flow thread never waits for
//! sled. Rows are written in chunks and a partition's offset last, then flushed. A crash in between
//! leaves rows newer than the stored offset; a restore reads the journal again from that offset
//! and applies the same records in the same order, which ends in the same state (the newest record
//! per key wins), so the offset never runs ahead of the rows it describes. A SIGKILL wipes nothing:
//! the checkpoint is older, and the tail makes it current.
//!
//! A store that is not what it claims to be is never trusted: a store of another journal topic or
//! stage, one sled cannot open, a row that does not decode, or a checkpoint ahead of the topic (the
//! topic was deleted and created again) drops the partition's rows (or the whole store) with a
//! warning that names the cause, and the partition is restored from the journal in full.
//!
//! ```text
//! DIR/eventstage-state.json   identifies the directory: format version, journal topic, stage
//! DIR/sled/                   the sled database:
//!     tree `offsets`: partition (i32 BE) -> next journal offset (i64 BE) | released at (u64 BE ms, 0: held)
//!     tree `p<partition>`: entity key -> the key's newest journal record value
//! ```

use super::{FlowError, Metrics};
use eventstage_journal::KafkaJournal;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MARKER: &str = "eventstage-state.json";
const FORMAT_VERSION: u32 = 1;
/// Rows per sled batch.
const CHUNK: usize = 10_000;
/// The follower writes a checkpoint once this many changed rows are pending, whatever the interval.
const MAX_PENDING: usize = 100_000;
/// How long closing the store waits for the follower to read the journal up to its end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq, Debug)]
struct Marker {
    format: u32,
    journal: String,
    stage: String,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Which journal partitions an instance keeps current in its local state store besides those it
/// owns (standby replicas, see [`FlowBuilder::standby`](super::FlowBuilder::standby)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Standby {
    /// None: a partition that goes to another instance is read up to the end of what was committed
    /// before it went, then left. Getting it back reads what the other instance wrote since.
    #[default]
    None,
    /// The partitions this instance owned before (in this process or, from its store, an earlier
    /// one): followed on after they went, until the retention drops them. Getting one back, after
    /// a rebalance or a crash of its new owner, reads almost nothing. Costs one journal reader and
    /// the sled writes of those partitions.
    Recent,
    /// Every partition of the journal, from the start: any takeover reads almost nothing, at the
    /// price of every instance reading and storing the whole journal (for small state, or few
    /// instances).
    All,
}

/// How the local state store is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StoreSettings {
    pub(super) dir: PathBuf,
    /// Rows of partitions this instance no longer holds are dropped after this long.
    pub(super) retention: Duration,
    /// A checkpoint is written at least this often while the journal changes.
    pub(super) interval: Duration,
    pub(super) standby: Standby,
}

/// The sled store of a flow's state directory.
#[derive(Clone)]
struct LocalStore {
    dir: PathBuf,
    db: sled::Db,
    offsets: sled::Tree,
    metrics: Option<Arc<Metrics>>,
}

/// A partition's checkpoint, for a restore.
pub(super) struct Loaded {
    /// The newest entry per key as of the checkpoint (perhaps newer: see the module docs), read
    /// when a key is first used (`None`: nothing stored).
    pub(super) rows: Option<sled::Tree>,
    /// The journal offset to read the tail from.
    pub(super) from: i64,
}

impl Loaded {
    fn empty() -> Self {
        Self { rows: None, from: 0 }
    }
}

fn config_err(dir: &Path, message: impl std::fmt::Display) -> FlowError {
    FlowError::Config(format!("state directory {}: {message}", dir.display()))
}

impl LocalStore {
    /// Opens (or creates) the store in `dir` for the journal `topic` of stage `stage`. A store of
    /// another topic or stage, or one sled cannot open, is emptied with a warning (it is a cache of
    /// the journal); a directory holding anything else, or a store another process has open, is
    /// an error.
    fn open(dir: &Path, topic: &str, stage: &str, metrics: &Metrics) -> Result<Self, FlowError> {
        let expected = Marker { format: FORMAT_VERSION, journal: topic.into(), stage: stage.into() };
        let marker_path = dir.join(MARKER);
        let sled_dir = dir.join("sled");
        let mut stale: Option<String> = None;
        if marker_path.exists() {
            let found = std::fs::read(&marker_path)
                .map_err(|e| config_err(dir, format!("cannot read {MARKER}: {e}")))
                .map(|raw| serde_json::from_slice::<Marker>(&raw));
            match found? {
                Ok(m) if m == expected => {}
                Ok(m) if m.format > FORMAT_VERSION => {
                    return Err(config_err(
                        dir,
                        format!(
                            "store format {} is newer than this eventstage understands ({FORMAT_VERSION}): upgrade eventstage, or use another directory",
                            m.format
                        ),
                    ))
                }
                Ok(m) => {
                    stale = Some(format!(
                        "it holds the state of journal `{}` of stage `{}`, not of journal `{topic}` of stage `{stage}`",
                        m.journal, m.stage
                    ))
                }
                Err(e) => stale = Some(format!("{MARKER} does not parse ({e})")),
            }
        } else if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(config_err(
                dir,
                format!("the directory is not empty and has no {MARKER}: give the flow a directory of its own"),
            ));
        }
        if let Some(why) = &stale {
            tracing::warn!(dir = %dir.display(), "the local state store is not this flow's: {why}; dropping it and restoring every partition from the journal");
            metrics.store_dropped.fetch_add(1, Ordering::Relaxed);
            remove_dir(&sled_dir).map_err(|e| config_err(dir, format!("cannot remove {}: {e}", sled_dir.display())))?;
        }
        if stale.is_some() || !marker_path.exists() {
            std::fs::create_dir_all(dir).map_err(|e| config_err(dir, format!("cannot create the directory: {e}")))?;
            let raw = serde_json::to_vec_pretty(&expected).map_err(|e| config_err(dir, e))?;
            std::fs::write(&marker_path, raw).map_err(|e| config_err(dir, format!("cannot write {MARKER}: {e}")))?;
        }
        let db = match sled::Config::new().path(&sled_dir).open() {
            Ok(db) => db,
            Err(e) if e.to_string().contains("lock") => {
                return Err(config_err(
                    dir,
                    format!("sled: {e} (another process has this state directory open: give every instance a directory of its own)"),
                ))
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "the local state store is damaged (sled cannot open it); dropping it and restoring every partition from the journal");
                metrics.store_dropped.fetch_add(1, Ordering::Relaxed);
                remove_dir(&sled_dir)
                    .map_err(|e| config_err(dir, format!("cannot remove {}: {e}", sled_dir.display())))?;
                sled::Config::new().path(&sled_dir).open().map_err(|e| config_err(dir, format!("sled: {e}")))?
            }
        };
        let offsets = db.open_tree("offsets").map_err(|e| config_err(dir, format!("sled: {e}")))?;
        Ok(Self { dir: dir.to_path_buf(), db, offsets, metrics: None })
    }

    fn storage(&self, e: impl std::fmt::Display) -> FlowError {
        config_err(&self.dir, format!("sled: {e}"))
    }

    fn rows(&self, p: i32) -> Result<sled::Tree, FlowError> {
        self.db.open_tree(format!("p{p}")).map_err(|e| self.storage(e))
    }

    /// Partition `p`'s checkpoint: (next offset, released at).
    fn position(&self, p: i32) -> Result<Option<(i64, u64)>, String> {
        let Some(v) = self.offsets.get(p.to_be_bytes()).map_err(|e| e.to_string())? else { return Ok(None) };
        match (v.get(..8), v.get(8..16)) {
            (Some(o), Some(r)) if v.len() == 16 => Ok(Some((
                i64::from_be_bytes(o.try_into().unwrap_or_default()),
                u64::from_be_bytes(r.try_into().unwrap_or_default()),
            ))),
            _ => Err(format!("the checkpoint entry of partition {p} has {} bytes, not 16", v.len())),
        }
    }

    /// The partitions the store has a checkpoint of.
    fn partitions(&self) -> Result<Vec<i32>, FlowError> {
        let mut out = Vec::new();
        for item in self.offsets.iter() {
            let (k, _) = item.map_err(|e| self.storage(e))?;
            if let Some(p) = k.as_ref().try_into().ok().map(i32::from_be_bytes) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Drops partition `p`'s rows and checkpoint.
    fn clear(&self, p: i32) -> Result<(), FlowError> {
        self.offsets.remove(p.to_be_bytes()).map_err(|e| self.storage(e))?;
        self.db.drop_tree(format!("p{p}")).map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// Partition `p`'s checkpoint for a restore (`Err`: why it cannot be used); `marks` are the
    /// journal partition's low and high watermarks now.
    fn load(&self, p: i32, marks: (i64, i64)) -> Result<Result<Loaded, String>, FlowError> {
        let from = match self.position(p) {
            Ok(None) => return Ok(Ok(Loaded::empty())),
            Ok(Some((from, _))) => from,
            Err(why) => return Ok(Err(why)),
        };
        let (low, high) = marks;
        if from > high {
            return Ok(Err(format!(
                "the checkpoint is at offset {from}, ahead of the journal's end ({high}): the topic was deleted and created again, or the store belongs to another cluster"
            )));
        }
        if from < low {
            return Ok(Err(format!(
                "the checkpoint is at offset {from}, before the journal's start ({low}): records after it were deleted"
            )));
        }
        // The offset was read before the rows will be: rows written since are newer, never older
        // (see the module docs).
        Ok(Ok(Loaded { rows: Some(self.rows(p)?), from }))
    }

    /// Writes `rows` of partition `p`, then its checkpoint `next` (see the module docs).
    fn write(
        &self,
        p: i32,
        rows: HashMap<Vec<u8>, Option<Vec<u8>>>,
        next: i64,
        released: u64,
    ) -> Result<(), FlowError> {
        let tree = self.rows(p)?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for (k, v) in rows {
            if in_batch == CHUNK {
                tree.apply_batch(std::mem::take(&mut batch)).map_err(|e| self.storage(e))?;
                in_batch = 0;
            }
            in_batch += 1;
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        tree.apply_batch(batch).map_err(|e| self.storage(e))?;
        let mut value = Vec::with_capacity(16);
        value.extend_from_slice(&next.to_be_bytes());
        value.extend_from_slice(&released.to_be_bytes());
        self.offsets.insert(p.to_be_bytes(), value).map_err(|e| self.storage(e))?;
        Ok(())
    }

    fn flush(&self) -> Result<(), FlowError> {
        self.db.flush().map(|_| ()).map_err(|e| self.storage(e))
    }

    /// Drops the rows of partitions released longer than `retention` ago.
    fn expire(&self, retention: Duration) -> Result<(), FlowError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut expired = Vec::new();
        for p in self.partitions()? {
            if let Ok(Some((_, released))) = self.position(p) {
                if released > 0 && released < cutoff {
                    expired.push(p);
                }
            }
        }
        for p in expired {
            tracing::info!(dir = %self.dir.display(), partition = p, "dropping the local rows of a partition released longer than the retention");
            self.clear(p)?;
        }
        Ok(())
    }
}

fn kafka(context: &str, source: rdkafka::error::KafkaError) -> FlowError {
    FlowError::Kafka { context: context.into(), source }
}

fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

enum Command {
    /// Keep partition `p`'s checkpoint current: it is assigned here.
    Follow(i32),
    /// Keep partition `p`'s checkpoint current: a standby (it may be owned elsewhere).
    Standby(i32),
    /// Partition `p` went to another instance: read it up to its end as of now, then let go.
    Release(i32),
    /// Read every followed partition up to its end as of now, write, and stop.
    Close(Sender<()>),
    /// Write what was read, and stop (the flow failed or was aborted).
    Quit,
    /// Stop following partition `p` and drop its rows and checkpoint; answer when done.
    Reset(i32, Sender<()>),
}

/// The partitions the flow owns (see [`Checkpoints::owned`]).
type Owned = Arc<std::sync::Mutex<std::collections::BTreeSet<i32>>>;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The local state store and its follower thread.
pub(super) struct Checkpoints {
    store: LocalStore,
    topic: String,
    /// The partitions this instance owns: their rows are read by the flow and never dropped
    /// behind its back (the follower drops a partition only when asked, or one not owned).
    owned: Owned,
    commands: Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpoints {
    /// Opens the store in `settings.dir` and starts its follower.
    pub(super) fn start(
        settings: &StoreSettings,
        journal: &KafkaJournal,
        common: &ClientConfig,
        stage: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FlowError> {
        let mut store = LocalStore::open(&settings.dir, journal.topic(), stage, &metrics)?;
        store.metrics = Some(metrics);
        store.expire(settings.retention)?;
        let mut config = common.clone();
        config
            .set("group.id", format!("eventstage-checkpoint-{}", journal.topic()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = config.create().map_err(|e| kafka("checkpoint consumer", e))?;
        let (commands, rx) = std::sync::mpsc::channel();
        let owned = Owned::default();
        let follower = Follower {
            owned: owned.clone(),
            store: store.clone(),
            topic: journal.topic().to_string(),
            consumer,
            interval: settings.interval,
            standby: settings.standby,
            retention: settings.retention,
            partitions: BTreeMap::new(),
            pending: 0,
            last_write: Instant::now(),
        };
        // Standbys from the start: every partition, or those this store kept after they went.
        let standbys = match settings.standby {
            Standby::All => (0..journal.partitions()).collect(),
            Standby::Recent => store.partitions()?,
            Standby::None => Vec::new(),
        };
        for p in standbys {
            let _ = commands.send(Command::Standby(p));
        }
        let thread = std::thread::Builder::new()
            .name("eventstage-checkpoint".into())
            .spawn(move || follower.run(&rx))
            .map_err(|e| config_err(&settings.dir, format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Self { store, topic: journal.topic().to_string(), owned, commands, thread: Some(thread) })
    }

    /// Partition `p`'s checkpoint, for a restore on its assignment (`marks`: the journal
    /// partition's low and high watermarks now). A checkpoint that cannot be used is dropped with
    /// a warning, and the partition is restored from the journal in full.
    pub(super) fn load(&self, p: i32, marks: (i64, i64)) -> Result<Loaded, FlowError> {
        lock(&self.owned).insert(p);
        match self.store.load(p, marks)? {
            Ok(loaded) => Ok(loaded),
            Err(why) => {
                self.drop_partition(p, &why);
                Ok(Loaded::empty())
            }
        }
    }

    /// Drops partition `p`'s rows and checkpoint because of `why` (the follower does it, so that
    /// it does not write on top of the emptied partition), with a warning.
    pub(super) fn drop_partition(&self, p: i32, why: &str) {
        tracing::warn!(dir = %self.store.dir.display(), journal = %self.topic, partition = p, "local state store: {why}; restoring the partition from the journal in full");
        if let Some(m) = &self.store.metrics {
            m.store_dropped.fetch_add(1, Ordering::Relaxed);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        if self.commands.send(Command::Reset(p, tx)).is_ok() {
            let _ = rx.recv_timeout(CLOSE_TIMEOUT);
        }
    }

    /// Keeps partition `p`'s checkpoint current from now on.
    pub(super) fn follow(&self, p: i32) {
        let _ = self.commands.send(Command::Follow(p));
    }

    /// Partition `p` was revoked: its checkpoint is brought up to the end of what was committed,
    /// and kept (until the retention drops it).
    pub(super) fn release(&self, p: i32) {
        lock(&self.owned).remove(&p);
        let _ = self.commands.send(Command::Release(p));
    }

    /// Brings every checkpoint up to the journal's end and stops the follower (waits up to
    /// [`CLOSE_TIMEOUT`]).
    pub(super) fn close(mut self) {
        self.stop(true);
    }

    fn stop(&mut self, catch_up: bool) {
        let Some(thread) = self.thread.take() else { return };
        let (tx, rx) = std::sync::mpsc::channel();
        let command = if catch_up { Command::Close(tx) } else { Command::Quit };
        if self.commands.send(command).is_ok() && catch_up {
            let _ = rx.recv_timeout(CLOSE_TIMEOUT + Duration::from_secs(5));
        }
        let _ = thread.join();
    }
}

impl Drop for Checkpoints {
    /// Without [`close`](Self::close) (the flow failed or was aborted), the follower writes what it
    /// has read and stops, without reading on to the journal's end.
    fn drop(&mut self) {
        self.stop(false);
    }
}

/// A followed journal partition.
struct Followed {
    /// The next journal offset to read.
    next: i64,
    /// Rows read since the last checkpoint (`None`: tombstone).
    rows: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Whether `next` moved since the last checkpoint.
    moved: bool,
    /// Released: let go once `next` reaches this offset.
    until: Option<i64>,
    /// The consumer reported the partition's end and no record since.
    at_end: bool,
    /// When the partition went to another instance (ms since the epoch; 0: owned, or a standby of
    /// [`Standby::All`]).
    released: u64,
}

impl Followed {
    /// Whether the partition was read up to `end` (an offset taken earlier). A partition ending
    /// in a transaction marker is read to its end when the consumer reports the end with only that
    /// one offset unread (librdkafka's position does not always move past a final marker). The
    /// checkpoint stores `next` either way: letting go early only lengthens the next tail.
    fn reached(&self, end: i64) -> bool {
        self.next >= end || (self.at_end && self.next + 1 >= end)
    }
}

struct Follower {
    owned: Owned,
    store: LocalStore,
    topic: String,
    consumer: BaseConsumer,
    interval: Duration,
    standby: Standby,
    retention: Duration,
    partitions: BTreeMap<i32, Followed>,
    pending: usize,
    last_write: Instant,
}

impl Follower {
    fn run(mut self, commands: &Receiver<Command>) {
        if let Err(e) = self.follow_until_closed(commands) {
            tracing::error!(error = %e, dir = %self.store.dir.display(), "the local state store stopped being updated; the flow goes on, and its next restore reads the journal from the last checkpoint");
        }
    }

    fn follow_until_closed(&mut self, commands: &Receiver<Command>) -> Result<(), FlowError> {
        loop {
            // With nothing to read, wait for a command instead of polling.
            let wait = if self.partitions.is_empty() { Duration::from_millis(500) } else { Duration::ZERO };
            match commands.recv_timeout(wait) {
                Ok(Command::Follow(p)) => self.follow(p, false)?,
                Ok(Command::Standby(p)) => self.follow(p, true)?,
                Ok(Command::Release(p)) => match self.standby {
                    Standby::None => {
                        let end = self.end_of(p)?;
                        if let Some(f) = self.partitions.get_mut(&p) {
                            f.until = Some(end);
                        }
                    }
                    Standby::Recent => {
                        if let Some(f) = self.partitions.get_mut(&p) {
                            f.released = now_ms();
                            f.moved = true;
                        }
                    }
                    Standby::All => {}
                },
                Ok(Command::Close(done)) => {
                    self.close()?;
                    let _ = done.send(());
                    return Ok(());
                }
                Ok(Command::Reset(p, done)) => {
                    self.reset(p)?;
                    let _ = done.send(());
                }
                Ok(Command::Quit) | Err(RecvTimeoutError::Disconnected) => return self.write(),
                Err(RecvTimeoutError::Timeout) => {}
            }
            if !self.partitions.is_empty() {
                self.read(Duration::from_millis(100))?;
            }
            if self.pending >= MAX_PENDING || self.last_write.elapsed() >= self.interval {
                self.write()?;
            }
            self.let_go()?;
        }
    }

    fn follow(&mut self, p: i32, standby: bool) -> Result<(), FlowError> {
        if let (Some(f), false) = (self.partitions.get_mut(&p), standby) {
            f.until = None;
            if f.released > 0 {
                f.released = 0;
                f.moved = true;
            }
            return Ok(());
        }
        if self.partitions.contains_key(&p) {
            return Ok(());
        }
        let (next, released) = self.store.position(p).ok().flatten().unwrap_or_default();
        // A standby of `Recent` counts as released (since it went, or since now) until it is
        // assigned here.
        let released = match (standby, self.standby) {
            (true, Standby::Recent) if released > 0 => released,
            (true, Standby::Recent) => now_ms(),
            _ => 0,
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, Offset::Offset(next)).map_err(|e| kafka("checkpoint follower", e))?;
        self.consumer.incremental_assign(&tpl).map_err(|e| kafka("checkpoint follower assign", e))?;
        self.partitions
            .insert(p, Followed { next, rows: HashMap::new(), moved: false, until: None, at_end: false, released });
        Ok(())
    }

    fn reset(&mut self, p: i32) -> Result<(), FlowError> {
        if let Some(f) = self.partitions.remove(&p) {
            self.pending = self.pending.saturating_sub(f.rows.len());
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, p);
            self.consumer.incremental_unassign(&tpl).map_err(|e| kafka("checkpoint follower unassign", e))?;
        }
        self.store.clear(p)?;
        self.store.flush()
    }

    fn end_of(&self, p: i32) -> Result<i64, FlowError> {
        let (_, high) = self
            .consumer
            .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
            .map_err(|e| kafka("checkpoint follower watermarks", e))?;
        Ok(high)
    }

    /// Reads what arrives within `wait`, then whatever is ready at once.
    fn read(&mut self, wait: Duration) -> Result<(), FlowError> {
        let mut timeout = wait;
        while let Some(polled) = self.consumer.poll(timeout) {
            timeout = Duration::ZERO;
            let msg = match polled {
                Ok(msg) => msg,
                Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                    if let Some(f) = self.partitions.get_mut(&p) {
                        f.at_end = true;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "checkpoint follower: consumer error (librdkafka retries)");
                    continue;
                }
            };
            let Some(f) = self.partitions.get_mut(&msg.partition()) else { continue };
            if let Some(end) = f.until.filter(|end| msg.offset() >= *end) {
                // Released, and read up to `end` (records come in order): what the new owner
                // writes is not read (see `Standby::None`).
                if f.next < end {
                    f.next = end;
                    f.moved = true;
                }
                continue;
            }
            f.next = msg.offset() + 1;
            f.moved = true;
            f.at_end = false;
            f.rows.insert(msg.key().unwrap_or_default().to_vec(), msg.payload().map(<[u8]>::to_vec));
            self.pending += 1;
            if self.pending >= MAX_PENDING {
                break;
            }
        }
        // Past transaction markers: the consumer's position is beyond the last record read.
        if let Ok(positions) = self.consumer.position() {
            for el in positions.elements() {
                if let (Offset::Offset(o), Some(f)) = (el.offset(), self.partitions.get_mut(&el.partition())) {
                    let o = f.until.map_or(o, |end| o.min(end));
                    if o > f.next {
                        f.next = o;
                        f.moved = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes every partition's rows read since the last checkpoint, and its position.
    fn write(&mut self) -> Result<(), FlowError> {
        let mut wrote = false;
        for (&p, f) in &mut self.partitions {
            if !f.moved {
                continue;
            }
            let released = if f.until.is_some() { now_ms() } else { f.released };
            self.store.write(p, std::mem::take(&mut f.rows), f.next, released)?;
            f.moved = false;
            wrote = true;
        }
        if wrote {
            self.store.flush()?;
        }
        self.pending = 0;
        self.last_write = Instant::now();
        Ok(())
    }

    /// Stops following released partitions that reached their end, and drops standbys released
    /// longer than the retention.
    fn let_go(&mut self) -> Result<(), FlowError> {
        let cutoff = now_ms().saturating_sub(self.retention.as_millis() as u64);
        let expired: Vec<i32> =
            self.partitions.iter().filter(|(_, f)| f.released > 0 && f.released < cutoff).map(|(p, _)| *p).collect();
        let done: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, f)| f.until.is_some_and(|end| f.reached(end)))
            .map(|(p, _)| *p)
            .collect();
        if done.is_empty() && expired.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &done {
            if let Some(mut f) = self.partitions.remove(&p) {
                self.store.write(p, std::mem::take(&mut f.rows), f.next, now_ms())?;
            }
            tpl.add_partition(&self.topic, p);
        }
        let owned = self.owned.clone();
        let owned = lock(&owned);
        for &p in expired.iter().filter(|p| !owned.contains(p)) {
            self.partitions.remove(&p);
            tracing::info!(dir = %self.store.dir.display(), partition = p, "dropping the local rows of a standby partition released longer than the retention");
            self.store.clear(p)?;
            tpl.add_partition(&self.topic, p);
        }
        drop(owned);
        self.store.flush()?;
        self.consumer.incremental_unassign(&tpl).map_err(|e| kafka("checkpoint follower unassign", e))?;
        Ok(())
    }

    fn close(&mut self) -> Result<(), FlowError> {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let mut ends = BTreeMap::new();
        for &p in self.partitions.keys() {
            ends.insert(p, self.end_of(p)?);
        }
        while Instant::now() < deadline
            && ends.iter().any(|(p, end)| self.partitions.get(p).is_some_and(|f| !f.reached(*end)))
        {
            self.read(Duration::from_millis(50))?;
        }
        let behind: Vec<i32> = ends
            .iter()
            .filter(|(p, end)| self.partitions.get(p).is_some_and(|f| !f.reached(**end)))
            .map(|(p, _)| *p)
            .collect();
        if !behind.is_empty() {
            tracing::warn!(partitions = ?behind, "the local state store did not reach the journal's end before closing; the next start reads the rest from the journal");
        }
        self.write()
    }
}
