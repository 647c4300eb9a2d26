//! `eventstage journal stats|verify|dump|replay`.

use super::registry::Registry;
use super::{progress_bar, Format};
use anyhow::{bail, Context};
use base64::Engine;
use eventstage_journal::{
    printable_key, EventQuery, EventRecord, Journal, JournalStats, Problem, Progress, SeqNo, SledJournal, SledStore,
    VerifyReport,
};
use futures::StreamExt;
use serde_json::json;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

/// Arguments of `journal`.
#[derive(Debug, clap::Args)]
pub(super) struct JournalArgs {
    /// The journal: a sled store's directory (what a stage or `eventstage demo --data` wrote), or
    /// `kafka:TOPIC`, a flow's Kafka journal (with --brokers).
    #[arg(long, global = true, value_name = "PATH|kafka:TOPIC", env = "EVENTSTAGE_JOURNAL")]
    journal: Option<PathBuf>,
    /// The Kafka cluster of a `kafka:TOPIC` journal (`host:port,...`).
    #[arg(long, global = true, value_name = "HOST:PORT", env = "EVENTSTAGE_BROKERS")]
    pub(super) brokers: Option<String>,
    /// Which journal of the store (a stage name, or `stage/partition`); default: all, or the only
    /// one. For a Kafka journal: the stage whose events and states it holds; default: the only
    /// stage this binary knows, if it knows one.
    #[arg(long, global = true, value_name = "NAME")]
    pub(super) stage: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub(super) format: Format,
    /// The journals' commit marks are known to be gone (a copy without its `marks` directory):
    /// `verify` does not report them missing, and opening does not warn.
    #[arg(long, global = true)]
    mark_lost: bool,
    #[command(subcommand)]
    pub(super) command: JournalCommand,
}

/// The journal subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum JournalCommand {
    /// Keys, events, snapshots, bytes, batches and source positions.
    Stats,
    /// Check every record's CRC and every key's sequence continuity; exit 1 and list all damage.
    Verify,
    /// Print events (decoded by the stage when it is compiled in, else envelope-level with base64
    /// payloads).
    Dump(DumpArgs),
    /// Rebuild state from events and print it, for all keys or one, at any point of history.
    Replay(PointArgs),
    /// Move the events each key's snapshot covers out of sled into the journal's history archive,
    /// a file read only by dump, replay, stats and verify. Flows and the demo do this as they write
    /// snapshots; this moves what a store written by an older version (or with archiving off) holds,
    /// so that opening it, and every scan of it, needs memory for its state, not its history.
    Archive,
}

/// Which events to dump: a key, a first sequence number and a point in history.
#[derive(Debug, clap::Args)]
pub(super) struct DumpArgs {
    #[command(flatten)]
    pub(super) point: PointArgs,
    /// First sequence number per key.
    #[arg(long, value_name = "SEQ")]
    pub(super) from_seq: Option<u64>,
}

/// Which events: a key and a point in history.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct PointArgs {
    /// Only this key.
    #[arg(long)]
    pub(super) key: Option<String>,
    /// First sequence number (set by `dump`; a replay starts at the first event).
    #[arg(skip)]
    pub(super) from_seq: Option<u64>,
    /// Last sequence number per key (inclusive).
    #[arg(long, value_name = "SEQ")]
    pub(super) until_seq: Option<u64>,
    /// Per key, events written up to this time: RFC 3339 with its offset (`2026-11-25T16:00:00Z`,
    /// `2026-11-25T17:00:00+01:00`), or since the Unix epoch in seconds (`1795801087s`) or
    /// milliseconds (`1795801087000ms`, or a bare number of milliseconds).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub(super) until_time: Option<u64>,
}

/// A bare number below this (1973-03-03 in milliseconds, the year 5138 in seconds) is more likely
/// epoch seconds than milliseconds: it is refused as ambiguous.
const MIN_BARE_MS: u64 = 100_000_000_000;

fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    if let Some(n) = s.strip_suffix("ms").filter(|n| digits(n)) {
        return n.parse().map_err(|e| format!("`{s}`: {e}"));
    }
    if let Some(n) = s.strip_suffix('s').filter(|n| digits(n)) {
        let secs: u64 = n.parse().map_err(|e| format!("`{s}`: {e}"))?;
        return secs.checked_mul(1000).ok_or_else(|| format!("`{s}` is too far in the future"));
    }
    if let Ok(n) = s.parse::<u64>() {
        if n >= MIN_BARE_MS {
            return Ok(n);
        }
        return Err(format!(
            "`{s}` is ambiguous: epoch seconds ({}) or milliseconds ({})? Write {s}s or {s}ms",
            format_time(n.saturating_mul(1000)),
            format_time(n)
        ));
    }
    let offset_hint = "use RFC 3339 with an offset, like 2026-11-25T16:00:00Z or 2026-11-25T17:00:00+01:00, or epoch time like 1795801087s";
    let (local, offset_ms) = split_offset(s).ok_or_else(|| {
        format!("`{s}` has no UTC offset (a time of which zone?): add Z for UTC or +HH:MM; {offset_hint}")
    })?;
    let t = humantime::parse_rfc3339_weak(local).map_err(|e| format!("`{s}` is not a time ({e}); {offset_hint}"))?;
    let utc_ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64) - offset_ms;
    u64::try_from(utc_ms).map_err(|_| format!("`{s}` is before 1970"))
}

/// A time's local part and its UTC offset in milliseconds: `Z` (0), or `+HH:MM` / `-HH:MM` at the
/// end (`None`: no offset).
fn split_offset(s: &str) -> Option<(&str, i64)> {
    if let Some(local) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        return Some((local, 0));
    }
    let at = s.len().checked_sub(6)?;
    let (local, offset) = (s.get(..at)?, s.get(at..)?.as_bytes());
    let sign = match offset[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let two = |b: &[u8]| -> Option<i64> {
        (b[0].is_ascii_digit() && b[1].is_ascii_digit()).then(|| i64::from(b[0] - b'0') * 10 + i64::from(b[1] - b'0'))
    };
    if offset[3] != b':' || !local.contains(['T', 't', ' ']) {
        return None;
    }
    let (hours, minutes) = (two(&offset[1..3])?, two(&offset[4..6])?);
    Some((local, sign * (hours * 60 + minutes) * 60_000))
}

