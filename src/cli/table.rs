//! `eventstage table dump|get|stats`: a compacted topic materialized and printed.

use super::registry::Registry;
use super::{progress_bar, Format};
use crate::table::{BadInput, Decoder, Table, TableStats};
use anyhow::{bail, Context};
use base64::Engine;
use eventstage_journal::JournalEntry;
use serde_json::{json, Value};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Arguments of `table`.
#[derive(Debug, clap::Args)]
pub(super) struct TableArgs {
    /// Kafka bootstrap servers.
    #[arg(long, global = true, value_name = "HOST:PORT", env = "EVENTSTAGE_BROKERS")]
    brokers: Option<String>,
    /// The compacted topic to materialize.
    #[arg(long, global = true, value_name = "TOPIC")]
    topic: Option<String>,
    /// Keep the materialization in this directory and reuse it next time (only the topic's tail is
    /// read then).
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// With --store: hold the rows in the store and at most this much of them in memory (e.g.
    /// `64MiB`), for tables larger than memory. Keys as string, hex or base64.
    #[arg(long, global = true, value_name = "BYTES", value_parser = super::parse_bytes, requires = "store")]
    cache: Option<u64>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// How record keys are decoded and printed.
    #[arg(long, global = true, value_enum, default_value_t = DataFormat::String)]
    key_format: DataFormat,
    /// How record values are decoded and printed (ignored with `--stage`).
    #[arg(long, global = true, value_enum, default_value_t = DataFormat::String)]
    value_format: DataFormat,
    /// The topic is an eventstage Kafka journal of this stage: print each key's rebuilt state.
    #[arg(long, global = true, value_name = "NAME")]
    stage: Option<String>,
    /// A record that does not decode: skip it with a counted warning, or stop with an error.
    #[arg(long, global = true, value_enum, default_value_t = OnBad::Skip, alias = "on-bad-record")]
    on_bad_input: OnBad,
    /// How long to wait for the cluster.
    #[arg(long, global = true, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: TableCommand,
}

/// The table subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum TableCommand {
    /// Print every key and value (in key order).
    Dump,
    /// Print one key's value; exit 1 when the key is absent.
    Get {
        /// The key, written as `--key-format` says.
        key: String,
    },
    /// Keys, bytes, records read, tombstones, bad records, end offsets.
    Stats,
}

/// How bytes are decoded and printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum DataFormat {
    /// UTF-8 text.
    String,
    /// JSON (printed compact).
    Json,
    /// Base64 of the raw bytes.
    Base64,
    /// Hex of the raw bytes.
    Hex,
}

/// The bad-input policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum OnBad {
    /// Skip and count.
    Skip,
    /// Stop with the record's location.
    Stop,
}

impl DataFormat {
    /// Bytes as this format's text (what keys are ordered and looked up by).
    fn render(self, b: &[u8]) -> Result<String, String> {
        match self {
            Self::String => {
                std::str::from_utf8(b).map(str::to_owned).map_err(|e| format!("not UTF-8 ({e}); try hex or base64"))
            }
            Self::Json => {
                let v: Value = serde_json::from_slice(b).map_err(|e| format!("not JSON ({e})"))?;
                Ok(v.to_string())
            }
            Self::Base64 => Ok(base64::engine::general_purpose::STANDARD.encode(b)),
            Self::Hex => Ok(hex::encode(b)),
        }
    }

    fn value(self, b: &[u8]) -> Result<Value, String> {
        match self {
            Self::Json => serde_json::from_slice(b).map_err(|e| format!("not JSON ({e})")),
            _ => self.render(b).map(Value::String),
        }
    }

    /// A key given on the command line, normalized as [`render`](Self::render) prints it.
    fn normalize(self, key: &str) -> anyhow::Result<String> {
        Ok(match self {
            Self::Json => {
                serde_json::from_str::<Value>(key).with_context(|| format!("`{key}` is not JSON"))?.to_string()
            }
            Self::Hex | Self::Base64 => {
                let normalized = if self == Self::Hex { key.to_ascii_lowercase() } else { key.to_string() };
                if self.parse(&normalized).is_none() {
                    anyhow::bail!("`{key}` is not {}", if self == Self::Hex { "hex" } else { "base64" });
                }
                normalized
            }
            Self::String => key.to_string(),
        })
    }

    /// The bytes a key [`render`](Self::render)ed as `text` came from (`None` for JSON, which is
    /// normalized, and for text this format does not print).
    fn parse(self, text: &str) -> Option<Vec<u8>> {
        match self {
            Self::String => Some(text.as_bytes().to_vec()),
            Self::Json => None,
            Self::Base64 => base64::engine::general_purpose::STANDARD.decode(text).ok(),
            Self::Hex => hex::decode(text).ok(),
        }
    }
}

