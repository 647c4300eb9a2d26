//! Bank accounts keyed by account id: open, deposit, withdraw, close.
//!
//! Rules: open on an open account, anything but open on an account that is not open, a withdrawal
//! beyond the balance, a deposit that would overflow, and closing with a non-zero balance are
//! rejected. Replies carry the balance after the command.

use crate::stage::{Effect, EventSourced};
use serde::{Deserialize, Serialize};

/// The bank stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bank;

/// Commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BankCommand {
    /// Open the account.
    Open,
    /// Add money.
    Deposit(u64),
    /// Take money out.
    Withdraw(u64),
    /// Close the account (balance must be 0).
    Close,
}

/// Events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BankEvent {
    /// The account was opened.
    Opened,
    /// Money came in.
    Deposited {
        /// Amount.
        amount: u64,
    },
    /// Money went out.
    Withdrawn {
        /// Amount.
        amount: u64,
    },
    /// The account was closed.
    Closed,
}

/// Per-account state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Open for business.
    pub open: bool,
    /// Balance.
    pub balance: u64,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum BankRejection {
    /// Open on an open account.
    #[error("account is already open")]
    AlreadyOpen,
    /// Deposit, withdraw or close on an account that is not open.
    #[error("account is not open")]
    NotOpen,
    /// Withdrawal beyond the balance.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// Balance.
        balance: u64,
        /// Requested amount.
        requested: u64,
    },
    /// Close with money left.
    #[error("balance is {balance}, not 0")]
    NonZeroBalance {
        /// Balance.
        balance: u64,
    },
    /// A deposit that would overflow the balance.
    #[error("deposit would overflow the balance")]
    Overflow,
}

impl EventSourced for Bank {
    const NAME: &'static str = "bank";
    type Key = String;
    type Command = BankCommand;
    type Event = BankEvent;
    type State = Account;
    type Reply = u64;
    type Rejection = BankRejection;

    fn handle(&self, account: &Account, command: BankCommand) -> Result<Effect<Self>, BankRejection> {
        use BankCommand::*;
        match command {
            Open if account.open => Err(BankRejection::AlreadyOpen),
            Open => Ok(Effect::persist([BankEvent::Opened]).reply(account.balance)),
            _ if !account.open => Err(BankRejection::NotOpen),
            Deposit(amount) => {
                account.balance.checked_add(amount).ok_or(BankRejection::Overflow)?;
                Ok(Effect::persist([BankEvent::Deposited { amount }]).then_reply(|a: &Account| a.balance))
            }
            Withdraw(amount) if amount > account.balance => {
                Err(BankRejection::InsufficientFunds { balance: account.balance, requested: amount })
            }
            Withdraw(amount) => {
                Ok(Effect::persist([BankEvent::Withdrawn { amount }]).then_reply(|a: &Account| a.balance))
            }
            Close if account.balance != 0 => Err(BankRejection::NonZeroBalance { balance: account.balance }),
            Close => Ok(Effect::persist([BankEvent::Closed]).reply(0)),
        }
    }

    fn apply(account: &mut Account, event: &BankEvent) {
        match event {
            BankEvent::Opened => account.open = true,
            BankEvent::Deposited { amount } => account.balance += amount,
            BankEvent::Withdrawn { amount } => account.balance -= amount,
            BankEvent::Closed => account.open = false,
        }
    }

    fn is_deleted(account: &Account) -> bool {
        !account.open && account.balance == 0
    }
}

#[cfg(test)]
mod tests {
    use super::BankCommand::*;
    use super::BankEvent::*;
    use super::*;
    use crate::testkit::StageTest;

    #[test]
    fn open_deposit_withdraw_close() {
        StageTest::new(Bank).when(Open).then_events([Opened]).then_reply(0);
        let funded = StageTest::new(Bank).given([Opened, Deposited { amount: 70 }]);
        funded.when(Deposit(30)).then_events([Deposited { amount: 30 }]).then_reply(100);
        funded.when(Withdraw(70)).then_events([Withdrawn { amount: 70 }]).then_reply(0);
        StageTest::new(Bank)
            .given([Opened, Deposited { amount: 5 }, Withdrawn { amount: 5 }])
            .when(Close)
            .then_events([Closed])
            .then_reply(0)
            .then_state(Account { open: false, balance: 0 });
        StageTest::new(Bank).given([Opened, Closed]).when(Open).then_events([Opened]);
    }

    #[test]
    fn rejections() {
        StageTest::new(Bank).given([Opened]).when(Open).then_rejected(BankRejection::AlreadyOpen);
        for cmd in [Deposit(1), Withdraw(1), Close] {
            StageTest::new(Bank).when(cmd).then_rejected(BankRejection::NotOpen);
            StageTest::new(Bank).given([Opened, Closed]).when(cmd).then_rejected(BankRejection::NotOpen);
        }
        let funded = StageTest::new(Bank).given([Opened, Deposited { amount: 10 }]);
        funded.when(Withdraw(11)).then_rejected(BankRejection::InsufficientFunds { balance: 10, requested: 11 });
        funded.when(Close).then_rejected(BankRejection::NonZeroBalance { balance: 10 });
        funded.when(Deposit(u64::MAX)).then_rejected(BankRejection::Overflow);
    }
}
