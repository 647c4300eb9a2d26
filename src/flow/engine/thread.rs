//! The flow thread's loop (Kafka Streams' `StreamThread.runLoop`/`runOnce`): poll, hand the
//! record its way, move the open work along, commit when due. Every failure of a round, wherever
//! it surfaced (a produce call, a commit, a rebalance callback), takes the one way back:
//! [`Core::recover`], which classifies it once and heals it or stops the flow.

use super::core::{Core, FlowConsumer};
use super::guarantee::{Guarantee, Wait};
use crate::flow::control::{ABORT, DRAIN};
use crate::flow::error::FlowError;
use crate::flow::shared::{kafka, lock, now_ms};
use crate::stage::EventSourced;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// While records keep coming, the flow loop reads the clock (is a commit due?) once per this many.
const CLOCK_EVERY: u32 = 32;
/// How often a running flow logs a progress line at INFO (rate, lag).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How often the lag is computed (from the high watermarks the consumer's fetches brought).
const LAG_EVERY: Duration = Duration::from_secs(5);

/// A started flow: its state and its consumer, subscribed.
pub(super) struct FlowThread<S: EventSourced, G: Guarantee> {
    pub(super) core: Arc<Mutex<Core<S, G>>>,
    pub(super) consumer: FlowConsumer<S, G>,
    pub(super) schedule: Schedule,
    pub(super) report: Report,
}

impl<S: EventSourced, G: Guarantee> FlowThread<S, G> {
    /// Runs until the application asks the flow to stop (drain: commit what is open; abort) or a
    /// failure cannot be recovered from.
    pub(super) fn run(mut self, stop: &AtomicU8) -> Result<(), FlowError> {
        let result = loop {
            match stop.load(Ordering::SeqCst) {
                // The open transaction is aborted below, with every other way of stopping on an error.
                ABORT => break Err(FlowError::Aborted),
                DRAIN => break lock(&self.core).finish(&self.consumer),
                _ => {}
            }
            if let Err(e) = self.run_once() {
                // The consumer was rewound (a record polled before comes again), or the flow stops.
                if let Err(e) = lock(&self.core).recover(&self.consumer, e) {
                    break Err(e);
                }
            }
        };
        self.close(result)
    }

    /// One round: a record (or none), the enrichment pipeline, pending batches, and a commit
    /// when one is due.
    fn run_once(&mut self) -> Result<(), FlowError> {
        let Polled { record, room, busy, waited } = poll(&self.core, &self.consumer)?;
        let waited = waited || record.is_none();
        let mut c = lock(&self.core);
        // A rebalance callback's failure, recovered from here.
        if let Some(e) = c.failure.take() {
            return Err(e);
        }
        if c.tasks.restore_ended() {
            c.take_restores(&self.consumer, false)?;
        }
        match record {
            Some(Ok(msg)) => c.process(&msg)?,
            // A fatal consumer error ends the consumer for good (librdkafka retries nothing):
            // the flow must stop, not idle as if healthy.
            Some(Err(KafkaError::MessageConsumptionFatal(code))) => return Err(consumer_fatal(code)),
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error (librdkafka retries)"),
            None => {
                c.emitter.hand_off()?;
                if let (true, Core { pipeline: Some(p), metrics, .. }) = (busy, &mut *c) {
                    p.wait(Duration::from_millis(if room { 2 } else { 20 }), metrics);
                }
            }
        }
        c.run_pipeline()?;
        let committing = c.guarantee.busy();
        c.advance(&self.consumer, Wait::No)?;
        if committing && !c.guarantee.busy() {
            self.schedule.commit_ended(Instant::now());
        }
        let now = self.schedule.tick(waited).inspect(|_| c.wall_ms = now_ms());
        if now.is_some() {
            c.fire_timers()?;
        }
        // A commit under way ends before the next starts; the flow processes meanwhile.
        if (self.schedule.due(now) || c.guarantee.due()) && !c.guarantee.busy() {
            let started = now.unwrap_or_else(Instant::now);
            c.commit(&self.consumer)?;
            self.schedule.committed(started);
            self.report.after_commit(&c, &self.consumer);
        }
        Ok(())
    }

