//! [`FlowBuilder`]: a flow's settings, and starting it.

use crate::flow::engine::{self, Standby};
use crate::flow::error::{describe, BoxError};
use crate::flow::record::{Context, Decoder, InputRecord, OutputRecord, Outputs, Processed, RouteFn};
use crate::flow::route::{Placement, Routed};

mod run;
mod stage;
use crate::flow::settings::{
    self, BadInput, CommitterSettings, EnrichSettings, FlowJournal, Guarantee, RebalanceActions, RebalanceEvent,
};
use crate::stage::EventSourced;
pub(super) use stage::StageSpec;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Builds a flow around a stage. See the module docs.
///
/// `C` is the type of the context the decoder hands the output mapping beside each command (see
/// [`decoder_with_context`](FlowBuilder::decoder_with_context)); `()` without one.
pub struct FlowBuilder<S: EventSourced, C = ()> {
    stage: S,
    brokers: String,
    group_id: String,
    inputs: Vec<String>,
    consumer: BTreeMap<String, String>,
    producer: BTreeMap<String, String>,
    transactional_id: Option<String>,
    commit_interval: Duration,
    journal: Option<FlowJournal>,
    take_over_journal: bool,
    state_dir: Option<std::path::PathBuf>,
    state_retention: Duration,
    checkpoint_interval: Duration,
    standby: Standby,
    state_cache: Option<u64>,
    snapshot_every: u64,
    decoder: Option<Decoder<S>>,
    outputs: Option<Outputs<S>>,
    route: Option<RouteFn<S>>,
    /// Set by the application the flow is a stage of: where its keys live.
    placement: Option<Placement>,
    /// Set by the application the flow is a stage of: where its timers are kept.
    timers: Option<engine::TimerSettings<S>>,
    bad_input: Option<BadInput>,
    codec: crate::Codec,
    guarantee: Guarantee,
    committer: CommitterSettings,
    enrich: Option<settings::Enrichment<S>>,
    on_rebalance: Vec<settings::SyncListener>,
    on_rebalance_async: Option<settings::AsyncListener>,
    setup_timeout: Duration,
    static_membership: bool,
    /// The output mapping was set before the decoder's context type changed: refused at `run`.
    outputs_lost: bool,
    /// The same for the route mapping.
    route_lost: bool,
    /// Queries this flow's committed state answers ([`Self::queryable`]).
    #[cfg(feature = "query")]
    queries: Option<crate::query::Queries>,
    context: std::marker::PhantomData<fn() -> C>,
}

impl<S: EventSourced, C> fmt::Debug for FlowBuilder<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowBuilder")
            .field("stage", &S::NAME)
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("inputs", &self.inputs)
            .finish_non_exhaustive()
    }
}