fn format_time(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl PointArgs {
    pub(super) fn query(&self) -> EventQuery {
        EventQuery {
            key: self.key.as_ref().map(|k| k.as_bytes().to_vec()),
            from_seq: SeqNo(self.from_seq.unwrap_or(0)),
            until_seq: self.until_seq.map(SeqNo),
            until_time_ms: self.until_time,
        }
    }
}

/// sled's page cache for inspection commands: they read each page once, in order, so a large
/// cache only holds history in memory (with sled's default of 256 MiB a replay's memory grew with
/// the journal's size on disk).
const INSPECT_CACHE: u64 = 16 << 20;

/// Runs a `journal` command.
///
/// # Errors
/// Anything that stops the command: the message names the thing and the fix.
pub(super) async fn run_journal(registry: &Registry, args: JournalArgs) -> anyhow::Result<ExitCode> {
    let path = args.journal.clone().context("--journal PATH is required (or set EVENTSTAGE_JOURNAL)")?;
    if let Some(topic) = path.to_str().and_then(|p| p.strip_prefix("kafka:")) {
        #[cfg(feature = "kafka")]
        return super::journal_kafka::run(registry, &args, topic).await;
        #[cfg(not(feature = "kafka"))]
        bail!("--journal kafka:{topic}: this eventstage was built without Kafka support");
    }
    // sled opens its files for writing: a write-protected store (a backup, another user's files)
    // is inspected through a private copy, and never written.
    let archiving = matches!(args.command, JournalCommand::Archive);
    let copy = if write_protected(&path) {
        if archiving {
            bail!(
                "{} is write-protected: `journal archive` moves records inside it; make it writable first",
                path.display()
            );
        }
        let tmp = tempfile::tempdir().context("cannot create a temporary directory for a copy of the journal")?;
        let target = tmp.path().join("journal");
        copy_tree(&path, &target)
            .with_context(|| format!("cannot copy the write-protected journal {}", path.display()))?;
        super::note(format_args!("{} is write-protected: inspecting a copy of it", path.display()));
        Some((tmp, target))
    } else {
        None
    };
    let opened = tokio::task::spawn_blocking({
        let path = copy.as_ref().map_or_else(|| path.clone(), |(_, target)| target.clone());
        let mark_lost = args.mark_lost;
        move || {
            SledStore::builder(path)
                .create(false)
                .flush_every(None)
                .mark_lost(mark_lost)
                .cache_capacity(INSPECT_CACHE)
                // Inspection moves nothing; `journal archive` moves in the foreground.
                .archive_history(None)
                .open()
        }
    })
    .await?;
    let store = match opened {
        // A store sled cannot read at all is damage, which `verify` reports (exit 1), not an error.
        Err(e) if unreadable_store(&e) && matches!(args.command, JournalCommand::Verify) => {
            let report = VerifyReport {
                name: path.display().to_string(),
                problems: vec![Problem {
                    key: None,
                    seq: None,
                    what: format!(
                        "the store cannot be opened, nothing in it can be read: {}; restore it from a backup",
                        unreadable(&e)
                    ),
                }],
                ..VerifyReport::default()
            };
            let mut out = std::io::stdout().lock();
            print_report(&mut out, args.format, &report)?;
            out.flush()?;
            return Ok(ExitCode::from(1));
        }
        opened => opened.with_context(|| format!("cannot open journal {}", path.display()))?,
    };
    let names = match &args.stage {
        Some(name) => vec![name.clone()],
        None => store.journal_names(),
    };
    if names.is_empty() {
        bail!("{} holds no journals yet", path.display());
    }
    // `verify` must look at damaged journals too; everything else refuses a journal that lost
    // committed batches rather than show a shorter history as if it were whole.
    let verifying = matches!(args.command, JournalCommand::Verify);
    // A journal whose own records (its batch counter, its archive's length) sled cannot read is
    // damage `verify` reports too (exit 1), beside the journals it can walk.
    let mut unopened: Vec<VerifyReport> = Vec::new();
    let mut journals: Vec<SledJournal> = Vec::new();
    for n in &names {
        match if verifying { store.inspect_journal(n) } else { store.existing_journal(n) } {
            Ok(j) => journals.push(j),
            Err(e) if verifying && unreadable_store(&e) => unopened.push(VerifyReport {
                name: n.clone(),
                problems: vec![Problem {
                    key: None,
                    seq: None,
                    what: format!(
                        "the journal cannot be opened, nothing in it can be checked: {}; restore it from a backup",
                        unreadable(&e)
                    ),
                }],
                ..VerifyReport::default()
            }),
            Err(e) => return Err(e).with_context(|| format!("cannot open journal `{n}` in {}", path.display())),
        }
    }
    let mut out = BufWriter::new(std::io::stdout().lock());
    let code = match &args.command {
        JournalCommand::Stats => {
            for j in &journals {
                let stats = j.stats().await?;
                print_stats(&mut out, args.format, &stats, store.size_on_disk())?;
            }
            // The journals of a store share its sled files: their size is the store's, said once.
            if args.format == Format::Text {
                writeln!(
                    out,
                    "store        {} bytes on disk, shared by its {} journal(s)",
                    store.size_on_disk(),
                    store.journal_names().len()
                )?;
            }
            ExitCode::SUCCESS
        }
        JournalCommand::Verify => {
            let mut damaged = !unopened.is_empty();
            for report in &unopened {
                print_report(&mut out, args.format, report)?;
            }
            for j in &journals {
                let bar = progress_bar(&format!("verifying {}", j.name()));
                let b = bar.clone();
                let report = j.verify(Progress::new(move |n| b.set_position(n))).await?;
                bar.finish_and_clear();
                damaged |= !report.is_ok();
                print_report(&mut out, args.format, &report)?;
            }
            if damaged {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        JournalCommand::Dump(d) => {
            let point = &PointArgs { from_seq: d.from_seq, ..d.point.clone() };
            let mut printed = 0;
            for j in &journals {
                printed += dump(&mut out, args.format, registry, j, point).await?;
            }
            match &point.key {
                // Nothing found where something was asked for, as `table get` says it.
                Some(key) if printed == 0 => {
                    out.flush()?;
                    eprintln!(
                        "no events of key `{key}` in {} (within the range asked for); `journal stats` shows what it holds",
                        path.display()
                    );
                    ExitCode::from(1)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        JournalCommand::Archive => {
            for j in &journals {
                let moved = j.archive_history().await?;
                j.flush().await?;
                writeln!(out, "{}: moved {moved} event records into the history archive", j.name())?;
            }
            ExitCode::SUCCESS
        }
        JournalCommand::Replay(point) => {
            for j in &journals {
                replay(&mut out, args.format, registry, j, point).await?;
            }
            ExitCode::SUCCESS
        }
    };
    out.flush()?;
    Ok(code)
}

fn print_stats(out: &mut impl Write, format: Format, s: &JournalStats, disk: u64) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            let mut v = named(&s.name, s)?;
            v["store_bytes_on_disk"] = json!(disk);
            writeln!(out, "{v}")?
        }
        Format::Text => {
            writeln!(out, "journal      {}", s.name)?;
            writeln!(out, "keys         {}", s.keys)?;
            writeln!(out, "events       {} ({} of them in the history archive)", s.events, s.archived)?;
            writeln!(out, "snapshots    {}", s.snapshots)?;
            writeln!(out, "bytes        {} (its records)", s.bytes)?;
            writeln!(out, "batches      {}", s.batches)?;
            if let (Some(a), Some(b)) = (s.first_event_ms, s.last_event_ms) {
                writeln!(out, "time         {} .. {}", format_time(a), format_time(b))?;
            }
            if s.positions.is_empty() {
                writeln!(out, "positions    none")?;
            }
            for p in &s.positions {
                writeln!(out, "position     {}[{}] next offset {}", p.topic, p.partition, p.next_offset)?;
            }
            writeln!(out)?;
        }
    }
    Ok(())
}

/// Whether the store at `path`, or the files sled writes on open, are write-protected.
fn write_protected(path: &std::path::Path) -> bool {
    [path.to_path_buf(), path.join("sled"), path.join("sled").join("db"), path.join("marks"), path.join("archive")]
        .iter()
        .any(|p| std::fs::metadata(p).is_ok_and(|m| m.permissions().readonly()))
}

/// Copies the directory tree `from` to `to` (files and directories; the copies are writable).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            let mut perms = std::fs::metadata(&target)?.permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&target, perms)?;
        }
    }
    Ok(())
}

