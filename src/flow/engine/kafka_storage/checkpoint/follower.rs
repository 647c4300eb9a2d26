//! The follower thread: reads the committed journal partitions it follows and writes their rows
//! and checkpoints to the local store.

use super::super::super::cache::StoreProgress;
use super::common::{Command, Owned, Standby, StoreSettings, CLOSE_TIMEOUT};
use super::store::LocalStore;
use crate::flow::error::FlowError;
use crate::flow::shared::{kafka, lock, now_ms};
use eventstage_journal::kafka::{JournalEntry, ReaderContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The follower writes a checkpoint once this many changed rows are pending, whatever the interval.
const MAX_PENDING: usize = 100_000;

/// The row the local store keeps of a journal record: the entry without its events, which a
/// read from the store does not use (it takes the state, its sequence number and the input
/// positions). A bank account's row after one deposit shrinks from about 98 to 67 bytes (three
/// 24-byte envelope headers become two), and fjall's flushes and compactions copy that much less.
/// A record that does not decode is kept as it is: reading it back reports the damage.
fn stored_row(value: &[u8]) -> Vec<u8> {
    match JournalEntry::decode(value) {
        Ok(entry) if !entry.events.is_empty() && entry.state.is_some() => {
            JournalEntry { events: Vec::new(), ..entry }.encode()
        }
        _ => value.to_vec(),
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

pub(super) struct Follower {
    owned: Owned,
    store: LocalStore,
    topic: String,
    consumer: BaseConsumer<ReaderContext>,
    interval: Duration,
    standby: Standby,
    retention: Duration,
    partitions: BTreeMap<i32, Followed>,
    pending: usize,
    last_write: Instant,
    /// Partitions a restore waits for (`Command::Restore`): written as soon as they are read to
    /// their end.
    restoring: std::collections::BTreeSet<i32>,
    /// Where the flow's state cache learns how far the store has each partition's rows.
    progress: Option<Arc<StoreProgress>>,
}

impl Follower {
    pub(super) fn new(
        owned: Owned,
        store: LocalStore,
        topic: &str,
        consumer: BaseConsumer<ReaderContext>,
        settings: &StoreSettings,
        progress: Option<Arc<StoreProgress>>,
    ) -> Self {
        Self {
            owned,
            store,
            topic: topic.to_string(),
            consumer,
            interval: settings.interval,
            standby: settings.standby,
            retention: settings.retention,
            partitions: BTreeMap::new(),
            pending: 0,
            last_write: Instant::now(),
            restoring: std::collections::BTreeSet::new(),
            progress,
        }
    }

    pub(super) fn run(mut self, commands: &Receiver<Command>) {
        if let Err(e) = self.follow_until_closed(commands) {
            tracing::error!(error = %e, dir = %self.store.dir.display(), "the local state store stopped being updated; the flow goes on, and its next restore reads the journal from the last checkpoint");
        }
    }

    fn follow_until_closed(&mut self, commands: &Receiver<Command>) -> Result<(), FlowError> {
        loop {
            // With nothing to read, wait for a command instead of polling. Every queued command is
            // handled before reading on, so that a released partition's end is taken when it is
            // released, not after the new owner has written.
            let wait = if self.partitions.is_empty() { Duration::from_millis(500) } else { Duration::ZERO };
            let mut next = commands.recv_timeout(wait);
            loop {
                match next {
                    Ok(command) => {
                        if self.handle(command)? {
                            return Ok(());
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return self.write(),
                    Err(RecvTimeoutError::Timeout) => break,
                }
                next = commands.try_recv().map_err(|e| match e {
                    TryRecvError::Empty => RecvTimeoutError::Timeout,
                    TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                });
            }
            if !self.partitions.is_empty() {
                self.read(Duration::from_millis(100))?;
            }
            if self.pending >= MAX_PENDING || self.last_write.elapsed() >= self.interval || self.restored_to_end() {
                self.write()?;
            }
            self.let_go()?;
        }
    }

    /// Handles one command; true when the follower is to stop.
    fn handle(&mut self, command: Command) -> Result<bool, FlowError> {
        match command {
            Command::Follow(p) => self.follow(p, false)?,
            Command::Restore(p) => {
                self.follow(p, false)?;
                self.restoring.insert(p);
            }
            Command::Standby(p) => self.follow(p, true)?,
            Command::Release(p, end) => match self.standby {
                Standby::None => {
                    let end = match end {
                        Some(end) => end,
                        None => self.end_of(p)?,
                    };
                    if let Some(f) = self.partitions.get_mut(&p) {
                        f.until = Some(end);
                        // The release time is written with the next checkpoint, moved or not.
                        f.moved = true;
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
            Command::Close(done) => {
                self.close()?;
                let _ = done.send(());
                return Ok(true);
            }
            Command::Reset(p, done) => {
                self.reset(p)?;
                let _ = done.send(());
            }
            Command::Quit => {
                self.write()?;
                return Ok(true);
            }
        }
        Ok(false)
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
        self.stored(p, next);
        Ok(())
    }

    /// True once a partition a restore waits for was read to its end: it is written now (and no
    /// longer waited for).
    fn restored_to_end(&mut self) -> bool {
        let partitions = &self.partitions;
        let before = self.restoring.len();
        self.restoring.retain(|p| partitions.get(p).is_some_and(|f| !f.at_end));
        self.restoring.len() < before
    }

    fn reset(&mut self, p: i32) -> Result<(), FlowError> {
        if let Some(f) = self.partitions.remove(&p) {
            self.pending = self.pending.saturating_sub(f.rows.len());
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, p);
            self.consumer.incremental_unassign(&tpl).map_err(|e| kafka("checkpoint follower unassign", e))?;
        }
        self.store.clear(p)?;
        self.stored(p, 0);
        self.store.flush()
    }

    /// The store has partition `p`'s rows up to journal offset `next` (readable by the flow).
    fn stored(&self, p: i32, next: i64) {
        if let Some(progress) = &self.progress {
            progress.stored(p, next);
        }
    }

    fn end_of(&self, p: i32) -> Result<i64, FlowError> {
        let (_, high) = self
            .consumer
            .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
            .map_err(|e| kafka("checkpoint follower watermarks", e))?;
        Ok(high)
    }

    /// Reads what arrives within `wait`, then whatever is ready at once, for at most `wait` more
    /// (commands are not left waiting while records keep coming).
    fn read(&mut self, wait: Duration) -> Result<(), FlowError> {
        let mut timeout = wait;
        let deadline = Instant::now() + wait * 2;
        while Instant::now() < deadline {
            let Some(polled) = self.consumer.poll(timeout) else { break };
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
            f.rows.insert(msg.key().unwrap_or_default().to_vec(), msg.payload().map(stored_row));
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
            if let Some(progress) = &self.progress {
                progress.stored(p, f.next);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use eventstage_journal::{CodecId, Envelope, SeqNo, SourcePosition};

    #[test]
    fn a_stored_row_keeps_the_state_and_positions_without_the_events() {
        let entry = JournalEntry {
            last_seq: SeqNo(7),
            events: vec![Envelope::event(CodecId::BINCODE, 1, 5, b"deposited 5".to_vec())],
            state: Some(Envelope::snapshot(CodecId::BINCODE, 1, 6, b"balance 12".to_vec())),
            sources: vec![SourcePosition { topic: "in".into(), partition: 2, next_offset: 40 }],
        };
        let raw = entry.encode();
        let row = stored_row(&raw);
        assert!(row.len() < raw.len());
        let read = JournalEntry::decode(&row).expect("decodes");
        assert!(read.events.is_empty());
        assert_eq!((read.last_seq, &read.state, &read.sources), (entry.last_seq, &entry.state, &entry.sources));
        // A deletion marker (no state) and bytes that do not decode are kept as they are.
        let marker = JournalEntry { state: None, ..entry }.encode();
        assert_eq!(stored_row(&marker), marker);
        assert_eq!(stored_row(b"not a journal record"), b"not a journal record");
    }
}
