//! The bank stage as an exactly-once Kafka flow, stopped cleanly by Ctrl-C or SIGTERM.
//!
//! ```sh
//! cargo run --example bank_flow -- 127.0.0.1:9092        # topics bank-commands / bank-replies / bank-events
//! ```
//!
//! Send commands with any Kafka client, key = account id, value = `{"id":"c1","op":"open"}`,
//! `{"id":"c2","op":"deposit","amount":100}`; read replies with `isolation.level=read_committed`.
//! (`eventstage demo --brokers HOST:PORT` is the same flow with more flags.)

mod util;

use eventstage::stages::bank_flow::{bank_flow, BankTopics};
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    util::init_tracing();
    let brokers = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9092".into());
    let flow = bank_flow(&brokers, "eventstage-bank-example", BankTopics::default())
        .journal_topic("bank-journal")
        .transactional_id("eventstage-bank-example-0")
        .commit_interval(Duration::from_millis(100))
        .run()?;
    println!("bank flow running against {brokers}; Ctrl-C drains and stops");
    let stopper = flow.stopper();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        println!("draining: finishing in-flight records and committing");
        stopper.drain();
    });
    let (result, metrics) = flow.wait_with_metrics().await;
    println!("{metrics:?}");
    Ok(result?)
}
