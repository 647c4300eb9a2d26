//! What the flow thread does once at start: the inputs' partition count, a journal taken over
//! from another group, and the error of a consumer that cannot go on.

use super::*;
use eventstage_journal::kafka::Detached;

/// The error of a fatal consumer error, with what to do about it.
pub(super) fn consumer_fatal(code: RDKafkaErrorCode) -> FlowError {
    let hint = match code {
        RDKafkaErrorCode::FencedInstanceId => {
            "another live instance joined the group with this instance's group.instance.id (a flow with a transactional id uses it as its static member id): give every instance its own id"
        }
        RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::GroupAuthorizationFailed => {
            "the consumer is not authorized: grant it read on the inputs and the group"
        }
        _ => "the consumer cannot go on; restart the flow",
    };
    kafka(format!("consumer (fatal): {hint}"), KafkaError::MessageConsumptionFatal(code))
}

/// Copies group `from`'s committed offsets of the inputs to group `to` where `to` has none: a
/// group taking a journal over goes on where the journal's state is.
pub(super) fn carry_offsets_over(
    common: &ClientConfig,
    from: &str,
    to: &str,
    inputs: &[String],
    partitions: i32,
) -> Result<(), FlowError> {
    let mut tpl = TopicPartitionList::new();
    for topic in inputs {
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
    }
    let group = |id: &str| -> Result<BaseConsumer, FlowError> {
        common
            .clone()
            .set("group.id", id)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| kafka("offsets client", e))
    };
    let old = group(from)?
        .committed_offsets(tpl.clone(), TXN_TIMEOUT)
        .map_err(|e| kafka(format!("committed offsets of group {from}"), e))?;
    let new = group(to)?;
    let mine =
        new.committed_offsets(tpl, TXN_TIMEOUT).map_err(|e| kafka(format!("committed offsets of group {to}"), e))?;
    let mut carried = TopicPartitionList::new();
    for el in old.elements() {
        let unset =
            mine.find_partition(el.topic(), el.partition()).is_none_or(|m| !matches!(m.offset(), Offset::Offset(_)));
        if let (Offset::Offset(o), true) = (el.offset(), unset) {
            carried
                .add_partition_offset(el.topic(), el.partition(), Offset::Offset(o))
                .map_err(|e| kafka("offsets", e))?;
        }
    }
    if carried.count() > 0 {
        new.commit(&carried, rdkafka::consumer::CommitMode::Sync)
            .map_err(|e| kafka(format!("commit the offsets carried over to group {to}"), e))?;
    }
    tracing::info!(from, to, partitions = carried.count(), "carried the previous owner's committed input offsets over");
    Ok(())
}

pub(super) fn input_partitions(common: &ClientConfig, inputs: &[String]) -> Result<i32, FlowError> {
    let probe: Detached<BaseConsumer> = Detached::new(common.create().map_err(|e| kafka("metadata client", e))?);
    let mut count = None;
    for topic in inputs {
        let md = probe
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| kafka(format!("metadata of {topic}"), e))?;
        let n = md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len() as i32);
        if n == 0 {
            return Err(FlowError::Config(format!("input topic `{topic}` does not exist; create it first")));
        }
        if count.is_some_and(|c| c != n) {
            return Err(FlowError::Config(format!(
                "input topics have different partition counts ({} vs {n} for `{topic}`); state partitions must line up, so give them the same count",
                count.unwrap_or_default()
            )));
        }
        count = Some(n);
    }
    count.ok_or_else(|| FlowError::Config("no input topics".into()))
}