/// Whether a store failed to open because of what its files hold (damage), not because of the path
/// or the permissions.
fn unreadable_store(e: &eventstage_journal::JournalError) -> bool {
    use eventstage_journal::JournalError;
    match e {
        JournalError::Storage { .. } => true,
        JournalError::Io { source, .. } => {
            matches!(source.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData)
        }
        other => other.is_damage(),
    }
}

/// What is wrong with a store that does not open, without the advice to run `verify` (this is it).
fn unreadable(e: &eventstage_journal::JournalError) -> String {
    match e {
        eventstage_journal::JournalError::Damaged { what, .. } => what.clone(),
        other => other.to_string(),
    }
}

pub(super) fn print_report(out: &mut impl Write, format: Format, r: &VerifyReport) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            let mut v = named(&r.name, r)?;
            v["ok"] = json!(r.is_ok());
            writeln!(out, "{v}")?
        }
        Format::Text => {
            let verdict = if r.is_ok() { "ok".to_string() } else { format!("DAMAGED: {} problems", r.problems.len()) };
            writeln!(
                out,
                "journal {}: {} records checked ({} events, {} keys, {} snapshots): {verdict}",
                r.name, r.records, r.events, r.keys, r.snapshots
            )?;
            for p in &r.problems {
                writeln!(out, "  {p}")?;
            }
        }
    }
    Ok(())
}

/// Every JSON line the journal commands print names its journal the same way, `"journal": NAME`
/// (stats, verify, dump and replay alike), with the other fields beside it.
pub(super) fn named(name: &str, fields: impl serde::Serialize) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(fields)?;
    let map = v.as_object_mut().context("a journal report is not a JSON object")?;
    map.remove("name");
    map.insert("journal".into(), json!(name));
    Ok(v)
}

