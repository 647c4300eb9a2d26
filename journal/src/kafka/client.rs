//! What the journal's short-lived Kafka clients share: errors, which consumer errors are fatal,
//! watermarks asked again while a leader is elected, the readers' context, and dropping a client
//! off the caller's thread.

use crate::error::JournalError;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;
use std::time::{Duration, Instant};

pub(super) fn kafka_err(topic: &str, what: &str, e: KafkaError) -> JournalError {
    JournalError::Storage { path: format!("kafka topic {topic}").into(), message: format!("{what}: {e}") }
}

pub(super) fn damaged(topic: &str, what: String) -> JournalError {
    JournalError::Damaged { journal: format!("kafka topic {topic}"), what }
}

/// True for a consumer error the client does not recover from. The others (all brokers down for
/// a moment, a transport failure, a leader moving) are reports: librdkafka reconnects and fetches
/// again, and a read that makes no progress ends at its own deadline, naming the last of them.
pub(crate) fn consumer_error_is_fatal(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match e {
        KafkaError::MessageConsumption(code) => {
            matches!(code, Code::TopicAuthorizationFailed | Code::GroupAuthorizationFailed)
        }
        _ => true,
    }
}

/// A metadata error of a topic that was just created, or whose partition has no leader for a moment.
fn transient(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        e.rdkafka_error_code(),
        Some(
            Code::UnknownPartition
                | Code::UnknownTopicOrPartition
                | Code::UnknownTopic
                | Code::LeaderNotAvailable
                | Code::NotLeaderForPartition
        )
    )
}

/// Partition `p`'s low and high watermarks, asked again while the cluster is still electing its
/// leader (a topic just created, a broker restarting: the broker answers `NotLeaderForPartition`
/// or the partition is missing from the metadata for a moment), for up to 30 s.
pub(super) fn watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    p: i32,
) -> rdkafka::error::KafkaResult<(i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        match consumer.fetch_watermarks(topic, p, left) {
            Err(e) if transient(&e) && Instant::now() < deadline => {
                tracing::debug!(error = %e, topic, partition = p, "no leader for the partition yet; asking again");
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// The context of a consumer that reads journal partitions to their end (a restore, a checkpoint
/// follower): reaching the end of a partition is how it knows where it is, not an error worth
/// logging. Other client errors are logged with `what` the consumer is.
#[derive(Debug, Clone, Copy)]
pub struct ReaderContext {
    /// What the consumer is, for its log lines (e.g. "journal restore consumer").
    pub what: &'static str,
}

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !eof {
            tracing::error!(%error, reason, consumer = self.what, "Kafka client error");
        }
    }
}

impl ConsumerContext for ReaderContext {}

pub(super) const RESTORE: ReaderContext = ReaderContext { what: "journal restore consumer" };

/// A short-lived Kafka client that is dropped on a thread of its own. rdkafka's `AdminClient`
/// joins its polling thread when dropped, which polls every 100 ms, and closing a consumer waits
/// for librdkafka's threads: dropped in place, each short-lived client (the journal's check, the
/// owner registry's, a restore's reader, a metadata probe) added up to 100 ms to a flow's start.
#[doc(hidden)]
pub struct Detached<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Detached<T> {
    /// Wraps `client`.
    pub fn new(client: T) -> Self {
        Self(Some(client))
    }
}

impl<T: Send + 'static> std::ops::Deref for Detached<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> std::fmt::Debug for Detached<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Detached(..)")
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            // If the thread cannot start, the closure (and the client) is dropped here instead.
            let _ = std::thread::Builder::new().name("eventstage-client-drop".into()).spawn(move || drop(client));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_down_for_a_moment_does_not_end_a_read() {
        use rdkafka::types::RDKafkaErrorCode as Code;
        // Seen in CI: a journal read ended with "AllBrokersDown" the client was retrying.
        for code in [Code::AllBrokersDown, Code::BrokerTransportFailure, Code::NotLeaderForPartition] {
            assert!(!consumer_error_is_fatal(&KafkaError::MessageConsumption(code)), "{code:?}");
        }
        assert!(consumer_error_is_fatal(&KafkaError::MessageConsumption(Code::TopicAuthorizationFailed)));
        assert!(consumer_error_is_fatal(&KafkaError::MessageConsumptionFatal(Code::Fenced)));
    }
}
