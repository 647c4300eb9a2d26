//! The flow engine: one thread per flow with its consumer, its transactional producer and the
//! state of the partitions it owns. `startup` builds it, `thread` runs its loop; see
//! ARCHITECTURE.md for the parts and the walk of one record.

mod committer;
mod core;
mod emitter;
mod enrich;
mod kafka_storage;
mod partitions;
mod producer;
mod records;
mod sled_storage;
mod startup;
mod state;
mod storage;
mod thread;
mod txn;

pub(super) use self::core::{Parts, Tasks};
pub use kafka_storage::Standby;
pub(super) use kafka_storage::StoreSettings;
pub(super) use startup::Settings;

use crate::flow::control::Metrics;

use crate::flow::error::FlowError;

use crate::flow::record::Outputs;
use crate::stage::EventSourced;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;

/// Runs a flow on the calling thread until it is asked to stop or fails: its setup (bounded by
/// its setup timeout), then its loop.
pub(super) fn run<S: EventSourced>(
    settings: Settings,
    parts: Parts<S>,
    outputs: Outputs<S>,
    stop: Arc<AtomicU8>,
    metrics: Arc<Metrics>,
) -> Result<(), FlowError> {
    let flow = startup::start(settings, parts, outputs, &stop, metrics)?;
    flow.run(&stop)
}
