//! The flow engine: one thread per flow with its consumer, its producers (exactly once: two
//! transactional ones taking turns) and the state of the partitions it owns. `startup` builds it,
//! `thread` runs its loop; see ARCHITECTURE.md for the parts and the walk of one record.

mod at_least_once;
mod cache;
mod core;
mod emitter;
mod enrich;
mod exactly_once;
mod guarantee;
mod kafka_storage;
mod partitions;
mod producer;
mod records;
mod sled_storage;
mod startup;
mod state;
mod storage;
mod thread;
mod timers;
mod view;
mod work;

pub(super) use self::core::{Parts, Tasks};
pub use kafka_storage::Standby;
pub(super) use kafka_storage::{StoreMemory, StoreSettings};
pub(super) use startup::{agreed_partitions, Settings};
pub(crate) use timers::{TimerSettings, TIMER_HEADER};

use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::record::Outputs;
use crate::flow::settings::Guarantee;
use crate::stage::EventSourced;
use at_least_once::AtLeastOnce;
use exactly_once::ExactlyOnce;
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
    // The one place the guarantee is chosen: the engine below is generic over it.
    match settings.guarantee {
        Guarantee::ExactlyOnce => {
            startup::start(settings, parts, outputs, &stop, metrics, ExactlyOnce::new)?.run(&stop)
        }
        Guarantee::AtLeastOnce => {
            let committer = settings.committer;
            let guarantee = move |sinks| AtLeastOnce::new(sinks, committer);
            startup::start(settings, parts, outputs, &stop, metrics, guarantee)?.run(&stop)
        }
    }
}
