//! The `eventstage` command line, as a library: your own binary registers its stages and gets the
//! same journal (and table) commands.
//!
//! ```no_run
//! use eventstage::stages::bank::Bank;
//!
//! fn main() -> std::process::ExitCode {
//!     eventstage::cli::Cli::new("my-app").stage::<Bank>().run()
//! }
//! ```

mod journal;
#[cfg(feature = "kafka")]
mod journal_kafka;
mod registry;
#[cfg(all(feature = "kafka", feature = "sled"))]
mod table;

pub use journal::{run_journal, JournalArgs, JournalCommand};
pub use registry::{ErasedStage, RebuiltEntity, Registry, StageCodecs};
#[cfg(all(feature = "kafka", feature = "sled"))]
pub use table::{run_table, DataFormat, OnBad, TableArgs, TableCommand};

use crate::stage::EventSourced;
use clap::{Parser, ValueEnum};
use std::io::IsTerminal;
use std::process::ExitCode;

/// Output format of the inspection commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    #[default]
    Text,
    /// JSON lines for programs.
    Json,
}

/// When log lines on stderr are coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ColorChoice {
    /// When stderr is a terminal and `NO_COLOR` is not set.
    #[default]
    Auto,
    /// Never.
    Never,
    /// Always, also into files and pipes.
    Always,
}

/// The logging options every command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Colour the log lines on stderr: auto (only on a terminal, and not with NO_COLOR set),
    /// never, always.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, env = "EVENTSTAGE_COLOR")]
    pub color: ColorChoice,
    /// Which log lines to print: error, warn, info, debug, trace, or a full filter such as
    /// `warn,eventstage::flow=info` (the syntax of RUST_LOG, which it overrides). Default: RUST_LOG,
    /// else warn.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log line format on stderr: text, or json (one JSON object per line, for log shippers:
    /// timestamp, level, target, fields; never coloured).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EVENTSTAGE_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A command line with the journal commands and the stages it knows.
#[derive(Debug)]
pub struct Cli {
    name: String,
    registry: Registry,
}

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, clap::Subcommand)]
enum Top {
    /// Inspect, verify, dump and replay journals.
    Journal(JournalArgs),
    /// Materialize a compacted topic as a table and print it.
    #[cfg(all(feature = "kafka", feature = "sled"))]
    Table(TableArgs),
}

impl Cli {
    /// A command line called `name` with no stages registered.
    pub fn new(name: &str) -> Self {
        Self { name: name.into(), registry: Registry::default() }
    }

    /// Registers a stage so its events decode and its state can be rebuilt.
    #[must_use]
    pub fn stage<S: EventSourced>(mut self) -> Self
    where
        S::Event: serde::Serialize,
    {
        self.registry.register::<S>();
        self
    }

    /// The registered stages.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Parses the process arguments, runs the command and returns the exit code (0 fine, 1 damage
    /// found by `verify`, 2 error).
    pub fn run(self) -> ExitCode {
        let args = <Args as clap::CommandFactory>::command().name(self.name.clone()).get_matches();
        let args = match <Args as clap::FromArgMatches>::from_arg_matches(&args) {
            Ok(a) => a,
            Err(e) => e.exit(),
        };
        if let Err(e) = init_logging(&args.log) {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
        match args.command {
            Top::Journal(j) => block_on_cli(run_journal(&self.registry, j)),
            #[cfg(all(feature = "kafka", feature = "sled"))]
            Top::Table(t) => block_on_cli(run_table(&self.registry, t)),
        }
    }
}

/// Logs go to stderr through `tracing`; `RUST_LOG` filters them (default: warnings and errors),
/// coloured only on a terminal without `NO_COLOR`.
pub fn init_tracing() {
    let _ = init_logging(&LogArgs::default());
}

/// Logs go to stderr through `tracing`, filtered by `--log-level` (else `RUST_LOG`, else warn) and
/// coloured as `--color` says.
///
/// # Errors
/// A `--log-level` that is not a filter (the message shows the syntax).
pub fn init_logging(args: &LogArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let filter = match &args.log_level {
        Some(level) => tracing_subscriber::EnvFilter::try_new(level).with_context(|| {
            format!("--log-level `{level}` is not a log filter: use error, warn, info, debug or trace, or e.g. `warn,eventstage::flow=info`")
        })?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    };
    let ansi = match args.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        // https://no-color.org: set and not empty.
        ColorChoice::Auto => {
            std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        }
    };
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Text => fmt.with_ansi(ansi).try_init(),
        LogFormat::Json => fmt.json().with_ansi(false).try_init(),
    };
    Ok(())
}

/// Runs a CLI future on a fresh tokio runtime and turns its result into an exit code; errors print
/// with their whole cause chain, a closed stdout (`| head`) counts as success.
pub fn block_on_cli(fut: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(fut) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// A progress spinner counting records on stderr; hidden when stderr is not a terminal.
pub fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let style = indicatif::ProgressStyle::with_template("{spinner} {msg}: {human_pos} records ({per_sec}) {elapsed}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
