//! The follower thread: reads the committed journal partitions it follows and writes their rows
//! and checkpoints to the local store.

use super::super::super::cache::StoreProgress;
use super::common::{Command, JournalRecord, Owned, Standby, StoreSettings, CLOSE_TIMEOUT};
use super::row::stored_row;
use super::store::LocalStore;
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::shared::{kafka, lock, now_ms};
use eventstage_journal::kafka::ReaderContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The follower writes a checkpoint once this many changed rows are pending, whatever the interval.
const MAX_PENDING: usize = 100_000;

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
    /// The consumer reads the partition (not once the flow hands over its rows).
    assigned: bool,
    /// Owned by a flow that hands over its committed rows ([`Command::Own`]): the journal is read
    /// up to this offset; the records from there on are the flow's own, and come from it.
    own_from: Option<i64>,
    /// The journal was read up to `own_from`: the partition's rows come from the flow only.
    direct: bool,
    /// The flow's rows that came before the journal was read up to `own_from`, in order, with the
    /// offset each batch is below.
    queued: Vec<(Arc<Vec<JournalRecord>>, i64)>,
}

impl Followed {
    /// A partition the consumer reads from `next` on.
    fn new(next: i64, released: u64) -> Self {
        Self {
            next,
            rows: HashMap::new(),
            moved: false,
            until: None,
            at_end: false,
            released,
            assigned: true,
            own_from: None,
            direct: false,
            queued: Vec::new(),
        }
    }

    /// Whether the partition was read up to `end` (an offset taken earlier). A partition ending
    /// in a transaction marker is read to its end when the consumer reports the end with only that
    /// one offset unread (librdkafka's position does not always move past a final marker). The
    /// checkpoint stores `next` either way: letting go early only lengthens the next tail.
    fn reached(&self, end: i64) -> bool {
        self.next >= end || (self.at_end && self.next + 1 >= end)
    }

    /// Where the consumer's records stop being this partition's rows: the end of a released
    /// partition (the new owner's records), or where the flow's own records start (it hands
    /// them over).
    fn limit(&self) -> Option<i64> {
        self.until.into_iter().chain(self.own_from).min()
    }

