//! What a flow promises and how it batches: the delivery guarantee, the at-least-once committer,
//! async enrichment and rebalance listeners.

use crate::flow::error::{describe, BoxError};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A boxed future, as the flow stores user functions.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a flow promises about each input record's effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Guarantee {
    /// One Kafka transaction per commit interval holds the outputs, the journal records and the
    /// consumed offsets: `read_committed` consumers see every input's outputs exactly once.
    #[default]
    ExactlyOnce,
    /// Alpakka Kafka's committable source → process → `Committer.sink`: no transactions. Outputs
    /// are produced as inputs are processed; the journal is written once a batch's outputs are
    /// acknowledged, and the batch's offsets are committed once its journal records are. A crash
    /// loses nothing but may deliver inputs again: their outputs can appear more than once, while
    /// their events are never applied twice (every journal record carries the input positions
    /// it includes, so a redelivered input whose events are journaled is skipped). Cheaper than
    /// transactions, and outputs are visible at once (any isolation level).
    AtLeastOnce,
}

/// How an at-least-once flow commits offsets (Alpakka Kafka's `CommitterSettings`):
/// `CommitterSettings::default().max_batch(500)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitterSettings {
    /// A batch ends after this many input records. Default: 1000.
    pub max_batch: usize,
    /// ... or after this long. Default: the flow's commit interval (100 ms).
    pub max_interval: Option<Duration>,
    /// Batches that may wait for their acknowledgements and offset commit at the same time while
    /// processing goes on; more make the flow wait (back-pressure). Default: 4.
    pub parallelism: usize,
}

impl Default for CommitterSettings {
    fn default() -> Self {
        Self { max_batch: 1000, max_interval: None, parallelism: 4 }
    }
}

impl CommitterSettings {
    /// A batch ends after this many input records.
    #[must_use]
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }

    /// ... or after this long (`None`: the flow's commit interval).
    #[must_use]
    pub fn max_interval(mut self, interval: Option<Duration>) -> Self {
        self.max_interval = interval;
        self
    }

    /// Batches waiting for their acknowledgements and offset commit at the same time.
    #[must_use]
    pub fn parallelism(mut self, n: usize) -> Self {
        self.parallelism = n;
        self
    }
}

/// How [`FlowBuilder::enrich`](crate::flow::FlowBuilder::enrich) calls its async function:
/// `EnrichSettings::parallelism(8).attempts(5)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct EnrichSettings {
    /// Calls in flight at most (Akka's `mapAsync(parallelism)`); results are used in input order per
    /// partition, and the flow stops consuming while this many records wait. Default: 16.
    pub parallelism: usize,
    /// Attempts per record before the flow's bad-input policy takes it (dead letter or stop).
    /// Default: 3.
    pub attempts: u32,
    /// Wait before the second attempt; doubles per attempt, up to `max_backoff`. Default: 100 ms.
    pub backoff: Duration,
    /// Longest wait between attempts. Default: 5 s.
    pub max_backoff: Duration,
    /// An attempt that takes longer fails. Default: 30 s.
    pub timeout: Duration,
}

impl Default for EnrichSettings {
    fn default() -> Self {
        Self {
            parallelism: 16,
            attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        }
    }
}

impl EnrichSettings {
    /// Default settings with `parallelism` calls in flight.
    pub fn parallelism(parallelism: usize) -> Self {
        Self { parallelism, ..Self::default() }
    }

    /// Attempts per record before the bad-input policy takes it.
    #[must_use]
    pub fn attempts(mut self, n: u32) -> Self {
        self.attempts = n;
        self
    }

    /// Wait before the second attempt (doubling per attempt), and the longest wait.
    #[must_use]
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max;
        self
    }

    /// An attempt that takes longer fails.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The enrichment step, type-erased: retries and timeouts included.
pub(crate) type EnrichFn<K, C> = Arc<dyn Fn(K, C) -> BoxFuture<Result<C, String>> + Send + Sync>;

