//! The `eventstage` command line, as a library: your own binary registers its stages and gets the
//! same journal (and table) commands, shell completions, the logging flags (`--log-level`,
//! `--log-format`, `--color`, `--quiet`), and room for commands of its own ([`Cli::run_with`]).
//!
//! ```no_run
//! # use eventstage::{Effect, EventSourced};
//! # use serde::{Deserialize, Serialize};
//! /// Your stage, as the runtime or a flow runs it (the journal commands decode its events).
//! struct Wallet;
//! # #[derive(Serialize, Deserialize)]
//! # enum Event { Credited(u64) }
//! # impl EventSourced for Wallet {
//! #     const NAME: &'static str = "wallet";
//! #     type Key = String; type Command = u64; type Event = Event; type State = u64;
//! #     type Reply = u64; type Rejection = String;
//! #     fn handle(&self, _: &u64, n: u64) -> Result<Effect<Self>, String> {
//! #         Ok(Effect::persist([Event::Credited(n)]).then_reply(|b: &u64| *b))
//! #     }
//! #     fn apply(b: &mut u64, Event::Credited(n): &Event) { *b += n }
//! # }
//!
//! fn main() -> std::process::ExitCode {
//!     // `my-app journal dump --journal /var/lib/wallets --key w-1` and the rest, for Wallet.
//!     eventstage::cli::Cli::new("my-app").stage::<Wallet>().run()
//! }
//! ```

mod journal;
#[cfg(feature = "kafka")]
mod journal_kafka;
mod registry;
#[cfg(all(feature = "kafka", feature = "sled"))]
mod table;

use journal::{run_journal, JournalArgs};
use registry::Registry;
#[cfg(all(feature = "kafka", feature = "sled"))]
use table::{run_table, TableArgs};

use crate::stage::EventSourced;
use clap::{Parser, ValueEnum};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// Output format of the inspection commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(crate) enum Format {
    /// Aligned text for people.
    #[default]
    Text,
    /// JSON lines for programs.
    Json,
}

/// When log lines on stderr are coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(crate) enum ColorChoice {
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
pub(crate) struct LogArgs {
    /// Colour the log lines on stderr: auto (only on a terminal, and not with NO_COLOR set),
    /// never, always.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, env = "EVENTSTAGE_COLOR")]
    pub(crate) color: ColorChoice,
    /// Which log lines to print: error, warn, info, debug, trace, or a full filter such as
    /// `warn,eventstage::flow=info` (the syntax of RUST_LOG, which it overrides). Default: RUST_LOG,
    /// else warn.
    #[arg(long, global = true, value_name = "FILTER")]
    pub(crate) log_level: Option<String>,
    /// Print only errors and the data asked for: no progress, no notes, no warnings (the same as
    /// `--log-level error`, and the notes on stderr go too).
    #[arg(long, short = 'q', global = true, conflicts_with = "log_level")]
    pub(crate) quiet: bool,
    /// Log line format on stderr: text, or json (one JSON object per line, for log shippers:
    /// timestamp, level, target, fields; never coloured).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EVENTSTAGE_LOG_FORMAT")]
    pub(crate) log_format: LogFormat,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A command line with the journal commands and the stages it knows, and optionally commands of
/// your own ([`Cli::run_with`]).
#[derive(Debug)]
pub struct Cli {
    name: String,
    about: Option<String>,
    version: Option<String>,
    registry: Registry,
}

#[derive(Debug, Parser)]
struct Args<E: clap::Subcommand> {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Top<E>,
}

#[derive(Debug, clap::Subcommand)]
enum Top<E: clap::Subcommand> {
    #[command(flatten)]
    Own(E),
    /// Inspect, verify, dump and replay journals.
    Journal(JournalArgs),
    /// Materialize a compacted topic as a table and print it: `dump`, `get KEY`, `stats`. With
    /// `--stage NAME` the topic is an eventstage Kafka journal and each key's state is printed.
    #[cfg(all(feature = "kafka", feature = "sled"))]
    Table(TableArgs),
    /// Print a shell completion script, e.g. `NAME completions bash > /etc/bash_completion.d/NAME`
    /// (or zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// The commands of a [`Cli`] that has none of its own ([`Cli::run`]).
#[derive(Debug, Clone, Copy)]
pub enum NoCommands {}

impl clap::FromArgMatches for NoCommands {
    fn from_arg_matches(_: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Err(clap::Error::new(clap::error::ErrorKind::InvalidSubcommand))
    }
    fn update_from_arg_matches(&mut self, _: &clap::ArgMatches) -> Result<(), clap::Error> {
        match *self {}
    }
}

impl clap::Subcommand for NoCommands {
    fn augment_subcommands(cmd: clap::Command) -> clap::Command {
        cmd
    }
    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        cmd
    }
    fn has_subcommand(_: &str) -> bool {
        false
    }
}

impl Cli {
    /// A command line called `name` with no stages registered.
    pub fn new(name: &str) -> Self {
        Self { name: name.into(), about: None, version: None, registry: Registry::default() }
    }

    /// The one-line description `--help` starts with.
    #[must_use]
    pub fn about(mut self, about: &str) -> Self {
        self.about = Some(about.into());
        self
    }