    /// After the loop: a failed flow abandons its open work; a drained one leaves the group.
    fn close(self, result: Result<(), FlowError>) -> Result<(), FlowError> {
        match &result {
            // The error may have come after the failed record's offset was counted (a command
            // whose events cannot be journaled): the open transaction is aborted, and closing the
            // consumer must not commit it on the way out.
            Err(_) => lock(&self.core).abandon(),
            Ok(()) => {
                // Leave the group now; the revoke callback finds nothing left to commit.
                self.consumer.unsubscribe();
                let _ = self.consumer.poll(Duration::from_millis(100));
                lock(&self.core).storage.close();
            }
        }
        drop(self.consumer);
        result
    }
}

/// What a round polled, and the enrichment pipeline's state when it polled.
struct Polled<'a> {
    record: Option<Result<BorrowedMessage<'a>, KafkaError>>,
    /// The pipeline had room (or there is none).
    room: bool,
    /// The pipeline had records in it.
    busy: bool,
    /// The poll waited for input (it had none at once).
    waited: bool,
}

/// Polls a record, without holding the lock (rebalance callbacks run inside poll and take it).
/// With enrichment, a full pipeline stops consumption (back-pressure) and a busy one is polled
/// without waiting, so finished calls reach the stage at once. Without waiting first (no clock
/// reads while records are queued); before waiting, the emitter gets what is collected, so
/// outputs never wait for more input.
fn poll<'a, S: EventSourced, G: Guarantee>(
    core: &Mutex<Core<S, G>>,
    consumer: &'a FlowConsumer<S, G>,
) -> Result<Polled<'a>, FlowError> {
    let (room, busy, committing, held_full) = {
        let c = lock(core);
        let (room, busy) = c.pipeline.as_ref().map_or((true, false), |p| (p.has_room(), !p.is_empty()));
        (room, busy, c.guarantee.busy(), c.emitter.holds_too_many())
    };
    // While a commit is under way the next transaction's records are held: past a bound,
    // consumption waits for the commit (back-pressure).
    if held_full {
        std::thread::sleep(Duration::from_millis(1));
        return Ok(Polled { record: None, room, busy, waited: true });
    }
    let mut waited = false;
    let record = match (room, busy) {
        (true, false) => match consumer.poll(Duration::ZERO) {
            None => {
                waited = true;
                lock(core).emitter.hand_off()?;
                // A commit's end is noticed by the next round: soon, while one is under way.
                consumer.poll(Duration::from_millis(if committing { 1 } else { 20 }))
            }
            record => record,
        },
        (true, true) => consumer.poll(Duration::ZERO),
        (false, _) => None,
    };
    Ok(Polled { record, room, busy, waited })
}

/// When the next commit is due.
pub(super) struct Schedule {
    every: Duration,
    /// Where the interval to the next commit counts from.
    last: Instant,
    polls: u32,
}

impl Schedule {
    pub(super) fn new(every: Duration) -> Self {
        Self { every, last: Instant::now(), polls: 0 }
    }

    /// The time, when the loop looks at the clock this round: after waiting for input, else every
    /// [`CLOCK_EVERY`] rounds while records keep coming (no clock read per record).
    fn tick(&mut self, waited: bool) -> Option<Instant> {
        self.polls = self.polls.wrapping_add(1);
        (waited || self.polls % CLOCK_EVERY == 0).then(Instant::now)
    }

    fn due(&self, now: Option<Instant>) -> bool {
        now.is_some_and(|now| now.saturating_duration_since(self.last) >= self.every)
    }

    /// A commit that ran beside processing (exactly once) ended at `ended`: the next is due no
    /// sooner than half an interval later, so that a commit slower than the interval is not
    /// followed at once by another carrying the few records of its own duration. (With one
    /// producer the records held while a commit ran went out only when it ended, and a commit
    /// started at once waited for all of them: at 50 ms, commits took 35-65 ms instead of
    /// 29-36 ms. With two producers taking turns they go out once the committing one's records
    /// are acknowledged; with and without this rule p99 was within the runs' noise.)
    fn commit_ended(&mut self, ended: Instant) {
        if let Some(earliest) = (ended + self.every / 2).checked_sub(self.every) {
            self.last = self.last.max(earliest);
        }
    }

