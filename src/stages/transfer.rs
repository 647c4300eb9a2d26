//! Money transfers between bank accounts, as a saga: a transfer entity (keyed by transfer id)
//! withdraws from the source account, then deposits to the target; a refused deposit refunds the
//! source. The bank stage answers each step ([`TransferCommand::Step`]); the transfer decides the
//! next one. See `stages::transfer_flow` (feature `kafka`) for the two stages as one application.

use crate::stage::{Effect, EventSourced};
use serde::{Deserialize, Serialize};

/// The transfer stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transfers;

/// A step of a transfer, done by the bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Take the amount out of the source account.
    Withdraw,
    /// Put it into the target account.
    Deposit,
    /// Put it back into the source account (the deposit was refused).
    Refund,
}

impl Step {
    /// The step's name, as the bank's routed commands carry it in a header.
    pub fn name(self) -> &'static str {
        match self {
            Step::Withdraw => "withdraw",
            Step::Deposit => "deposit",
            Step::Refund => "refund",
        }
    }

    /// The step of a header's value.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        match name {
            b"withdraw" => Some(Step::Withdraw),
            b"deposit" => Some(Step::Deposit),
            b"refund" => Some(Step::Refund),
            _ => None,
        }
    }
}

/// Commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferCommand {
    /// Start a transfer of `amount` from account `from` to account `to`.
    Start {
        /// Source account.
        from: String,
        /// Target account.
        to: String,
        /// Amount.
        amount: u64,
    },
    /// The bank's answer to a step: done, or refused with the bank's reason.
    Step {
        /// Which step.
        step: Step,
        /// Refused with this reason (`None`: done).
        refused: Option<String>,
    },
}

/// Events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferEvent {
    /// The transfer was asked for: the withdrawal is on its way.
    Requested {
        /// Source account.
        from: String,
        /// Target account.
        to: String,
        /// Amount.
        amount: u64,
    },
    /// The amount left the source account: the deposit is on its way.
    Withdrawn,
    /// The source account refused the withdrawal: the transfer is rejected.
    WithdrawalRefused {
        /// The bank's reason.
        reason: String,
    },
    /// The amount reached the target account: the transfer is complete.
    Deposited,
    /// The target account refused the deposit: the refund is on its way.
    DepositRefused {
        /// The bank's reason.
        reason: String,
    },
    /// The amount is back in the source account: the transfer is refunded.
    Refunded,
    /// The source account refused the refund (it was closed meanwhile): the transfer holds the
    /// amount.
    RefundRefused {
        /// The bank's reason.
        reason: String,
    },
}

/// Where a transfer is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Not asked for.
    #[default]
    New,
    /// Waiting for the withdrawal.
    Withdrawing,
    /// Waiting for the deposit.
    Depositing,
    /// Waiting for the refund.
    Refunding,
    /// Done: the amount moved.
    Completed,
    /// Done: the deposit was refused and the amount is back.
    Refunded,
    /// Done: the withdrawal was refused, nothing moved.
    Rejected,
    /// Done: the refund was refused; the transfer holds the amount.
    Held,
}

impl Status {
    /// The status as the replies name it (`completed`, `refunded`, `rejected`, `held`), for a
    /// transfer that ended; `None` while it runs.
    pub fn ended(self) -> Option<&'static str> {
        match self {
            Status::Completed => Some("completed"),
            Status::Refunded => Some("refunded"),
            Status::Rejected => Some("rejected"),
            Status::Held => Some("held"),
            Status::New | Status::Withdrawing | Status::Depositing | Status::Refunding => None,
        }
    }
}