    /// The version `--version` prints, e.g. `env!("CARGO_PKG_VERSION")`.
    #[must_use]
    pub fn version(mut self, version: &str) -> Self {
        self.version = Some(version.into());
        self
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

    /// Parses the process arguments, runs the command and returns the exit code (0 fine, 1 damage
    /// found by `verify` or nothing found where something was asked for, 2 error).
    pub fn run(self) -> ExitCode {
        self.run_with::<NoCommands, _, _, BoxError>(|never| async move { match never {} })
    }

    /// As [`Cli::run`], with your own commands beside the built-in ones: `C` is a
    /// `#[derive(clap::Subcommand)]` enum, and `run` runs one of them on the command line's tokio
    /// runtime. Its error is yours: any `std::error::Error + Send + Sync + 'static`, an
    /// `anyhow::Error`, a `Box<dyn Error + Send + Sync>` or a `String`; it prints with its whole
    /// cause chain (each cause once) and exits 2. [`quiet`] says whether `--quiet` was given.
    ///
    /// ```no_run
    /// use std::process::ExitCode;
    ///
    /// #[derive(Debug, clap::Subcommand)]
    /// enum Own {
    ///     /// Greets someone.
    ///     Hello { name: String },
    /// }
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// enum AppError {
    ///     #[error("nobody to greet: give a name")]
    ///     NoName,
    ///     #[error("cannot write the greeting")]
    ///     Io(#[from] std::io::Error),
    /// }
    ///
    /// fn main() -> ExitCode {
    ///     eventstage::cli::Cli::new("my-app").run_with(|command: Own| async move {
    ///         let Own::Hello { name } = command;
    ///         if name.is_empty() {
    ///             return Err(AppError::NoName);
    ///         }
    ///         std::io::Write::write_all(&mut std::io::stdout(), format!("hello {name}\n").as_bytes())?;
    ///         Ok(ExitCode::SUCCESS)
    ///     })
    /// }
    /// ```
    pub fn run_with<C, F, Fut, E>(self, run: F) -> ExitCode
    where
        C: clap::Subcommand + std::fmt::Debug,
        F: FnOnce(C) -> Fut,
        Fut: std::future::Future<Output = Result<ExitCode, E>>,
        E: Into<BoxError>,
    {
        let mut command = <Args<C> as clap::CommandFactory>::command().name(self.name.clone());
        if let Some(about) = &self.about {
            command = command.about(about.clone());
        }
        if let Some(version) = &self.version {
            command = command.version(version.clone());
        }
        let matches = command.clone().get_matches();
        let args = match <Args<C> as clap::FromArgMatches>::from_arg_matches(&matches) {
            Ok(a) => a,
            Err(e) => e.format(&mut command).exit(),
        };
        if let Err(e) = init_logging(&args.log) {
            eprintln!("error: {}", render_error(&*e));
            return ExitCode::from(2);
        }
        match args.command {
            Top::Own(own) => block_on_cli(run(own)),
            Top::Journal(j) => block_on_cli(run_journal(&self.registry, j)),
            #[cfg(all(feature = "kafka", feature = "sled"))]
            Top::Table(t) => block_on_cli(run_table(&self.registry, t)),
            Top::Completions { shell } => {
                clap_complete::generate(shell, &mut command, self.name, &mut std::io::stdout());
                ExitCode::SUCCESS
            }
        }
    }
}

/// Set by `--quiet`.
static QUIET: AtomicBool = AtomicBool::new(false);

/// A size in bytes, as the command line takes it: `268435456`, `256MiB`, `1.5GB`.
///
/// # Errors
/// Text that is not a size, with an example of one.
pub fn parse_bytes(raw: &str) -> Result<u64, String> {
    raw.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("`{raw}` is not a size ({e}); e.g. 256MiB"))
}

/// True when the command line was given `--quiet`: print only errors and the data asked for (no
/// progress, notes or warnings). Your own commands of [`Cli::run_with`] honour it this way.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A note for the operator on stderr (what is being done, a hint), unless `--quiet`.
pub(crate) fn note(message: impl std::fmt::Display) {
    if !quiet() {
        eprintln!("{message}");
    }
}

/// Logs go to stderr through `tracing`; `RUST_LOG` filters them (default: warnings and errors),
/// coloured only on a terminal without `NO_COLOR`. (A [`Cli`] does this by itself, with its
/// logging flags. A program without the `cli` feature sets up `tracing-subscriber` itself, as the
/// examples do in `examples/util/mod.rs`.)
pub fn init_tracing() {
    let _ = init_logging(&LogArgs::default());
}

/// Logs go to stderr through `tracing`, filtered by `--log-level` (else `RUST_LOG`, else warn) and
/// coloured as `--color` says.
///
/// # Errors
/// A `--log-level` that is not a filter (the message shows the syntax).
pub(crate) fn init_logging(args: &LogArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    QUIET.store(args.quiet, Ordering::Relaxed);
    let level = if args.quiet { Some("error".to_string()) } else { args.log_level.clone() };
    let filter = match &level {
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

/// What a command's error may be: anything that converts into it (`anyhow::Error`, any
/// `std::error::Error + Send + Sync + 'static`, `String`).
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Runs a CLI future on a fresh tokio runtime and turns its result into an exit code; errors print
/// with their whole cause chain, a closed stdout (`| head`) counts as success.
pub(crate) fn block_on_cli<E: Into<BoxError>>(fut: impl std::future::Future<Output = Result<ExitCode, E>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(fut).map_err(Into::into) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&*e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render_error(&*e));
            ExitCode::from(2)
        }
    }
}

