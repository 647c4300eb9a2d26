//! Why a flow stops, and how the errors of the user's closures are rendered.

/// What a flow's own closures (the decoder, the enrichment, the at-least-once processing) return
/// when they fail: any error type (`?` or `.into()` makes one of it), or a message (`String`,
/// `&str`). The flow renders it with its chain of sources, `what: why: root cause`, for the
/// dead-letter record's `eventstage.error` header, the log and [`FlowError::BadInput`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of a user closure, with its chain of sources.
pub(crate) fn describe(error: impl Into<BoxError>) -> String {
    let error = error.into();
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Errors that stop a flow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// Kafka failed in a way retrying does not fix.
    // The client's error is part of the message, not a `source`: an error printed with its chain
    // (anyhow's `{:#}`) said librdkafka's message twice.
    #[error("kafka: {context}: {error}")]
    Kafka {
        /// What the flow was doing.
        context: String,
        /// The client's error.
        error: rdkafka::error::KafkaError,
    },
    /// The broker refused this producer's epoch while its transaction was younger than
    /// `transaction.timeout.ms`: another instance with the same transactional id took over (this
    /// one is a zombie). Nothing after its last commit counts; restarting it is safe (it fences any
    /// other instance with the id), but two instances sharing an id keep fencing each other. (A
    /// fence of a transaction older than the timeout is the broker's timeout: the flow recovers
    /// from it by itself.)
    #[error("fenced: the broker refused this producer's epoch for transactional.id `{transactional_id}`: another instance with this id took over (give each instance its own id); this instance committed nothing since its last commit and stopped")]
    Fenced {
        /// The transactional id.
        transactional_id: String,
    },
    /// The journal failed (missing/misconfigured topic, damaged record).
    #[error(transparent)]
    Journal(#[from] eventstage_journal::JournalError),
    /// A journal record does not decode into the stage's state.
    #[error(transparent)]
    Stage(#[from] crate::Error),
    /// A bad input record, under [`BadInput::Stop`](crate::flow::BadInput::Stop).
    #[error("input {topic}[{partition}]@{offset} rejected: {reason}")]
    BadInput {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// Why.
        reason: String,
    },
    /// Settings that cannot work.
    #[error("flow configuration: {0}")]
    Config(String),
    /// Stopped by [`FlowControl::abort`](crate::flow::FlowControl::abort).
    #[error("aborted by the application")]
    Aborted,
    /// The flow thread died.
    #[error("the flow thread stopped unexpectedly: {0}")]
    Crashed(String),
}