impl<S: EventSourced> FlowBuilder<S> {
    /// A flow of `stage` reading `inputs` (`&["commands"]`, a `Vec<String>`, ...) as consumer
    /// group `group_id` from `brokers`.
    pub fn new(
        stage: S,
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        inputs: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Self {
        Self {
            stage,
            brokers: brokers.into(),
            group_id: group_id.into(),
            inputs: inputs.into_iter().map(|s| s.as_ref().to_string()).collect(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
            transactional_id: None,
            commit_interval: Duration::from_millis(100),
            journal: None,
            take_over_journal: false,
            state_dir: None,
            state_retention: Duration::from_secs(24 * 3600),
            checkpoint_interval: Duration::from_secs(1),
            standby: Standby::None,
            state_cache: None,
            snapshot_every: 100,
            decoder: None,
            outputs: None,
            route: None,
            placement: None,
            timers: None,
            bad_input: None,
            codec: crate::Codec::Bincode,
            guarantee: Guarantee::ExactlyOnce,
            committer: CommitterSettings::default(),
            enrich: None,
            on_rebalance: Vec::new(),
            on_rebalance_async: None,
            setup_timeout: Duration::from_secs(30),
            static_membership: false,
            outputs_lost: false,
            route_lost: false,
            #[cfg(feature = "query")]
            queries: None,
            context: std::marker::PhantomData,
        }
    }

    /// Answers queries of this flow's committed state through `queries` (see [`crate::query`]):
    /// the flow keeps a committed view of its partitions' keys, and its consumer's client id
    /// carries `queries`' advertised address, for the other instances of the group to find it.
    /// With a [`state_cache`](Self::state_cache) the view holds the keys the local store does not
    /// have yet, and queries read the others from the store.
    #[cfg(feature = "query")]
    #[must_use]
    pub fn queryable(mut self, queries: &crate::query::Queries) -> Self {
        self.queries = Some(queries.clone());
        self
    }

    /// The decoder from input record to `(key, command)`, or an error saying why it cannot be one
    /// (any error type, or a message: see [`BoxError`](crate::flow::BoxError)). Required (this, or
    /// [`decoder_with_context`](Self::decoder_with_context)).
    #[must_use]
    pub fn decoder<E: Into<BoxError>>(
        mut self,
        decode: impl Fn(&InputRecord) -> Result<(S::Key, S::Command), E> + Send + 'static,
    ) -> Self {
        self.decoder = Some(Box::new(move |input| {
            decode(input).map(|(key, command)| (key, command, Box::new(()) as Context)).map_err(describe)
        }));
        self
    }

    /// A decoder that also hands the output mapping a value of your own beside the command
    /// ([`Processed::context`]): what the outputs need from the input and the command does not
    /// carry (a request id to echo, a reply-to topic, a correlation header), parsed once. Call it
    /// before [`outputs`](FlowBuilder::outputs), whose closure then takes `&Processed<S, C>`.
    ///
    /// ```
    /// # use eventstage::flow::{FlowBuilder, OutputRecord};
    /// # use eventstage::{Effect, EventSourced};
    /// # struct Counter;
    /// # impl EventSourced for Counter {
    /// #     const NAME: &'static str = "counter";
    /// #     type Key = String; type Command = u64; type Event = u64; type State = u64;
    /// #     type Reply = u64; type Rejection = String;
    /// #     fn handle(&self, _: &u64, n: u64) -> Result<Effect<Self>, String> {
    /// #         Ok(Effect::persist([n]).then_reply(|t: &u64| *t))
    /// #     }
    /// #     fn apply(t: &mut u64, n: &u64) { *t += n }
    /// # }
    /// #[derive(serde::Deserialize)]
    /// struct Request { id: String, counter: String, add: u64 }
    ///
    /// let flow = FlowBuilder::new(Counter, "127.0.0.1:9092", "counters", ["counter-requests"])
    ///     .decoder_with_context(|r| {
    ///         let req: Request = serde_json::from_slice(r.value.as_deref().unwrap_or_default())?;
    ///         Ok::<_, serde_json::Error>((req.counter, req.add, req.id)) // the id, for the reply
    ///     })
    ///     .outputs(|p| {
    ///         let reply = match p.outcome {
    ///             Ok(total) => format!(r#"{{"id":"{}","total":{total}}}"#, p.context),
    ///             Err(e) => format!(r#"{{"id":"{}","error":"{e}"}}"#, p.context),
    ///         };
    ///         vec![OutputRecord::new("counter-replies", p.key.as_bytes(), reply)]
    ///     });
    /// ```
    #[must_use]
    pub fn decoder_with_context<C: Send + 'static, E: Into<BoxError>>(
        self,
        decode: impl Fn(&InputRecord) -> Result<(S::Key, S::Command, C), E> + Send + 'static,
    ) -> FlowBuilder<S, C> {
        let decoder: Decoder<S> = Box::new(move |input| {
            decode(input).map(|(key, command, c)| (key, command, Box::new(c) as Context)).map_err(describe)
        });
        FlowBuilder {
            stage: self.stage,
            brokers: self.brokers,
            group_id: self.group_id,
            inputs: self.inputs,
            consumer: self.consumer,
            producer: self.producer,
            transactional_id: self.transactional_id,
            commit_interval: self.commit_interval,
            journal: self.journal,
            take_over_journal: self.take_over_journal,
            state_dir: self.state_dir,
            state_retention: self.state_retention,
            checkpoint_interval: self.checkpoint_interval,
            standby: self.standby,
            state_cache: self.state_cache,
            snapshot_every: self.snapshot_every,
            decoder: Some(decoder),
            outputs: None,
            route: None,
            placement: self.placement,
            timers: self.timers,
            bad_input: self.bad_input,
            codec: self.codec,
            guarantee: self.guarantee,
            committer: self.committer,
            enrich: self.enrich,
            on_rebalance: self.on_rebalance,
            on_rebalance_async: self.on_rebalance_async,
            setup_timeout: self.setup_timeout,
            static_membership: self.static_membership,
            outputs_lost: self.outputs.is_some(),
            route_lost: self.route.is_some(),
            #[cfg(feature = "query")]
            queries: self.queries,
            context: std::marker::PhantomData,
        }
    }
}

impl<S: EventSourced, C: Send + 'static> FlowBuilder<S, C> {
    /// Exactly-once (transactions, the default) or at-least-once (see [`Guarantee`]).
    #[must_use]
    pub fn guarantee(mut self, guarantee: Guarantee) -> Self {
        self.guarantee = guarantee;
        self
    }