    /// A commit that started at `started` returned now (exactly once: its seal, the rest runs
    /// beside processing; at least once: the batch's hand-off and the wait for pending batches).
    /// The next one is due one interval after it started (as Kafka Streams counts: a commit's own
    /// duration does not stretch the interval), but no sooner than half an interval, or as long
    /// as this call took, after it returned. The loop does not consume during the call, so after
    /// one slower than the interval the next would be due at once, after CLOCK_EVERY records: on
    /// Apache Kafka, when commits blocked the loop for 100+ ms, the flow fell into committing
    /// every 32 commands (~300/s) while its backlog grew.
    fn committed(&mut self, started: Instant) {
        let finished = Instant::now();
        let gap = (self.every / 2).max(finished.saturating_duration_since(started));
        let due = (finished + gap).max(started + self.every);
        self.last = due.checked_sub(self.every).unwrap_or(started);
    }
}

/// What a running flow tells after its commits: the lag (asked of the broker now and then), the
/// exported metrics, and a progress line at INFO every [`PROGRESS_EVERY`].
pub(super) struct Report {
    last_lag: Instant,
    /// When the last progress line was logged, and the records in by then.
    last_progress: (Instant, u64),
}

impl Report {
    pub(super) fn new() -> Self {
        Self { last_lag: Instant::now(), last_progress: (Instant::now(), 0) }
    }

    fn after_commit<S: EventSourced, G: Guarantee>(&mut self, c: &Core<S, G>, consumer: &FlowConsumer<S, G>) {
        if self.last_lag.elapsed() >= LAG_EVERY {
            update_lag(c, consumer);
            self.last_lag = Instant::now();
        }
        let m = c.metrics.snapshot();
        c.exported.publish(&m);
        if self.last_progress.0.elapsed() >= PROGRESS_EVERY {
            let secs = self.last_progress.0.elapsed().as_secs_f64();
            let rate = (m.records_in - self.last_progress.1) as f64 / secs;
            tracing::info!(
                records_per_s = rate.round() as u64,
                lag = m.lag,
                partitions = m.assigned_partitions,
                commits = m.transactions,
                aborts = m.aborts,
                dead_letters = m.dead_letters,
                "progress"
            );
            self.last_progress = (Instant::now(), m.records_in);
        }
    }
}

/// The lag per partition, from the high watermarks the consumer's last fetches brought: no round
/// trip. Asking the broker (`fetch_watermarks`, a round trip per partition on the flow thread)
/// stalled the flow every few seconds, by up to 100 ms under load: at 50 ms commits that was most
/// of the gap between p99 and the commit interval. A partition not fetched from yet is left out.
fn update_lag<S: EventSourced, G: Guarantee>(c: &Core<S, G>, consumer: &FlowConsumer<S, G>) {
    let mut lag = 0u64;
    for (topic, p, o) in c.tasks.offsets() {
        if let Some(high) = cached_high_watermark(consumer, topic, p) {
            let behind = (high - o.next.max(0)).max(0) as u64;
            c.exported.partition_lag(topic, p, behind);
            lag += behind;
        }
    }
    c.metrics.lag.store(lag, Ordering::Relaxed);
}

/// The high watermark of `topic`'s partition `p` as of the consumer's last fetch from it.
fn cached_high_watermark<S: EventSourced, G: Guarantee>(
    consumer: &FlowConsumer<S, G>,
    topic: &str,
    p: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client is alive (borrowed for the call), the topic a NUL-terminated string, and
    // the out-pointers point to locals; librdkafka only reads its partition's cached offsets.
    let code = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            p,
            &mut low,
            &mut high,
        )
    };
    (code == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// The error of a fatal consumer error, with what to do about it.
pub(super) fn consumer_fatal(code: RDKafkaErrorCode) -> FlowError {
    let hint = match code {
        RDKafkaErrorCode::FencedInstanceId => {
            "another live instance joined the group with this instance's group.instance.id (with FlowBuilder::static_membership it is the transactional id): give every instance its own id"
        }
        RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::GroupAuthorizationFailed => {
            "the consumer is not authorized: grant it read on the inputs and the group"
        }
        _ => "the consumer cannot go on; restart the flow",
    };
    kafka(format!("consumer (fatal): {hint}"), KafkaError::MessageConsumptionFatal(code))
}
