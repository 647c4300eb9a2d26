//! The small helpers every part of a flow uses (the engine, its storages, the checkpoint store):
//! the bottom layer, importing nothing else of `flow` but its error type.

use crate::flow::error::FlowError;
use rdkafka::error::KafkaError;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Timeout of one blocking call of the flow's Kafka clients (a transactional call, a seek, a
/// committed-offsets request).
pub(crate) const TXN_TIMEOUT: Duration = Duration::from_secs(10);

/// Locks `m`, going on past a panic of an earlier holder: what the flow keeps behind its locks is
/// consistent between calls (a panic is caught and stops the flow first).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A Kafka client's error, with what the flow was doing.
pub(crate) fn kafka(context: impl Into<String>, error: KafkaError) -> FlowError {
    FlowError::Kafka { context: context.into(), error }
}

/// Wall clock, in ms since the epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
