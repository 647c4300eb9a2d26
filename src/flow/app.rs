//! [`Application`]: several stages in one consumer group, commands routed between them through
//! repartition topics, each hop exactly once.

use crate::flow::builder::{FlowBuilder, StageSpec};
use crate::flow::control::{FlowControl, FlowMetrics, FlowStatus, FlowStopper};
use crate::flow::error::FlowError;
use crate::flow::route::{commands_topic, timers_topic, Placement, To};
use crate::flow::shared::kafka;
use crate::stage::EventSourced;
use eventstage_journal::kafka::Detached;
use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An application of several stages (Kafka Streams' topology of sub-topologies joined by
/// repartition topics; Akka's sharded entities sending each other commands), in one consumer
/// group.
///
/// - **Stages.** Each stage is a [`FlowBuilder`] (from [`flow`](Self::flow)) with its inputs,
///   decoder, outputs and settings, and a [`route`](FlowBuilder::route) mapping: the commands an
///   outcome sends to other stages or to other keys of its own ([`To::command`]).
/// - **Repartition topics.** Every stage reads `<group>-<stage>-commands` beside its inputs,
///   created at [`start`](Self::start) with as many partitions as the stage's inputs. A routed
///   command is a record of it keyed by the target key, written in the sender's transaction with
///   its journal records, outputs and offsets; the target handles it once that commits, in a
///   transaction of its own: each hop, and so the whole chain, is exactly once. Under
///   [`Guarantee::AtLeastOnce`](crate::flow::Guarantee) a routed command may be sent again after a
///   crash (each journal still applies its events once).
/// - **Where a key lives.** A stage's keys live in the partition Kafka's default partitioner
///   (murmur2, as Java clients and Kafka Streams use it) gives them, in its inputs and its
///   repartition topic alike, and the application's producers partition that way. An input record
///   that arrived in another partition (its producer partitioned by another function, as
///   librdkafka's default `consistent_random` does) is forwarded to its key's partition through
///   the repartition topic, in the same transaction as its offset; the metric `forwarded` counts
///   them. Produce with murmur2 (librdkafka: `partitioner=murmur2_random`) to save that hop.
/// - **Threads.** Each stage runs as a flow of its own (its thread, consumer and transactional
///   producers: the transactional id is the application's with `-<stage>` appended), so stages run
///   side by side on as many cores. One failing stops the others (see [`Running::wait`]).
pub struct Application {
    brokers: String,
    group: String,
    transactional_id: Option<String>,
    partitions: Option<i32>,
    setup_timeout: Duration,
    stages: Vec<Box<dyn AppStage>>,
    targets: Arc<Mutex<BTreeSet<&'static str>>>,
}

impl fmt::Debug for Application {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Application")
            .field("brokers", &self.brokers)
            .field("group", &self.group)
            .field("stages", &self.stages.iter().map(|s| s.name()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Application {
    /// An application of consumer group `group` on `brokers`.
    pub fn new(brokers: impl Into<String>, group: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            group: group.into(),
            transactional_id: None,
            partitions: None,
            setup_timeout: Duration::from_secs(30),
            stages: Vec::new(),
            targets: Arc::default(),
        }
    }

    /// A flow of `stage` reading `inputs` (none for a stage that only takes routed commands), as
    /// this application's group on its brokers: set its decoder, outputs, route and settings,
    /// then hand it to [`stage`](Self::stage).
    pub fn flow<S: EventSourced>(&self, stage: S, inputs: impl IntoIterator<Item = impl AsRef<str>>) -> FlowBuilder<S> {
        FlowBuilder::new(stage, self.brokers.clone(), self.group.clone(), inputs)
    }

    /// Where to send commands for stage `S` from a [`route`](FlowBuilder::route) mapping. `S`
    /// must be a stage of this application ([`start`](Self::start) checks it).
    pub fn to<S: EventSourced>(&self) -> To<S>
    where
        S::Command: Serialize,
    {
        crate::flow::shared::lock(&self.targets).insert(S::NAME);
        To::new(&self.group)
    }

    /// Adds a stage. Commands routed to it are read as JSON of its command type; the output and
    /// route mappings see them with the context `C::default()` and their
    /// [`sender`](crate::flow::Processed::sender).
    #[must_use]
    pub fn stage<S, C>(mut self, flow: FlowBuilder<S, C>) -> Self
    where
        S: EventSourced,
        S::Command: Serialize + DeserializeOwned,
        C: Default + Send + 'static,
    {
        self.stages.push(Box::new(Some(flow)));
        self
    }

    /// The transactional id of this instance (stable across its restarts, its own per instance):
    /// each stage's flow has it with `-<stage>` appended, unless the stage's flow sets one.
    #[must_use]
    pub fn transactional_id(mut self, id: impl Into<String>) -> Self {
        self.transactional_id = Some(id.into());
        self
    }

    /// The partition count of stages without inputs (only routed commands). Default: the largest
    /// of the other stages'.
    #[must_use]
    pub fn partitions(mut self, n: i32) -> Self {
        self.partitions = Some(n);
        self
    }

    /// How long creating the repartition topics may take (each stage's own start is bounded by
    /// its [`FlowBuilder::setup_timeout`]). Default: 30 s.
    #[must_use]
    pub fn setup_timeout(mut self, timeout: Duration) -> Self {
        self.setup_timeout = timeout;
        self
    }

    /// Checks the stages, creates the repartition topics (or checks them) and starts every stage.
    ///
    /// # Errors
    /// [`FlowError::Config`] for an application that cannot run as built (no stages, a stage
    /// twice, a route to a stage it does not have, a stage of another group, inputs with
    /// different partition counts, a repartition topic with the wrong count) or a cluster that
    /// cannot be reached in time; a stage's setup error from [`FlowBuilder::run`].
    pub async fn start(self) -> Result<Running, FlowError> {
        let names: Vec<&'static str> = self.stages.iter().map(|s| s.name()).collect();
        if names.is_empty() {
            return Err(FlowError::Config(format!(
                "application `{}` has no stages: add them with Application::stage",
                self.group
            )));
        }
        let mut seen = BTreeSet::new();
        for name in &names {
            if !seen.insert(*name) {
                return Err(FlowError::Config(format!(
                    "stage `{name}` is added twice to application `{}`",
                    self.group
                )));
            }
        }
        let targets = crate::flow::shared::lock(&self.targets).clone();
        if let Some(missing) = targets.iter().find(|t| !seen.contains(*t)) {
            return Err(FlowError::Config(format!(
                "commands are routed to stage `{missing}`, which is not a stage of application `{}` (its stages: {}): add it with Application::stage",
                self.group,
                names.join(", ")
            )));
        }
        let mut dirs = BTreeMap::new();
        for stage in &self.stages {
            stage.check(&self.brokers, &self.group)?;
            if let Some(dir) = stage.state_dir() {
                if let Some(other) = dirs.insert(dir.to_path_buf(), stage.name()) {
                    return Err(FlowError::Config(format!(
                        "stages `{other}` and `{}` keep their local state stores in the same directory ({}): give each its own (e.g. one subdirectory per stage)",
                        stage.name(),
                        dir.display()
                    )));
                }
            }
        }
        let mut common = ClientConfig::new();
        common.set("bootstrap.servers", &self.brokers);
        let deadline = Instant::now() + self.setup_timeout;
        let inputs: Vec<(&'static str, Vec<String>)> =
            self.stages.iter().filter(|s| !s.inputs().is_empty()).map(|s| (s.name(), s.inputs().to_vec())).collect();
        let counts = partition_counts(&common, inputs, deadline).await?;
        // One admin client for every topic: each client's start and close cost round trips.
        let admin: Detached<AdminClient<DefaultClientContext>> =
            Detached::new(common.create().map_err(|e| kafka("admin client", e))?);
        let fallback = self.partitions.or_else(|| counts.values().copied().max());
        let mut specs = Vec::new();
        for name in &names {
            let partitions = match counts.get(name).copied().or(fallback) {
                Some(n) => n,
                None => {
                    return Err(FlowError::Config(format!(
                        "no stage of application `{}` has inputs to take a partition count from: set Application::partitions",
                        self.group
                    )))
                }
            };
            let topic = commands_topic(&self.group, name);
            ensure_topic(&admin, &topic, partitions, false, deadline).await?;
            let timers = timers_topic(&self.group, name);
            ensure_topic(&admin, &timers, partitions, true, deadline).await?;
            specs.push((Placement { topic, partitions }, timers));
        }
        let mut running: Vec<(&'static str, FlowControl)> = Vec::new();
        for (mut stage, (placement, timers)) in self.stages.into_iter().zip(specs) {
            let name = stage.name();
            let spec = StageSpec { placement, timers, transactional_id: self.transactional_id.clone() };
            match stage.start(spec) {
                Ok(control) => running.push((name, control)),
                Err(e) => {
                    for (_, control) in running {
                        let _ = control.abort().await;
                    }
                    return Err(e);
                }
            }
        }
        tracing::info!(group = %self.group, stages = %names.join(", "), "application started");
        Ok(Running { group: self.group, flows: running })
    }
}

/// A stage of an application, whatever its types.
trait AppStage: Send {
    fn name(&self) -> &'static str;
    fn inputs(&self) -> &[String];
    fn check(&self, brokers: &str, group: &str) -> Result<(), FlowError>;
    fn state_dir(&self) -> Option<&std::path::Path>;
    fn start(&mut self, spec: StageSpec) -> Result<FlowControl, FlowError>;
}

impl<S, C> AppStage for Option<FlowBuilder<S, C>>
where
    S: EventSourced,
    S::Command: Serialize + DeserializeOwned,
    C: Default + Send + 'static,
{
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn inputs(&self) -> &[String] {
        self.as_ref().map_or(&[], |f| f.inputs())
    }

    fn check(&self, brokers: &str, group: &str) -> Result<(), FlowError> {
        let Some(flow) = self else { return Ok(()) };
        let name = S::NAME;
        if flow.group() != group || flow.brokers() != brokers {
            return Err(FlowError::Config(format!(
                "stage `{name}` was built for group `{}` on {}; an application's stages share its group `{group}` and brokers {brokers}: build it with Application::flow",
                flow.group(),
                flow.brokers()
            )));
        }
        if !flow.inputs().is_empty() && !flow.has_decoder() {
            return Err(FlowError::Config(format!(
                "stage `{name}` reads {} and has no decoder",
                flow.inputs().join(", ")
            )));
        }
        match flow.producer_setting("partitioner") {
            None | Some("murmur2_random") => Ok(()),
            Some(other) => Err(FlowError::Config(format!(
                "stage `{name}` sets the producer's partitioner to `{other}`: an application's stages partition by murmur2 (`murmur2_random`), where its keys live; leave it out"
            ))),
        }
    }

    fn state_dir(&self) -> Option<&std::path::Path> {
        self.as_ref().and_then(|f| f.state_dir_set())
    }

    fn start(&mut self, spec: StageSpec) -> Result<FlowControl, FlowError> {
        let flow = self.take().ok_or_else(|| FlowError::Config(format!("stage `{}` started twice", S::NAME)))?;
        flow.into_stage(spec).run()
    }
}

/// The partition count of each stage's `inputs` (a stage's must agree), asked with one client
/// until `deadline` while the cluster does not answer.
async fn partition_counts(
    common: &ClientConfig,
    inputs: Vec<(&'static str, Vec<String>)>,
    deadline: Instant,
) -> Result<BTreeMap<&'static str, i32>, FlowError> {
    let common = common.clone();
    tokio::task::spawn_blocking(move || {
        let probe: Detached<BaseConsumer> = Detached::new(common.create().map_err(|e| kafka("metadata client", e))?);
        inputs.iter().map(|(stage, topics)| Ok((*stage, stage_partitions(&probe, topics, deadline)?))).collect()
    })
    .await
    .map_err(|e| FlowError::Crashed(format!("the application's metadata request panicked: {e}")))?
}

/// The partition count of one stage's `inputs`, which must agree.
fn stage_partitions(probe: &BaseConsumer, inputs: &[String], deadline: Instant) -> Result<i32, FlowError> {
    super::engine::agreed_partitions(inputs, |topic| loop {
        match probe.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md) => {
                return Ok(md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len() as i32))
            }
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(topic, error = %e, "metadata of an application's input; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(kafka(format!("metadata of {topic} (check the brokers)"), e)),
        }
    })
}

/// Creates a stage's repartition topic, or (`compact`) its timers topic, `topic` with `partitions`
/// (or checks the count of the one there).
async fn ensure_topic(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    partitions: i32,
    compact: bool,
    deadline: Instant,
) -> Result<(), FlowError> {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    if compact {
        new = new.set("cleanup.policy", "compact");
    }
    let created = admin.create_topics(&[new], &opts).await.map_err(|e| kafka(format!("create topic {topic}"), e))?;
    for r in created {
        match r {
            Ok(_) => tracing::info!(topic, partitions, compact, "created an application topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(FlowError::Config(format!("cannot create the application topic `{topic}`: {code}")))
            }
        }
    }
    // A topic just created may be missing from a broker's metadata for a moment.
    loop {
        let md = admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(|e| kafka(format!("metadata of {topic}"), e))?;
        let found = md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len() as i32);
        if found == partitions {
            return Ok(());
        }
        if found != 0 || Instant::now() >= deadline {
            return Err(FlowError::Config(format!(
                "the topic `{topic}` has {found} partitions, its stage's inputs have {partitions}: a key must live in the same partition of both; delete the topic (`eventstage reset` deletes an application's topics) to have it created again"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running application: its stages' flows.
#[derive(Debug)]
pub struct Running {
    group: String,
    flows: Vec<(&'static str, FlowControl)>,
}

/// Stops a running application's stages from elsewhere; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppStopper(Vec<FlowStopper>);

impl AppStopper {
    /// Drains every stage: stop polling, finish in-flight work, commit, leave the group.
    pub fn drain(&self) {
        self.0.iter().for_each(FlowStopper::drain);
    }

    /// Stops every stage at once, aborting their open transactions.
    pub fn abort(&self) {
        self.0.iter().for_each(FlowStopper::abort);
    }
}

impl Running {
    /// A handle that stops every stage.
    pub fn stopper(&self) -> AppStopper {
        AppStopper(self.flows.iter().map(|(_, f)| f.stopper()).collect())
    }

    /// Each stage's name and status (counters and readiness).
    pub fn statuses(&self) -> Vec<(&'static str, FlowStatus)> {
        self.flows.iter().map(|(name, f)| (*name, f.status())).collect()
    }

    /// Each stage's name and counters now.
    pub fn metrics(&self) -> Vec<(&'static str, FlowMetrics)> {
        self.flows.iter().map(|(name, f)| (*name, f.metrics())).collect()
    }

    /// Ready when every stage is (see [`FlowStatus::ready`]).
    pub fn ready(&self) -> bool {
        self.flows.iter().all(|(_, f)| f.status().ready())
    }

    /// Waits until the stages stop. The first to stop on an error stops the others (they abort
    /// their open transactions) and its error is returned; one that ends without an error (a
    /// drain) drains the others.
    ///
    /// # Errors
    /// The [`FlowError`] of the first stage that failed.
    pub async fn wait(self) -> Result<(), FlowError> {
        let stopper = self.stopper();
        let group = self.group;
        let mut pending: Vec<BoxFuture<'static, (&'static str, Result<(), FlowError>)>> = self
            .flows
            .into_iter()
            .map(|(name, f)| Box::pin(async move { (name, f.wait().await) }) as BoxFuture<'static, _>)
            .collect();
        let mut first = None;
        while !pending.is_empty() {
            let ((name, result), _, rest) = futures::future::select_all(pending).await;
            pending = rest;
            match result {
                Err(FlowError::Aborted) | Ok(()) => stopper.drain(),
                Err(e) => {
                    if first.is_none() {
                        tracing::error!(group = %group, stage = name, error = %e, "a stage of the application stopped; stopping the others");
                        stopper.abort();
                        first = Some(e);
                    }
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Drains every stage and waits for them.
    ///
    /// # Errors
    /// The error of the first stage that failed before or while draining.
    pub async fn drain_and_shutdown(self) -> Result<(), FlowError> {
        self.stopper().drain();
        self.wait().await
    }

    /// Stops every stage at once, aborting their open transactions.
    ///
    /// # Errors
    /// The error of a stage that failed before the abort.
    pub async fn abort(self) -> Result<(), FlowError> {
        self.stopper().abort();
        match self.wait().await {
            Err(FlowError::Aborted) => Ok(()),
            other => other,
        }
    }
}