pub(super) fn event_line(
    format: Format,
    stage: Option<&dyn super::registry::ErasedStage>,
    journal: &str,
    e: &EventRecord,
) -> anyhow::Result<String> {
    let decoded = stage.map(|s| s.event_json(e));
    let key = printable_key(&e.key);
    let env = &e.envelope;
    Ok(match format {
        Format::Json => {
            let mut v = json!({
                "journal": journal, "key": key, "seq": e.seq.0, "time": format_time(env.timestamp_ms),
                "timestamp_ms": env.timestamp_ms, "codec": env.codec.name(), "type_version": env.type_version,
            });
            match decoded {
                Some(Ok(ev)) => v["event"] = ev,
                Some(Err(err)) => {
                    v["decode_error"] = json!(format!("{err:#}"));
                    v["payload_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&env.payload));
                }
                None => v["payload_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&env.payload)),
            }
            v.to_string()
        }
        Format::Text => {
            let body = match decoded {
                Some(Ok(ev)) => ev.to_string(),
                Some(Err(err)) => format!(
                    "<undecodable: {err:#}> base64:{}",
                    base64::engine::general_purpose::STANDARD.encode(&env.payload)
                ),
                None => format!("base64:{}", base64::engine::general_purpose::STANDARD.encode(&env.payload)),
            };
            format!(
                "{key:<16} {:>8}  {}  {}/v{}  {body}",
                e.seq.0,
                format_time(env.timestamp_ms),
                env.codec.name(),
                env.type_version
            )
        }
    })
}

async fn dump(
    out: &mut impl Write,
    format: Format,
    registry: &Registry,
    journal: &SledJournal,
    point: &PointArgs,
) -> anyhow::Result<u64> {
    let stage = registry.for_journal(journal.name());
    if stage.is_none() {
        tracing::warn!(journal = journal.name(), known = %registry.names(), "no stage of this name is compiled in; printing payloads as base64");
    }
    let bar = progress_bar(&format!("dumping {}", journal.name()));
    let mut stream = std::pin::pin!(journal.events(point.query()));
    let (mut printed, mut last): (u64, Option<(Vec<u8>, u64)>) = (0, None);
    // A dump that fails midway has printed part of the journal: say how far it got.
    let how_far = |printed: u64, last: &Option<(Vec<u8>, u64)>| {
        match last {
        Some((key, seq)) => format!(
            "journal `{}`: the dump stopped after {printed} events (the last printed: key {} seq {seq}); the events printed before are correct, the rest was not read",
            journal.name(),
            printable_key(key)
        ),
        None => format!("journal `{}`: the dump stopped before its first event", journal.name()),
    }
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| how_far(printed, &last))?;
        bar.inc(chunk.len() as u64);
        for e in &chunk {
            writeln!(
                out,
                "{}",
                event_line(format, stage, journal.name(), e).with_context(|| how_far(printed, &last))?
            )?;
            printed += 1;
            last = Some((e.key.clone(), e.seq.0));
        }
    }
    bar.finish_and_clear();
    Ok(printed)
}

async fn replay(
    out: &mut impl Write,
    format: Format,
    registry: &Registry,
    journal: &SledJournal,
    point: &PointArgs,
) -> anyhow::Result<()> {
    let Some(stage) = registry.for_journal(journal.name()) else {
        bail!(
            "no stage named `{}` is compiled into this binary (known: {}); use `journal dump` for envelope-level output, or register the stage in your own binary with eventstage::cli::Cli::new(..).stage::<YourStage>()",
            journal.name(),
            registry.names()
        );
    };
    let bar = progress_bar(&format!("replaying {}", journal.name()));
    let b = bar.clone();
    let entities = stage.rebuild(journal, point.query(), Progress::new(move |n| b.set_position(n))).await?;
    bar.finish_and_clear();
    for (key, seq, state) in entities {
        match format {
            Format::Json => {
                writeln!(out, "{}", json!({ "journal": journal.name(), "key": key, "seq": seq, "state": state }))?
            }
            Format::Text => writeln!(out, "{key:<16} {seq:>8}  {state}")?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod time_tests {
    use super::parse_time;

    #[test]
    fn times_with_offsets_epoch_units_and_ambiguity() {
        let utc = parse_time("2026-11-27T17:38:08Z").unwrap();
        assert_eq!(parse_time("2026-11-27T18:38:08+01:00"), Ok(utc));
        assert_eq!(parse_time("2026-11-27T12:38:08-05:00"), Ok(utc));
        assert_eq!(parse_time("2026-11-27T17:38:08.250Z"), Ok(utc + 250));
        assert_eq!(parse_time("1795801087s"), Ok(1_795_801_087_000));
        assert_eq!(parse_time("1795801087000ms"), Ok(1_795_801_087_000));
        assert_eq!(parse_time("1795801087000"), Ok(1_795_801_087_000));
        let ambiguous = parse_time("1795801087").unwrap_err();
        assert!(ambiguous.contains("1795801087s") && ambiguous.contains("ambiguous"), "{ambiguous}");
        let no_offset = parse_time("2026-11-27T17:38:08").unwrap_err();
        assert!(no_offset.contains("no UTC offset"), "{no_offset}");
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert!(parse_time("2026-11-27T18:38:08+1:00").is_err());
    }
}
