//! Interactive queries: ask a running application for a key's committed state, whichever of its
//! instances owns the key.
//!
//! A flow made queryable ([`FlowBuilder::queryable`](crate::flow::FlowBuilder::queryable)) keeps a
//! committed view of the partitions it owns: each key's state as of the last committed
//! transaction, never a change of an open one, published by the flow thread at each commit and
//! read without a lock (queries never wait for the flow, and the flow never waits for them).
//!
//! [`Queries`] answers from those views, and asks the instance that owns a key when it is not
//! here: the consumer group's assignment says which instance owns which partition, and each
//! instance's consumer carries the address it answers on (`advertise`) in its client id (see
//! `group.rs` for why the group and not a topic). The query is **forwarded** there (one answer for
//! the client, no redirect to follow; the answer names the instance in `served_by`). While the
//! group rebalances, while a partition is restored, or when its owner cannot be reached (killed,
//! and not yet out of the group), the answer is 503 with `Retry-After`: never an old owner's or a
//! guessed value.
//!
//! Serve them with [`Queries::router`] (an axum `Router`, to merge into an application's own axum
//! server, or to serve alone with [`serve`]); a service with another HTTP stack calls
//! [`Queries::state`] and [`Queries::scan`] and writes the [`Answer`] out itself.
//!
//! | request | answer |
//! |---|---|
//! | `GET /state/{stage}/{key}[?stale=true]` | 200: `{stage, key, partition, seq, state, journal: {topic, partition, below_offset}, committed_at_ms, served_by}`; 404: no state; 400: not a key of the stage; 414: key over 8 KiB; 503 + `Retry-After`: rebalancing, restoring, owner unreachable; with `stale=true`, instead of a 503, the state this instance's local store keeps of the key's partition (a standby), with `stale: {store_next_offset, journal_end, behind_records}` |
//! | `GET /state/{stage}?prefix=P&after=K&limit=N` | 200: `{items: [..], next, partitions, restoring, served_by}`: this instance's partitions only, in key order, `next` is the `after` of the next page (limit 1..=1000, default 100) |
//! | `GET /tables/{topic}/{key}`, `GET /tables/{topic}?prefix=P&after=K&limit=N` | the same for a table registered with [`Queries::table`], from this instance's copy: `{topic, key, partition, value, served_by}` |

mod group;
mod http;
mod table;

pub use http::serve;

use crate::flow::view::{Lookup, StageView};
use group::{GroupReader, GroupView};
use http::Forwarder;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use table::TableQuery;

pub(crate) use group::client_id;

/// Keys longer than this are refused (414).
pub const MAX_KEY_BYTES: usize = 8 * 1024;
/// A page of a prefix scan holds at most this many keys.
pub const MAX_LIMIT: usize = 1000;
/// How long an answer of the group coordinator is used before it is asked again.
const GROUP_MAX_AGE: Duration = Duration::from_secs(1);
/// The `Retry-After` of a 503.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One query's answer: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// 200, 4xx, or 503 (try again after `retry_after`).
    pub status: u16,
    /// The answer (`{"error": ...}` unless 200).
    pub body: Value,
    /// Set with a 503.
    pub retry_after: Option<Duration>,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self { status: 200, body, retry_after: None }
    }

    fn error(status: u16, message: impl Into<String>) -> Self {
        Self { status, body: json!({ "error": message.into() }), retry_after: None }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self { retry_after: Some(RETRY_AFTER), ..Self::error(503, message) }
    }
}

/// A stage registered for queries, with the group its flow runs in.
struct Registered {
    view: Arc<dyn StageView>,
    brokers: String,
    group: String,
}

/// The group coordinator's view of a group, asked for at most once per [`GROUP_MAX_AGE`].
#[derive(Default)]
struct GroupCache {
    reader: Mutex<Option<Arc<GroupReader>>>,
    last: Mutex<Option<GroupView>>,
    /// A refresh runs in the background (queries meanwhile use the last description).
    refreshing: std::sync::atomic::AtomicBool,
}

/// A description older than this is not used without asking again first.
const GROUP_STALE: Duration = Duration::from_secs(10);

