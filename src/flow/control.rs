//! A running flow as the application sees it: its counters, readiness, and how to stop it and
//! wait for it.

use crate::flow::error::FlowError;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Counters of a running flow.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) records_in: AtomicU64,
    pub(crate) records_out: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) transactions: AtomicU64,
    pub(crate) aborts: AtomicU64,
    pub(crate) restored_records: AtomicU64,
    pub(crate) store_rows: AtomicU64,
    pub(crate) store_dropped: AtomicU64,
    pub(crate) store_read_records: AtomicU64,
    pub(crate) store_handed_rows: AtomicU64,
    pub(crate) restoring_partitions: AtomicU64,
    pub(crate) last_commit_us: AtomicU64,
    pub(crate) max_commit_us: AtomicU64,
    pub(crate) lag: AtomicU64,
    pub(crate) assigned_partitions: AtomicU64,
    pub(crate) skipped_redeliveries: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) timers_fired: AtomicU64,
    pub(crate) timers_pending: AtomicU64,
    pub(crate) enrich_in_flight: AtomicU64,
    pub(crate) max_enrich_in_flight: AtomicU64,
    pub(crate) rebalances: AtomicU64,
    pub(crate) cache_bytes: AtomicU64,
    pub(crate) cache_entries: AtomicU64,
    pub(crate) cache_unstored: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) cache_evictions: AtomicU64,
    pub(crate) store_lag: AtomicU64,
}

/// A snapshot of a flow's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlowMetrics {
    /// Input records processed (committed or not).
    pub records_in: u64,
    /// Output records produced (journal records not included).
    pub records_out: u64,
    /// Records sent to the dead-letter topic.
    pub dead_letters: u64,
    /// Committed transactions (exactly-once), or committed batches (at-least-once).
    pub transactions: u64,
    /// Aborted transactions.
    pub aborts: u64,
    /// Journal records read by restores.
    pub restored_records: u64,
    /// Rows restores loaded from the local state store (see [`FlowBuilder::state_dir`](crate::flow::FlowBuilder::state_dir)).
    pub store_rows: u64,
    /// Times the local state store, or a partition of it, was unusable (damaged, of another
    /// journal, ahead of the journal) and was dropped and restored from the journal in full.
    pub store_dropped: u64,
    /// Journal records the local state store's follower read from the broker: the partitions it
    /// keeps as standbys, the journal's tail after a restore, and (at least once) every record.
    pub store_read_records: u64,
    /// Rows the flow handed its local state store as their transactions committed (exactly once):
    /// the store does not read them back from the broker.
    pub store_handed_rows: u64,
    /// Partitions being restored right now.
    pub restoring_partitions: u64,
    /// Latency of the last commit.
    pub last_commit: Duration,
    /// Highest commit latency seen.
    pub max_commit: Duration,
    /// Records behind the end of the assigned input partitions (as of the last fetch).
    pub lag: u64,
    /// Input partitions assigned to this instance.
    pub assigned_partitions: u64,
    /// Inputs delivered again whose events the journal already held (skipped, not applied twice).
    pub skipped_redeliveries: u64,
    /// Inputs of a stage in an application that arrived in another partition than their key's
    /// and were forwarded to it through the stage's repartition topic.
    pub forwarded: u64,
    /// Durable timers fired (a stage of an application).
    pub timers_fired: u64,
    /// Durable timers pending in the partitions this instance owns, as of the last commit.
    pub timers_pending: u64,
    /// Enrichment calls running now.
    pub enrich_in_flight: u64,
    /// Most enrichment calls ever running at once.
    pub max_enrich_in_flight: u64,
    /// Rebalances this instance took part in (assignments and revocations).
    pub rebalances: u64,
    /// With a state cache ([`FlowBuilder::state_cache`](crate::flow::FlowBuilder::state_cache)):
    /// bytes of committed state in the cache, as weighed against the budget.
    pub cache_bytes: u64,
    /// Committed keys in memory: in the cache, or every key without one.
    pub cache_entries: u64,
    /// With a state cache: committed keys the local store does not have yet (held in memory
    /// beside the cache, never evicted).
    pub cache_unstored: u64,
    /// Keys found in memory when used (with a local store).
    pub cache_hits: u64,
    /// Keys read from the local store when used (not in memory).
    pub cache_misses: u64,
    /// Keys the state cache evicted.
    pub cache_evictions: u64,
    /// With a state cache: journal records acknowledged that the local store does not have yet
    /// (its follower's lag behind the flow).
    pub store_lag: u64,
}

