//! `eventstage query --brokers B --group G [--stage S] KEY`: a key's committed state, from the
//! running application (see `eventstage::query`).

use anyhow::bail;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub(crate) struct QueryArgs {
    /// The Kafka cluster (`host:port,...`).
    #[arg(long, value_name = "HOST:PORT", env = "EVENTSTAGE_BROKERS")]
    brokers: String,
    /// The application's consumer group.
    #[arg(long)]
    group: String,
    /// The stage to ask (default: the group's only queryable stage).
    #[arg(long)]
    stage: Option<String>,
    /// The key (its text; a key that is not text as `0x` and its bytes in hex).
    key: String,
    /// When no owner can answer now, accept the state an instance's local store keeps of the
    /// key's partition as a standby: possibly stale, marked with how far behind it is.
    #[arg(long)]
    stale: bool,
    /// How long to keep asking while the answer is "try again" (a rebalance, a restore, an
    /// instance that was killed and is not out of the group yet).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub(crate) async fn run(args: QueryArgs) -> anyhow::Result<ExitCode> {
    let answer = match eventstage::query::ask(
        &args.brokers,
        &args.group,
        args.stage.as_deref(),
        &args.key,
        args.stale,
        args.timeout,
    )
    .await
    {
        Ok(a) => a,
        Err(e) => bail!("{e}"),
    };
    match answer.status {
        200 => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", answer.body)?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        404 if answer.body.get("error").is_some_and(|e| e.as_str().is_some_and(|e| e.contains("has no state"))) => {
            eprintln!("{}", answer.body["error"].as_str().unwrap_or_default());
            Ok(ExitCode::from(1))
        }
        status => {
            let error = answer
                .body
                .get("error")
                .and_then(|e| e.as_str())
                .map_or_else(|| answer.body.to_string(), str::to_string);
            bail!("the application answered {status}: {error}")
        }
    }
}