struct Inner {
    advertise: String,
    stages: RwLock<BTreeMap<&'static str, Registered>>,
    tables: RwLock<BTreeMap<String, Arc<dyn TableQuery>>>,
    groups: Mutex<BTreeMap<(String, String), Arc<GroupCache>>>,
    forwarder: Forwarder,
}

/// The queryable stages of this process and how to reach the other instances (see the module
/// documentation). Cheap to clone.
#[derive(Clone)]
pub struct Queries {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Queries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queries").field("advertise", &self.inner.advertise).finish_non_exhaustive()
    }
}

impl Queries {
    /// Queries answered at `advertise` (`host:port`): the address the other instances and clients
    /// reach this process's HTTP server on (its bound address, unless a proxy or container
    /// network puts another in front).
    pub fn new(advertise: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                advertise: advertise.into(),
                stages: RwLock::new(BTreeMap::new()),
                tables: RwLock::new(BTreeMap::new()),
                groups: Mutex::new(BTreeMap::new()),
                forwarder: Forwarder::new(),
            }),
        }
    }

    /// The address this process answers on.
    pub fn advertised(&self) -> &str {
        &self.inner.advertise
    }

    /// Answers queries of `table` (a table with text keys and values that serialize) at
    /// `/tables/{topic}/...`, from this instance's copy of it. A table of the same topic
    /// registered before is replaced.
    pub fn table<V: serde::Serialize + Send + Sync + 'static>(&self, table: &crate::table::Table<String, V>) {
        let mut tables = self.inner.tables.write().unwrap_or_else(|p| p.into_inner());
        tables.insert(table.topic().to_string(), Arc::new(table.clone()));
    }

    fn table_of(&self, topic: &str) -> Result<Arc<dyn TableQuery>, Answer> {
        let tables = self.inner.tables.read().unwrap_or_else(|p| p.into_inner());
        tables.get(topic).cloned().ok_or_else(|| {
            let known: Vec<&str> = tables.keys().map(String::as_str).collect();
            Answer::error(404, format!("no table of `{topic}` here; the queryable tables are: {}", list(&known)))
        })
    }

    /// `key`'s value in this instance's table of `topic`.
    pub fn table_value(&self, topic: &str, key: &str) -> Answer {
        if key.len() > MAX_KEY_BYTES {
            return Answer::error(
                414,
                format!("the key is {} bytes; keys of at most {MAX_KEY_BYTES} are asked for", key.len()),
            );
        }
        match self.table_of(topic) {
            Ok(t) => table::get(t.as_ref(), topic, key, &self.inner.advertise),
            Err(a) => a,
        }
    }

    /// Up to `limit` rows of this instance's table of `topic` whose keys start with `prefix`,
    /// after `after`, in key order.
    pub fn table_scan(&self, topic: &str, prefix: &str, after: Option<&str>, limit: usize) -> Answer {
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Answer::error(400, format!("limit is {limit}: ask for 1 to {MAX_LIMIT} keys a page"));
        }
        match self.table_of(topic) {
            Ok(t) => table::scan(t.as_ref(), topic, prefix, after, limit, &self.inner.advertise),
            Err(a) => a,
        }
    }

    /// Registers a flow's view (when it runs); refuses a stage a running flow registered already.
    pub(crate) fn register(&self, view: Arc<dyn StageView>, brokers: &str, group: &str) -> Result<(), String> {
        let mut stages = self.inner.stages.write().unwrap_or_else(|p| p.into_inner());
        let stage = view.stage();
        if let Some(old) = stages.get(stage) {
            if old.view.owned().1 {
                return Err(format!("stage `{stage}` is queryable already through a running flow of this process"));
            }
        }
        stages.insert(stage, Registered { view, brokers: brokers.to_string(), group: group.to_string() });
        Ok(())
    }

    fn stage(&self, stage: &str) -> Result<(Arc<dyn StageView>, String, String), Answer> {
        let stages = self.inner.stages.read().unwrap_or_else(|p| p.into_inner());
        match stages.get(stage) {
            Some(r) => Ok((r.view.clone(), r.brokers.clone(), r.group.clone())),
            None => {
                let known: Vec<&str> = stages.keys().copied().collect();
                Err(Answer::error(404, format!("no stage `{stage}` here; the queryable stages are: {}", list(&known))))
            }
        }
    }

    /// The committed state of `key` (its text, as in the URL) in `stage`, from this instance or
    /// from the instance that owns it.
    pub async fn state(&self, stage: &str, key: &str) -> Answer {
        self.state_at(stage, key, false, false).await
    }

    /// [`Self::state`], or when no owner can answer now (a rebalance, a restore, an owner
    /// unreachable), the state this instance's local store keeps of the key's partition as a
    /// standby: possibly stale, marked `stale` with how far behind the journal it is.
    pub async fn state_or_stale(&self, stage: &str, key: &str) -> Answer {
        self.state_at(stage, key, false, true).await
    }

    /// `local`: answer from this instance's view only (a query forwarded here); `stale`: a
    /// standby's copy may answer when no owner can.
    pub(crate) async fn state_at(&self, stage: &str, key_text: &str, local: bool, stale: bool) -> Answer {
        let answer = self.fresh(stage, key_text, local).await;
        if !stale || answer.status != 503 {
            return answer;
        }
        let Ok((view, ..)) = self.stage(stage) else { return answer };
        let Ok(key) = key_bytes(view.as_ref(), key_text) else { return answer };
        match view.stale(&key) {
            Some(Ok(mut v)) => {
                v["served_by"] = json!(self.inner.advertise);
                Answer::ok(v)
            }
            Some(Err(e)) => {
                tracing::warn!(stage, error = %e, "a stale query could not read the local store");
                answer
            }
            None => answer,
        }
    }

    async fn fresh(&self, stage: &str, key_text: &str, local: bool) -> Answer {
        let (view, brokers, group) = match self.stage(stage) {
            Ok(s) => s,
            Err(a) => return a,
        };
        if key_text.len() > MAX_KEY_BYTES {
            return Answer::error(
                414,
                format!("the key is {} bytes; keys of at most {MAX_KEY_BYTES} are asked for", key_text.len()),
            );
        }
        let key = match key_bytes(view.as_ref(), key_text) {
            Ok(k) => k,
            Err(e) => return Answer::error(400, e),
        };
        let partition = view.partition_of(&key);
        let mut answer = match view.get(&key) {
            Lookup::Found(v) => Answer::ok(v),
            Lookup::Restoring => {
                Answer::unavailable("the key's partition is being restored on this instance; ask again shortly")
            }
            Lookup::Stopped => Answer::unavailable(format!("the flow of stage `{stage}` is not running here")),
            Lookup::Failed(e) => Answer::error(500, format!("stage `{stage}` cannot read its state here: {e}")),
            Lookup::Missing if local || partition.is_some() => not_found(stage, key_text),
            Lookup::NotOwned if local => Answer::unavailable(format!(
                "partition {} of stage `{stage}` is not owned here (the group is rebalancing); ask again shortly",
                partition.unwrap_or(-1)
            )),
            Lookup::Missing | Lookup::NotOwned => {
                return self.routed(&view, &brokers, &group, key_text, partition).await;
            }
        };
        if answer.status == 200 {
            answer.body["served_by"] = json!(self.inner.advertise);
        }
        answer
    }

    /// Asks the other instances: the owner of `partition`, or (a plain flow, whose partitioning
    /// is its producers') every other instance of the stage.
    async fn routed(
        &self,
        view: &Arc<dyn StageView>,
        brokers: &str,
        group: &str,
        key: &str,
        partition: Option<i32>,
    ) -> Answer {
        let stage = view.stage();
        let mut last = None;
        for fresh in [false, true] {
            let g = match self.group(brokers, group, fresh).await {
                Ok(g) => g,
                Err(e) => return Answer::unavailable(e),
            };
            if !g.stable() {
                return Answer::unavailable(format!("group {group} is rebalancing ({}); ask again shortly", g.state));
            }
            let me = &self.inner.advertise;
            let targets: Vec<String> = match partition {
                Some(p) => match g.owner(stage, p) {
                    Some(m) if &m.address != me => vec![m.address.clone()],
                    // The group gives it to this instance, which has not taken it yet.
                    Some(_) => {
                        return Answer::unavailable(format!(
                            "partition {p} of stage `{stage}` is being taken over by this instance; ask again shortly"
                        ))
                    }
                    None => {
                        last = Some(Answer::unavailable(format!(
                            "no instance of group {group} owns partition {p} of stage `{stage}`; ask again shortly"
                        )));
                        continue;
                    }
                },
                None => g.addresses(stage).into_iter().filter(|a| a != me).map(str::to_string).collect(),
            };
            if targets.is_empty() {
                return not_found(stage, key);
            }
            let answers = futures::future::join_all(
                targets.iter().map(|address| self.inner.forwarder.state(address, stage, key)),
            )
            .await;
            if let Some(found) = answers.iter().find(|a| a.status == 200) {
                return found.clone();
            }
            match answers.into_iter().find(|a| a.status != 404) {
                // Every instance asked has no state for it.
                None => return not_found(stage, key),
                Some(a) => last = Some(a),
            }
        }
        last.unwrap_or_else(|| Answer::unavailable("no instance answered; ask again shortly"))
    }

    /// The group's description, at most [`GROUP_MAX_AGE`] old (`fresh`: asked for now).
    async fn group(&self, brokers: &str, group: &str, fresh: bool) -> Result<GroupView, String> {
        let cache = {
            let mut groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
            groups.entry((brokers.to_string(), group.to_string())).or_default().clone()
        };
        if !fresh {
            let last = cache.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match last {
                Some(g) if g.fetched.elapsed() < GROUP_MAX_AGE => return Ok(g),
                // Older: used while one refresh runs in the background (a query does not wait for
                // the coordinator; an owner that moved meanwhile says so, and is asked fresh).
                Some(g) if g.fetched.elapsed() < GROUP_STALE => {
                    if !cache.refreshing.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        let (q, brokers, group) = (self.clone(), brokers.to_string(), group.to_string());
                        let c = cache.clone();
                        tokio::spawn(async move {
                            if let Err(e) = q.describe(&c, &brokers, &group).await {
                                tracing::debug!(error = %e, "refreshing the group's description failed");
                            }
                            c.refreshing.store(false, std::sync::atomic::Ordering::Release);
                        });
                    }
                    return Ok(g);
                }
                _ => {}
            }
        }
        self.describe(&cache, brokers, group).await
    }

    /// Asks the group coordinator now, and keeps the answer.
    async fn describe(&self, cache: &Arc<GroupCache>, brokers: &str, group: &str) -> Result<GroupView, String> {
        let (brokers, group_name) = (brokers.to_string(), group.to_string());
        let c = cache.clone();
        let described = tokio::task::spawn_blocking(move || {
            let reader = {
                let mut reader = c.reader.lock().unwrap_or_else(|p| p.into_inner());
                match &*reader {
                    Some(r) => r.clone(),
                    None => reader.insert(Arc::new(GroupReader::new(&brokers, &group_name)?)).clone(),
                }
            };
            reader.describe(Duration::from_secs(5))
        })
        .await
        .map_err(|e| format!("the group lookup failed: {e}"))??;
        *cache.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(described.clone());
        Ok(described)
    }

    /// Up to `limit` keys of `stage` starting with `prefix`, after `after`, from this instance's
    /// partitions.
    pub fn scan(&self, stage: &str, prefix: &str, after: Option<&str>, limit: usize) -> Answer {
        let (view, ..) = match self.stage(stage) {
            Ok(s) => s,
            Err(a) => return a,
        };
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Answer::error(400, format!("limit is {limit}: ask for 1 to {MAX_LIMIT} keys a page"));
        }
        if prefix.len() > MAX_KEY_BYTES || after.is_some_and(|a| a.len() > MAX_KEY_BYTES) {
            return Answer::error(414, format!("prefix and after are keys: at most {MAX_KEY_BYTES} bytes"));
        }
        let (owned, running) = view.owned();
        if !running {
            return Answer::unavailable(format!("the flow of stage `{stage}` is not running here"));
        }
        let after = match after.map(|a| key_bytes(view.as_ref(), a)).transpose() {
            Ok(a) => a,
            Err(e) => return Answer::error(400, format!("after: {e}")),
        };
        let scan = view.scan(prefix.as_bytes(), after.as_deref(), limit);
        debug_assert!(owned.len() >= scan.partitions.len());
        if let Some(e) = scan.failed {
            return Answer::error(500, format!("stage `{stage}` cannot read its state here: {e}"));
        }
        Answer::ok(json!({
            "stage": stage,
            "items": scan.items,
            "next": scan.next,
            "partitions": scan.partitions,
            "restoring": scan.restoring,
            "served_by": self.inner.advertise,
        }))
    }

    /// The axum routes of the queries (see the module documentation), to serve alone
    /// ([`serve`]) or merged into an application's own router.
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }
}

