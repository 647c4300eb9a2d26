//! Why a table cannot be opened or stopped following its topic.

/// Why a table cannot be opened or stopped following its topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// No broker answered.
    #[error("cannot reach the Kafka cluster at {brokers}: {source}; check the broker addresses (--brokers) and that the cluster is up")]
    Unreachable {
        /// The bootstrap servers.
        brokers: String,
        /// The client's error.
        source: rdkafka::error::KafkaError,
    },
    /// The topic does not exist.
    #[error("topic `{topic}` does not exist on {brokers}; create it (cleanup.policy=compact) or check the name")]
    MissingTopic {
        /// Topic.
        topic: String,
        /// The bootstrap servers.
        brokers: String,
    },
    /// A requested partition does not exist.
    #[error("topic `{topic}` has {count} partitions; partition {partition} does not exist")]
    NoSuchPartition {
        /// Topic.
        topic: String,
        /// Partition asked for.
        partition: i32,
        /// Partitions the topic has.
        count: i32,
    },
    /// The local store belongs to another topic.
    #[error("the table store at {path} holds topic `{found}`, not `{expected}`: use another store directory for `{expected}`, or delete this one to rebuild it")]
    StoreMismatch {
        /// Store directory.
        path: String,
        /// Its topic.
        found: String,
        /// The topic asked for.
        expected: String,
    },
    /// The local store is behind the topic's start or past its end: the topic was recreated or
    /// truncated since the checkpoint.
    #[error("the table store at {path} read topic `{topic}` partition {partition} up to offset {checkpoint}, but the topic now holds offsets {low}..{high}: the topic was recreated or truncated; delete the store directory to rebuild it")]
    StoreAhead {
        /// Store directory.
        path: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Checkpointed next offset.
        checkpoint: i64,
        /// The partition's first offset.
        low: i64,
        /// The partition's end offset.
        high: i64,
    },
    /// The directory is not a table store.
    #[error("{path} is not an eventstage table store ({why}); give an empty or new directory")]
    NotAStore {
        /// Directory.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The local store failed.
    #[error("table store at {path}: {message}")]
    Store {
        /// Store directory.
        path: String,
        /// What failed.
        message: String,
    },
    /// A record did not decode and the policy is [`BadInput::Stop`](super::BadInput::Stop).
    #[error("topic `{topic}` partition {partition} offset {offset}: {reason}; the table stopped before this record (policy: stop); fix the producer or open the table with BadInput::Skip")]
    BadInput {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// Why it does not decode.
        reason: String,
    },
    /// Kafka failed in a way retrying does not fix.
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What the table was doing.
        context: String,
        /// The client's error.
        source: rdkafka::error::KafkaError,
    },
    /// The table's thread could not start, or its opening task failed.
    #[error("the table's thread or task failed: {0}")]
    Crashed(String),
    /// The table was closed.
    #[error("the table was closed")]
    Closed,
    /// The builder's settings cannot work together (the message says which and the fix).
    #[error("table `{topic}`: {message}")]
    Settings {
        /// The topic.
        topic: String,
        /// What is wrong, and the fix.
        message: String,
    },
}
