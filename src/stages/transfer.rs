//! Money transfers between bank accounts, as a saga: a transfer entity (keyed by transfer id)
//! withdraws from the source account, then deposits to the target; a refused deposit refunds the
//! source. The bank stage answers each step ([`TransferCommand::Step`]); the transfer decides the
//! next one. See `stages::transfer_flow` (feature `kafka`) for the two stages as one application.
//!
//! **A withdrawal not answered in time.** Starting a transfer schedules a durable timer
//! ([`Transfers::withdraw_timeout`]); the withdrawal's answer cancels it. When it fires first (the
//! source account's partition is slow or moving), the transfer is rejected at once ("timed out").
//! The withdrawal is not lost, only late: when its answer comes and it took the money, the
//! transfer compensates by depositing it back to the source. Retrying the withdrawal instead
//! would take the money twice (the bank's withdrawals are not idempotent), and a deposit or
//! refund has no deadline: money already left the source, and the transfer waits for its fate to
//! reply with the truth.

use crate::stage::{Effect, EventSourced};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The transfer stage.
#[derive(Debug, Clone, Copy)]
pub struct Transfers {
    /// How long a transfer waits for its withdrawal before it is rejected as timed out (a late
    /// withdrawal is then deposited back). Default: 30 s.
    pub withdraw_timeout: Duration,
}

impl Default for Transfers {
    fn default() -> Self {
        Self { withdraw_timeout: Duration::from_secs(30) }
    }
}

/// The name of the withdrawal's timer.
pub const WITHDRAW_TIMER: &str = "withdraw-timeout";

/// A step of a transfer, done by the bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Take the amount out of the source account.
    Withdraw,
    /// Put it into the target account.
    Deposit,
    /// Put it back into the source account (the deposit was refused, or the withdrawal came
    /// after the transfer timed out).
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
    /// The withdrawal's timer fired.
    WithdrawTimedOut,
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
    /// The withdrawal was not answered in time: the transfer is rejected.
    TimedOut {
        /// How long it waited, in ms.
        waited_ms: u64,
    },
    /// The withdrawal came after the transfer timed out and took the money: it goes back.
    LateWithdrawal,
    /// A late withdrawal's answer came, and it had taken nothing.
    LateWithdrawalRefused,
    /// The late withdrawal's money is back in the source account.
    Compensated,
    /// The source account refused the late withdrawal's money back (it was closed meanwhile):
    /// the transfer holds the amount.
    CompensationRefused {
        /// The bank's reason.
        reason: String,
    },
}

impl TransferEvent {
    /// Whether the event ends the transfer (its one reply says how).
    pub fn ends(&self) -> bool {
        matches!(
            self,
            TransferEvent::WithdrawalRefused { .. }
                | TransferEvent::Deposited
                | TransferEvent::Refunded
                | TransferEvent::RefundRefused { .. }
                | TransferEvent::TimedOut { .. }
        )
    }
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
    /// Done (rejected): the withdrawal was not answered in time; its answer is still to come.
    TimedOut,
    /// Done (rejected): the late withdrawal took the money, which is being deposited back.
    Compensating,
    /// Done (rejected): nothing moved in the end.
    Compensated,
}

