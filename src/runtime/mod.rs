//! The in-process stage runtime: many tasks send `(key, command)` and await replies; one writer task
//! batches commands, persists each batch with one journal write (group commit) and replies once the
//! events are durable.

mod cached;
mod writer;

pub use cached::StateCacheStats;

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::replay::{recover, Entity, RecoveryStats};
use crate::stage::EventSourced;
use cached::Cached;
use eventstage_journal::{Journal, Progress, SeqNo, SourcePosition};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use tokio::sync::{mpsc, oneshot, Notify};

/// When a command's reply may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Reply after the batch holding the command's events is fsynced. A reply means the events
    /// survive any crash. The default.
    #[default]
    Durable,
    /// Reply as soon as the batch is written to the journal, before it is fsynced; the journal's
    /// background flush (every 200 ms for sled by default) makes it durable. Several times faster at
    /// low concurrency. A process crash loses nothing (the data is in the OS), but a power loss or
    /// kernel crash may lose the last acknowledged batches: whole batches, never part of one, and the
    /// state rebuilt on restart is still exactly the replay of what survived.
    Buffered,
}

/// Settings of a [`StageRuntime`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RuntimeConfig {
    /// Most commands in one journal write. Default: 1000.
    pub max_batch: usize,
    /// Commands queued before `ask` waits (back-pressure). Default: 4096.
    pub queue_capacity: usize,
    /// When replies are sent. Default: [`Durability::Durable`].
    pub durability: Durability,
    /// Write a snapshot of a key every this many of its events; 0 disables snapshots. Default: 100.
    pub snapshot_every: u64,
    /// Codec for new events and snapshots. Default: bincode.
    pub codec: Codec,
    /// Called during recovery with the number of records read so far.
    pub recovery_progress: Progress,
    /// Hold at most about this many bytes of state in memory instead of every key (see
    /// [`state_cache`](Self::state_cache)). Default: `None`, every key in memory.
    pub state_cache: Option<u64>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            queue_capacity: 4096,
            durability: Durability::Durable,
            snapshot_every: 100,
            codec: Codec::Bincode,
            recovery_progress: Progress::none(),
            state_cache: None,
        }
    }
}

impl RuntimeConfig {
    /// Sets [`max_batch`](Self::max_batch) (at least 1).
    #[must_use]
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }
    /// Sets [`queue_capacity`](Self::queue_capacity) (at least 1).
    #[must_use]
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }
    /// Sets [`durability`](Self::durability).
    #[must_use]
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }
    /// Sets [`snapshot_every`](Self::snapshot_every); 0 disables snapshots.
    #[must_use]
    pub fn snapshot_every(mut self, n: u64) -> Self {
        self.snapshot_every = n;
        self
    }
    /// Sets [`codec`](Self::codec).
    #[must_use]
    pub fn codec(mut self, c: Codec) -> Self {
        self.codec = c;
        self
    }
    /// Hold at most about `bytes` of state in memory instead of every key. Nothing is read on
    /// open: a key's state is read from the journal (its latest snapshot and the events after it)
    /// when a command or a query first uses it, and the keys used least lately leave memory when
    /// the budget is full (S3-FIFO: keys used once do not push out the ones used often). A restart
    /// costs the same whatever the number of keys; a key's first use costs a journal read (a seek
    /// for its snapshot and tail in a sled journal).
    ///
    /// Queries over all keys then read the journal: [`StageHandle::snapshot`],
    /// [`StageHandle::range`] and [`StageHandle::len`] read it whole, holding back the next
    /// journal write meanwhile (that is what keeps them consistent).
    ///
    /// What an entry weighs: the inline sizes of its key, state and bookkeeping, plus the key's
    /// bytes; memory a state owns beyond its inline size (a `String` field's text) is not
    /// counted. The journal's own memory (sled's page cache) comes on top: see
    /// [`SledStoreBuilder`](eventstage_journal::SledStoreBuilder).
    #[must_use]
    pub fn state_cache(mut self, bytes: u64) -> Self {
        self.state_cache = Some(bytes);
        self
    }
    /// Sets [`recovery_progress`](Self::recovery_progress).
    #[must_use]
    pub fn recovery_progress(mut self, p: Progress) -> Self {
        self.recovery_progress = p;
        self
    }
}

type Outcome<S> = Result<Result<<S as EventSourced>::Reply, <S as EventSourced>::Rejection>>;

pub(crate) struct Request<S: EventSourced> {
    key: S::Key,
    command: S::Command,
    reply: oneshot::Sender<Outcome<S>>,
    position: Option<SourcePosition>,
}

