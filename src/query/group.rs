//! Which instance owns which partition: the consumer group's own assignment, as the group
//! coordinator describes it, with each member's query address carried in its client id.
//!
//! Why the group and not a topic of addresses: the assignment *is* who owns a partition, so it
//! cannot disagree with it; it changes with every rebalance, a killed instance leaves it when its
//! session expires, and nothing has to be written, compacted or cleaned up. librdkafka does not let
//! an application put its own bytes into the member metadata, but the group description carries
//! every member's client id beside its assignment: a queryable flow's consumer sets its client id
//! to `eventstage/<stage>@<host:port>`.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const CLIENT_ID_PREFIX: &str = "eventstage/";

/// The client id of a queryable flow's consumer: the stage and where its instance answers.
pub(crate) fn client_id(stage: &str, advertise: &str) -> String {
    format!("{CLIENT_ID_PREFIX}{stage}@{advertise}")
}

/// `(stage, address)` of a client id written by [`client_id`].
fn parse_client_id(id: &str) -> Option<(&str, &str)> {
    id.strip_prefix(CLIENT_ID_PREFIX)?.split_once('@').filter(|(s, a)| !s.is_empty() && !a.is_empty())
}

/// One member of the group that answers queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) stage: String,
    /// Its advertised `host:port`.
    pub(crate) address: String,
    /// The partition numbers assigned to it (of any of its stage's topics: they are
    /// co-partitioned).
    pub(crate) partitions: BTreeSet<i32>,
}

/// The group as its coordinator last described it.
#[derive(Debug, Clone)]
pub(crate) struct GroupView {
    /// The coordinator's state of the group: `Stable` once an assignment is in force.
    pub(crate) state: String,
    pub(crate) members: Vec<Member>,
    pub(crate) fetched: Instant,
}

impl GroupView {
    pub(crate) fn stable(&self) -> bool {
        self.state == "Stable"
    }

    /// The member of `stage` assigned partition `p`.
    pub(crate) fn owner(&self, stage: &str, p: i32) -> Option<&Member> {
        self.members.iter().find(|m| m.stage == stage && m.partitions.contains(&p))
    }

    /// The addresses of `stage`'s members, each once, in order.
    pub(crate) fn addresses(&self, stage: &str) -> BTreeSet<&str> {
        self.members.iter().filter(|m| m.stage == stage).map(|m| m.address.as_str()).collect()
    }

    /// The stages with members.
    pub(crate) fn stages(&self) -> BTreeSet<&str> {
        self.members.iter().map(|m| m.stage.as_str()).collect()
    }
}

/// Asks the group coordinator for the group's members and assignment.
pub(crate) struct GroupReader {
    consumer: BaseConsumer,
    group: String,
}

impl GroupReader {
    pub(crate) fn new(brokers: &str, group: &str) -> Result<Self, String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("client.id", "eventstage-query-router")
            .create()
            .map_err(|e| format!("cannot create a Kafka client for {brokers}: {e}"))?;
        Ok(Self { consumer, group: group.to_string() })
    }

    /// The group's description (blocking: at most `timeout`).
    pub(crate) fn describe(&self, timeout: Duration) -> Result<GroupView, String> {
        let list = self
            .consumer
            .fetch_group_list(Some(&self.group), timeout)
            .map_err(|e| format!("cannot describe group {}: {e}", self.group))?;
        let info = list
            .groups()
            .iter()
            .find(|g| g.name() == self.group)
            .ok_or_else(|| format!("group {} is not known to the cluster", self.group))?;
        let members = info
            .members()
            .iter()
            .filter_map(|m| {
                let (stage, address) = parse_client_id(m.client_id())?;
                let partitions = m.assignment().map(assigned_partitions).unwrap_or_default();
                Some(Member { stage: stage.to_string(), address: address.to_string(), partitions })
            })
            .collect();
        Ok(GroupView { state: info.state().to_string(), members, fetched: Instant::now() })
    }
}

/// The partition numbers of a consumer protocol assignment (version, then per topic its name
/// and partitions, then user data). Damaged bytes give what was read up to them.
fn assigned_partitions(bytes: &[u8]) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    let mut r = Reader(bytes);
    let _version = r.i16();
    let Some(topics) = r.i32() else { return out };
    for _ in 0..topics.max(0) {
        let Some(len) = r.i16() else { break };
        if r.take(len.max(0) as usize).is_none() {
            break;
        }
        let Some(n) = r.i32() else { break };
        for _ in 0..n.max(0) {
            match r.i32() {
                Some(p) => {
                    out.insert(p);
                }
                None => return out,
            }
        }
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_carry_stage_and_address() {
        let id = client_id("bank", "10.0.0.7:8080");
        assert_eq!(parse_client_id(&id), Some(("bank", "10.0.0.7:8080")));
        assert_eq!(parse_client_id("rdkafka"), None);
        assert_eq!(parse_client_id("eventstage/@x"), None);
    }

    #[test]
    fn assignments_are_parsed_as_kafka_writes_them() {
        // Version 1; topics "a" [0, 3] and "bc" [5]; empty user data.
        let mut b = vec![0, 1, 0, 0, 0, 2];
        b.extend([0, 1, b'a', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3]);
        b.extend([0, 2, b'b', b'c', 0, 0, 0, 1, 0, 0, 0, 5]);
        b.extend([0, 0, 0, 0]);
        assert_eq!(assigned_partitions(&b), BTreeSet::from([0, 3, 5]));
        // Cut short: what was read.
        assert_eq!(assigned_partitions(&b[..18]), BTreeSet::from([0]));
        assert!(assigned_partitions(&[]).is_empty());
    }
}
