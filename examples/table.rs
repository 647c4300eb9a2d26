//! Materializes a compacted topic as a table, prints it once caught up, then prints every change
//! until Ctrl-C.
//!
//! ```sh
//! cargo run --example table -- 127.0.0.1:9092 bank-limits [STORE_DIR]
//! ```

mod util;

use eventstage::table::{Decoder, Table};
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    util::init_tracing();
    let mut args = std::env::args().skip(1);
    let (Some(brokers), Some(topic)) = (args.next(), args.next()) else {
        eprintln!("usage: table BROKERS TOPIC [STORE_DIR]");
        std::process::exit(2);
    };
    let mut builder = Table::builder(brokers, &topic).keys(Decoder::utf8()).values(Decoder::utf8());
    if let Some(dir) = args.next() {
        builder = builder.store(dir);
    }
    let table = builder.open().await?;
    table.caught_up().await?;
    // Subscribe, then take the snapshot: no change falls between the two (a change the snapshot
    // already has may be printed again).
    let mut changes = Box::pin(table.watch());
    for row in table.snapshot().iter() {
        let row = row?;
        println!("{} = {}", row.key(), *row);
    }
    let stats = table.stats();
    println!(
        "-- {} keys ({} records read, {} from the store); following {topic}, Ctrl-C to stop",
        stats.keys, stats.records_read, stats.loaded_from_store
    );
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(Ok(c)) => match c.new {
                    Some(v) => println!("{} = {v}", c.key),
                    None => println!("{} deleted", c.key),
                },
                Some(Err(lagged)) => println!("-- {lagged}"),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    table.close().await?;
    Ok(())
}
