//! The flow thread's state, shared with the consumer's rebalance callbacks: the stage and its
//! parts, the partitions this instance owns, the open transaction or batch, and the storage.
//! What the engine does with it is in the files beside this one: one record's way (`records`),
//! the open work (`work`) and how it commits and recovers (the `guarantee`), state following
//! partitions (`partitions`), the loop (`thread`).

use super::emitter::Emitter;
use super::enrich::Pipeline;
use super::state::TaskManager;
use super::storage::Storage;
use crate::flow::control::Metrics;
use crate::flow::error::FlowError;
use crate::flow::exported::Exported;
use crate::flow::record::Decoder;
use crate::flow::route::Placement;
use crate::flow::settings::{AsyncListener, Enrichment, SyncListener, Throttle};
use crate::flow::settings::{BadInput, RebalanceEvent};
use crate::stage::EventSourced;
use rdkafka::consumer::BaseConsumer;
use std::sync::{Arc, Mutex};

/// What the application gave the flow: the stage, how inputs become commands, and the
/// listeners.
pub(crate) struct Parts<S: EventSourced> {
    pub(crate) stage: S,
    pub(crate) decoder: Decoder<S>,
    pub(crate) enrich: Option<Enrichment<S>>,
    pub(crate) on_rebalance: Vec<SyncListener>,
    pub(crate) on_rebalance_async: Option<AsyncListener>,
    pub(crate) tasks: Option<Tasks>,
    /// In an application: where the stage's keys live (a command of a key decoded in another
    /// partition is forwarded there).
    pub(crate) placement: Option<Placement>,
    /// In an application: where the stage's durable timers are kept.
    pub(crate) timers: Option<super::timers::TimerSettings<S>>,
    /// The committed view queries read (a queryable flow).
    pub(crate) view: Option<Arc<crate::flow::view::View<S>>>,
}

/// Where enrichment calls and async listeners run: the tokio runtime the flow was started from,
/// or one of the flow's own.
pub(crate) struct Tasks {
    pub(super) handle: tokio::runtime::Handle,
    _own: Option<tokio::runtime::Runtime>,
}

impl Tasks {
    pub(crate) fn current_or_own() -> Result<Self, FlowError> {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            return Ok(Self { handle, _own: None });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("eventstage-flow-tasks")
            .enable_all()
            .build()
            .map_err(|e| FlowError::Config(format!("cannot start the flow's task runtime: {e}")))?;
        Ok(Self { handle: rt.handle().clone(), _own: Some(rt) })
    }
}

/// The flow thread's state, shared with the consumer's rebalance callbacks.
pub(super) struct Core<S: EventSourced, G> {
    pub(super) parts: Parts<S>,
    /// The tasks of the partitions this instance owns: their state and offsets.
    pub(super) tasks: TaskManager<S>,
    /// How the open work is delivered and committed, with the producer (see `guarantee`).
    pub(super) guarantee: G,
    /// Output records: mapped and produced on a thread of their own.
    pub(super) emitter: Emitter<S>,
    /// Where the state is restored from and journaled to.
    pub(super) storage: Box<dyn Storage<S>>,
    /// Some partition has inputs applied beyond its committed offset (sled positions after a
    /// crash): records below them are skipped.
    pub(super) skip_applied: bool,
    /// Enrichment calls and the records waiting for them.
    pub(super) pipeline: Option<Pipeline<S>>,
    /// Feeds the async rebalance listener's task.
    pub(super) rebalance_events: Option<tokio::sync::mpsc::UnboundedSender<RebalanceEvent>>,
    pub(super) bad_input: BadInput,
    /// Throttles the warning per bad input record.
    pub(super) bad_input_log: Throttle,
    /// Wall clock (ms since the epoch) as of the flow loop's last look at the clock: the journal's
    /// timestamps, of events and of the snapshots in its records (read every few records, not per
    /// record or per key).
    pub(super) wall_ms: u64,
    /// A failure of a rebalance callback, for the loop to recover from (or stop on).
    pub(super) failure: Option<FlowError>,
    /// The flow stopped on an error: nothing of its open work may commit, not even in the
    /// revocation that closing the consumer runs.
    pub(super) stopped: bool,
    pub(super) metrics: Arc<Metrics>,
    /// The metrics facade's handles (see `flow::exported`).
    pub(super) exported: Exported,
}

/// The consumer's context: the rebalance callbacks reach the flow's state through it (see
/// `partitions`).
pub(super) struct FlowContext<S: EventSourced, G> {
    pub(super) core: Arc<Mutex<Core<S, G>>>,
}

/// The flow's consumer.
pub(super) type FlowConsumer<S, G> = BaseConsumer<FlowContext<S, G>>;
