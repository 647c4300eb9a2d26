//! Rebalance listeners on the bank flow: a synchronous one logs each change inside the rebalance
//! (after the flow restored or committed the partitions), and an async one, an actor-like task
//! that never blocks the poll loop, records which partitions this instance owns. Start it twice
//! to watch the partitions move.
//!
//! ```sh
//! cargo run --example rebalance_listener -- 127.0.0.1:9092
//! ```

mod util;

use eventstage::flow::{RebalanceEvent, TopicPartition};
use eventstage::stages::bank_flow::{bank_flow, BankTopics};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    util::init_tracing();
    let brokers = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9092".into());
    let owned: Arc<Mutex<BTreeSet<TopicPartition>>> = Arc::default();
    let recorder = owned.clone();
    let flow = bank_flow(&brokers, "eventstage-listener-example", BankTopics::default())
        .journal_topic("bank-journal")
        .on_rebalance(|event, actions| {
            for tp in event.partitions() {
                let committed = actions.committed_offset(&tp.topic, tp.partition);
                tracing::info!(?event, partition = %tp, ?committed, "rebalance (synchronous listener)");
            }
        })
        .on_rebalance_async(move |event| {
            let owned = recorder.clone();
            async move {
                let mut owned = owned.lock().unwrap_or_else(|p| p.into_inner());
                match &event {
                    RebalanceEvent::Assigned(tps) => owned.extend(tps.iter().cloned()),
                    RebalanceEvent::Revoked(tps) | RebalanceEvent::Lost(tps) => {
                        for tp in tps {
                            owned.remove(tp);
                        }
                    }
                    _ => {}
                }
                let list: Vec<String> = owned.iter().map(ToString::to_string).collect();
                println!("owned now: [{}]", list.join(", "));
            }
        })
        .run()?;
    println!("bank flow with rebalance listeners running against {brokers}; Ctrl-C drains and stops");
    let stopper = flow.stopper();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stopper.drain();
    });
    Ok(flow.wait().await?)
}
