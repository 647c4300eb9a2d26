//! A flow's metrics through the [`metrics`] facade, the way Rust services export them today: the
//! application installs a recorder (a Prometheus exporter, as `eventstage demo --metrics-addr`
//! does, OpenTelemetry, StatsD); without one nothing is recorded and this costs a few atomic
//! no-ops per commit. Every metric carries the labels `stage` and `group`.
//!
//! Counters and gauges are published from the flow's own counters once per commit interval (not
//! per record: the hot path stays as it is); the commit latency is a histogram of every commit.

use crate::flow::control::FlowMetrics;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Label};
use std::time::Duration;

/// Names of the metrics, for dashboards and tests.
pub mod names {
    /// Input records processed (counter).
    pub const RECORDS_IN: &str = "eventstage_flow_records_in_total";
    /// Output records produced, journal records not included (counter).
    pub const RECORDS_OUT: &str = "eventstage_flow_records_out_total";
    /// Records sent to the dead-letter topic (counter).
    pub const DEAD_LETTERS: &str = "eventstage_flow_dead_letters_total";
    /// Committed transactions, or at-least-once offset commits (counter).
    pub const COMMITS: &str = "eventstage_flow_commits_total";
    /// Aborted transactions (counter).
    pub const ABORTS: &str = "eventstage_flow_aborts_total";
    /// Journal records read by restores (counter).
    pub const RESTORED_RECORDS: &str = "eventstage_flow_restored_records_total";
    /// Rows restores loaded from the local state store (counter).
    pub const STORE_ROWS: &str = "eventstage_flow_store_rows_total";
    /// Journal records the local store's follower read from the broker (counter).
    pub const STORE_READ_RECORDS: &str = "eventstage_flow_store_read_records_total";
    /// Rows the flow handed its local store as their transactions committed (counter).
    pub const STORE_HANDED_ROWS: &str = "eventstage_flow_store_handed_rows_total";
    /// Inputs delivered again whose events the journal already held, skipped (counter).
    pub const SKIPPED_REDELIVERIES: &str = "eventstage_flow_skipped_redeliveries_total";
    /// Inputs forwarded to their key's partition through the stage's repartition topic (counter).
    pub const FORWARDED: &str = "eventstage_flow_forwarded_total";
    /// Durable timers fired (counter).
    pub const TIMERS_FIRED: &str = "eventstage_flow_timers_fired_total";
    /// Durable timers pending in the owned partitions (gauge).
    pub const TIMERS_PENDING: &str = "eventstage_flow_timers_pending";
    /// Rebalances this instance took part in: assignments and revocations (counter).
    pub const REBALANCES: &str = "eventstage_flow_rebalances_total";
    /// Records behind the end of the assigned input partitions (gauge; also per partition, with the
    /// labels `topic` and `partition`, for the partitions this instance owns).
    pub const LAG: &str = "eventstage_flow_lag_records";
    /// Input partitions assigned to this instance (gauge).
    pub const ASSIGNED_PARTITIONS: &str = "eventstage_flow_assigned_partitions";
    /// Partitions being restored now (gauge).
    pub const RESTORING_PARTITIONS: &str = "eventstage_flow_restoring_partitions";
    /// Bytes of committed state in the state cache, as weighed against its budget (gauge).
    pub const CACHE_BYTES: &str = "eventstage_flow_cache_bytes";
    /// Committed keys in memory: in the state cache, or every key without one (gauge).
    pub const CACHE_ENTRIES: &str = "eventstage_flow_cache_entries";
    /// Committed keys the local store does not have yet, held beside the cache (gauge).
    pub const CACHE_UNSTORED: &str = "eventstage_flow_cache_unstored_entries";
    /// Keys found in memory when used, with a local store (counter).
    pub const CACHE_HITS: &str = "eventstage_flow_cache_hits_total";
    /// Keys read from the local store when used (counter).
    pub const CACHE_MISSES: &str = "eventstage_flow_cache_misses_total";
    /// Keys the state cache evicted (counter).
    pub const CACHE_EVICTIONS: &str = "eventstage_flow_cache_evictions_total";
    /// Journal records acknowledged that the local store does not have yet (gauge).
    pub const STORE_LAG: &str = "eventstage_flow_store_lag_records";
    /// Latency of each commit, in seconds (histogram).
    pub const COMMIT_SECONDS: &str = "eventstage_flow_commit_seconds";
}