impl Status {
    /// The status as the replies name it (`completed`, `refunded`, `rejected`, `held`), for a
    /// transfer that ended; `None` while it runs.
    pub fn ended(self) -> Option<&'static str> {
        match self {
            Status::Completed => Some("completed"),
            Status::Refunded => Some("refunded"),
            Status::Rejected | Status::TimedOut | Status::Compensating | Status::Compensated => Some("rejected"),
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
    /// A withdrawal timer that fired after its answer came (it was cancelled then).
    #[error("the withdrawal was answered already")]
    Answered,
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
        let reply = |event: TransferEvent| Effect::persist([event]).then_reply(|t: &Transfer| t.status);
        let event = match command {
            TransferCommand::Start { .. } if t.status != Status::New => return Err(TransferRejection::Exists),
            TransferCommand::Start { amount: 0, .. } => return Err(TransferRejection::Invalid("the amount is 0")),
            TransferCommand::Start { from, to, .. } if from == to => {
                return Err(TransferRejection::Invalid("the source and target accounts are the same"))
            }
            TransferCommand::Start { from, to, amount } => {
                return Ok(reply(E::Requested { from, to, amount }).schedule(
                    WITHDRAW_TIMER,
                    self.withdraw_timeout,
                    TransferCommand::WithdrawTimedOut,
                ))
            }
            TransferCommand::WithdrawTimedOut if t.status == Status::Withdrawing => {
                E::TimedOut { waited_ms: self.withdraw_timeout.as_millis() as u64 }
            }
            TransferCommand::WithdrawTimedOut => return Err(TransferRejection::Answered),
            TransferCommand::Step { step, refused } => match (t.status, step, refused) {
                (Status::Withdrawing, Step::Withdraw, None) => return Ok(reply(E::Withdrawn).cancel(WITHDRAW_TIMER)),
                (Status::Withdrawing, Step::Withdraw, Some(reason)) => {
                    return Ok(reply(E::WithdrawalRefused { reason }).cancel(WITHDRAW_TIMER))
                }
                (Status::Depositing, Step::Deposit, None) => E::Deposited,
                (Status::Depositing, Step::Deposit, Some(reason)) => E::DepositRefused { reason },
                (Status::Refunding, Step::Refund, None) => E::Refunded,
                (Status::Refunding, Step::Refund, Some(reason)) => E::RefundRefused { reason },
                (Status::TimedOut, Step::Withdraw, None) => E::LateWithdrawal,
                (Status::TimedOut, Step::Withdraw, Some(_)) => E::LateWithdrawalRefused,
                (Status::Compensating, Step::Refund, None) => E::Compensated,
                (Status::Compensating, Step::Refund, Some(reason)) => E::CompensationRefused { reason },
                (status, step, _) => return Err(TransferRejection::Unexpected { status, step }),
            },
        };
        Ok(reply(event))
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
            E::TimedOut { waited_ms } => {
                t.status = Status::TimedOut;
                t.reason = Some(format!("the source account did not answer the withdrawal within {waited_ms} ms"));
            }
            E::LateWithdrawal => t.status = Status::Compensating,
            E::LateWithdrawalRefused | E::Compensated => t.status = Status::Compensated,
            E::CompensationRefused { reason } => {
                t.status = Status::Held;
                t.reason = Some(format!(
                    "{}; the late withdrawal's refund was refused: {reason}",
                    t.reason.as_deref().unwrap_or_default()
                ));
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

    fn stage() -> StageTest<Transfers> {
        StageTest::new(Transfers { withdraw_timeout: Duration::from_secs(2) })
    }

    #[test]
    fn a_transfer_withdraws_then_deposits() {
        stage()
            .when(start(5))
            .then_events([requested()])
            .then_reply(Status::Withdrawing)
            .then_timers(&[(WITHDRAW_TIMER, Some(Duration::from_secs(2)))]);
        let t = stage().given([requested()]);
        t.when(step(Step::Withdraw, None))
            .then_events([E::Withdrawn])
            .then_reply(Status::Depositing)
            .then_timers(&[(WITHDRAW_TIMER, None)]);
        let t = t.given([E::Withdrawn]);
        t.when(step(Step::Deposit, None)).then_reply(Status::Completed);
        let t = t.given([E::Deposited]);
        t.when(step(Step::Deposit, None))
            .then_rejected(TransferRejection::Unexpected { status: Status::Completed, step: Step::Deposit });
        t.when(start(5)).then_rejected(TransferRejection::Exists);
        t.when(TransferCommand::WithdrawTimedOut).then_rejected(TransferRejection::Answered);
    }

    #[test]
    fn a_refused_deposit_refunds_and_a_refused_withdrawal_rejects() {
        let t = stage().given([requested(), E::Withdrawn]);
        t.when(step(Step::Deposit, Some("account is not open"))).then_reply(Status::Refunding);
        let t = t.given([E::DepositRefused { reason: "account is not open".into() }]);
        t.when(step(Step::Refund, None)).then_reply(Status::Refunded);
        t.when(step(Step::Refund, Some("account is not open"))).then_reply(Status::Held);
        let t = stage().given([requested()]);
        t.when(step(Step::Withdraw, Some("insufficient funds")))
            .then_reply(Status::Rejected)
            .then_timers(&[(WITHDRAW_TIMER, None)])
            .then_state(Transfer {
                status: Status::Rejected,
                from: "a".into(),
                to: "b".into(),
                amount: 5,
                reason: Some("insufficient funds".into()),
            });
        stage().when(start(0)).then_rejected(TransferRejection::Invalid("the amount is 0"));
    }

    #[test]
    fn a_withdrawal_not_answered_in_time_rejects_and_a_late_one_is_given_back() {
        let t = stage().given([requested()]);
        t.when(TransferCommand::WithdrawTimedOut)
            .then_events([E::TimedOut { waited_ms: 2000 }])
            .then_reply(Status::TimedOut);
        assert_eq!(Status::TimedOut.ended(), Some("rejected"));
        let t = t.given([E::TimedOut { waited_ms: 2000 }]);
        // The late withdrawal took the money: it goes back, without a second reply.
        t.when(step(Step::Withdraw, None)).then_events([E::LateWithdrawal]).then_reply(Status::Compensating);
        t.when(step(Step::Withdraw, Some("insufficient funds"))).then_reply(Status::Compensated);
        let t = t.given([E::LateWithdrawal]);
        t.when(step(Step::Refund, None)).then_events([E::Compensated]).then_reply(Status::Compensated);
        t.when(step(Step::Refund, Some("account is not open"))).then_reply(Status::Held);
        for e in
            [E::LateWithdrawal, E::LateWithdrawalRefused, E::Compensated, E::CompensationRefused { reason: "x".into() }]
        {
            assert!(!e.ends(), "{e:?} comes after the transfer's reply");
        }
        assert!(E::TimedOut { waited_ms: 1 }.ends());
    }
}