/// Where the runtime holds its keys' durable states.
pub(crate) enum States<S: EventSourced> {
    /// Every key, recovered on open. RwLock: reads (queries) are many and short; the writer takes
    /// the write lock once per batch to publish the batch's new states, after they are durable.
    All(RwLock<BTreeMap<S::Key, Entity<S>>>),
    /// The keys used lately, over the journal ([`RuntimeConfig::state_cache`]).
    Cached(Cached<S>),
}

/// State shared by the writer and every handle.
pub(crate) struct Shared<S: EventSourced> {
    states: States<S>,
    closed: AtomicBool,
    close: Notify,
    stopped: Mutex<Option<String>>,
}

fn read<S: EventSourced>(
    states: &RwLock<BTreeMap<S::Key, Entity<S>>>,
) -> RwLockReadGuard<'_, BTreeMap<S::Key, Entity<S>>> {
    states.read().unwrap_or_else(|p| p.into_inner())
}

/// A running stage over a journal. Create it with [`StageRuntime::open`], talk to it through
/// [`StageHandle`]s, stop it with [`StageRuntime::shutdown`].
pub struct StageRuntime<S: EventSourced, J: Journal> {
    handle: StageHandle<S>,
    writer: tokio::task::JoinHandle<()>,
    recovery: RecoveryStats,
    positions: Vec<SourcePosition>,
    journal: J,
}

impl<S: EventSourced, J: Journal> fmt::Debug for StageRuntime<S, J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageRuntime").field("stage", &S::NAME).field("recovery", &self.recovery).finish()
    }
}

