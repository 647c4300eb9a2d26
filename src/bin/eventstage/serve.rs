//! `demo --metrics-addr`: Prometheus metrics, health and readiness over HTTP.
//!
//! - `GET /metrics`: every metric of the `metrics` facade (the flow's, see
//!   `eventstage::flow::metric_names`), in the Prometheus text format.
//! - `GET /health`: 200 while the flow runs, 503 once it stopped or failed.
//! - `GET /ready`: 200 once the flow is in its group with every assigned partition restored and
//!   polling; 503 before that and while a rebalance restores partitions.

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
}

/// Installs the Prometheus recorder and binds `addr` (port 0 picks a free one).
pub(crate) async fn prepare(addr: SocketAddr) -> anyhow::Result<Prepared> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(eventstage::flow::metric_names::COMMIT_SECONDS.into()),
            &[0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
        )
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on --metrics-addr {addr}"))?;
    Ok(Prepared { handle, listener })
}

impl Prepared {
    /// Serves the endpoints; returns the bound address.
    pub(crate) fn serve(self, status: Status) -> anyhow::Result<SocketAddr> {
        let Prepared { handle, listener } = self;
        let bound = listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let (handle, status) = (handle.clone(), status.clone());
                        tokio::spawn(async move {
                            if let Err(e) = respond(stream, &handle, &status).await {
                                tracing::debug!(error = %e, "metrics endpoint request failed");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "metrics endpoint: accept failed"),
                }
            }
        });
        Ok(bound)
    }
}

/// Reads one request head (at most 8 KiB) and answers it; the connection closes after.
async fn respond(mut stream: TcpStream, handle: &PrometheusHandle, status: &Status) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (code, body, kind) = match (method, path) {
        ("GET", "/metrics") => (200, handle.render(), "text/plain; version=0.0.4"),
        ("GET", "/health") if status.running.load(Ordering::Acquire) => (200, "ok\n".into(), "text/plain"),
        ("GET", "/health") => (503, "the flow stopped\n".into(), "text/plain"),
        ("GET", "/ready") if status.running.load(Ordering::Acquire) && (status.ready)() => {
            (200, "ready\n".into(), "text/plain")
        }
        ("GET", "/ready") => (503, "not ready: joining the group or restoring partitions\n".into(), "text/plain"),
        ("GET", _) => (404, "not found: /metrics, /health, /ready\n".into(), "text/plain"),
        _ => (405, "only GET\n".into(), "text/plain"),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
