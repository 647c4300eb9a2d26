//! The bank stage on a sled journal: a few commands, a restart, the state rebuilt.
//!
//! ```sh
//! cargo run --example bank            # temporary journal
//! cargo run --example bank -- DIR     # keep it in DIR, then: cargo run -- journal dump --journal DIR
//! ```
//!
//! The stage itself (command handler, event handler, rejections) is `src/stages/bank.rs`.

mod util;

use eventstage::stages::bank::{Bank, BankCommand, BankRejection};
use eventstage::{RuntimeConfig, StageRuntime};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    util::init_tracing();
    let temp = tempfile::tempdir()?;
    let path = std::env::args().nth(1).map_or_else(|| temp.path().join("bank"), Into::into);

    let stage = StageRuntime::open_sled(Bank, &path, RuntimeConfig::default()).await?;
    let bank = stage.handle();
    let alice = "alice".to_string();
    println!("open     -> {:?}", bank.ask(alice.clone(), BankCommand::Open).await?);
    println!("deposit  -> {:?}", bank.ask(alice.clone(), BankCommand::Deposit(100)).await?);
    println!("withdraw -> {:?}", bank.ask(alice.clone(), BankCommand::Withdraw(30)).await?);
    match bank.ask(alice.clone(), BankCommand::Withdraw(500)).await? {
        Err(BankRejection::InsufficientFunds { balance, requested }) => {
            println!("withdraw 500 rejected: balance {balance}, requested {requested}")
        }
        other => println!("unexpected: {other:?}"),
    }
    println!("close    -> {:?}", bank.ask(alice.clone(), BankCommand::Close).await?);
    stage.shutdown().await?;

    // Restart: the state comes back from the journal.
    let stage = StageRuntime::open_sled(Bank, &path, RuntimeConfig::default()).await?;
    println!("after restart: {:?} (journal at {})", stage.handle().get(&alice).await?, path.display());
    stage.shutdown().await?;
    Ok(())
}