/// Asks a running application of group `group` for `key`'s committed state in `stage` (`None`:
/// its only queryable stage) through one of its instances, found in the group's description:
/// what `eventstage query` does (`stale`: see [`Queries::state_or_stale`]). A 503 is asked again,
/// as its `Retry-After` says, until `patience` runs out; the last answer is returned.
///
/// # Errors
/// When the group has no queryable instance, or no stage is named and it has several.
pub async fn ask(
    brokers: &str,
    group: &str,
    stage: Option<&str>,
    key: &str,
    stale: bool,
    patience: Duration,
) -> Result<Answer, String> {
    let deadline = tokio::time::Instant::now() + patience;
    let reader = {
        let (brokers, group) = (brokers.to_string(), group.to_string());
        Arc::new(
            tokio::task::spawn_blocking(move || GroupReader::new(&brokers, &group))
                .await
                .map_err(|e| e.to_string())??,
        )
    };
    let forwarder = Forwarder::new();
    loop {
        let r = reader.clone();
        let g = tokio::task::spawn_blocking(move || r.describe(Duration::from_secs(10)))
            .await
            .map_err(|e| e.to_string())??;
        let stages = g.stages();
        let stage = match stage {
            Some(s) => s.to_string(),
            None if stages.len() == 1 => stages.iter().next().map(|s| s.to_string()).unwrap_or_default(),
            None if stages.is_empty() => String::new(),
            None => {
                let names: Vec<&str> = stages.iter().copied().collect();
                return Err(format!(
                    "group {group} has several queryable stages ({}): name one with --stage",
                    names.join(", ")
                ));
            }
        };
        let instances = g.addresses(&stage);
        let answer = if instances.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                return Err(if stages.is_empty() {
                    format!("group {group} has no queryable instance running (start its flows with an HTTP address: demo --http-addr)")
                } else {
                    let names: Vec<&str> = stages.iter().copied().collect();
                    format!(
                        "group {group} has no queryable instance of stage `{stage}`; its stages are: {}",
                        names.join(", ")
                    )
                });
            }
            Answer::unavailable("no instance yet")
        } else {
            // Any instance routes the query to the owner; the first that answers is enough.
            let mut last = Answer::unavailable("no instance answered");
            for address in instances {
                last = forwarder.routed(address, &stage, key, stale).await;
                if last.status != 503 {
                    break;
                }
            }
            last
        };
        let wait = answer.retry_after.unwrap_or(RETRY_AFTER);
        if answer.status != 503 || tokio::time::Instant::now() + wait > deadline {
            return Ok(answer);
        }
        tokio::time::sleep(wait).await;
    }
}

fn not_found(stage: &str, key: &str) -> Answer {
    Answer::error(404, format!("key `{key}` of stage `{stage}` has no state"))
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// The key a URL names: its text's bytes, or the bytes a `0x…` hex form spells (the form keys
/// that are not text are printed in).
fn key_bytes(view: &dyn StageView, text: &str) -> Result<Vec<u8>, String> {
    let raw = text.as_bytes().to_vec();
    match view.check_key(&raw) {
        Ok(()) => Ok(raw),
        Err(e) => match text.strip_prefix("0x").and_then(hex_bytes) {
            Some(bytes) if view.check_key(&bytes).is_ok() => Ok(bytes),
            _ => Err(e),
        },
    }
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}
