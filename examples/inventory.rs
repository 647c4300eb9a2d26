//! Inventory reservations from many concurrent "order" tasks: stock is never oversold, because each
//! reservation is validated against the state that includes every earlier reservation.
//!
//! ```sh
//! cargo run --example inventory
//! ```
//!
//! The stage is `src/stages/inventory.rs` (it also shows an event upcast from version 1).

mod util;

use eventstage::stages::inventory::{Inventory, InventoryCommand};
use eventstage::{RuntimeConfig, StageRuntime};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    util::init_tracing();
    let temp = tempfile::tempdir()?;
    let path = temp.path().join("inventory");
    let stage = StageRuntime::open_sled(Inventory, &path, RuntimeConfig::default()).await?;
    let inv = stage.handle();
    let sku = "sku-42".to_string();
    inv.ask(sku.clone(), InventoryCommand::Restock(100)).await?.map_err(anyhow::Error::msg)?;

    // 40 orders of 3 units race for 100 units: 33 win, 7 are rejected.
    let mut orders = Vec::new();
    for i in 0..40 {
        let (inv, sku) = (inv.clone(), sku.clone());
        orders.push(tokio::spawn(async move {
            inv.ask(sku, InventoryCommand::Reserve { order: format!("order-{i}"), qty: 3 }).await
        }));
    }
    let (mut won, mut lost) = (Vec::new(), 0);
    for (i, o) in orders.into_iter().enumerate() {
        match o.await?? {
            Ok(_) => won.push(format!("order-{i}")),
            Err(rejection) => {
                lost += 1;
                tracing::debug!(%rejection, "reservation rejected");
            }
        }
    }
    let first = won.first().cloned().unwrap_or_default();
    let levels = inv.ask(sku.clone(), InventoryCommand::Ship { order: first.clone() }).await?;
    println!("{} reservations accepted, {lost} rejected; after shipping {first}: {levels:?}", won.len());
    stage.shutdown().await?;

    let stage = StageRuntime::open_sled(Inventory, &path, RuntimeConfig::default()).await?;
    let stock = stage.handle().get(&sku).await?.expect("the SKU has history");
    println!(
        "after restart: {} on hand, {} reserved, {} available",
        stock.on_hand,
        stock.reserved(),
        stock.available()
    );
    stage.shutdown().await?;
    Ok(())
}
