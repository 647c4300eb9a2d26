//! The `eventstage` binary: the embedded demo and the journal tools, with the example stages
//! compiled in.

mod demo;
mod flow_demo;
#[cfg(feature = "kafka")]
mod group;
#[cfg(all(feature = "kafka", feature = "prometheus"))]
mod serve;

// glibc's malloc slows down badly on the allocation patterns of large tables and sled's recovery
// (reopening a table store of 500 000 rows: 6.5 s with it, 1.8 s with mimalloc).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use eventstage::cli::{block_on_cli, init_logging, run_journal, JournalArgs, LogArgs, Registry};
#[cfg(all(feature = "kafka", feature = "sled"))]
use eventstage::cli::{run_table, TableArgs};
use eventstage::stages::{bank::Bank, inventory::Inventory};
use std::process::ExitCode;

/// Event-sourced, stateful stream processing: persistent stages over journals.
#[derive(Debug, Parser)]
#[command(name = "eventstage", version)]
struct Args {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the bank stage on a sled journal under a generated load from many tasks, restart it, and
    /// check that the replayed state equals the live state. Needs nothing external. With
    /// `--brokers`, run the bank stage as an exactly-once Kafka flow instead, until Ctrl-C/SIGTERM.
    Demo(Box<demo::DemoArgs>),
    /// Inspect, verify, dump and replay journals.
    Journal(JournalArgs),
    /// Materialize a compacted topic as a table and print it: `dump`, `get KEY`, `stats`. With
    /// `--stage NAME` the topic is an eventstage Kafka journal and each key's state is printed.
    #[cfg(all(feature = "kafka", feature = "sled"))]
    Table(TableArgs),
    /// A flow's group: committed input offsets and lag per partition, and its Kafka journal's
    /// owner and positions.
    #[cfg(feature = "kafka")]
    Describe(group::GroupArgs),
    /// Make a flow's next run start from scratch: delete its group's committed offsets and empty
    /// its Kafka journal (every instance stopped first). `--dry-run` prints what it would do.
    #[cfg(feature = "kafka")]
    Reset(group::ResetArgs),
    /// Print a shell completion script: `eventstage completions bash > /etc/bash_completion.d/eventstage`
    /// (or zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = init_logging(&args.log) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let mut registry = Registry::default();
    registry.register::<Bank>();
    registry.register::<Inventory>();
    match args.command {
        Command::Demo(d) => block_on_cli(demo::run(*d)),
        Command::Journal(j) => block_on_cli(run_journal(&registry, j)),
        #[cfg(feature = "kafka")]
        Command::Describe(g) => block_on_cli(group::describe(g)),
        #[cfg(feature = "kafka")]
        Command::Reset(r) => block_on_cli(group::reset(r)),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Args::command(), "eventstage", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        #[cfg(all(feature = "kafka", feature = "sled"))]
        Command::Table(t) => block_on_cli(run_table(&registry, t)),
    }
}