impl Metrics {
    pub(crate) fn snapshot(&self) -> FlowMetrics {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FlowMetrics {
            records_in: l(&self.records_in),
            records_out: l(&self.records_out),
            dead_letters: l(&self.dead_letters),
            transactions: l(&self.transactions),
            aborts: l(&self.aborts),
            restored_records: l(&self.restored_records),
            store_rows: l(&self.store_rows),
            store_dropped: l(&self.store_dropped),
            store_read_records: l(&self.store_read_records),
            store_handed_rows: l(&self.store_handed_rows),
            restoring_partitions: l(&self.restoring_partitions),
            last_commit: Duration::from_micros(l(&self.last_commit_us)),
            max_commit: Duration::from_micros(l(&self.max_commit_us)),
            lag: l(&self.lag),
            assigned_partitions: l(&self.assigned_partitions),
            skipped_redeliveries: l(&self.skipped_redeliveries),
            forwarded: l(&self.forwarded),
            timers_fired: l(&self.timers_fired),
            timers_pending: l(&self.timers_pending),
            enrich_in_flight: l(&self.enrich_in_flight),
            max_enrich_in_flight: l(&self.max_enrich_in_flight),
            rebalances: l(&self.rebalances),
            cache_bytes: l(&self.cache_bytes),
            cache_entries: l(&self.cache_entries),
            cache_unstored: l(&self.cache_unstored),
            cache_hits: l(&self.cache_hits),
            cache_misses: l(&self.cache_misses),
            cache_evictions: l(&self.cache_evictions),
            store_lag: l(&self.store_lag),
        }
    }
}

pub(crate) const RUN: u8 = 0;
pub(crate) const DRAIN: u8 = 1;
pub(crate) const ABORT: u8 = 2;

/// Asks a running flow to stop; cheap to clone (e.g. into a signal handler).
#[derive(Debug, Clone)]
pub struct FlowStopper(pub(crate) Arc<AtomicU8>);

impl FlowStopper {
    /// Stop polling, finish in-flight work, commit, leave the group.
    pub fn drain(&self) {
        let _ = self.0.compare_exchange(RUN, DRAIN, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Stop now: abort the open transaction (nothing since the last commit becomes visible).
    pub fn abort(&self) {
        self.0.store(ABORT, Ordering::SeqCst);
    }
}

/// Reads a running flow's counters and readiness from anywhere; see [`FlowControl::status`].
#[derive(Debug, Clone)]
pub struct FlowStatus(pub(crate) Arc<Metrics>);

impl FlowStatus {
    /// The flow's counters now.
    pub fn metrics(&self) -> FlowMetrics {
        self.0.snapshot()
    }

    /// Ready to serve: the instance joined its group (took part in a rebalance) and no assigned
    /// partition is being restored, so it polls and processes. What a readiness probe asks.
    pub fn ready(&self) -> bool {
        let m = self.metrics();
        m.rebalances > 0 && m.restoring_partitions == 0
    }
}

/// Controls a running flow.
#[derive(Debug)]
pub struct FlowControl {
    pub(crate) stop: FlowStopper,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) done: oneshot::Receiver<Result<(), FlowError>>,
}

impl FlowControl {
    /// A handle that can stop the flow from elsewhere.
    pub fn stopper(&self) -> FlowStopper {
        self.stop.clone()
    }

    /// The flow's counters now.
    pub fn metrics(&self) -> FlowMetrics {
        self.metrics.snapshot()
    }

    /// A cheap, cloneable reader of the flow's counters and readiness, e.g. for a health endpoint.
    pub fn status(&self) -> FlowStatus {
        FlowStatus(self.metrics.clone())
    }

    /// Waits until the flow stops; the error is what stopped it.
    ///
    /// # Errors
    /// The [`FlowError`] that stopped the flow.
    pub async fn wait(self) -> Result<(), FlowError> {
        self.done.await.unwrap_or_else(|_| Err(FlowError::Crashed("the flow thread ended without a result".into())))
    }

    /// Waits until the flow stops; returns its result and its final counters.
    pub async fn wait_with_metrics(self) -> (Result<(), FlowError>, FlowMetrics) {
        let metrics = self.metrics.clone();
        let result = self.wait().await;
        (result, metrics.snapshot())
    }

    /// Stops polling, finishes in-flight work, commits the last transaction, leaves the group.
    ///
    /// # Errors
    /// The error that stopped the flow, if it failed before or while draining.
    pub async fn drain_and_shutdown(self) -> Result<(), FlowError> {
        self.stop.drain();
        self.wait().await
    }

    /// Stops at once, aborting the open transaction.
    ///
    /// # Errors
    /// The error that stopped the flow before the abort, if any.
    pub async fn abort(self) -> Result<(), FlowError> {
        self.stop.abort();
        match self.wait().await {
            Err(FlowError::Aborted) => Ok(()),
            other => other,
        }
    }
}
