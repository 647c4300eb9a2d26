//! Your own operator CLI: register your stages and get `journal stats|verify|dump|replay` for them.
//!
//! ```sh
//! cargo run --example custom_cli -- journal stats --journal DIR
//! ```

use eventstage::stages::{bank::Bank, inventory::Inventory};

fn main() -> std::process::ExitCode {
    eventstage::cli::Cli::new("custom_cli").stage::<Bank>().stage::<Inventory>().run()
}
