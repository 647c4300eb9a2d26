//! Stages known to the CLI, type-erased: decode their events to JSON and rebuild their state.

use crate::replay::{decode_event, decode_state, rebuild};
use crate::stage::{EntityKey, EventSourced};
use anyhow::Context;
use eventstage_journal::{printable_key, Envelope, EventQuery, EventRecord, Progress, SledJournal};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// One rebuilt entity: printable key, last sequence number, state as JSON.
pub(super) type RebuiltEntity = (String, u64, serde_json::Value);

/// What the CLI needs of a stage, without its types.
pub(super) trait ErasedStage: Send + Sync {
    /// Decodes an event into JSON.
    ///
    /// # Errors
    /// When the payload does not decode.
    fn event_json(&self, rec: &EventRecord) -> anyhow::Result<serde_json::Value>;
    /// Decodes a state snapshot (as the Kafka journal stores it with each record) into JSON.
    ///
    /// # Errors
    /// When the payload does not decode or is of another state version.
    fn state_json(&self, envelope: &Envelope) -> anyhow::Result<serde_json::Value>;
    /// Rebuilds every key matching `query` from events.
    fn rebuild<'a>(
        &'a self,
        journal: &'a SledJournal,
        query: EventQuery,
        progress: Progress,
    ) -> BoxFuture<'a, anyhow::Result<Vec<RebuiltEntity>>>;
}

/// The [`ErasedStage`] of `S`.
pub(super) struct StageCodecs<S>(PhantomData<fn() -> S>);

impl<S> fmt::Debug for StageCodecs<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StageCodecs")
    }
}

impl<S: EventSourced> ErasedStage for StageCodecs<S>
where
    S::Event: serde::Serialize,
{
    fn event_json(&self, rec: &EventRecord) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::to_value(decode_event::<S>(rec)?)?)
    }

    fn state_json(&self, envelope: &Envelope) -> anyhow::Result<serde_json::Value> {
        let state = decode_state::<S>(envelope).with_context(|| format!("stage `{}`", S::NAME))?;
        Ok(serde_json::to_value(state)?)
    }

    fn rebuild<'a>(
        &'a self,
        journal: &'a SledJournal,
        query: EventQuery,
        progress: Progress,
    ) -> BoxFuture<'a, anyhow::Result<Vec<RebuiltEntity>>> {
        Box::pin(async move {
            let states = rebuild::<S, _>(journal, query, &progress).await?;
            states
                .into_iter()
                .map(|(k, (state, seq))| Ok((printable_key(&k.to_bytes()), seq.0, serde_json::to_value(state)?)))
                .collect()
        })
    }
}

/// The stages a CLI knows, by name.
#[derive(Default, Clone)]
pub(super) struct Registry {
    stages: BTreeMap<&'static str, Arc<dyn ErasedStage>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.stages.keys()).finish()
    }
}

impl Registry {
    /// Registers `S`.
    pub(super) fn register<S: EventSourced>(&mut self)
    where
        S::Event: serde::Serialize,
    {
        self.stages.insert(S::NAME, Arc::new(StageCodecs::<S>(PhantomData)));
    }

    /// The stage that wrote journal `journal`: its name, or its name before a `/` (partitioned
    /// journals are named `stage/partition`).
    pub(super) fn for_journal(&self, journal: &str) -> Option<&dyn ErasedStage> {
        self.shared_for_journal(journal).map(|s| &**s)
    }

    /// [`for_journal`](Self::for_journal), as a handle that outlives the registry borrow.
    pub(super) fn shared_for_journal(&self, journal: &str) -> Option<&Arc<dyn ErasedStage>> {
        let stage = journal.split('/').next().unwrap_or(journal);
        self.stages.get(stage)
    }

    /// The stage a Kafka journal `topic` is read with: the one `named` by `--stage`, else the only
    /// one registered, else the one the topic's name ends with as an application names its
    /// stages' journals (`<group>-<stage>-journal`); `None` when none is named and none of these
    /// picks one (then [`choices`](Self::choices) says what to do).
    ///
    /// # Errors
    /// `named` is not registered: the message lists those that are.
    pub(super) fn for_kafka_journal<'a>(
        &'a self,
        named: Option<&'a str>,
        topic: &str,
    ) -> anyhow::Result<Option<(&'a str, &'a dyn ErasedStage)>> {
        match named {
            Some(name) => {
                let stage = self.for_journal(name).with_context(|| {
                    format!("no stage named `{name}` is compiled into this binary (known: {})", self.names())
                })?;
                Ok(Some((name, stage)))
            }
            None => match self.stages.iter().next() {
                Some((name, stage)) if self.stages.len() == 1 => Ok(Some((*name, &**stage))),
                _ => Ok(self
                    .stages
                    .iter()
                    .find(|(name, _)| {
                        topic
                            .strip_suffix("-journal")
                            .and_then(|t| t.strip_suffix(**name))
                            .is_some_and(|t| t.ends_with('-'))
                    })
                    .map(|(name, stage)| (*name, &**stage))),
            },
        }
    }

    /// What to pass when no stage could be chosen by itself: the registered names, or how to
    /// register one.
    pub(super) fn choices(&self) -> String {
        if self.stages.is_empty() {
            "no stage is registered in this binary: register yours with eventstage::cli::Cli::new(..).stage::<YourStage>()".into()
        } else {
            format!("this binary knows {}: name one", self.names())
        }
    }

    /// Registered stage names, comma-separated.
    pub(super) fn names(&self) -> String {
        let names: Vec<&str> = self.stages.keys().copied().collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::{bank::Bank, inventory::Inventory};

    #[test]
    fn a_kafka_journal_is_read_with_the_named_stage_or_the_only_one() {
        let none = Registry::default();
        assert!(none.for_kafka_journal(None, "j").unwrap().is_none());
        assert!(none.choices().contains(".stage::<YourStage>()"), "{}", none.choices());
        assert!(none.for_kafka_journal(Some("bank"), "j").is_err());

        let mut one = Registry::default();
        one.register::<Bank>();
        assert_eq!(one.for_kafka_journal(None, "j").unwrap().map(|(name, _)| name), Some("bank"));
        assert_eq!(one.for_kafka_journal(Some("bank"), "j").unwrap().map(|(name, _)| name), Some("bank"));
        let err = one.for_kafka_journal(Some("inventory"), "j").err().unwrap();
        assert!(format!("{err:#}").contains("known: bank"), "{err:#}");

        let mut two = one.clone();
        two.register::<Inventory>();
        assert!(two.for_kafka_journal(None, "j").unwrap().is_none(), "two stages: none is chosen by itself");
        assert_eq!(two.choices(), "this binary knows bank, inventory: name one");
        assert_eq!(two.for_kafka_journal(Some("inventory"), "j").unwrap().map(|(name, _)| name), Some("inventory"));
        // An application's journal names its stage.
        assert_eq!(
            two.for_kafka_journal(None, "shop-inventory-journal").unwrap().map(|(name, _)| name),
            Some("inventory")
        );
        assert!(two.for_kafka_journal(None, "shop-xinventory-journal").unwrap().is_none());
        assert!(two.for_kafka_journal(None, "inventory-journal").unwrap().is_none());
    }
}
