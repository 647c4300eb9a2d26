//! What the flow thread does once at start: the deadline of the whole start, the inputs'
//! partition count, a journal taken over from another group, and the error of a consumer that
//! cannot go on.

use super::TXN_TIMEOUT;
use crate::flow::shared::kafka;
use crate::flow::FlowError;
use eventstage_journal::kafka::Detached;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The flow's start (metadata, the journal's checks, the transactional producer's
/// `init_transactions`), bounded as a whole by `FlowBuilder::setup_timeout`: each step retries
/// until the deadline, then the flow stops with one error that names the brokers, the step, how
/// long it tried and the fix.
pub(super) struct Setup<'a> {
    started: Instant,
    timeout: Duration,
    brokers: String,
    stop: &'a AtomicU8,
}

impl<'a> Setup<'a> {
    pub(super) fn new(started: Instant, timeout: Duration, common: &ClientConfig, stop: &'a AtomicU8) -> Self {
        let brokers = common.get("bootstrap.servers").unwrap_or("(no bootstrap.servers)").to_string();
        Self { started, timeout, brokers, stop }
    }

    /// Time left until the deadline.
    pub(super) fn remaining(&self) -> Duration {
        self.timeout.saturating_sub(self.started.elapsed())
    }

    /// The timeout of one blocking attempt: what is left, at most `cap`, at least 100 ms (a
    /// librdkafka call given 0 does not even send its request).
    pub(super) fn attempt(&self, cap: Duration) -> Duration {
        self.remaining().clamp(Duration::from_millis(100), cap.max(Duration::from_millis(100)))
    }

    /// False once the application asked the flow to stop (drain or abort): no more retries.
    pub(super) fn running(&self) -> bool {
        self.stop.load(Ordering::SeqCst) == crate::flow::RUN
    }

    /// The error after the deadline: what the flow was `doing`, against which brokers, for how
    /// long, the last error (if any, rendered once) and the fix.
    pub(super) fn gave_up(&self, doing: &str, last: Option<&FlowError>) -> FlowError {
        // One message with the last error's text in it, and no `source()`: a cause chain
        // (anyhow's `{:#}`) prints librdkafka's message once.
        let last = last.map_or_else(String::new, |e| format!(" (last error: {e})"));
        FlowError::Config(format!(
            "the flow's setup gave up after {:.1} s {doing} with the brokers {brokers}{last}: check the bootstrap servers and that the brokers are up and reachable from here, or raise FlowBuilder::setup_timeout (now {:.1} s)",
            self.started.elapsed().as_secs_f64(),
            self.timeout.as_secs_f64(),
            brokers = self.brokers,
        ))
    }

    /// Runs `f` (a step whose blocking calls have deadlines of their own, longer than the time
    /// left) on a thread of its own and waits for it until the deadline. A step still running
    /// then is left to finish on its thread, its result dropped; its clients close when it does.
    pub(super) fn within<T: Send + 'static>(
        &self,
        doing: &str,
        f: impl FnOnce() -> Result<T, FlowError> + Send + 'static,
    ) -> Result<T, FlowError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("eventstage-flow-setup".into())
            .spawn(move || {
                let _ = tx.send(f());
            })
            .map_err(|e| FlowError::Config(format!("cannot start a thread of the flow's setup: {e}")))?;
        match rx.recv_timeout(self.remaining()) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(self.gave_up(doing, None)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(FlowError::Crashed(format!("the flow's setup panicked {doing}")))
            }
        }
    }
}

/// The error of a fatal consumer error, with what to do about it.
pub(super) fn consumer_fatal(code: RDKafkaErrorCode) -> FlowError {
    let hint = match code {
        RDKafkaErrorCode::FencedInstanceId => {
            "another live instance joined the group with this instance's group.instance.id (a flow with a transactional id uses it as its static member id): give every instance its own id"
        }
        RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::GroupAuthorizationFailed => {
            "the consumer is not authorized: grant it read on the inputs and the group"
        }
        _ => "the consumer cannot go on; restart the flow",
    };
    kafka(format!("consumer (fatal): {hint}"), KafkaError::MessageConsumptionFatal(code))
}

/// Copies group `from`'s committed offsets of the inputs to group `to` where `to` has none: a
/// group taking a journal over goes on where the journal's state is.
pub(super) fn carry_offsets_over(
    common: &ClientConfig,
    from: &str,
    to: &str,
    inputs: &[String],
    partitions: i32,
) -> Result<(), FlowError> {
    let mut tpl = TopicPartitionList::new();
    for topic in inputs {
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
    }
    let group = |id: &str| -> Result<BaseConsumer, FlowError> {
        common
            .clone()
            .set("group.id", id)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| kafka("offsets client", e))
    };
    let old = group(from)?
        .committed_offsets(tpl.clone(), TXN_TIMEOUT)
        .map_err(|e| kafka(format!("committed offsets of group {from}"), e))?;
    let new = group(to)?;
    let mine =
        new.committed_offsets(tpl, TXN_TIMEOUT).map_err(|e| kafka(format!("committed offsets of group {to}"), e))?;
    let mut carried = TopicPartitionList::new();
    for el in old.elements() {
        let unset =
            mine.find_partition(el.topic(), el.partition()).is_none_or(|m| !matches!(m.offset(), Offset::Offset(_)));
        if let (Offset::Offset(o), true) = (el.offset(), unset) {
            carried
                .add_partition_offset(el.topic(), el.partition(), Offset::Offset(o))
                .map_err(|e| kafka("offsets", e))?;
        }
    }
    if carried.count() > 0 {
        new.commit(&carried, rdkafka::consumer::CommitMode::Sync)
            .map_err(|e| kafka(format!("commit the offsets carried over to group {to}"), e))?;
    }
    tracing::info!(from, to, partitions = carried.count(), "carried the previous owner's committed input offsets over");
    Ok(())
}

/// The inputs' partition count (they must agree); each metadata request waits at most `timeout`.
pub(super) fn input_partitions(common: &ClientConfig, inputs: &[String], timeout: Duration) -> Result<i32, FlowError> {
    let probe: Detached<BaseConsumer> = Detached::new(common.create().map_err(|e| kafka("metadata client", e))?);
    let mut count = None;
    for topic in inputs {
        let md = probe.fetch_metadata(Some(topic), timeout).map_err(|e| kafka(format!("metadata of {topic}"), e))?;
        let n = md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len() as i32);
        if n == 0 {
            return Err(FlowError::Config(format!("input topic `{topic}` does not exist; create it first")));
        }
        if count.is_some_and(|c| c != n) {
            return Err(FlowError::Config(format!(
                "input topics have different partition counts ({} vs {n} for `{topic}`); state partitions must line up, so give them the same count",
                count.unwrap_or_default()
            )));
        }
        count = Some(n);
    }
    count.ok_or_else(|| FlowError::Config("no input topics".into()))
}