/// An error's causes, itself first.
fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// An error and its causes on one line, as anyhow's `{:#}` prints them, less each cause whose text
/// the message before it already holds: many errors print their source in their own message and
/// return it from `source()` too (`FlowError::Kafka`, whose librdkafka message then appeared
/// twice, thrice with its error code), and the chain would repeat it.
pub(crate) fn render_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut before = String::new();
    for cause in chain(e) {
        let this = cause.to_string();
        if before.is_empty() || !before.contains(&this) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&this);
        }
        before = this;
    }
    text
}

fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    chain(e).any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// A progress spinner counting records on stderr; hidden when stderr is not a terminal.
pub(crate) fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = if std::io::stderr().is_terminal() && !quiet() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(Debug, clap::Subcommand)]
    enum Own {
        /// A command of the application's own.
        Hello { name: String },
    }

    #[test]
    fn an_error_prints_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("opening the journal: {0}")]
        struct Outer(#[source] std::io::Error);
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        // Printed in the message and returned as the source: once.
        let e = anyhow::Error::new(Outer(io())).context("journal stats");
        assert_eq!(render_error(&*e), "journal stats: opening the journal: no such file");
        // A cause the message does not hold is printed.
        let e = anyhow::Error::new(io()).context("reading x");
        assert_eq!(render_error(&*e), "reading x: no such file");
    }

    /// A command's error of the application's own type.
    #[derive(Debug, thiserror::Error)]
    enum AppError {
        #[error("no such account `{0}`")]
        NoAccount(String),
        #[error("cannot write the report")]
        Io(#[from] std::io::Error),
    }

    #[test]
    fn own_commands_may_fail_with_their_own_error_type() {
        // Exits 2 (the message is printed on stderr).
        let code = block_on_cli(async { Err::<ExitCode, _>(AppError::NoAccount("a".into())) });
        assert_eq!(code, ExitCode::from(2));
        // Its cause chain is seen: a closed stdout is success, as with anyhow errors.
        let pipe = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "closed");
        assert_eq!(block_on_cli(async { Err::<ExitCode, _>(AppError::Io(pipe)) }), ExitCode::SUCCESS);
        assert_eq!(
            render_error(&AppError::Io(std::io::Error::other("disk full"))),
            "cannot write the report: disk full"
        );
        // anyhow, boxed errors and messages still do.
        assert_eq!(block_on_cli(async { Err::<ExitCode, _>(anyhow::anyhow!("x")) }), ExitCode::from(2));
        assert_eq!(block_on_cli(async { Err::<ExitCode, _>("a message") }), ExitCode::from(2));
        assert_eq!(block_on_cli(async { Ok::<_, AppError>(ExitCode::from(1)) }), ExitCode::from(1));
        // And run_with takes such a closure (type-checked, not run: it parses the process' arguments).
        let _ =
            |cli: Cli| cli.run_with(|Own::Hello { name }| async move { Err::<ExitCode, _>(AppError::NoAccount(name)) });
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn a_kafka_error_of_a_flow_prints_librdkafkas_message_once() {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaErrorCode;
        let source = KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure);
        let e = anyhow::Error::new(crate::flow::FlowError::Kafka { context: "metadata of t".into(), error: source });
        assert_eq!(format!("{e:#}").matches("Meta data fetch error").count(), 1, "{e:#}");
        let text = render_error(&*e);
        assert_eq!(text.matches("Meta data fetch error").count(), 1, "{text}");
        assert_eq!(text.matches("BrokerTransportFailure").count(), 1, "{text}");
        assert!(text.starts_with("kafka: metadata of t: Meta data fetch error: BrokerTransportFailure"), "{text}");
    }

    #[test]
    fn own_commands_sit_beside_the_built_in_ones() {
        Args::<NoCommands>::command().debug_assert();
        Args::<Own>::command().debug_assert();
        let parsed = Args::<NoCommands>::try_parse_from(["my-app", "journal", "stats", "--journal", "x"]).unwrap();
        assert!(matches!(parsed.command, Top::Journal(_)));
        assert!(Args::<NoCommands>::try_parse_from(["my-app", "hello", "x"]).is_err());
        let parsed = Args::<Own>::try_parse_from(["my-app", "-q", "hello", "x"]).unwrap();
        assert!(parsed.log.quiet);
        assert!(matches!(parsed.command, Top::Own(Own::Hello { name }) if name == "x"));
        let parsed = Args::<Own>::try_parse_from(["my-app", "completions", "zsh"]).unwrap();
        assert!(matches!(parsed.command, Top::Completions { .. }));
    }
}
