//! A flow as a stage of an [`Application`](crate::flow::Application): what the application
//! reads of the builder, and how it turns the builder into one of its stages.

use super::FlowBuilder;
use crate::flow::engine;
use crate::flow::record::Context;
use crate::flow::route::Placement;
use crate::flow::settings::Guarantee;
use crate::stage::EventSourced;
use rdkafka::ClientConfig;

/// What an [`Application`](crate::flow::Application) gives each of its stages.
pub(in crate::flow) struct StageSpec {
    /// The stage's repartition topic and where its keys live.
    pub(in crate::flow) placement: Placement,
    /// The stage's timers topic.
    pub(in crate::flow) timers: String,
    /// The application's transactional id, for stages without one of their own.
    pub(in crate::flow) transactional_id: Option<String>,
}

impl<S: EventSourced, C: Send + 'static> FlowBuilder<S, C> {
    pub(in crate::flow) fn brokers(&self) -> &str {
        &self.brokers
    }

    pub(in crate::flow) fn group(&self) -> &str {
        &self.group_id
    }

    pub(in crate::flow) fn inputs(&self) -> &[String] {
        &self.inputs
    }

    pub(in crate::flow) fn state_dir_set(&self) -> Option<&std::path::Path> {
        self.state_dir.as_deref()
    }

    pub(in crate::flow) fn has_decoder(&self) -> bool {
        self.decoder.is_some()
    }

    pub(in crate::flow) fn producer_setting(&self, key: &str) -> Option<&str> {
        self.producer.get(key).map(String::as_str)
    }

    /// The flow as a stage of an application: it reads its repartition topic beside its inputs
    /// (routed commands as JSON, forwarded inputs as they came), keeps each key in the
    /// partition Kafka's default partitioner gives it, and partitions what it writes the same way.
    pub(in crate::flow) fn into_stage(mut self, spec: StageSpec) -> Self
    where
        S::Command: serde::Serialize + serde::de::DeserializeOwned,
        C: Default,
    {
        let topic = spec.placement.topic.clone();
        self.inputs.push(topic.clone());
        let context: fn() -> Context = || Box::new(C::default());
        self.decoder = Some(crate::flow::route::application_decoder::<S>(topic, self.decoder.take(), context));
        self.producer.insert("partitioner".into(), "murmur2_random".into());
        if self.transactional_id.is_none() {
            self.transactional_id = spec.transactional_id.map(|id| format!("{id}-{}", S::NAME));
        }
        self.placement = Some(spec.placement);
        // At least once, a fired timer's removal (an output, produced at once) could be written
        // before the fired command's journal records, and its effect lost in a crash: timers
        // need transactions.
        if self.guarantee == Guarantee::AtLeastOnce {
            return self;
        }
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        self.timers = Some(engine::TimerSettings {
            topic: spec.timers,
            config,
            encode: |command| serde_json::to_vec(command).map_err(|e| e.to_string()),
            decode: |bytes| serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            context,
        });
        self
    }
}
