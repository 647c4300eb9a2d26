//! The talk's "Committable Sink": consume, process each record with an async function, commit
//! the offsets in batches afterwards. At least once: a crash delivers again what was not committed.
//!
//! It is the flow machinery without a stage's state: an at-least-once flow whose enrichment step
//! is the user's function and whose stage does nothing, so batching, back-pressure, per-partition
//! order, retries, dead letters, rebalance handling and draining are the flows' own.

use crate::flow::builder::FlowBuilder;
use crate::flow::control::FlowControl;
use crate::flow::error::{describe, BoxError, FlowError};
use crate::flow::record::InputRecord;
use crate::flow::settings::{
    BadInput, CommitterSettings, EnrichSettings, FlowJournal, Guarantee, RebalanceActions, RebalanceEvent,
};
use crate::stage::{Effect, EventSourced};
use std::future::Future;

/// The stage of a consume-only flow: the work happened in the async step.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProcessOnly;

impl EventSourced for ProcessOnly {
    const NAME: &'static str = "eventstage-consume";
    type Key = Vec<u8>;
    type Command = InputRecord;
    type Event = ();
    type State = ();
    type Reply = ();
    type Rejection = ();

    fn handle(&self, _: &(), _: InputRecord) -> Result<Effect<Self>, ()> {
        Ok(Effect::reply(()))
    }

    fn apply(_: &mut (), _: &()) {}
}

/// Consumes `inputs` as group `group_id` and runs an async function per record (see
/// [`ConsumeBuilder`]).
pub fn consume(brokers: impl Into<String>, group_id: impl Into<String>, inputs: &[&str]) -> ConsumeBuilder {
    let flow = FlowBuilder::new(ProcessOnly, brokers, group_id, inputs)
        .guarantee(Guarantee::AtLeastOnce)
        .journal(FlowJournal::None)
        .decoder(|r: &InputRecord| Ok::<_, std::convert::Infallible>((r.key.clone().unwrap_or_default(), r.clone())));
    ConsumeBuilder { flow, settings: EnrichSettings::parallelism(1) }
}

/// A consumer that processes each record with an async function, then commits its offset in a
/// batch (Alpakka Kafka's committable source → `mapAsync` → `Committer.sink`).
///
/// - At most `parallelism` calls run at once; a partition's offsets are committed only up to
///   records whose call finished (so results are committed in input order per partition).
/// - A failing call is retried with backoff ([`EnrichSettings`]); after the last attempt the
///   record goes to the dead-letter topic (`<first input>.dlq`, with headers naming source and
///   error) or stops the consumer, by [`BadInput`] policy.
/// - Draining ([`FlowControl::drain_and_shutdown`]) finishes the running calls and commits them.
#[derive(Debug)]
pub struct ConsumeBuilder {
    flow: FlowBuilder<ProcessOnly>,
    settings: EnrichSettings,
}

impl ConsumeBuilder {
    /// Any librdkafka consumer property, passed through.
    #[must_use]
    pub fn consumer_property(mut self, key: &str, value: &str) -> Self {
        self.flow = self.flow.consumer_property(key, value);
        self
    }

    /// Any librdkafka property of the producer that writes dead letters.
    #[must_use]
    pub fn producer_property(mut self, key: &str, value: &str) -> Self {
        self.flow = self.flow.producer_property(key, value);
        self
    }

    /// Offset commit batching. Default: [`CommitterSettings::default`].
    #[must_use]
    pub fn committer(mut self, settings: CommitterSettings) -> Self {
        self.flow = self.flow.committer(settings);
        self
    }

    /// Calls in flight, attempts, backoff and timeout. Default: one call at a time.
    #[must_use]
    pub fn settings(mut self, settings: EnrichSettings) -> Self {
        self.settings = settings;
        self
    }

    /// What to do with a record whose last attempt failed. Default: dead-letter to `<first input>.dlq`.
    #[must_use]
    pub fn bad_input(mut self, policy: BadInput) -> Self {
        self.flow = self.flow.bad_input(policy);
        self
    }

    /// A synchronous rebalance listener (see [`FlowBuilder::on_rebalance`]).
    #[must_use]
    pub fn on_rebalance(
        mut self,
        listener: impl FnMut(&RebalanceEvent, &mut RebalanceActions<'_>) + Send + 'static,
    ) -> Self {
        self.flow = self.flow.on_rebalance(listener);
        self
    }

    /// Starts consuming; `process` is called once per record (again after a failed attempt, and
    /// again after a crash for records not committed yet).
    ///
    /// # Errors
    /// [`FlowError::Config`] on impossible settings.
    pub fn run<F, Fut, E>(self, process: F) -> Result<FlowControl, FlowError>
    where
        F: Fn(InputRecord) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let process = std::sync::Arc::new(process);
        self.flow
            .enrich(self.settings, move |_key, record: InputRecord| {
                let process = process.clone();
                async move {
                    process(record.clone()).await.map_err(describe)?;
                    Ok::<_, String>(record)
                }
            })
            .run()
    }
}
