//! The `eventstage` binary: the library's command line ([`eventstage::cli::Cli`]) with the example
//! stages compiled in, plus the embedded demo and the group tools.

mod demo;
mod flow_demo;
#[cfg(feature = "kafka")]
mod group;
#[cfg(feature = "query")]
mod query;
#[cfg(all(feature = "query", feature = "prometheus"))]
mod serve;

// glibc's malloc slows down badly on the allocation patterns of large tables and sled's recovery
// (reopening a table store of 500 000 rows: 6.5 s with it, 1.8 s with mimalloc).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use eventstage::cli::Cli;
use eventstage::stages::{bank::Bank, inventory::Inventory, transfer::Transfers};
use std::process::ExitCode;

/// The binary's own commands, beside the library's `journal`, `table` and `completions`.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the bank stage on a sled journal under a generated load from many tasks, restart it, and
    /// check that the replayed state equals the live state. Needs nothing external. With
    /// `--brokers`, run the bank stage as an exactly-once Kafka flow instead, until Ctrl-C/SIGTERM.
    Demo(Box<demo::DemoArgs>),
    /// A flow's group: committed input offsets and lag per partition, and its Kafka journal's
    /// owner and positions; with `--instances`, what running instances hold (partitions, state
    /// cache, local store).
    #[cfg(feature = "kafka")]
    Describe(group::DescribeArgs),
    /// Make a flow's next run start from scratch: delete its group's committed offsets and empty
    /// its Kafka journal (every instance stopped first). `--dry-run` prints what it would do.
    #[cfg(feature = "kafka")]
    Reset(group::ResetArgs),
    /// Ask a running application for a key's committed state: finds an instance in the group
    /// (`demo --http-addr`), which answers or asks the instance that owns the key. Prints the
    /// answer as JSON; exits 1 when the key has no state.
    #[cfg(feature = "query")]
    Query(query::QueryArgs),
}

fn main() -> ExitCode {
    Cli::new("eventstage")
        .about("Event-sourced, stateful stream processing: persistent stages over journals.")
        .version(env!("CARGO_PKG_VERSION"))
        .stage::<Bank>()
        .stage::<Inventory>()
        .stage::<Transfers>()
        .run_with(|command: Command| async move {
            match command {
                Command::Demo(d) => demo::run(*d).await,
                #[cfg(feature = "kafka")]
                Command::Describe(g) => group::describe(g).await,
                #[cfg(feature = "kafka")]
                Command::Reset(r) => group::reset(r).await,
                #[cfg(feature = "query")]
                Command::Query(q) => query::run(q).await,
            }
        })
}
