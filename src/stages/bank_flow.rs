//! The bank stage as a Kafka flow, with a wire contract any Kafka client can drive:
//!
//! - input (`bank-commands`): key = account id (UTF-8), value = JSON
//!   `{"id": "<command id>", "op": "open" | "deposit" | "withdraw" | "close", "amount": <u64>}`
//!   (`amount` for deposit and withdraw only);
//! - replies (`bank-replies`): key = account id, value = JSON
//!   `{"id": "<command id>", "ok": <bool>, "balance": <u64 or null>, "error": <string or null>}`,
//!   exactly one per command;
//! - events (`bank-events`): key = account id, value = the event as JSON.
//!
//! [`bank_flow_with_limits`] adds a stream-table join: a compacted `limits` topic (key = account
//! id, value = the largest withdrawal allowed, a JSON number) materialized as a
//! [`Table`](crate::table::Table), consulted for every command as it is processed.

use super::bank::{Account, Bank, BankCommand, BankEvent, BankRejection};
use crate::flow::{FlowBuilder, InputRecord, OutputRecord, Processed};
use crate::stage::EventSourced;
use serde::{Deserialize, Serialize};

/// A command on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireCommand {
    /// Command id, echoed in the reply.
    pub id: String,
    /// `open`, `deposit`, `withdraw` or `close`.
    pub op: String,
    /// Amount of a deposit or withdrawal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<u64>,
}

/// A reply on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireReply {
    /// The command id.
    pub id: String,
    /// Accepted.
    pub ok: bool,
    /// Balance after the command (the current one on rejection; null when the account is not open).
    pub balance: Option<u64>,
    /// The rejection, when not ok.
    pub error: Option<String>,
}

/// Topic names of the bank flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BankTopics {
    /// Commands in.
    pub input: String,
    /// Replies out.
    pub replies: String,
    /// Events out.
    pub events: String,
}

impl Default for BankTopics {
    fn default() -> Self {
        Self { input: "bank-commands".into(), replies: "bank-replies".into(), events: "bank-events".into() }
    }
}

/// A wire command as read, borrowing from the record (no allocation per field).
#[derive(Deserialize)]
struct WireCommandRef<'a> {
    /// Required, like every wire command's id; read by the output mapping.
    #[serde(borrow, rename = "id")]
    _id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    op: std::borrow::Cow<'a, str>,
    #[serde(default)]
    amount: Option<u64>,
}

/// The command id of a wire command, borrowed when it has no escapes.
#[derive(Deserialize)]
struct WireId<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

/// A reply as written (the same JSON as [`WireReply`], without owning the id).
#[derive(Serialize)]
struct WireReplyRef<'a> {
    id: &'a str,
    ok: bool,
    balance: Option<u64>,
    error: Option<String>,
}

/// Why a record is not a bank command (the dead-letter header and the log say it with its cause).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// No key.
    #[error("the record has no key (the account id)")]
    NoKey,
    /// A key that is not UTF-8.
    #[error("the key (account id) is not UTF-8")]
    KeyNotUtf8,
    /// No value.
    #[error("the record has no value")]
    NoValue,
    /// A value that is not the wire command's JSON.
    #[error("the value is not a bank command")]
    NotACommand(#[source] serde_json::Error),
    /// An op that needs an amount came without one.
    #[error("`{0}` needs an amount")]
    NoAmount(String),
    /// An op the bank does not know.
    #[error("unknown op `{0}` (open, deposit, withdraw, close)")]
    UnknownOp(String),
}

/// Decodes a wire command.
///
/// # Errors
/// What is wrong with the record.
pub fn decode(input: &InputRecord) -> Result<(String, BankCommand), DecodeError> {
    let key = input.key.as_deref().ok_or(DecodeError::NoKey)?;
    let key = std::str::from_utf8(key).map_err(|_| DecodeError::KeyNotUtf8)?;
    let value = input.value.as_deref().ok_or(DecodeError::NoValue)?;
    let wire: WireCommandRef<'_> = serde_json::from_slice(value).map_err(DecodeError::NotACommand)?;
    let amount = || wire.amount.ok_or_else(|| DecodeError::NoAmount(wire.op.to_string()));
    let command = match wire.op.as_ref() {
        "open" => BankCommand::Open,
        "deposit" => BankCommand::Deposit(amount()?),
        "withdraw" => BankCommand::Withdraw(amount()?),
        "close" => BankCommand::Close,
        other => return Err(DecodeError::UnknownOp(other.to_string())),
    };
    Ok((key.to_string(), command))
}