/// The flow's metric handles, registered once.
pub(crate) struct Exported {
    labels: Vec<Label>,
    records_in: Counter,
    records_out: Counter,
    dead_letters: Counter,
    commits: Counter,
    aborts: Counter,
    restored_records: Counter,
    store_rows: Counter,
    store_read_records: Counter,
    store_handed_rows: Counter,
    skipped_redeliveries: Counter,
    forwarded: Counter,
    timers_fired: Counter,
    timers_pending: Gauge,
    rebalances: Counter,
    lag: Gauge,
    assigned: Gauge,
    restoring: Gauge,
    cache_bytes: Gauge,
    cache_entries: Gauge,
    cache_unstored: Gauge,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_evictions: Counter,
    store_lag: Gauge,
    commit_seconds: Histogram,
}

impl Exported {
    pub(crate) fn new(stage: &str, group: &str) -> Self {
        let labels = vec![Label::new("stage", stage.to_string()), Label::new("group", group.to_string())];
        let l = || labels.clone();
        Self {
            records_in: counter!(names::RECORDS_IN, l()),
            records_out: counter!(names::RECORDS_OUT, l()),
            dead_letters: counter!(names::DEAD_LETTERS, l()),
            commits: counter!(names::COMMITS, l()),
            aborts: counter!(names::ABORTS, l()),
            restored_records: counter!(names::RESTORED_RECORDS, l()),
            store_rows: counter!(names::STORE_ROWS, l()),
            store_read_records: counter!(names::STORE_READ_RECORDS, l()),
            store_handed_rows: counter!(names::STORE_HANDED_ROWS, l()),
            skipped_redeliveries: counter!(names::SKIPPED_REDELIVERIES, l()),
            forwarded: counter!(names::FORWARDED, l()),
            timers_fired: counter!(names::TIMERS_FIRED, l()),
            timers_pending: gauge!(names::TIMERS_PENDING, l()),
            rebalances: counter!(names::REBALANCES, l()),
            lag: gauge!(names::LAG, l()),
            assigned: gauge!(names::ASSIGNED_PARTITIONS, l()),
            restoring: gauge!(names::RESTORING_PARTITIONS, l()),
            cache_bytes: gauge!(names::CACHE_BYTES, l()),
            cache_entries: gauge!(names::CACHE_ENTRIES, l()),
            cache_unstored: gauge!(names::CACHE_UNSTORED, l()),
            cache_hits: counter!(names::CACHE_HITS, l()),
            cache_misses: counter!(names::CACHE_MISSES, l()),
            cache_evictions: counter!(names::CACHE_EVICTIONS, l()),
            store_lag: gauge!(names::STORE_LAG, l()),
            commit_seconds: histogram!(names::COMMIT_SECONDS, l()),
            labels,
        }
    }

    /// Publishes the flow's counters as they are now.
    pub(crate) fn publish(&self, m: &FlowMetrics) {
        self.records_in.absolute(m.records_in);
        self.records_out.absolute(m.records_out);
        self.dead_letters.absolute(m.dead_letters);
        self.commits.absolute(m.transactions);
        self.aborts.absolute(m.aborts);
        self.restored_records.absolute(m.restored_records);
        self.store_rows.absolute(m.store_rows);
        self.store_read_records.absolute(m.store_read_records);
        self.store_handed_rows.absolute(m.store_handed_rows);
        self.skipped_redeliveries.absolute(m.skipped_redeliveries);
        self.forwarded.absolute(m.forwarded);
        self.timers_fired.absolute(m.timers_fired);
        self.timers_pending.set(m.timers_pending as f64);
        self.rebalances.absolute(m.rebalances);
        self.lag.set(m.lag as f64);
        self.assigned.set(m.assigned_partitions as f64);
        self.restoring.set(m.restoring_partitions as f64);
        self.cache_bytes.set(m.cache_bytes as f64);
        self.cache_entries.set(m.cache_entries as f64);
        self.cache_unstored.set(m.cache_unstored as f64);
        self.cache_hits.absolute(m.cache_hits);
        self.cache_misses.absolute(m.cache_misses);
        self.cache_evictions.absolute(m.cache_evictions);
        self.store_lag.set(m.store_lag as f64);
    }

    /// Records one commit's latency.
    pub(crate) fn commit(&self, took: Duration) {
        self.commit_seconds.record(took.as_secs_f64());
    }

    /// The lag of one owned partition.
    pub(crate) fn partition_lag(&self, topic: &str, partition: i32, lag: u64) {
        let mut labels = self.labels.clone();
        labels.push(Label::new("topic", topic.to_string()));
        labels.push(Label::new("partition", partition.to_string()));
        gauge!(names::LAG, labels).set(lag as f64);
    }
}
