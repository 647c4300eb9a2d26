//! The queries over HTTP: axum routes, and the client that forwards a query to the owner.

use super::{Answer, Queries};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

/// A forwarded query that takes longer than this is given up (503).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) fn router(queries: Queries) -> Router {
    Router::new()
        .route("/state/{stage}", get(scan))
        .route("/state/{stage}/{*key}", get(state))
        .route("/tables/{topic}", get(table_scan))
        .route("/tables/{topic}/{*key}", get(table_value))
        .with_state(queries)
}

/// Serves `queries`' routes, with `extra` merged in (e.g. metrics and health), on `listener` until
/// the process ends.
///
/// # Errors
/// When the server fails.
pub async fn serve(listener: tokio::net::TcpListener, queries: Queries, extra: Router) -> std::io::Result<()> {
    axum::serve(listener, queries.router().merge(extra)).await
}

async fn state(
    State(q): State<Queries>,
    Path((stage, key)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let flag = |name: &str| params.get(name).is_some_and(|v| v == "true" || v == "1");
    respond(q.state_at(&stage, &key, flag("local"), flag("stale")).await)
}

async fn scan(
    State(q): State<Queries>,
    Path(stage): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let (prefix, after, limit) = match page(&params) {
        Ok(p) => p,
        Err(a) => return respond(a),
    };
    respond(q.scan(&stage, prefix, after, limit))
}

async fn table_value(State(q): State<Queries>, Path((topic, key)): Path<(String, String)>) -> Response {
    respond(q.table_value(&topic, &key))
}

async fn table_scan(
    State(q): State<Queries>,
    Path(topic): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let (prefix, after, limit) = match page(&params) {
        Ok(p) => p,
        Err(a) => return respond(a),
    };
    respond(q.table_scan(&topic, prefix, after, limit))
}

/// A page's `prefix`, `after` and `limit` (default 100).
fn page(params: &HashMap<String, String>) -> Result<(&str, Option<&str>, usize), Answer> {
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(l)) => l,
        Some(Err(_)) => return Err(Answer::error(400, "limit is not a number")),
    };
    Ok((params.get("prefix").map_or("", String::as_str), params.get("after").map(String::as_str), limit))
}

fn respond(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(answer.body)).into_response();
    if let Some(after) = answer.retry_after {
        if let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    response
}

/// Asks other instances (HTTP/1.1, connections kept alive).
pub(super) struct Forwarder {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Forwarder {
    pub(super) fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        Self { client: Client::builder(TokioExecutor::new()).build(connector) }
    }

    /// `key` of `stage` as the instance at `address` holds it (its own partitions only).
    pub(super) async fn state(&self, address: &str, stage: &str, key: &str) -> Answer {
        self.get(address, format!("/state/{}/{}?local=true", encode(stage), encode(key))).await
    }

    /// `key` of `stage`, asked of the instance at `address` (which routes it to the owner).
    pub(super) async fn routed(&self, address: &str, stage: &str, key: &str, stale: bool) -> Answer {
        let query = if stale { "?stale=true" } else { "" };
        self.get(address, format!("/state/{}/{}{query}", encode(stage), encode(key))).await
    }

    async fn get(&self, address: &str, path: String) -> Answer {
        let uri = format!("http://{address}{path}");
        match tokio::time::timeout(FORWARD_TIMEOUT, get_json(&self.client, &uri)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                Answer::unavailable(format!("the owner at {address} cannot be reached ({e}); ask again shortly"))
            }
            Err(_) => Answer::unavailable(format!(
                "the owner at {address} did not answer within {FORWARD_TIMEOUT:?}; ask again shortly"
            )),
        }
    }
}

/// A GET whose answer is JSON.
pub(crate) async fn get_json(client: &Client<HttpConnector, Empty<Bytes>>, uri: &str) -> Result<Answer, String> {
    let uri: hyper::Uri = uri.parse().map_err(|e| format!("bad address {uri}: {e}"))?;
    let response = client.get(uri).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&body).trim().to_string() }));
    Ok(Answer { status, body, retry_after })
}

/// All but RFC 3986's unreserved characters, percent-encoded in a path segment.
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn encode(text: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(text, SEGMENT)
}
