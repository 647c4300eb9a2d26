//! A table's metrics through the [`metrics`] facade, as a flow's are (see
//! [`flow::metric_names`](crate::flow::metric_names)): nothing is recorded until the application
//! installs a recorder. Every metric carries the label `topic`. The follower thread publishes them
//! once a second from the table's own counters, never per record.

use super::Counters;
use metrics::{counter, gauge, Counter, Gauge, Label};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Names of the metrics, for dashboards and tests.
pub mod names {
    /// Records read from the topic: rows, tombstones and bad records (counter).
    pub const RECORDS_READ: &str = "eventstage_table_records_read_total";
    /// Rows loaded from the local store when the table opened or was assigned partitions: restore
    /// progress (counter).
    pub const STORE_ROWS_LOADED: &str = "eventstage_table_store_rows_loaded_total";
    /// Tombstones read (counter).
    pub const TOMBSTONES: &str = "eventstage_table_tombstones_total";
    /// Records skipped because they did not decode (counter).
    pub const BAD_INPUT: &str = "eventstage_table_bad_input_total";
    /// Checkpoints written to the local store (counter).
    pub const CHECKPOINTS: &str = "eventstage_table_checkpoints_total";
    /// Keys in the table (gauge).
    pub const KEYS: &str = "eventstage_table_keys";
    /// Bytes of the keys and values in the table (gauge).
    pub const BYTES: &str = "eventstage_table_bytes";
    /// Records behind the end of the partitions the table reads (gauge; also per partition, with
    /// the label `partition`).
    pub const LAG: &str = "eventstage_table_lag_records";
    /// Partitions not yet read up to the end they had when the table started reading them: 0
    /// once the table has caught up (gauge).
    pub const CATCHING_UP_PARTITIONS: &str = "eventstage_table_catching_up_partitions";
}

/// How often the follower publishes its counters.
const EVERY: Duration = Duration::from_secs(1);
/// How often it asks the cluster for the partitions' ends, for the lag (a round trip each).
const LAG_EVERY: Duration = Duration::from_secs(5);

/// The table's metric handles, registered once.
pub(super) struct Exported {
    topic: String,
    records_read: Counter,
    store_rows_loaded: Counter,
    tombstones: Counter,
    bad_input: Counter,
    checkpoints: Counter,
    keys: Gauge,
    bytes: Gauge,
    lag: Gauge,
    catching_up: Gauge,
    /// Per partition, for the partitions read now (a revoked one is set to 0 once).
    partition_lag: BTreeMap<i32, Gauge>,
    last: Option<Instant>,
    last_lag: Option<Instant>,
}

impl Exported {
    pub(super) fn new(topic: &str) -> Self {
        let l = || vec![Label::new("topic", topic.to_string())];
        Self {
            topic: topic.to_string(),
            records_read: counter!(names::RECORDS_READ, l()),
            store_rows_loaded: counter!(names::STORE_ROWS_LOADED, l()),
            tombstones: counter!(names::TOMBSTONES, l()),
            bad_input: counter!(names::BAD_INPUT, l()),
            checkpoints: counter!(names::CHECKPOINTS, l()),
            keys: gauge!(names::KEYS, l()),
            bytes: gauge!(names::BYTES, l()),
            lag: gauge!(names::LAG, l()),
            catching_up: gauge!(names::CATCHING_UP_PARTITIONS, l()),
            partition_lag: BTreeMap::new(),
            last: None,
            last_lag: None,
        }
    }

    /// Publishes the table's counters, at most once per [`EVERY`] unless `now`, and its lag, at
    /// most once per [`LAG_EVERY`]: each partition's end offset (`end_of`, a round trip to the
    /// cluster) minus the next offset to read.
    pub(super) fn publish(
        &mut self,
        now: bool,
        mut end_of: impl FnMut(i32) -> Option<i64>,
        counters: &Counters,
        keys: impl FnOnce() -> usize,
        positions: &BTreeMap<i32, i64>,
        catching_up: usize,
    ) {
        if !now && self.last.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        self.records_read.absolute(counters.records_read.load(Ordering::Relaxed));
        self.store_rows_loaded.absolute(counters.loaded_from_store.load(Ordering::Relaxed));
        self.tombstones.absolute(counters.tombstones.load(Ordering::Relaxed));
        self.bad_input.absolute(counters.bad_input.load(Ordering::Relaxed));
        self.checkpoints.absolute(counters.checkpoints.load(Ordering::Relaxed));
        self.keys.set(keys() as f64);
        self.bytes.set(counters.bytes.load(Ordering::Relaxed).max(0) as f64);
        self.catching_up.set(catching_up as f64);
        if self.last_lag.is_some_and(|t| t.elapsed() < LAG_EVERY) {
            return;
        }
        self.last_lag = Some(Instant::now());
        let mut total = 0;
        for (&p, &next) in positions {
            // Unknown for now (the cluster did not answer in time): the last value stands.
            let Some(end) = end_of(p) else { continue };
            let lag = (end - next).max(0);
            total += lag;
            let topic = &self.topic;
            let gauge = self.partition_lag.entry(p).or_insert_with(|| {
                gauge!(names::LAG, vec![Label::new("topic", topic.clone()), Label::new("partition", p.to_string())])
            });
            gauge.set(lag as f64);
        }
        self.partition_lag.retain(|p, gauge| {
            let kept = positions.contains_key(p);
            if !kept {
                gauge.set(0.0);
            }
            kept
        });
        self.lag.set(total as f64);
    }
}
