//! The in-process stage runtime: many tasks send `(key, command)` and await replies; one writer task
//! batches commands, persists each batch with one journal write (group commit) and replies once the
//! events are durable.

mod writer;

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::replay::{recover, Entity, RecoveryStats};
use crate::stage::EventSourced;
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

/// State shared by the writer and every handle.
pub(crate) struct Shared<S: EventSourced> {
    // RwLock: reads (queries) are many and short; the writer takes the write lock once per batch to
    // publish the batch's new states, after they are durable.
    states: RwLock<BTreeMap<S::Key, Entity<S>>>,
    closed: AtomicBool,
    close: Notify,
    stopped: Mutex<Option<String>>,
}

impl<S: EventSourced> Shared<S> {
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<S::Key, Entity<S>>> {
        self.states.read().unwrap_or_else(|p| p.into_inner())
    }
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
    /// starts the writer task. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// Journal failures, damaged records and records the stage cannot decode: the stage does not start
    /// on a history it cannot read completely.
    pub async fn open(stage: S, journal: J, config: RuntimeConfig) -> Result<Self> {
        let (states, recovery) = recover::<S, J>(&journal, &config.recovery_progress).await?;
        let positions = journal.positions().await?;
        tracing::info!(
            stage = S::NAME,
            keys = recovery.keys,
            snapshots = recovery.snapshots,
            events = recovery.events,
            elapsed_ms = recovery.elapsed.as_millis() as u64,
            "recovered"
        );
        let shared = Arc::new(Shared {
            states: RwLock::new(states),
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

    /// What recovery read on open.
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
    /// stops the writer. `ask` on any handle then returns [`Error::Closed`].
    ///
    /// # Errors
    /// When the final flush fails.
    pub async fn shutdown(self) -> Result<()> {
        self.handle.shared.closed.store(true, Ordering::SeqCst);
        self.handle.shared.close.notify_one();
        drop(self.handle);
        if let Err(e) = self.writer.await {
            tracing::error!(stage = S::NAME, error = %e, "writer task failed");
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

    /// The durable state of `key`, if it has any events. Never waits for the writer.
    pub fn get(&self, key: &S::Key) -> Option<Arc<S::State>> {
        self.shared.read().get(key).map(|e| e.state.clone())
    }

    /// The sequence number of `key`'s last durable event (0 when none).
    pub fn seq(&self, key: &S::Key) -> SeqNo {
        self.shared.read().get(key).map_or(SeqNo::ZERO, |e| e.seq)
    }

    /// Number of keys with state.
    pub fn len(&self) -> usize {
        self.shared.read().len()
    }

    /// Commands waiting in the queue for the writer (at most `queue_capacity`).
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// True when no key has state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A consistent snapshot of every key's state, in key order: the state after some whole batch,
    /// never part of one. Cheap per key (states are shared, not copied).
    pub fn snapshot(&self) -> BTreeMap<S::Key, Arc<S::State>> {
        self.shared.read().iter().map(|(k, e)| (k.clone(), e.state.clone())).collect()
    }

    /// Keys in `range`, in order, with their states (a consistent snapshot of that range).
    pub fn range<R: std::ops::RangeBounds<S::Key>>(&self, range: R) -> Vec<(S::Key, Arc<S::State>)> {
        self.shared.read().range(range).map(|(k, e)| (k.clone(), e.state.clone())).collect()
    }
}