    /// Takes a batch of the flow's committed records (below journal offset `next`); returns how
    /// many rows it added. A batch the consumer already read (it read the partition up to `next`
    /// before it learnt that the flow owns it) is skipped: its rows could be older than those read
    /// after it.
    fn take(&mut self, records: &[JournalRecord], next: i64) -> usize {
        if next <= self.next {
            return 0;
        }
        for (key, value) in records {
            self.rows.insert(key.clone(), value.as_deref().map(stored_row));
        }
        self.next = self.next.max(next);
        self.moved = true;
        records.len()
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
    /// Where the flow (its state cache, a restore through the store) learns how far the store
    /// has each partition's rows.
    progress: Arc<StoreProgress>,
    metrics: Arc<Metrics>,
}

impl Follower {
    pub(super) fn new(
        owned: Owned,
        store: LocalStore,
        topic: &str,
        consumer: BaseConsumer<ReaderContext>,
        settings: &StoreSettings,
        progress: Arc<StoreProgress>,
        metrics: Arc<Metrics>,
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
            metrics,
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
            // Partitions whose rows all come from the flow need no reading: their rows arrive as
            // commands.
            let consuming = self.partitions.values().any(|f| f.assigned);
            let wait = match (self.partitions.is_empty(), consuming) {
                (true, _) => Duration::from_millis(500),
                (false, false) => Duration::from_millis(100),
                (false, true) => Duration::ZERO,
            };
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
            if consuming {
                self.read(Duration::from_millis(100))?;
                self.go_direct()?;
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
            Command::Own(p, from) => {
                self.follow(p, false)?;
                // Given away and back before the follower let it go: another owner may have written
                // beyond what the flow handed over, and the consumer reads that first.
                if self.partitions.get(&p).is_some_and(|f| f.direct && f.next < from) {
                    self.disown(p)?;
                }
                if let Some(f) = self.partitions.get_mut(&p) {
                    f.own_from = Some(from);
                }
                self.go_direct()?;
            }
            Command::Rows(p, records, next) => match self.partitions.get_mut(&p) {
                Some(f) if f.direct => {
                    let taken = f.take(&records, next);
                    self.taken(taken);
                }
                Some(f) if f.own_from.is_some() => f.queued.push((records, next)),
                // Never expected (a partition is owned before its rows come); the checkpoint does
                // not move past rows it lacks.
                _ => tracing::warn!(partition = p, "local state store: committed rows of a partition it does not keep; a restore reads them from the journal"),
            },
            Command::Restore(p) => {
                self.follow(p, false)?;
                self.restoring.insert(p);
            }
            Command::Standby(p) => self.follow(p, true)?,
            Command::Release(p, end) => match (self.standby, self.partitions.get_mut(&p)) {
                (Standby::None, Some(f)) if f.direct => {
                    // Every row the flow committed came before: done.
                    f.own_from = None;
                    f.until = Some(f.next);
                    f.moved = true;
                }
                (standby, _) => {
                    self.disown(p)?;
                    self.release(p, end, standby)?;
                }
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

    /// Partition `p`, read by the consumer, went to another instance (`end`: the partition's end
    /// then, if the flow took it).
    fn release(&mut self, p: i32, end: Option<i64>, standby: Standby) -> Result<(), FlowError> {
        match standby {
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
        }
        Ok(())
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
        self.partitions.insert(p, Followed::new(next, released));
        self.stored(p, next);
        Ok(())
    }

    /// `n` rows the flow handed over were taken.
    fn taken(&mut self, n: usize) {
        self.pending += n;
        self.metrics.store_handed_rows.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Partitions read up to where the flow's own records start take the flow's rows from now on:
    /// the consumer lets them go, and the rows the flow handed over meanwhile are taken.
    fn go_direct(&mut self) -> Result<(), FlowError> {
        let (mut tpl, mut taken) = (TopicPartitionList::new(), 0);
        for (&p, f) in &mut self.partitions {
            let Some(from) = f.own_from.filter(|&from| !f.direct && f.reached(from)) else { continue };
            f.direct = true;
            taken +=
                std::mem::take(&mut f.queued).into_iter().map(|(records, next)| f.take(&records, next)).sum::<usize>();
            if f.assigned {
                f.assigned = false;
                tpl.add_partition(&self.topic, p);
            }
            tracing::debug!(
                partition = p,
                from,
                "local state store: the flow's committed rows are written from here on"
            );
        }
        self.taken(taken);
        if tpl.count() > 0 {
            self.consumer.incremental_unassign(&tpl).map_err(|e| kafka("checkpoint follower unassign", e))?;
        }
        Ok(())
    }

    /// Partition `p` no longer hands over its rows: the consumer reads it again from `next` (rows
    /// the flow handed over beyond `next` and not taken yet are read from the journal instead).
    fn disown(&mut self, p: i32) -> Result<(), FlowError> {
        let Some(f) = self.partitions.get_mut(&p).filter(|f| f.own_from.is_some() || f.direct) else {
            return Ok(());
        };
        f.own_from = None;
        f.direct = false;
        f.queued.clear();
        f.at_end = false;
        // The consumer may have skipped records beyond `next` (the flow's): it starts over there.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, Offset::Offset(f.next))
            .map_err(|e| kafka("checkpoint follower", e))?;
        if f.assigned {
            self.consumer.incremental_unassign(&tpl).map_err(|e| kafka("checkpoint follower unassign", e))?;
        }
        self.consumer.incremental_assign(&tpl).map_err(|e| kafka("checkpoint follower assign", e))?;
        f.assigned = true;
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
            if f.assigned {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&self.topic, p);
                self.consumer.incremental_unassign(&tpl).map_err(|e| kafka("checkpoint follower unassign", e))?;
            }
        }
        self.store.clear(p)?;
        self.stored(p, 0);
        self.store.flush()
    }

    /// The store has partition `p`'s rows up to journal offset `next` (readable by the flow).
    fn stored(&self, p: i32, next: i64) {
        self.progress.stored(p, next);
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
            if let Some(end) = f.limit().filter(|end| msg.offset() >= *end) {
                // Read up to its limit (records come in order): what the new owner of a released
                // partition writes is not read (see `Standby::None`), and the flow hands over the
                // rows of its own records itself.
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
            self.metrics.store_read_records.fetch_add(1, Ordering::Relaxed);
            if self.pending >= MAX_PENDING {
                break;
            }
        }
        // Past transaction markers: the consumer's position is beyond the last record read.
        if let Ok(positions) = self.consumer.position() {
            for el in positions.elements() {
                if let (Offset::Offset(o), Some(f)) = (el.offset(), self.partitions.get_mut(&el.partition())) {
                    let o = f.limit().map_or(o, |end| o.min(end));
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
            self.progress.stored(p, f.next);
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
                if f.assigned {
                    tpl.add_partition(&self.topic, p);
                }
            }
        }
        let owned = self.owned.clone();
        let owned = lock(&owned);
        for &p in expired.iter().filter(|p| !owned.contains(p)) {
            let assigned = self.partitions.remove(&p).is_some_and(|f| f.assigned);
            tracing::info!(dir = %self.store.dir.display(), partition = p, "dropping the local rows of a standby partition released longer than the retention");
            self.store.clear(p)?;
            if assigned {
                tpl.add_partition(&self.topic, p);
            }
        }
        drop(owned);
        self.store.flush()?;
        if tpl.count() > 0 {
            self.consumer.incremental_unassign(&tpl).map_err(|e| kafka("checkpoint follower unassign", e))?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), FlowError> {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        // Partitions owned by the flow end where its own records start: it handed over the rows
        // of everything it committed.
        let mut ends = BTreeMap::new();
        for (&p, f) in self.partitions.iter().filter(|(_, f)| !f.direct) {
            let end = match f.own_from {
                Some(from) => from,
                None => self.end_of(p)?,
            };
            ends.insert(p, end);
        }
        while Instant::now() < deadline
            && ends.iter().any(|(p, end)| self.partitions.get(p).is_some_and(|f| !f.reached(*end)))
        {
            self.read(Duration::from_millis(50))?;
            self.go_direct()?;
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

    #[test]
    fn the_flows_rows_are_taken_in_order_and_a_batch_already_read_is_skipped() {
        let row = |v: &str| (b"acct-1".to_vec(), Some(v.as_bytes().to_vec()));
        // The consumer read the partition up to offset 20 before it learnt that the flow owns it.
        let mut f = Followed::new(20, 0);
        f.rows.insert(b"acct-1".to_vec(), Some(b"as of 19".to_vec()));
        assert_eq!(f.take(&[row("as of 12")], 13), 0, "a batch below what was read is older");
        assert_eq!(f.rows[&b"acct-1".to_vec()].as_deref(), Some(&b"as of 19"[..]));
        assert_eq!(f.take(&[row("as of 24"), (b"acct-2".to_vec(), None)], 25), 2);
        assert_eq!(f.take(&[row("as of 30")], 31), 1);
        assert_eq!(f.next, 31);
        assert_eq!(f.rows[&b"acct-1".to_vec()].as_deref(), Some(&b"as of 30"[..]));
        assert_eq!(f.rows[&b"acct-2".to_vec()], None, "a tombstone is kept as one");
        assert!(f.moved);
    }
}