    /// How an at-least-once flow batches its offset commits.
    #[must_use]
    pub fn committer(mut self, settings: CommitterSettings) -> Self {
        self.committer = settings;
        self
    }

    /// Async enrichment between the decoder and the stage (Akka's `mapAsync(parallelism)`, the ask
    /// pattern): `enrich(key, command)` may call a service, a database or an actor and returns the
    /// command the stage handles. At most `settings.parallelism` calls run at once (the flow stops
    /// consuming while that many records wait), and the stage sees each partition's records in
    /// input order whatever order the calls finish in. A call that fails (or times out) is retried
    /// with backoff; after the last attempt the record goes to the bad-input policy (dead letter,
    /// or stop). The calls run on the tokio runtime `run()` is called from (or a runtime of the
    /// flow's own outside one). Works under both guarantees: offsets only ever cover records the
    /// stage handled.
    #[must_use]
    pub fn enrich<F, Fut, E>(mut self, settings: EnrichSettings, enrich: F) -> Self
    where
        S::Command: Clone,
        F: Fn(S::Key, S::Command) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<S::Command, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.enrich = Some((settings, settings::retrying(settings, enrich)));
        self
    }

    /// A synchronous rebalance listener, called on the flow's thread: on assignment once the
    /// partitions' state is restored (a restore runs on a thread of its own, the partitions paused,
    /// while the flow goes on with the others) and before any of their records is processed (it
    /// may [`seek`](RebalanceActions::seek)); inside the rebalance on revocation, once the flow has
    /// finished and committed their in-flight work, before their state is released, and on loss
    /// after their uncommitted work was dropped. Keep it short: the flow (and on revocation the
    /// group) waits for it. Each call adds a listener; they run in the order they were added.
    #[must_use]
    pub fn on_rebalance(
        mut self,
        listener: impl FnMut(&RebalanceEvent, &mut RebalanceActions<'_>) + Send + 'static,
    ) -> Self {
        self.on_rebalance.push(Box::new(listener));
        self
    }

    /// An async rebalance listener (the talk's actor-based listener): every event, in order, is
    /// handed to `listener` on a task of its own, so it never blocks the consumer's poll loop.
    #[must_use]
    pub fn on_rebalance_async<F, Fut>(mut self, listener: F) -> Self
    where
        F: Fn(RebalanceEvent) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.on_rebalance_async = Some(Arc::new(move |e| Box::pin(listener(e)) as settings::BoxFuture<()>));
        self
    }

    /// Any librdkafka consumer property, passed through.
    #[must_use]
    pub fn consumer_property(mut self, key: &str, value: &str) -> Self {
        self.consumer.insert(key.into(), value.into());
        self
    }

    /// Any librdkafka producer property, passed through.
    #[must_use]
    pub fn producer_property(mut self, key: &str, value: &str) -> Self {
        self.producer.insert(key.into(), value.into());
        self
    }

    /// The producer's `transactional.id`: stable per instance, so a restarted instance fences its
    /// zombie. It is also the instance's static member id in the consumer group when
    /// [`static_membership`](Self::static_membership) is on. Give every instance its own (e.g. the
    /// pod's name in a StatefulSet, `<app>-<n>`). Default: `eventstage-<group>-<random>`, new in
    /// every process.
    ///
    /// An exactly-once flow has two transactional producers that take turns (one commits while
    /// the other takes the next transaction's records): the first has this id, the second this id
    /// with `.1` appended. Grant both when transactional ids are authorized by prefix.
    #[must_use]
    pub fn transactional_id(mut self, id: impl Into<String>) -> Self {
        self.transactional_id = Some(id.into());
        self
    }

    /// Whether the flow's consumer joins its group as a static member (KIP-345,
    /// `group.instance.id` = the [`transactional_id`](Self::transactional_id), which must be set:
    /// [`run`](Self::run) refuses it otherwise). Default: off. A consumer property
    /// `group.instance.id` overrides the id.
    ///
    /// - **What it buys.** A restarted instance (after a crash, `kill -9`, a deploy) takes its
    ///   place and its partitions back at once, without a rebalance: it answered again 1.6 s after
    ///   its restart in the reservations example's test, where a dynamic member restarted after
    ///   `kill -9` waited about 45 s for its dead predecessor's session (`session.timeout.ms`,
    ///   librdkafka's default 45 s) to expire before the group rebalanced.
    /// - **What it costs.** A static member that goes away does not leave the group, not even on a
    ///   clean drain: its partitions wait, unprocessed, until the same id comes back or its
    ///   session times out. Two live instances with the same id fence each other (the older one
    ///   stops with `FencedInstanceId`).
    /// - **When not to.** Instances removed for good (scaling in), or ids that change from one
    ///   run to the next (a random or per-deploy suffix): each such stop stalls its partitions for
    ///   a session timeout. Keep it off there, or lower `session.timeout.ms`
    ///   ([`consumer_property`](Self::consumer_property)) to bound the stall. It fits instances
    ///   with stable slots: a StatefulSet's pods, `app-0..app-N` under systemd.
    #[must_use]
    pub fn static_membership(mut self, on: bool) -> Self {
        self.static_membership = on;
        self
    }

    /// How often a transaction commits. Default: 100 ms. Zero is refused by
    /// [`run`](Self::run): each commit is a round trip to the transaction coordinator, and one per
    /// record is not "as soon as possible" but a flow that spends itself committing.
    #[must_use]
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.commit_interval = every;
        self
    }

    /// The Kafka journal topic. Default: `<group id>-<stage name>-journal`: a journal belongs to
    /// one consumer group (see [`take_over_journal`](Self::take_over_journal)).
    #[must_use]
    pub fn journal_topic(mut self, topic: impl Into<String>) -> Self {
        self.journal = Some(FlowJournal::Kafka(topic.into()));
        self
    }

    /// Where the flow keeps its entities' events (see [`FlowJournal`]). Default: the Kafka topic
    /// `<group id>-<stage name>-journal`.
    #[must_use]
    pub fn journal(mut self, journal: FlowJournal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// This flow's group takes over a Kafka journal another group owns. A Kafka journal belongs to
    /// the consumer group that first ran on it (recorded in the compacted topic
    /// `eventstage-journal-owners`); a flow of another group is refused with
    /// [`FlowError::Journal`](crate::flow::FlowError::Journal), because it would read the inputs from its own offsets and apply
    /// commands the journal's state includes already. Taking over makes the journal this group's:
    /// the flow continues from the journal's state, and the previous owner's committed input
    /// offsets are copied to this group where it has none, so that no input is applied twice.
    /// The previous group is refused from then on.
    #[must_use]
    pub fn take_over_journal(mut self) -> Self {
        self.take_over_journal = true;
        self
    }

    /// Journal in a local sled store at `dir` instead of Kafka (see [`FlowJournal::Sled`]).
    #[must_use]
    pub fn sled_journal(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.journal = Some(FlowJournal::Sled(dir.into()));
        self
    }

    /// With the Kafka journal: keep a local state store in `dir` (created if missing; one
    /// directory per instance), a checkpoint of the journal, so that a restart or an assignment
    /// reads only the journal's records after the checkpoint instead of the whole partition. The
    /// compacted topic stays the state of record; the store holds committed state only, is written
    /// off the flow thread, and a damaged or foreign store is dropped with a warning and restored
    /// from the journal. Default: none (every assignment reads the journal partition in full).
    #[must_use]
    pub fn state_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// With a [`state_dir`](Self::state_dir): how long the rows of a partition that went to
    /// another instance stay in the local store (getting it back within that time reads only what
    /// the other instance wrote). Default: 24 h.
    #[must_use]
    pub fn state_retention(mut self, keep: Duration) -> Self {
        self.state_retention = keep;
        self
    }

    /// With a [`state_dir`](Self::state_dir): how often the local store is checkpointed while the
    /// journal changes. Default: 1 s.
    #[must_use]
    pub fn checkpoint_interval(mut self, every: Duration) -> Self {
        self.checkpoint_interval = every;
        self
    }

    /// With a [`state_dir`](Self::state_dir): which partitions besides its own this instance
    /// keeps current in its local store, so that taking one over after a crash or a rebalance
    /// reads almost nothing from the journal (see [`Standby`]). Default: [`Standby::None`].
    #[must_use]
    pub fn standby(mut self, standby: Standby) -> Self {
        self.standby = standby;
        self
    }

    /// With a [`state_dir`](Self::state_dir): hold at most about `bytes` of state in memory, one
    /// budget for all the partitions of this flow and its local store, instead of every key: a
    /// quarter (at most 256 MiB) is the local store's page cache, the rest holds committed keys,
    /// split evenly over the partitions (the page cache gets at least 1 MiB, beyond the budget if
    /// it is smaller than 4 MiB). Committed keys beyond it are evicted (S3-FIFO: keys used once do not push out
    /// the ones used often) and read from the local store when next used. Keys changed by the
    /// open transaction, or committed but not yet in the local store (its follower reads the
    /// journal a little behind the flow), are never evicted and come on top of the budget; the
    /// metrics show both (`cache_bytes`, `cache_unstored`).
    ///
    /// A budget needs the local store: without one, an evicted key could only be read back by
    /// reading its whole journal partition, so [`run`](Self::run) refuses it rather than keep a
    /// budget it cannot. Default: none (every key of the owned partitions stays in memory).
    ///
    /// What an entry weighs: the inline sizes of its key, state and bookkeeping, plus the key's
    /// bytes; memory a state owns beyond its inline size (a `String` field's text) is not counted.
    #[must_use]
    pub fn state_cache(mut self, bytes: u64) -> Self {
        self.state_cache = Some(bytes);
        self
    }

    /// With the sled journal: a snapshot of a key every this many events (0: none). Default: 100.
    #[must_use]
    pub fn snapshot_every(mut self, n: u64) -> Self {
        self.snapshot_every = n;
        self
    }

    /// The output mapping. Default: no outputs. It runs on the flow's emitter thread, one
    /// outcome after another in the order the commands were handled, and sees the input record
    /// ([`Processed::input`]: key, value, headers, timestamp, where it came from) and the
    /// decoder's context ([`Processed::context`]).
    #[must_use]
    pub fn outputs(mut self, map: impl Fn(&Processed<'_, S, C>) -> Vec<OutputRecord> + Send + 'static) -> Self {
        self.outputs = Some(Box::new(move |p: &Processed<'_, S, Context>| typed(p, |p| map(p))));
        self.outputs_lost = false;
        self
    }

    /// The route mapping of a stage in an [`Application`](crate::flow::Application): the
    /// commands an outcome sends to other stages, or to other keys of this one
    /// ([`To::command`](crate::flow::To::command), with the [`To`](crate::flow::To) of the target
    /// from [`Application::to`](crate::flow::Application::to)). Each goes through the target's
    /// repartition topic, keyed by the target key, in the same transaction as this command's
    /// journal records, outputs and offset, and is handled by the target once that commits.
    /// Like the output mapping, it runs on the emitter thread, in order; a command routed here
    /// says who sent it ([`Processed::sender`]). Default: none. A flow with a route mapping runs
    /// only as a stage of an application.
    #[must_use]
    pub fn route(mut self, map: impl Fn(&Processed<'_, S, C>) -> Vec<Routed> + Send + 'static) -> Self {
        self.route = Some(Box::new(move |p: &Processed<'_, S, Context>| typed(p, |p| map(p))));
        self.route_lost = false;
        self
    }

    /// What to do with bad input. Default: dead-letter to `<first input>.dlq`.
    #[must_use]
    pub fn bad_input(mut self, policy: BadInput) -> Self {
        self.bad_input = Some(policy);
        self
    }

    /// Codec of journal payloads. Default: bincode.
    #[must_use]
    pub fn codec(mut self, codec: crate::Codec) -> Self {
        self.codec = codec;
        self
    }

    /// How long the flow's start may take: reading the inputs' metadata, checking (or creating)
    /// the journal topic and its owner, and the transactional producer's `init_transactions`,
    /// each retried with backoff while Kafka is unreachable or not ready. After this time the
    /// flow stops with one [`FlowError::Config`](crate::flow::FlowError::Config) that names the brokers, the step it was on, how
    /// long it tried and the last error, delivered through [`FlowControl::wait`](crate::flow::FlowControl::wait). Default: 30 s
    /// (the demo's `--timeout`). Only the start is bounded: a running flow rides out a broker
    /// outage by itself.
    #[must_use]
    pub fn setup_timeout(mut self, timeout: Duration) -> Self {
        self.setup_timeout = timeout;
        self
    }
}

/// `p` with the decoder's context as the `C` the builder's mappings take.
fn typed<S: EventSourced, C: 'static, T>(
    p: &Processed<'_, S, Context>,
    map: impl FnOnce(&Processed<'_, S, C>) -> T,
) -> T {
    let Some(context) = p.context.downcast_ref::<C>() else {
        // The builder sets the decoder and its mappings with the same `C`: unreachable.
        panic!("the decoder's context is not a {}", std::any::type_name::<C>())
    };
    map(&Processed { input: p.input, key: p.key, events: p.events, outcome: p.outcome, state: p.state, context })
}