/// An enrichment step with its settings.
pub(crate) type Enrichment<S> =
    (EnrichSettings, EnrichFn<<S as crate::EventSourced>::Key, <S as crate::EventSourced>::Command>);

/// Wraps a user's enrichment function with the timeout and retry policy of `settings`.
pub(crate) fn retrying<K, C, F, Fut, E>(settings: EnrichSettings, f: F) -> EnrichFn<K, C>
where
    K: Clone + Send + 'static,
    C: Clone + Send + 'static,
    F: Fn(K, C) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<C, E>> + Send + 'static,
    E: Into<BoxError>,
{
    let f = Arc::new(f);
    Arc::new(move |key: K, command: C| {
        let f = f.clone();
        Box::pin(async move {
            let mut delay = settings.backoff;
            let mut attempt = 1;
            loop {
                let error = match tokio::time::timeout(settings.timeout, f(key.clone(), command.clone())).await {
                    Ok(Ok(enriched)) => return Ok(enriched),
                    Ok(Err(e)) => describe(e),
                    Err(_) => format!("timed out after {:?}", settings.timeout),
                };
                if attempt >= settings.attempts.max(1) {
                    return Err(format!("enrichment failed after {attempt} attempts: {error}"));
                }
                tracing::warn!(attempt, %error, retry_in_ms = delay.as_millis() as u64, "enrichment failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(settings.max_backoff);
                attempt += 1;
            }
        }) as BoxFuture<Result<C, String>>
    })
}

/// A topic partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
}

/// A change of the partitions a flow instance owns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RebalanceEvent {
    /// These partitions are now this instance's; their state is restored.
    Assigned(Vec<TopicPartition>),
    /// These partitions go to another instance; everything consumed from them is committed.
    Revoked(Vec<TopicPartition>),
    /// These partitions were taken away without a revocation (the session expired): nothing
    /// since the last commit was committed, and their state was dropped.
    Lost(Vec<TopicPartition>),
}

impl RebalanceEvent {
    /// The partitions concerned.
    pub fn partitions(&self) -> &[TopicPartition] {
        match self {
            Self::Assigned(p) | Self::Revoked(p) | Self::Lost(p) => p,
        }
    }
}

/// What a synchronous rebalance listener may do while the rebalance waits for it.
#[derive(Debug)]
pub struct RebalanceActions<'a> {
    pub(crate) committed: &'a [(TopicPartition, i64)],
    pub(crate) seeks: &'a mut Vec<(String, i32, i64)>,
}

impl RebalanceActions<'_> {
    /// The group's committed offset of a partition this instance owns (the next offset to read;
    /// `None` when nothing was committed yet or the partition is not owned).
    pub fn committed_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.committed
            .iter()
            .find(|(tp, _)| tp.topic == topic && tp.partition == partition)
            .map(|(_, o)| *o)
            .filter(|o| *o >= 0)
    }

    /// On assignment: start reading `topic[partition]` at `offset` instead of the committed offset.
    /// With a journal, inputs before the journal's state are then skipped only if the journal says
    /// so (sled positions, at-least-once positions); seeking backwards under exactly-once applies
    /// inputs again: the caller owns that choice.
    pub fn seek(&mut self, topic: &str, partition: i32, offset: i64) {
        self.seeks.push((topic.to_string(), partition, offset));
    }
}

/// A synchronous listener: runs on the flow's thread inside the rebalance. On assignment after
/// the partitions' state is restored (and before any of their records is processed); on
/// revocation after the flow finished and committed their in-flight work and before their state
/// is released.
pub(crate) type SyncListener = Box<dyn FnMut(&RebalanceEvent, &mut RebalanceActions<'_>) + Send>;
/// An async listener: gets every event in order on a task of its own, never blocking the poll loop.
pub(crate) type AsyncListener = Arc<dyn Fn(RebalanceEvent) -> BoxFuture<()> + Send + Sync>;

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// Partitions for log lines, per topic: `bank-commands[0,1,3] limits[2]`.
pub(crate) struct Partitions<'a>(pub(crate) &'a [TopicPartition]);

