//! What the examples share (`mod util;` in each). Copy it into your own program: it needs only
//! `tracing-subscriber` (features `fmt`, `env-filter`), not eventstage's `cli` feature.

use std::io::IsTerminal;

/// Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default: warnings and errors),
/// coloured only on a terminal without `NO_COLOR`. The library logs through `tracing` and never installs a
/// subscriber itself; without one, its logs go nowhere.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
        .try_init();
}
