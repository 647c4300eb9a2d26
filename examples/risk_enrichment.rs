//! Async enrichment before a persistent stage (the talk's "ask pattern", Akka's
//! `mapAsync(parallelism)`): every bank command first asks a risk service (here a local tokio
//! actor that answers after 10 ms) for the account's withdrawal limit, with 16 questions in
//! flight at most; the bank stage then handles the enriched command. Replies still come in
//! command order per account, whatever order the answers arrive in.
//!
//! ```sh
//! cargo run --example risk_enrichment -- 127.0.0.1:9092   # bank-commands -> bank-replies / bank-events
//! ```

mod util;

use eventstage::flow::{EnrichSettings, FlowBuilder};
use eventstage::stages::bank::{Limited, LimitedBank};
use eventstage::stages::bank_flow::{decode, outputs, BankTopics};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A question to the risk service: the account, and where to send its limit.
type Ask = (String, oneshot::Sender<Option<u64>>);

/// The risk service: an actor owning its model, answering one question at a time per call
/// (each answer takes 10 ms, like a remote call).
fn risk_service() -> mpsc::Sender<Ask> {
    let (tx, mut rx) = mpsc::channel::<Ask>(64);
    tokio::spawn(async move {
        while let Some((account, reply)) = rx.recv().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                // Toy model: accounts whose id ends in a digit are limited to 500 per withdrawal.
                let limit = account.chars().last().filter(char::is_ascii_digit).map(|_| 500);
                let _ = reply.send(limit);
            });
        }
    });
    tx
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    util::init_tracing();
    let brokers = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9092".into());
    let risk = risk_service();
    let topics = BankTopics::default();
    let input = topics.input.clone();
    let flow = FlowBuilder::new(LimitedBank, &brokers, "eventstage-risk-example", [input.as_str()])
        .decoder(|record| decode(record).map(|(account, command)| (account, Limited { command, limit: None })))
        .enrich(EnrichSettings::parallelism(16), move |account: String, command: Limited| {
            let risk = risk.clone();
            async move {
                let (tx, rx) = oneshot::channel();
                risk.send((account, tx)).await.map_err(|_| "the risk service stopped".to_string())?;
                let limit = rx.await.map_err(|_| "the risk service dropped the question".to_string())?;
                Ok::<_, String>(Limited { limit, ..command })
            }
        })
        .outputs(move |p| outputs(&topics, p))
        .journal_topic("bank-journal")
        .run()?;
    println!("bank flow with risk checks running against {brokers}; Ctrl-C drains and stops");
    let stopper = flow.stopper();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stopper.drain();
    });
    let (result, metrics) = flow.wait_with_metrics().await;
    println!("{} commands, at most {} risk checks at once", metrics.records_in, metrics.max_enrich_in_flight);
    Ok(result?)
}
