//! The transfer saga as an [`Application`] of two stages, the bank and the transfers, with a wire
//! contract any Kafka client can drive:
//!
//! - transfers in (`transfers`): value = JSON
//!   `{"id": "<transfer id>", "from": "<account>", "to": "<account>", "amount": <u64>}` (the key
//!   is free: the transfer's id is its entity key);
//! - replies (`<transfers>.replies`): key = transfer id, value = JSON
//!   `{"id": "<transfer id>", "status": "completed" | "refunded" | "rejected" | "held", "error":
//!   <string or null>}`, exactly one per transfer once it ends (`held`: the source account refused
//!   the refund, closed meanwhile, and the transfer holds the amount; `rejected` also when the
//!   withdrawal was not answered within the timeout: a late withdrawal is then given back, see
//!   [`transfer`](super::transfer));
//! - the bank's topics keep their contract (see [`bank_flow`](super::bank_flow)): a reply per
//!   bank command, an event per change of an account, the transfers' steps included (their
//!   withdrawals and deposits are events of the accounts; they have no bank reply).
//!
//! A transfer starts its transfer entity, which routes a withdrawal to the source account; the
//! bank routes its answer back, then the transfer routes the deposit to the target account, or
//! ends; a refused deposit routes a refund to the source. Every hop is exactly once, so money is
//! conserved whatever crashes: the sum of all balances is the bank commands' deposits minus their
//! withdrawals (plus nothing, once every transfer has ended, but what `held` transfers hold).

use super::bank::{Bank, BankCommand};
use super::bank_flow::{self, BankTopics};
use super::transfer::{Step, TransferCommand, TransferEvent, TransferRejection, Transfers};
use crate::flow::{Application, FlowBuilder, InputRecord, OutputRecord, Processed, Routed, To};
use crate::stage::EventSourced;
use serde::{Deserialize, Serialize};

/// Header of the commands the transfers route to the bank: which step of the transfer it is.
pub const STEP_HEADER: &str = "transfer-step";

/// A transfer on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTransfer {
    /// Transfer id (the entity key), echoed in the reply.
    pub id: String,
    /// Source account.
    pub from: String,
    /// Target account.
    pub to: String,
    /// Amount.
    pub amount: u64,
}

/// A transfer's reply on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTransferReply {
    /// The transfer id.
    pub id: String,
    /// `completed`, `refunded`, `rejected` or `held`.
    pub status: String,
    /// Why it was refunded, rejected or held.
    pub error: Option<String>,
}

/// The replies topic of transfers read from `transfers`.
pub fn replies_topic(transfers: &str) -> String {
    format!("{transfers}.replies")
}

/// Decodes a wire transfer.
///
/// # Errors
/// What is wrong with the record.
pub fn decode(input: &InputRecord) -> Result<(String, TransferCommand), String> {
    let value = input.value.as_deref().ok_or("the record has no value")?;
    let wire: WireTransfer = serde_json::from_slice(value).map_err(|e| format!("the value is not a transfer: {e}"))?;
    Ok((wire.id, TransferCommand::Start { from: wire.from, to: wire.to, amount: wire.amount }))
}

/// The transfer's reply, when this command ended it (or refused to start it).
fn reply(replies: &str, p: &Processed<'_, Transfers>) -> Vec<OutputRecord> {
    let (status, error) = match p.outcome {
        Ok(status) => match status.ended().filter(|_| p.events.iter().any(TransferEvent::ends)) {
            Some(ended) => (ended, p.state.reason.clone()),
            None => return Vec::new(),
        },
        Err(rejection @ (TransferRejection::Exists | TransferRejection::Invalid(_))) => {
            ("rejected", Some(rejection.to_string()))
        }
        // A withdrawal timer that lost the race with its answer: nothing to say.
        Err(TransferRejection::Answered) => return Vec::new(),
        Err(unexpected) => {
            tracing::warn!(transfer = %p.key, %unexpected, "an answer of the bank the transfer does not wait for; ignored");
            return Vec::new();
        }
    };
    let reply = WireTransferReply { id: p.key.clone(), status: status.into(), error };
    vec![OutputRecord::new(replies, p.key.as_bytes(), serde_json::to_vec(&reply).unwrap_or_default())]
}

/// The bank command of a transfer's next step, after this command's events.
fn next_step(bank: &To<Bank>, p: &Processed<'_, Transfers>) -> Vec<Routed> {
    let t = p.state;
    let step = match p.events.last() {
        Some(TransferEvent::Requested { .. }) => (Step::Withdraw, &t.from, BankCommand::Withdraw(t.amount)),
        Some(TransferEvent::Withdrawn) => (Step::Deposit, &t.to, BankCommand::Deposit(t.amount)),
        Some(TransferEvent::DepositRefused { .. } | TransferEvent::LateWithdrawal) => {
            (Step::Refund, &t.from, BankCommand::Deposit(t.amount))
        }
        _ => return Vec::new(),
    };
    let (step, account, command) = step;
    vec![bank.command(account, &command).header(STEP_HEADER, step.name())]
}

/// The bank's answer to a transfer's step, routed back to the transfer.
fn answer(transfers: &To<Transfers>, p: &Processed<'_, Bank>) -> Vec<Routed> {
    let Some(sender) = p.sender().filter(|s| s.stage == Transfers::NAME) else { return Vec::new() };
    let Some(step) = p.input.header(STEP_HEADER).and_then(Step::from_name) else {
        tracing::warn!(account = %p.key, "a command of the transfers without its step; not answered");
        return Vec::new();
    };
    let transfer = String::from_utf8_lossy(sender.key).into_owned();
    let refused = p.outcome.as_ref().err().map(ToString::to_string);
    vec![transfers.command(&transfer, &TransferCommand::Step { step, refused })]
}

/// The two stages of the transfer application, to be configured (journal, state directory,
/// commit interval...) before [`into_application`](Self::into_application).
#[derive(Debug)]
pub struct TransferApp {
    /// The application (group, brokers).
    pub app: Application,
    /// The bank stage: bank commands from its input, transfer steps routed from the transfers.
    pub bank: FlowBuilder<Bank>,
    /// The transfer stage.
    pub transfers: FlowBuilder<Transfers>,
}

impl TransferApp {
    /// The application with both stages.
    pub fn into_application(self) -> Application {
        self.app.stage(self.bank).stage(self.transfers)
    }
}

/// The bank (`bank` topics) and the transfers (read from `transfers`, each waiting at most
/// `withdraw_timeout` for its withdrawal) as one application of consumer group `group`.
pub fn transfer_app(
    brokers: &str,
    group: &str,
    bank: BankTopics,
    transfers: &str,
    withdraw_timeout: std::time::Duration,
) -> TransferApp {
    let app = Application::new(brokers, group);
    let (to_bank, to_transfers) = (app.to::<Bank>(), app.to::<Transfers>());
    let bank_flow = app
        .flow(Bank, [bank.input.as_str()])
        .decoder(bank_flow::decode)
        .outputs(move |p| match p.sender() {
            // A transfer's step: the account's events, no bank reply (it answers the transfer).
            Some(_) => bank_flow::outputs(&bank, p).split_off(1),
            None => bank_flow::outputs(&bank, p),
        })
        .route(move |p| answer(&to_transfers, p));
    let replies = replies_topic(transfers);
    let transfer_flow = app
        .flow(Transfers { withdraw_timeout }, [transfers])
        .decoder(decode)
        .outputs(move |p| reply(&replies, p))
        .route(move |p| next_step(&to_bank, p));
    TransferApp { app, bank: bank_flow, transfers: transfer_flow }
}