impl<S: EventSourced, J: Journal + Clone> StageRuntime<S, J> {
    /// Recovers the state from the journal (latest snapshot plus the events after it, per key) and
    /// starts the writer task. Must be called inside a tokio runtime. With a
    /// [`state_cache`](RuntimeConfig::state_cache), nothing is recovered: keys are read when first
    /// used.
    ///
    /// # Errors
    /// Journal failures, damaged records and records the stage cannot decode: the stage does not start
    /// on a history it cannot read completely. With a state cache, a key that cannot be read fails
    /// the commands and queries that use it ([`Error::Unreadable`]), not the stage.
    pub async fn open(stage: S, journal: J, config: RuntimeConfig) -> Result<Self> {
        let (states, recovery) = match config.state_cache {
            None => {
                let (states, recovery) = recover::<S, J>(&journal, &config.recovery_progress).await?;
                tracing::info!(
                    stage = S::NAME,
                    keys = recovery.keys,
                    snapshots = recovery.snapshots,
                    events = recovery.events,
                    elapsed_ms = recovery.elapsed.as_millis() as u64,
                    "recovered"
                );
                (States::All(RwLock::new(states)), recovery)
            }
            Some(budget) => {
                tracing::info!(stage = S::NAME, budget, "opened with a state cache; keys are read when first used");
                (States::Cached(Cached::new(budget, journal.clone())), RecoveryStats::default())
            }
        };
        let positions = journal.positions().await?;
        let shared = Arc::new(Shared {
            states,
            closed: AtomicBool::new(false),
            close: Notify::new(),
            stopped: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let writer = writer::Writer { stage, journal: journal.clone(), config, shared: shared.clone() };
        let writer = tokio::spawn(writer.run(rx));
        Ok(Self { handle: StageHandle { tx, shared }, writer, recovery, positions, journal })
    }
}

#[cfg(feature = "sled")]
impl<S: EventSourced> StageRuntime<S, eventstage_journal::SledJournal> {
    /// [`open`](Self::open) on the sled journal named after the stage ([`EventSourced::NAME`]) in
    /// the store at `path` (created if missing): `SledJournal::open(path, S::NAME)` without
    /// repeating the name, which is also what the CLI looks the stage up by (`eventstage journal
    /// replay --journal PATH`). Open the journal yourself for several journals in one store
    /// ([`SledStore`](eventstage_journal::SledStore)) or a store of your own settings.
    ///
    /// ```
    /// # use eventstage::{Effect, EventSourced, RuntimeConfig, StageRuntime};
    /// use eventstage::journal::Journal as _;
    /// # struct Counter;
    /// # impl EventSourced for Counter {
    /// #     const NAME: &'static str = "counter";
    /// #     type Key = String; type Command = i64; type Event = i64; type State = i64;
    /// #     type Reply = i64; type Rejection = String;
    /// #     fn handle(&self, _: &i64, d: i64) -> Result<Effect<Self>, String> {
    /// #         Ok(Effect::persist([d]).then_reply(|t: &i64| *t))
    /// #     }
    /// #     fn apply(t: &mut i64, e: &i64) { *t += e }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let stage = StageRuntime::open_sled(Counter, dir.path(), RuntimeConfig::default()).await?;
    /// assert_eq!(stage.handle().ask("a".into(), 5).await?, Ok(5));
    /// assert_eq!(stage.journal().name(), "counter"); // eventstage journal replay --journal DIR --stage counter
    /// # stage.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// Those of [`SledJournal::open`](eventstage_journal::SledJournal::open) (a path that is not
    /// a store, a store another process holds, damage) and of [`open`](Self::open);
    /// [`Error::Closed`] when the tokio runtime is shutting down.
    ///
    /// # Panics
    /// When the sled journal's open panics (the panic is resumed here).
    pub async fn open_sled(stage: S, path: impl Into<std::path::PathBuf>, config: RuntimeConfig) -> Result<Self> {
        let path = path.into();
        // Opening reads and checks the store's files: off the async threads.
        let journal =
            match tokio::task::spawn_blocking(move || eventstage_journal::SledJournal::open(path, S::NAME)).await {
                Ok(opened) => opened?,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The tokio runtime is shutting down.
                Err(_) => return Err(Error::Closed(S::NAME.into())),
            };
        Self::open(stage, journal, config).await
    }
}

impl<S: EventSourced, J: Journal> StageRuntime<S, J> {
    /// A handle for sending commands and reading state. Cheap to clone.
    pub fn handle(&self) -> StageHandle<S> {
        self.handle.clone()
    }

    /// What recovery read on open (nothing with a [`state_cache`](RuntimeConfig::state_cache)).
    pub fn recovery(&self) -> RecoveryStats {
        self.recovery
    }

    /// The source positions stored with the last batch of each source partition, as read on open:
    /// where a consumer resumes so that every input is applied exactly once.
    pub fn positions(&self) -> &[SourcePosition] {
        &self.positions
    }

    /// The journal.
    pub fn journal(&self) -> &J {
        &self.journal
    }

    /// Stops accepting commands, finishes every command already queued, flushes the journal and
    /// stops the writer. `ask` on any handle then returns [`Error::Closed`]; with a
    /// [`state_cache`](RuntimeConfig::state_cache), so do queries of keys not in memory (the
    /// journal is let go, whatever handles remain).
    ///
    /// # Errors
    /// When the final flush fails.
    pub async fn shutdown(self) -> Result<()> {
        self.handle.shared.closed.store(true, Ordering::SeqCst);
        self.handle.shared.close.notify_one();
        let shared = self.handle.shared.clone();
        drop(self.handle);
        if let Err(e) = self.writer.await {
            tracing::error!(stage = S::NAME, error = %e, "writer task failed");
        }
        if let States::Cached(cached) = &shared.states {
            cached.close();
        }
        self.journal.flush().await?;
        Ok(())
    }
}

/// Sends commands to a running stage and reads its state.
pub struct StageHandle<S: EventSourced> {
    tx: mpsc::Sender<Request<S>>,
    shared: Arc<Shared<S>>,
}

impl<S: EventSourced> Clone for StageHandle<S> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), shared: self.shared.clone() }
    }
}

impl<S: EventSourced> fmt::Debug for StageHandle<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageHandle").field("stage", &S::NAME).finish()
    }
}

impl<S: EventSourced> StageHandle<S> {
    /// Sends a command and waits for its outcome: `Ok(Ok(reply))` once its events are persisted,
    /// `Ok(Err(rejection))` when the stage rejected it (nothing persisted), `Err` on infrastructure
    /// failure. Waits while the queue is full (back-pressure).
    ///
    /// # Errors
    /// [`Error::Closed`] after shutdown, [`Error::Stopped`] after a journal failure, the journal's
    /// error for the batch that failed, [`Error::HandlerPanicked`].
    pub async fn ask(&self, key: S::Key, command: S::Command) -> Result<Result<S::Reply, S::Rejection>> {
        self.send(key, command, None).await
    }

    /// Like [`ask`](Self::ask), for a command read from a source partition: `position` (the next
    /// offset to consume after this command) is stored atomically with the batch that handles the
    /// command, accepted or rejected, and read back by [`StageRuntime::positions`] on open.
    ///
    /// # Errors
    /// As [`ask`](Self::ask).
    pub async fn ask_at(
        &self,
        key: S::Key,
        command: S::Command,
        position: SourcePosition,
    ) -> Result<Result<S::Reply, S::Rejection>> {
        self.send(key, command, Some(position)).await
    }