impl fmt::Display for Partitions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "none");
        }
        let mut sorted: Vec<&TopicPartition> = self.0.iter().collect();
        sorted.sort();
        let mut topic: Option<&str> = None;
        for tp in sorted {
            match topic {
                Some(t) if t == tp.topic => write!(f, ",{}", tp.partition)?,
                Some(_) => write!(f, "] {}[{}", tp.topic, tp.partition)?,
                None => write!(f, "{}[{}", tp.topic, tp.partition)?,
            }
            topic = Some(&tp.topic);
        }
        write!(f, "]")
    }
}

/// A warning that can repeat once per record (bad input): the first few are logged each, then at
/// most one line per interval with how many were not, so that a flood of bad records does not
/// become a flood of log lines.
#[derive(Debug)]
pub(crate) struct Throttle {
    logged: u32,
    suppressed: u64,
    last: Option<std::time::Instant>,
}

impl Throttle {
    /// Logged one by one before throttling starts.
    const FIRST: u32 = 10;
    /// At most one line per this interval after that.
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    pub(crate) const fn new() -> Self {
        Self { logged: 0, suppressed: 0, last: None }
    }

    /// Whether to log this occurrence, and how many were not logged before it.
    pub(crate) fn check(&mut self) -> Option<u64> {
        if self.logged < Self::FIRST {
            self.logged += 1;
            return Some(std::mem::take(&mut self.suppressed));
        }
        let now = std::time::Instant::now();
        if self.last.is_none_or(|l| now.duration_since(l) >= Self::EVERY) {
            self.last = Some(now);
            return Some(std::mem::take(&mut self.suppressed));
        }
        self.suppressed += 1;
        None
    }
}

/// Where a flow keeps its entities' events.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlowJournal {
    /// A compacted Kafka topic (created if missing): state follows partitions across instances.
    Kafka(String),
    /// A local sled store: events and consumed positions in one write, plus an outbox. The store is
    /// local to one instance, so partitions must not move to other instances (run one instance, or
    /// one per fixed set of partitions).
    Sled(std::path::PathBuf),
    /// No journal: for stateless stages (`State = ()`) or state that may start empty after every
    /// restart and rebalance.
    None,
}

/// What to do with an input record that does not decode (or whose handler panics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadInput {
    /// Produce it to this dead-letter topic, with headers naming source and error (the default, to
    /// `<first input topic>.dlq`).
    DeadLetter(String),
    /// Stop the flow with [`FlowError::BadInput`](crate::flow::FlowError::BadInput).
    Stop,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_print_per_topic() {
        let tp = |t: &str, p| TopicPartition { topic: t.into(), partition: p };
        let list = [tp("b", 2), tp("a", 1), tp("b", 0), tp("a", 0)];
        assert_eq!(Partitions(&list).to_string(), "a[0,1] b[0,2]");
        assert_eq!(Partitions(&[]).to_string(), "none");
    }

    #[test]
    fn a_flood_of_warnings_is_throttled_and_counted() {
        let mut t = Throttle::new();
        let logged: Vec<Option<u64>> = (0..5000).map(|_| t.check()).collect();
        // The first ten, and the first after them (no line in the last interval yet).
        assert_eq!(logged.iter().filter(|l| l.is_some()).count(), 11);
        assert!(logged[..11].iter().all(|l| *l == Some(0)));
        assert_eq!(t.suppressed, 5000 - 11);
        // The next line, once due, says how many were not logged.
        t.last = Some(std::time::Instant::now() - Throttle::EVERY);
        assert_eq!(t.check(), Some(5000 - 11));
        assert_eq!(t.check(), None);
    }
}
