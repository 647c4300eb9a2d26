//! Turning a builder into a running flow: the clients' settings, the checks of what the builder
//! was given, the engine's settings and parts, and the flow's thread.

use super::FlowBuilder;
use crate::flow::control::{FlowControl, FlowStopper, Metrics, RUN};
use crate::flow::engine::{self, StoreMemory, StoreSettings};
use crate::flow::error::FlowError;
use crate::flow::record::{Context, Outputs, Processed};
use crate::flow::settings::{BadInput, FlowJournal, Guarantee};
use crate::stage::{EntityKey, EventSourced};
use rdkafka::ClientConfig;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;
use tokio::sync::oneshot;

impl<S: EventSourced, C: Send + 'static> FlowBuilder<S, C> {
    /// Starts the flow on a thread of its own and returns its control handle at once; setup errors
    /// arrive through [`FlowControl::wait`]: a cluster still unreachable (or a transaction
    /// coordinator still not ready) after [`setup_timeout`](Self::setup_timeout) as one
    /// [`FlowError::Config`] naming the brokers, the step and the fix; a missing input topic or a
    /// misconfigured journal topic at once.
    ///
    /// # Errors
    /// [`FlowError::Config`] when the builder lacks a decoder or inputs.
    pub fn run(self) -> Result<FlowControl, FlowError> {
        let decoder = self.decoder.ok_or_else(|| FlowError::Config("a decoder is required".into()))?;
        if self.outputs_lost {
            return Err(FlowError::Config(
                "the output mapping was set before decoder_with_context, which changes the type it takes: set the outputs after the decoder".into(),
            ));
        }
        if self.route_lost {
            return Err(FlowError::Config(
                "the route mapping was set before decoder_with_context, which changes the type it takes: set the route after the decoder".into(),
            ));
        }
        if self.route.is_some() && self.placement.is_none() {
            return Err(FlowError::Config(format!(
                "the flow of stage `{}` routes commands: run it as a stage of an Application (eventstage::flow::Application), which creates and consumes the repartition topics the commands go through",
                S::NAME
            )));
        }
        if self.commit_interval.is_zero() {
            return Err(FlowError::Config(
                "the commit interval is 0: give it at least 1 ms (Kafka Streams' exactly-once default is 100 ms)"
                    .into(),
            ));
        }
        let first = self.inputs.first().cloned().ok_or_else(|| FlowError::Config("no input topics".into()))?;
        let mut common = ClientConfig::new();
        common.set("bootstrap.servers", &self.brokers);
        let mut consumer = common.clone();
        consumer
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false");
        let static_id = match (self.static_membership, &self.transactional_id) {
            (false, _) => None,
            (true, Some(id)) => Some(id),
            (true, None) => {
                return Err(FlowError::Config(
                    "static membership needs a member id that survives restarts: set transactional_id (the member id is the transactional id)".into(),
                ))
            }
        };
        if let Some(id) = static_id {
            consumer.set("group.instance.id", id);
        } else if self.transactional_id.is_some() && !self.consumer.contains_key("group.instance.id") {
            tracing::info!(
                group = %self.group_id,
                "a dynamic group member: restarted after a crash, this instance waits up to session.timeout.ms (librdkafka's default: 45 s) for the group to drop its predecessor; FlowBuilder::static_membership(true) takes its place at once (see its docs for the cost)"
            );
        }
        for (k, v) in &self.consumer {
            consumer.set(k, v);
        }
        // A queryable flow's state is kept in a committed view, and its consumer's client id says
        // where it answers (the other instances find it in the group's description).
        #[cfg(feature = "query")]
        let view = match &self.queries {
            None => None,
            Some(queries) => {
                if self.consumer.contains_key("client.id") {
                    tracing::warn!(stage = S::NAME, "a queryable flow's consumer carries its query address in its client id: the client.id set is replaced");
                }
                let view = Arc::new(crate::flow::view::View::<S>::default());
                queries.register(view.clone(), &self.brokers, &self.group_id).map_err(FlowError::Config)?;
                consumer.set("client.id", crate::query::client_id(S::NAME, queries.advertised()));
                Some(view)
            }
        };
        #[cfg(not(feature = "query"))]
        let view = None;
        let transactional_id = self
            .transactional_id
            .unwrap_or_else(|| format!("eventstage-{}-{:016x}", self.group_id, rand::random::<u64>()));
        let mut producer = common.clone();
        match self.guarantee {
            Guarantee::ExactlyOnce => {
                // A transaction that starts right after a commit gets CONCURRENT_TRANSACTIONS from
                // Kafka until the coordinator has written the commit markers; librdkafka retries
                // after retry.backoff.ms (default 100 ms, more than a commit interval). 10 ms (still
                // growing exponentially to retry.backoff.max.ms on real failures): with it, the bank
                // flow kept up with 10k commands/s on Apache Kafka (p50 134-153 ms instead of 2-6 s).
                producer
                    .set("transactional.id", &transactional_id)
                    .set("transaction.timeout.ms", "10000")
                    .set("retry.backoff.ms", "10");
            }
            // Idempotence keeps each partition's records in order across retries: a key's journal
            // records must land in the order they were written.
            Guarantee::AtLeastOnce => {
                producer.set("enable.idempotence", "true");
            }
        }
        for (k, v) in &self.producer {
            producer.set(k, v);
        }
        let stop = FlowStopper(Arc::new(AtomicU8::new(RUN)));
        let metrics = Arc::new(Metrics::default());
        let (tx, done) = oneshot::channel();
        let journal =
            self.journal.unwrap_or_else(|| FlowJournal::Kafka(format!("{}-{}-journal", self.group_id, S::NAME)));
        let store = match (self.state_dir, &journal) {
            (None, _) => None,
            (Some(dir), FlowJournal::Kafka(_)) => {
                Some(StoreSettings {
                dir,
                retention: self.state_retention,
                interval: self.checkpoint_interval,
                standby: self.standby,
                memory: split_budget(self.state_cache).0,
            })
            }
            (Some(dir), _) => {
                return Err(FlowError::Config(format!(
                    "a state directory ({}) keeps a local checkpoint of a Kafka journal; this flow has no Kafka journal (a sled journal is local already)",
                    dir.display()
                )))
            }
        };
        match (self.state_cache, &store, &journal) {
            (Some(0), _, _) => {
                return Err(FlowError::Config("the state cache's budget is 0 bytes: give it room for the keys in use (e.g. 256 MiB), or leave it out to keep every key in memory".into()))
            }
            (Some(_), None, FlowJournal::Kafka(_)) => {
                return Err(FlowError::Config(
                    "a state cache evicts keys that the local state store holds, and this flow has none: give it a state directory (FlowBuilder::state_dir, --state-dir), or leave the cache out to keep every key in memory".into(),
                ))
            }
            (Some(_), _, FlowJournal::Sled(_) | FlowJournal::None) => {
                return Err(FlowError::Config(
                    "a state cache bounds the state a flow keeps over the Kafka journal and its local state store; this flow has no Kafka journal (it keeps every key in memory): leave the cache out, or journal to Kafka with a state directory".into(),
                ))
            }
            _ => {}
        }
        let settings = engine::Settings {
            common,
            consumer,
            producer,
            transactional_id,
            inputs: self.inputs,
            journal,
            group: self.group_id.clone(),
            take_over_journal: self.take_over_journal,
            store,
            state_cache: split_budget(self.state_cache).1,
            snapshot_every: self.snapshot_every,
            commit_interval: self.commit_interval,
            bad_input: self.bad_input.unwrap_or(BadInput::DeadLetter(format!("{first}.dlq"))),
            codec: self.codec,
            guarantee: self.guarantee,
            committer: self.committer,
            setup_timeout: self.setup_timeout,
        };
        let outputs = match (self.outputs, self.route) {
            (None, None) => Box::new(|_: &Processed<'_, S, Context>| Vec::new()),
            (Some(outputs), None) => outputs,
            (outputs, Some(route)) => Box::new(move |p: &Processed<'_, S, Context>| {
                let mut records = outputs.as_ref().map(|o| o(p)).unwrap_or_default();
                let key = p.key.to_bytes();
                records.extend(route(p).into_iter().map(|r| r.into_record(S::NAME, &key)));
                records
            }) as Outputs<S>,
        };
        if self.committer.max_batch == 0 || self.committer.parallelism == 0 {
            return Err(FlowError::Config("committer max_batch and parallelism must be at least 1".into()));
        }
        if self.enrich.as_ref().is_some_and(|(s, _)| s.parallelism == 0) {
            return Err(FlowError::Config("enrichment parallelism must be at least 1".into()));
        }
        // Enrichment calls and async listeners run on the caller's tokio runtime, or on one of the
        // flow's own when run() is called outside one.
        let needs_runtime = self.enrich.is_some() || self.on_rebalance_async.is_some();
        let tasks = if needs_runtime { Some(engine::Tasks::current_or_own()?) } else { None };
        let parts = engine::Parts {
            stage: self.stage,
            decoder,
            enrich: self.enrich,
            on_rebalance: self.on_rebalance,
            on_rebalance_async: self.on_rebalance_async,
            tasks,
            placement: self.placement,
            timers: self.timers,
            view,
        };
        let (stop2, metrics2) = (stop.0.clone(), metrics.clone());
        let spawned = std::thread::Builder::new().name(format!("eventstage-flow-{}", S::NAME)).spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine::run(settings, parts, outputs, stop2, metrics2)
            }))
            .unwrap_or_else(|_| Err(FlowError::Crashed("panic on the flow thread".into())));
            if let Err(e) = &result {
                tracing::error!(error = %e, "flow stopped");
            }
            let _ = tx.send(result);
        });
        spawned.map_err(|e| FlowError::Config(format!("cannot start the flow thread: {e}")))?;
        Ok(FlowControl { stop, metrics, done })
    }
}

/// A state cache's `budget` split (see [`FlowBuilder::state_cache`]): what the local store may hold
/// in memory, a quarter (at most 256 MiB, at least 2 MiB), half for its block cache and half for
/// its memtables; and the rest, for committed keys. Without a state cache: 64 MiB of each for the
/// store, and no bound on the keys.
fn split_budget(budget: Option<u64>) -> (StoreMemory, Option<u64>) {
    let quarter = budget.map(|budget| (budget / 4).min(256 << 20));
    let store = quarter.map_or(128 << 20, |q| q.max(2 << 20));
    let keys = budget.zip(quarter).map(|(budget, q)| budget - q);
    (StoreMemory { cache: store / 2, memtables: store / 2 }, keys)
}