/// Runs a `table` command.
///
/// # Errors
/// Missing flags, an unreachable cluster, a missing topic, an unusable store, or (with
/// `--on-bad-input stop`) a record that does not decode.
pub(super) async fn run_table(registry: &Registry, args: TableArgs) -> anyhow::Result<ExitCode> {
    let brokers = args.brokers.clone().context("--brokers HOST:PORT is required (or EVENTSTAGE_BROKERS)")?;
    let topic = args.topic.clone().context("--topic TOPIC is required")?;
    let key_format = args.key_format;
    let journal_like = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let values = match &args.stage {
        Some(name) => {
            let stage = registry.shared_for_journal(name).cloned().with_context(|| {
                format!("no stage named `{name}` is compiled into this binary (known: {})", registry.names())
            })?;
            Decoder::new("eventstage journal entry", move |b| {
                let entry = JournalEntry::decode(b).map_err(|e| format!("not an eventstage journal record ({e})"))?;
                let state = match &entry.state {
                    Some(env) => stage.state_json(env).map_err(|e| format!("{e:#}"))?,
                    None => Value::Null,
                };
                Ok(json!({ "seq": entry.last_seq.0, "state": state }))
            })
        }
        None => {
            let f = args.value_format;
            let journal_like = journal_like.clone();
            Decoder::new(&format!("{f:?}").to_lowercase(), move |b| {
                f.value(b).inspect_err(|_| {
                    // Remembered for a hint: the topic may be an eventstage journal.
                    if JournalEntry::decode(b).is_ok() {
                        journal_like.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
        }
    };
    let mut keys = Decoder::new(&format!("{key_format:?}").to_lowercase(), move |b| key_format.render(b));
    if key_format != DataFormat::Json {
        // The bytes a key was rendered from (JSON keys are normalized, so not given back).
        keys = keys.with_encoder(move |k: &String| key_format.parse(k).unwrap_or_default());
    }
    let mut builder = Table::builder(&brokers, &topic)
        .keys(keys)
        .values(values)
        .bad_input(if args.on_bad_input == OnBad::Stop { BadInput::Stop } else { BadInput::Skip })
        .timeout(args.timeout);
    if let Some(dir) = &args.store {
        builder = builder.store(dir);
    }
    if let Some(bytes) = args.cache {
        builder = builder.cache(bytes);
    }
    let started = Instant::now();
    let table = builder.open().await.with_context(|| format!("materializing topic `{topic}`"))?;
    let bar = progress_bar(&format!("reading {topic}"));
    {
        let caught_up = table.caught_up();
        tokio::pin!(caught_up);
        loop {
            tokio::select! {
                r = &mut caught_up => {
                    r.with_context(|| format!("materializing topic `{topic}`"))?;
                    break;
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => bar.set_position(table.stats().records_read),
            }
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let stats = table.stats();
    if stats.bad_input > 0 {
        tracing::warn!(
            skipped = stats.bad_input,
            "records that did not decode were skipped (see the warnings above; --on-bad-input stop to fail instead)"
        );
        if journal_like.load(std::sync::atomic::Ordering::Relaxed) {
            super::note(format_args!(
                "hint: `{topic}` holds eventstage Kafka journal records: add --stage NAME (known: {}) to read each key's state",
                registry.names()
            ));
        }
    }
    let out = std::io::stdout();
    let mut out = BufWriter::new(out.lock());
    let code = match &args.command {
        TableCommand::Dump => {
            let snap = table.snapshot();
            let mut width = 0;
            for row in snap.iter().take(10_000) {
                width = width.max(row.with_context(|| format!("reading table `{topic}`"))?.key().len());
            }
            for row in snap.iter() {
                let v = row.with_context(|| format!("reading table `{topic}`"))?;
                line(&mut out, args.format, width.min(60), v.key(), &v)?;
            }
            ExitCode::SUCCESS
        }
        TableCommand::Get { key } => {
            let key = key_format.normalize(key)?;
            match table.get(key.as_str()) {
                Some(v) => {
                    line(&mut out, args.format, key.len(), &key, &v)?;
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("key `{key}` is not in topic `{topic}` ({} keys)", stats.keys);
                    ExitCode::from(1)
                }
            }
        }
        TableCommand::Stats => {
            print_stats(&mut out, args.format, &topic, &stats, elapsed)?;
            ExitCode::SUCCESS
        }
    };
    out.flush()?;
    drop(out);
    if let Err(e) = table.close().await {
        bail!("closing the table of `{topic}`: {e}");
    }
    Ok(code)
}

fn line(out: &mut impl Write, format: Format, width: usize, key: &str, value: &Value) -> std::io::Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", json!({ "key": key, "value": value })),
        Format::Text => {
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            writeln!(out, "{key:<width$}  {value}")
        }
    }
}

fn print_stats(
    out: &mut impl Write,
    format: Format,
    topic: &str,
    s: &TableStats,
    elapsed: Duration,
) -> std::io::Result<()> {
    match format {
        Format::Json => writeln!(
            out,
            "{}",
            json!({
                "topic": topic,
                "keys": s.keys,
                "bytes": s.bytes,
                "records_read": s.records_read,
                "loaded_from_store": s.loaded_from_store,
                "tombstones": s.tombstones,
                "bad_input": s.bad_input,
                "end_offsets": s.end_offsets,
                "positions": s.positions,
                "cache": (s.cache_budget > 0).then(|| json!({
                    "budget": s.cache_budget,
                    "bytes": s.cache_bytes,
                    "entries": s.cache_entries,
                    "hits": s.cache_hits,
                    "misses": s.cache_misses,
                })),
                "elapsed_ms": elapsed.as_millis() as u64,
            })
        ),
        Format::Text => {
            writeln!(out, "topic              {topic}")?;
            writeln!(out, "keys               {}", s.keys)?;
            writeln!(out, "bytes              {}", s.bytes)?;
            writeln!(out, "records read       {} in {:.2} s", s.records_read, elapsed.as_secs_f64())?;
            writeln!(out, "loaded from store  {}", s.loaded_from_store)?;
            writeln!(out, "tombstones seen    {}", s.tombstones)?;
            writeln!(out, "bad input          {}", s.bad_input)?;
            if s.cache_budget > 0 {
                writeln!(
                    out,
                    "row cache          {} of {} bytes, {} rows; {} hits, {} store reads",
                    s.cache_bytes, s.cache_budget, s.cache_entries, s.cache_hits, s.cache_misses
                )?;
            }
            for (p, end) in &s.end_offsets {
                writeln!(out, "partition {p:<8} end offset {end}")?;
            }
            Ok(())
        }
    }
}