/// The id of a wire command. Commands written as the contract shows them start with their id
/// (`{"id":"...` with no escapes in it): that id is taken as it is, without parsing the rest again
/// (the decoder has parsed it already). Any other layout is parsed in full.
fn command_id(value: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    const PREFIX: &[u8] = br#"{"id":""#;
    if let Some(rest) = value.strip_prefix(PREFIX) {
        if let Some(end) = rest.iter().position(|&b| b == b'"' || b == b'\\') {
            if rest[end] == b'"' {
                return std::str::from_utf8(&rest[..end]).ok().map(std::borrow::Cow::Borrowed);
            }
        }
    }
    serde_json::from_slice::<WireId<'_>>(value).ok().map(|w| w.id)
}

/// The reply and event records of one processed command (of [`Bank`] or a bank with its types).
pub fn outputs<S>(topics: &BankTopics, p: &Processed<'_, S>) -> Vec<OutputRecord>
where
    S: EventSourced<Key = String, Event = BankEvent, State = Account, Reply = u64, Rejection = BankRejection>,
{
    let id = p.input.value.as_deref().and_then(command_id);
    let id = id.as_deref().unwrap_or_default();
    let reply = match p.outcome {
        Ok(balance) => WireReplyRef { id, ok: true, balance: Some(*balance), error: None },
        Err(rejection) => WireReplyRef {
            id,
            ok: false,
            balance: p.state.open.then_some(p.state.balance),
            error: Some(match rejection {
                BankRejection::NotOpen => "account is not open".to_string(),
                other => other.to_string(),
            }),
        },
    };
    let mut out = Vec::with_capacity(1 + p.events.len());
    out.push(OutputRecord::new(&topics.replies, p.key.as_bytes(), serde_json::to_vec(&reply).unwrap_or_default()));
    for e in p.events {
        out.push(OutputRecord::new(&topics.events, p.key.as_bytes(), serde_json::to_vec(e).unwrap_or_default()));
    }
    out
}

/// The bank flow: a [`FlowBuilder`] with the wire decoder and outputs; add settings and `run()`.
pub fn bank_flow(brokers: &str, group_id: &str, topics: BankTopics) -> FlowBuilder<Bank> {
    let input = topics.input.clone();
    FlowBuilder::new(Bank, brokers, group_id, [input.as_str()]).decoder(decode).outputs(move |p| outputs(&topics, p))
}

/// The bank flow with withdrawal limits: every command is enriched with the account's current
/// limit from `limits` (a table of the compacted limits topic: account id → JSON number) when the
/// flow processes it, and a withdrawal over the limit is rejected. The join sees the table as it
/// is at that moment; the events record what was decided, so replay never consults the table.
#[cfg(feature = "sled")]
pub fn bank_flow_with_limits(
    brokers: &str,
    group_id: &str,
    topics: BankTopics,
    limits: crate::table::Table<String, u64>,
) -> FlowBuilder<super::bank::LimitedBank> {
    use super::bank::{Limited, LimitedBank};
    let input = topics.input.clone();
    FlowBuilder::new(LimitedBank, brokers, group_id, [input.as_str()])
        .decoder(move |record| {
            let (account, command) = decode(record)?;
            let limit = limits.get(account.as_str()).map(|l| *l);
            Ok::<_, DecodeError>((account, Limited { command, limit }))
        })
        .outputs(move |p| outputs(&topics, p))
}

#[cfg(test)]
mod tests {
    use super::command_id;

    #[test]
    fn the_command_id_is_read_in_any_layout() {
        let cases: [(&[u8], Option<&str>); 6] = [
            (br#"{"id":"c-1","op":"deposit","amount":5}"#, Some("c-1")),
            (br#"{"op":"open","id":"c-2"}"#, Some("c-2")),
            (br#"{ "id" : "c-3", "op":"open"}"#, Some("c-3")),
            (br#"{"id":"c\"4","op":"open"}"#, Some("c\"4")),
            (br#"{"id":"c\u00e95","op":"open"}"#, Some("c\u{e9}5")),
            (b"not json", None),
        ];
        for (value, id) in cases {
            assert_eq!(command_id(value).as_deref(), id, "{}", String::from_utf8_lossy(value));
        }
    }
}
