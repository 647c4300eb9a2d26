//! Tables an application opens, queried like its stages: `GET /tables/{topic}/{key}` and
//! `GET /tables/{topic}?prefix=P&after=K&limit=N`. A table is read by each instance for itself,
//! so each answers from its own copy (a table that reads only some partitions answers for those).

use super::Answer;
use crate::table::Table;
use serde::Serialize;
use serde_json::{json, Value};

/// The query layer's side of a table with text keys, over value types.
pub(crate) trait TableQuery: Send + Sync {
    fn get(&self, key: &str) -> Result<Option<Value>, String>;
    /// Up to `limit` rows with keys starting with `prefix` after `after`, and the next page's
    /// `after` when more may follow.
    fn scan(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<(Vec<Value>, Option<String>), String>;
}

fn row<V: Serialize>(topic: &str, v: &crate::table::Value<String, V>) -> Value {
    json!({
        "topic": topic,
        "key": v.key(),
        "partition": v.partition(),
        "value": serde_json::to_value(&**v).unwrap_or_else(|e| json!({ "unserializable": e.to_string() })),
    })
}

impl<V: Serialize + Send + Sync + 'static> TableQuery for Table<String, V> {
    fn get(&self, key: &str) -> Result<Option<Value>, String> {
        Ok(self.try_get(key).map_err(|e| e.to_string())?.map(|v| row(self.topic(), &v)))
    }

    fn scan(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<(Vec<Value>, Option<String>), String> {
        let snapshot = self.snapshot();
        let mut rows = Vec::with_capacity(limit + 1);
        for v in snapshot.prefix(prefix) {
            let v = v.map_err(|e| e.to_string())?;
            if after.is_some_and(|a| v.key().as_str() <= a) {
                continue;
            }
            rows.push(row(self.topic(), &v));
            if rows.len() > limit {
                break;
            }
        }
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().and_then(|r| r["key"].as_str()).map(str::to_string)
        } else {
            None
        };
        Ok((rows, next))
    }
}

pub(super) fn get(table: &dyn TableQuery, topic: &str, key: &str, served_by: &str) -> Answer {
    match table.get(key) {
        Ok(Some(mut v)) => {
            v["served_by"] = json!(served_by);
            Answer::ok(v)
        }
        Ok(None) => Answer::error(404, format!("key `{key}` has no value in this instance's table of `{topic}`")),
        Err(e) => Answer::error(500, format!("the table of `{topic}` cannot be read: {e}")),
    }
}

pub(super) fn scan(
    table: &dyn TableQuery,
    topic: &str,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    served_by: &str,
) -> Answer {
    match table.scan(prefix, after, limit) {
        Ok((items, next)) => {
            Answer::ok(json!({ "topic": topic, "items": items, "next": next, "served_by": served_by }))
        }
        Err(e) => Answer::error(500, format!("the table of `{topic}` cannot be read: {e}")),
    }
}
