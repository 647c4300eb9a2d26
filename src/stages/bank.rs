//! Bank accounts keyed by account id: open, deposit, withdraw, close.
//!
//! Rules: open on an open account, anything but open on an account that is not open, a withdrawal
//! beyond the balance, a deposit that would overflow, and closing with a non-zero balance are
//! rejected. Replies carry the balance after the command.
//!
//! [`LimitedBank`] is the same bank whose commands arrive enriched with the account's withdrawal
//! limit (a stream-table join: the bank flow looks the limit up in a compacted `limits` topic
//! materialized as a table, `eventstage::table::Table`); it writes the same journal as [`Bank`].

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
    /// A withdrawal over the account's limit ([`LimitedBank`]).
    #[error("withdrawal of {requested} is over the account's limit of {limit}")]
    OverLimit {
        /// The limit.
        limit: u64,
        /// Requested amount.
        requested: u64,
    },
}

/// What the bank decided: events, and whether the reply is the balance before them (fixed) or
/// after them.
struct Decision {
    events: Vec<BankEvent>,
    reply: Option<u64>,
}

impl Decision {
    fn effect<S>(self) -> Effect<S>
    where
        S: EventSourced<Event = BankEvent, State = Account, Reply = u64>,
    {
        let persist = Effect::persist(self.events);
        match self.reply {
            Some(balance) => persist.reply(balance),
            None => persist.then_reply(|a: &Account| a.balance),
        }
    }
}

fn decide(account: &Account, command: BankCommand) -> Result<Decision, BankRejection> {
    use BankCommand::*;
    let after = |event| Ok(Decision { events: vec![event], reply: None });
    match command {
        Open if account.open => Err(BankRejection::AlreadyOpen),
        Open => Ok(Decision { events: vec![BankEvent::Opened], reply: Some(account.balance) }),
        _ if !account.open => Err(BankRejection::NotOpen),
        Deposit(amount) => {
            account.balance.checked_add(amount).ok_or(BankRejection::Overflow)?;
            after(BankEvent::Deposited { amount })
        }
        Withdraw(amount) if amount > account.balance => {
            Err(BankRejection::InsufficientFunds { balance: account.balance, requested: amount })
        }
        Withdraw(amount) => after(BankEvent::Withdrawn { amount }),
        Close if account.balance != 0 => Err(BankRejection::NonZeroBalance { balance: account.balance }),
        Close => Ok(Decision { events: vec![BankEvent::Closed], reply: Some(0) }),
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

impl EventSourced for Bank {
    const NAME: &'static str = "bank";
    type Key = String;
    type Command = BankCommand;
    type Event = BankEvent;
    type State = Account;
    type Reply = u64;
    type Rejection = BankRejection;

    fn handle(&self, account: &Account, command: BankCommand) -> Result<Effect<Self>, BankRejection> {
        decide(account, command).map(Decision::effect)
    }

    fn apply(account: &mut Account, event: &BankEvent) {
        apply(account, event);
    }

    fn is_deleted(account: &Account) -> bool {
        !account.open && account.balance == 0
    }
}

/// The bank with withdrawal limits: each command carries the account's current limit, looked up
/// by whoever sends it (the bank flow joins a limits table). Same events, state and journal as
/// [`Bank`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitedBank;

/// A bank command enriched with the account's withdrawal limit (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limited {
    /// The command.
    pub command: BankCommand,
    /// The largest withdrawal allowed, as the limits table said when the command was processed.
    pub limit: Option<u64>,
}

impl EventSourced for LimitedBank {
    const NAME: &'static str = "bank";
    type Key = String;
    type Command = Limited;
    type Event = BankEvent;
    type State = Account;
    type Reply = u64;
    type Rejection = BankRejection;

    fn handle(&self, account: &Account, limited: Limited) -> Result<Effect<Self>, BankRejection> {
        if let (BankCommand::Withdraw(requested), Some(limit)) = (limited.command, limited.limit) {
            if account.open && requested > limit {
                return Err(BankRejection::OverLimit { limit, requested });
            }
        }
        decide(account, limited.command).map(Decision::effect)
    }

    fn apply(account: &mut Account, event: &BankEvent) {
        apply(account, event);
    }

    fn is_deleted(account: &Account) -> bool {
        Bank::is_deleted(account)
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

    #[test]
    fn limits() {
        let limited = |command, limit| Limited { command, limit };
        let funded = StageTest::new(LimitedBank).given([Opened, Deposited { amount: 100 }]);
        funded
            .when(limited(Withdraw(60), Some(50)))
            .then_rejected(BankRejection::OverLimit { limit: 50, requested: 60 });
        funded.when(limited(Withdraw(50), Some(50))).then_events([Withdrawn { amount: 50 }]).then_reply(50);
        funded.when(limited(Withdraw(100), None)).then_events([Withdrawn { amount: 100 }]).then_reply(0);
        funded.when(limited(Deposit(500), Some(1))).then_events([Deposited { amount: 500 }]).then_reply(600);
        StageTest::new(LimitedBank).when(limited(Withdraw(5), Some(1))).then_rejected(BankRejection::NotOpen);
    }
}