    async fn send(
        &self,
        key: S::Key,
        command: S::Command,
        position: Option<SourcePosition>,
    ) -> Result<Result<S::Reply, S::Rejection>> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed(S::NAME.into()));
        }
        if let Some(cause) = self.stopped() {
            return Err(Error::Stopped { stage: S::NAME.into(), cause });
        }
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request { key, command, reply, position }).await.map_err(|_| Error::Closed(S::NAME.into()))?;
        match rx.await {
            Ok(outcome) => outcome,
            Err(_) => Err(match self.stopped() {
                Some(cause) => Error::Stopped { stage: S::NAME.into(), cause },
                None => Error::Closed(S::NAME.into()),
            }),
        }
    }

    fn stopped(&self) -> Option<String> {
        self.shared.stopped.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The durable state of `key`, if it has any events. Never waits for the writer; with a
    /// [`state_cache`](RuntimeConfig::state_cache), a key not in memory is read from the journal
    /// (between two journal writes) and kept.
    ///
    /// # Errors
    /// With a state cache: the journal's failure, or a record of the key that does not decode.
    pub async fn get(&self, key: &S::Key) -> Result<Option<Arc<S::State>>> {
        Ok(self.entity(key).await?.map(|e| e.state))
    }

    /// The sequence number of `key`'s last durable event (0 when none).
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn seq(&self, key: &S::Key) -> Result<SeqNo> {
        Ok(self.entity(key).await?.map_or(SeqNo::ZERO, |e| e.seq))
    }

    async fn entity(&self, key: &S::Key) -> Result<Option<Entity<S>>> {
        match &self.shared.states {
            States::All(states) => Ok(read(states).get(key).cloned()),
            States::Cached(cached) => cached.get(key).await,
        }
    }

    /// Number of keys with state. With a [`state_cache`](RuntimeConfig::state_cache), counted in
    /// the journal's key index.
    ///
    /// # Errors
    /// With a state cache: the journal's failure.
    pub async fn len(&self) -> Result<usize> {
        match &self.shared.states {
            States::All(states) => Ok(read(states).len()),
            States::Cached(cached) => Ok(cached.count().await? as usize),
        }
    }

    /// True when no key has state.
    ///
    /// # Errors
    /// As [`len`](Self::len).
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// The state cache's counters; `None` without a [`state_cache`](RuntimeConfig::state_cache).
    pub fn cache_stats(&self) -> Option<StateCacheStats> {
        match &self.shared.states {
            States::All(_) => None,
            States::Cached(cached) => Some(cached.stats()),
        }
    }

    /// Commands waiting in the queue for the writer (at most `queue_capacity`).
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// A consistent snapshot of every key's state, in key order: the state after some whole batch,
    /// never part of one. Cheap per key (states are shared, not copied). With a
    /// [`state_cache`](RuntimeConfig::state_cache), read from the whole journal while no batch is
    /// written.
    ///
    /// # Errors
    /// With a state cache: the journal's failure, or a record that does not decode.
    pub async fn snapshot(&self) -> Result<BTreeMap<S::Key, Arc<S::State>>> {
        self.collect(|_| true).await
    }

    /// Keys in `range`, in order, with their states (a consistent snapshot of that range). With a
    /// [`state_cache`](RuntimeConfig::state_cache), read from the whole journal while no batch is
    /// written; only the keys in `range` are held.
    ///
    /// # Errors
    /// As [`snapshot`](Self::snapshot).
    pub async fn range<R>(&self, range: R) -> Result<Vec<(S::Key, Arc<S::State>)>>
    where
        R: std::ops::RangeBounds<S::Key> + Send + Sync + 'static,
    {
        if let States::All(states) = &self.shared.states {
            return Ok(read(states).range(range).map(|(k, e)| (k.clone(), e.state.clone())).collect());
        }
        Ok(self.collect(move |k| range.contains(k)).await?.into_iter().collect())
    }

    async fn collect(
        &self,
        keep: impl Fn(&S::Key) -> bool + Send + Sync + 'static,
    ) -> Result<BTreeMap<S::Key, Arc<S::State>>> {
        let states = match &self.shared.states {
            States::All(states) => {
                return Ok(read(states)
                    .iter()
                    .filter(|(k, _)| keep(k))
                    .map(|(k, e)| (k.clone(), e.state.clone()))
                    .collect())
            }
            States::Cached(cached) => cached.scan(Box::new(keep)).await?,
        };
        Ok(states.into_iter().map(|(k, e)| (k, e.state)).collect())
    }
}
