//! The owner registry: which consumer group a Kafka journal belongs to ([`OWNERS_TOPIC`]), and
//! a group claiming a journal, or taking it over.

use super::client::{consumer_error_is_fatal, kafka_err, watermarks};
use super::{Detached, KafkaJournal, ReaderContext};
use crate::error::{JournalError, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// The compacted topic recording which consumer group owns each Kafka journal: key = the journal
/// topic, value = the group id (UTF-8), the newest record per key wins.
pub const OWNERS_TOPIC: &str = "eventstage-journal-owners";

/// What [`KafkaJournal::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No group owned the journal (a new journal, or one written before owners were recorded): it
    /// is this group's now.
    New,
    /// The journal is this group's already.
    Owned,
    /// The journal was group `from`'s; this group took it over.
    TakenOver {
        /// The group that owned it before.
        from: String,
    },
}

impl KafkaJournal {
    /// Records that consumer group `group` owns this journal, in [`OWNERS_TOPIC`] (created if
    /// missing). A journal of another group is refused ([`JournalError::Foreign`]) unless
    /// `take_over`: then it becomes `group`'s and the previous owner is returned, so that the
    /// caller can carry its committed input offsets over. It reads the registry with a blocking
    /// consumer (a few round trips).
    ///
    /// # Errors
    /// [`JournalError::Foreign`], or broker errors.
    pub async fn claim(&self, group: &str, take_over: bool) -> Result<Claim> {
        let registry = OWNERS_TOPIC;
        let admin: Detached<AdminClient<DefaultClientContext>> =
            Detached::new(self.config.create().map_err(|e| kafka_err(registry, "admin client", e))?);
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let new = NewTopic::new(registry, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
        let created = admin.create_topics(&[new], &opts).await.map_err(|e| kafka_err(registry, "create topic", e))?;
        for r in created {
            match r {
                Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(kafka_err(registry, "create topic", KafkaError::AdminOp(code))),
            }
        }
        let reader = self.reader(registry, "eventstage-journal-owners")?;
        let (owner, end) = self.read_owner(&reader, None, None)?;
        let claim = match owner.clone() {
            Some(owner) if owner == group => return Ok(Claim::Owned),
            Some(owner) if !take_over => {
                return Err(JournalError::Foreign {
                    journal: self.topic.clone(),
                    owner,
                    group: group.into(),
                    registry: registry.into(),
                })
            }
            Some(from) => Claim::TakenOver { from },
            None => Claim::New,
        };
        // Not idempotent (that costs a round trip for a producer id): a retried send may record
        // the same owner twice, which changes nothing in a compacted registry.
        let producer: Detached<FutureProducer> = Detached::new(
            self.config.clone().set("acks", "all").create().map_err(|e| kafka_err(registry, "producer", e))?,
        );
        // Awaited delivery, not `flush`: rdkafka's `BaseProducer::flush` polls in 100 ms steps,
        // which made every claim 100 ms longer; and a failed delivery is an error here.
        producer
            .send(FutureRecord::to(registry).key(&self.topic).payload(group), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| kafka_err(registry, "record the journal's owner", e))?;
        // Two groups claiming at once: the record written last wins, and the other is refused.
        // The registry up to `end` is read already: what came after it decides.
        match self.read_owner(&reader, Some(end), owner)?.0 {
            Some(owner) if owner != group => Err(JournalError::Foreign {
                journal: self.topic.clone(),
                owner,
                group: group.into(),
                registry: registry.into(),
            }),
            _ => Ok(claim),
        }
    }

    /// The group [`OWNERS_TOPIC`] records for this journal (`None`: none).
    ///
    /// # Errors
    /// Broker errors (a missing registry topic is an error: [`claim`](Self::claim) creates it).
    pub fn owner(&self) -> Result<Option<String>> {
        let consumer = self.reader(OWNERS_TOPIC, "eventstage-journal-owners")?;
        Ok(self.read_owner(&consumer, None, None)?.0)
    }

    /// Reads the registry from offset `from` (None: its start) to its end as of now, with
    /// `consumer`: the owner its last record for this journal names (`known` when none in that
    /// range does), and the end.
    fn read_owner(
        &self,
        consumer: &BaseConsumer<ReaderContext>,
        from: Option<i64>,
        known: Option<String>,
    ) -> Result<(Option<String>, i64)> {
        let registry = OWNERS_TOPIC;
        // A registry just created (by this claim, or another instance's) or whose leader moves is
        // missing from the metadata for a moment: "unknown partition" then means "not yet".
        let (low, high) = watermarks(consumer, registry, 0).map_err(|e| kafka_err(registry, "watermarks", e))?;
        let start = from.unwrap_or(low).max(low);
        if high <= start {
            return Ok((known, high));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(registry, 0, Offset::Offset(start)).map_err(|e| kafka_err(registry, "assign", e))?;
        consumer.assign(&tpl).map_err(|e| kafka_err(registry, "assign", e))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut owner = known;
        let mut retrying: Option<KafkaError> = None;
        loop {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(msg)) => {
                    if msg.key() == Some(self.topic.as_bytes()) {
                        owner = msg.payload().map(|v| String::from_utf8_lossy(v).into_owned());
                    }
                    if msg.offset() + 1 >= high {
                        return Ok((owner, high));
                    }
                }
                // An end of partition from the consumer's assignment before this one (a second
                // read) says nothing about this one.
                Some(Err(KafkaError::PartitionEOF(_))) if position(consumer, registry).is_some_and(|p| p >= high) => {
                    return Ok((owner, high))
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) if !consumer_error_is_fatal(&e) => {
                    tracing::debug!(registry, error = %e, "owner registry read: consumer error (the client retries)");
                    retrying = Some(e);
                }
                Some(Err(e)) => return Err(kafka_err(registry, "read", e)),
                None if Instant::now() > deadline => {
                    let cause = retrying.take().unwrap_or(KafkaError::NoMessageReceived);
                    return Err(kafka_err(registry, "read (no record for 30 s)", cause));
                }
                None => {}
            }
        }
    }
}

/// The next offset `consumer` reads of `topic`'s partition 0 (None: not known yet).
fn position(consumer: &BaseConsumer<ReaderContext>, topic: &str) -> Option<i64> {
    let positions = consumer.position().ok()?;
    match positions.find_partition(topic, 0)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}
