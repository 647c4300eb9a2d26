//! `demo --http-addr`: the flow's HTTP server (axum): its state ([`eventstage::query`]), Prometheus
//! metrics, health and readiness.
//!
//! - `GET /state/{stage}/{key}`, `GET /state/{stage}?prefix=...`: see [`eventstage::query`].
//! - `GET /metrics`: every metric of the `metrics` facade (the flow's, see
//!   `eventstage::flow::metric_names`), in the Prometheus text format.
//! - `GET /health`: 200 while the flow runs, 503 once it stopped or failed.
//! - `GET /ready`: 200 once the flow is in its group with every assigned partition restored and
//!   polling; 503 before that and while a rebalance restores partitions.

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use eventstage::query::Queries;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

/// What the endpoints report.
#[derive(Clone)]
pub(crate) struct Status {
    pub(crate) running: Arc<AtomicBool>,
    pub(crate) ready: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// The recorder installed and the address bound, before the flow starts: a metric handle the flow
/// registers before a recorder is installed records nothing, ever (the `metrics` facade hands out
/// no-op handles then), and a bad address is refused before anything runs.
pub(crate) struct Prepared {
    handle: PrometheusHandle,
    listener: TcpListener,
    /// What the flows answer queries through.
    pub(crate) queries: Queries,
}

/// Installs the Prometheus recorder and binds `addr` (port 0 picks a free one); the queries are
/// advertised at `advertise`, else at the bound address (the host's name when bound to all
/// interfaces).
pub(crate) async fn prepare(addr: SocketAddr, advertise: Option<String>) -> anyhow::Result<Prepared> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(eventstage::flow::metric_names::COMMIT_SECONDS.into()),
            &[0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
        )
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on --http-addr {addr}"))?;
    let bound = listener.local_addr()?;
    let advertise = match advertise {
        Some(a) => a,
        None if bound.ip().is_unspecified() => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let host = host.trim();
            anyhow::ensure!(
                !host.is_empty(),
                "--http-addr {addr} listens on every interface and the host's name is unknown: say where the other instances reach this one with --advertise HOST:PORT"
            );
            format!("{host}:{}", bound.port())
        }
        None => bound.to_string(),
    };
    Ok(Prepared { handle, listener, queries: Queries::new(advertise) })
}

impl Prepared {
    /// Serves the endpoints; returns the bound address.
    pub(crate) fn serve(self, status: Status) -> anyhow::Result<SocketAddr> {
        let Prepared { handle, listener, queries } = self;
        let bound = listener.local_addr()?;
        let ops = Router::new()
            .route("/metrics", get(|State((h, _)): State<(PrometheusHandle, Status)>| async move { h.render() }))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .with_state((handle, status));
        tokio::spawn(async move {
            if let Err(e) = eventstage::query::serve(listener, queries, ops).await {
                tracing::error!(error = %e, "the HTTP server stopped");
            }
        });
        Ok(bound)
    }
}

async fn health(State((_, status)): State<(PrometheusHandle, Status)>) -> impl IntoResponse {
    if status.running.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the flow stopped\n")
    }
}

async fn ready(State((_, status)): State<(PrometheusHandle, Status)>) -> impl IntoResponse {
    if status.running.load(Ordering::Acquire) && (status.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: joining the group or restoring partitions\n")
    }
}