/// Per-transfer state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Where it is.
    pub status: Status,
    /// Source account.
    pub from: String,
    /// Target account.
    pub to: String,
    /// Amount.
    pub amount: u64,
    /// Why it was rejected or refunded.
    pub reason: Option<String>,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferRejection {
    /// A start for an id that exists.
    #[error("transfer exists already")]
    Exists,
    /// A start that cannot run.
    #[error("{0}")]
    Invalid(&'static str),
    /// An answer to a step the transfer does not wait for.
    #[error("the transfer is {status:?}, not waiting for the {step:?} step")]
    Unexpected {
        /// Where the transfer is.
        status: Status,
        /// The step answered.
        step: Step,
    },
}

impl EventSourced for Transfers {
    const NAME: &'static str = "transfer";
    type Key = String;
    type Command = TransferCommand;
    type Event = TransferEvent;
    type State = Transfer;
    type Reply = Status;
    type Rejection = TransferRejection;

    fn handle(&self, t: &Transfer, command: TransferCommand) -> Result<Effect<Self>, TransferRejection> {
        use TransferEvent as E;
        let event = match command {
            TransferCommand::Start { .. } if t.status != Status::New => return Err(TransferRejection::Exists),
            TransferCommand::Start { amount: 0, .. } => return Err(TransferRejection::Invalid("the amount is 0")),
            TransferCommand::Start { from, to, .. } if from == to => {
                return Err(TransferRejection::Invalid("the source and target accounts are the same"))
            }
            TransferCommand::Start { from, to, amount } => E::Requested { from, to, amount },
            TransferCommand::Step { step, refused } => match (t.status, step, refused) {
                (Status::Withdrawing, Step::Withdraw, None) => E::Withdrawn,
                (Status::Withdrawing, Step::Withdraw, Some(reason)) => E::WithdrawalRefused { reason },
                (Status::Depositing, Step::Deposit, None) => E::Deposited,
                (Status::Depositing, Step::Deposit, Some(reason)) => E::DepositRefused { reason },
                (Status::Refunding, Step::Refund, None) => E::Refunded,
                (Status::Refunding, Step::Refund, Some(reason)) => E::RefundRefused { reason },
                (status, step, _) => return Err(TransferRejection::Unexpected { status, step }),
            },
        };
        Ok(Effect::persist([event]).then_reply(|t: &Transfer| t.status))
    }

    fn apply(t: &mut Transfer, event: &TransferEvent) {
        use TransferEvent as E;
        match event {
            E::Requested { from, to, amount } => {
                *t = Transfer {
                    status: Status::Withdrawing,
                    from: from.clone(),
                    to: to.clone(),
                    amount: *amount,
                    reason: None,
                }
            }
            E::Withdrawn => t.status = Status::Depositing,
            E::WithdrawalRefused { reason } => {
                t.status = Status::Rejected;
                t.reason = Some(reason.clone());
            }
            E::Deposited => t.status = Status::Completed,
            E::DepositRefused { reason } => {
                t.status = Status::Refunding;
                t.reason = Some(reason.clone());
            }
            E::Refunded => t.status = Status::Refunded,
            E::RefundRefused { reason } => {
                t.status = Status::Held;
                t.reason =
                    Some(format!("{}; the refund was refused: {reason}", t.reason.as_deref().unwrap_or_default()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::StageTest;
    use TransferEvent as E;

    fn start(amount: u64) -> TransferCommand {
        TransferCommand::Start { from: "a".into(), to: "b".into(), amount }
    }

    fn step(step: Step, refused: Option<&str>) -> TransferCommand {
        TransferCommand::Step { step, refused: refused.map(str::to_string) }
    }

    fn requested() -> TransferEvent {
        E::Requested { from: "a".into(), to: "b".into(), amount: 5 }
    }

    #[test]
    fn a_transfer_withdraws_then_deposits() {
        StageTest::new(Transfers).when(start(5)).then_events([requested()]).then_reply(Status::Withdrawing);
        let t = StageTest::new(Transfers).given([requested()]);
        t.when(step(Step::Withdraw, None)).then_events([E::Withdrawn]).then_reply(Status::Depositing);
        let t = t.given([E::Withdrawn]);
        t.when(step(Step::Deposit, None)).then_reply(Status::Completed);
        let t = t.given([E::Deposited]);
        t.when(step(Step::Deposit, None))
            .then_rejected(TransferRejection::Unexpected { status: Status::Completed, step: Step::Deposit });
        t.when(start(5)).then_rejected(TransferRejection::Exists);
    }

    #[test]
    fn a_refused_deposit_refunds_and_a_refused_withdrawal_rejects() {
        let t = StageTest::new(Transfers).given([requested(), E::Withdrawn]);
        t.when(step(Step::Deposit, Some("account is not open"))).then_reply(Status::Refunding);
        let t = t.given([E::DepositRefused { reason: "account is not open".into() }]);
        t.when(step(Step::Refund, None)).then_reply(Status::Refunded);
        t.when(step(Step::Refund, Some("account is not open"))).then_reply(Status::Held);
        let t = StageTest::new(Transfers).given([requested()]);
        t.when(step(Step::Withdraw, Some("insufficient funds"))).then_reply(Status::Rejected).then_state(Transfer {
            status: Status::Rejected,
            from: "a".into(),
            to: "b".into(),
            amount: 5,
            reason: Some("insufficient funds".into()),
        });
        StageTest::new(Transfers).when(start(0)).then_rejected(TransferRejection::Invalid("the amount is 0"));
    }
}
