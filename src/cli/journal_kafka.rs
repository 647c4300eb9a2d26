//! `eventstage journal stats|verify|dump|replay --journal kafka:TOPIC --brokers ...`: a flow's
//! Kafka journal (a compacted topic: each record holds a key's events of one transaction and its
//! state after them), read with `read_committed` from its start to its end as of now.

use super::journal::{event_line, print_report, JournalArgs, JournalCommand, PointArgs};
use super::registry::Registry;
use super::{progress_bar, Format};
use anyhow::{bail, Context};
use eventstage_journal::{printable_key, EventRecord, JournalEntry, KafkaJournal, Problem, SeqNo, VerifyReport};
use rdkafka::ClientConfig;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::time::Duration;

/// How long a scan may see no record before it gives up.
const STALL: Duration = Duration::from_secs(30);

/// A key as the scan leaves it: its newest entry's last seq and state, or deleted.
struct Latest {
    seq: u64,
    state: Option<eventstage_journal::Envelope>,
}

/// Runs a `journal` command on the Kafka journal `topic`.
///
/// # Errors
/// No `--brokers`, an unreachable cluster, a missing topic, or (except `verify`, which reports it)
/// a record that does not decode.
pub(super) async fn run(registry: &Registry, args: &JournalArgs, topic: &str) -> anyhow::Result<ExitCode> {
    let brokers = args
        .brokers
        .clone()
        .with_context(|| format!("--journal kafka:{topic} needs --brokers HOST:PORT (or EVENTSTAGE_BROKERS)"))?;
    let name = format!("kafka:{topic}");
    // The stage decodes events and states: the one --stage names, else the only one registered,
    // else the one an application's journal name ends with. Checked before the cluster is asked
    // anything.
    let chosen = registry.for_kafka_journal(args.stage.as_deref(), topic)?;
    let stage = chosen.map(|(_, stage)| stage);
    if let JournalCommand::Replay(point) = &args.command {
        if stage.is_none() {
            bail!("replay of a Kafka journal needs --stage NAME to read its states ({})", registry.choices());
        }
        if point.until_seq.is_some() || point.until_time.is_some() {
            bail!("a Kafka journal is compacted: it keeps each key's newest entry, not its history, so replay reads the newest state; --until-seq and --until-time apply to sled journals (`journal dump` shows the events still in the topic)");
        }
    }
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &brokers);
    let journal = {
        let owned = topic.to_string();
        tokio::task::spawn_blocking(move || KafkaJournal::existing(config, &owned, Duration::from_secs(10)))
            .await?
            .with_context(|| format!("cannot open the Kafka journal `{topic}` on {brokers}"))?
    };
    let partitions: Vec<(i32, i64)> = (0..journal.partitions()).map(|p| (p, 0)).collect();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let bar = progress_bar(&format!("reading {topic}"));
    let code = match &args.command {
        JournalCommand::Verify => {
            let mut report = VerifyReport { name: name.clone(), ..VerifyReport::default() };
            let mut seqs: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            let b = bar.clone();
            let scanned = scan(&journal, &partitions, |p, offset, key, value| {
                b.inc(1);
                report.records += 1;
                let Some(value) = value else {
                    seqs.remove(key);
                    return;
                };
                match JournalEntry::decode(value) {
                    Ok(entry) => {
                        report.events += entry.events.len() as u64;
                        report.snapshots += u64::from(entry.state.is_some());
                        // Compaction removes older entries, so seqs may jump; never go back.
                        let seq = entry.last_seq.0;
                        if let Some(&before) = seqs.get(key) {
                            if seq < before {
                                report.problems.push(Problem::at(
                                    key,
                                    Some(seq),
                                    format!("partition {p} offset {offset}: seq goes back from {before}"),
                                ));
                            }
                        }
                        seqs.insert(key.to_vec(), seq);
                    }
                    Err(e) => report.problems.push(Problem::at(
                        key,
                        None,
                        format!("partition {p} offset {offset}: the record does not decode: {e}"),
                    )),
                }
            })
            .await;
            bar.finish_and_clear();
            scanned?;
            report.keys = seqs.len() as u64;
            print_report(&mut out, args.format, &report)?;
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        JournalCommand::Stats => {
            let (mut records, mut tombstones, mut events, mut bytes) = (0u64, 0u64, 0u64, 0u64);
            let mut latest: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            let b = bar.clone();
            let mut failure = None;
            let scanned = scan(&journal, &partitions, |_, offset, key, value| {
                b.inc(1);
                records += 1;
                match value {
                    None => {
                        tombstones += 1;
                        latest.remove(key);
                    }
                    Some(v) => {
                        bytes += v.len() as u64;
                        match JournalEntry::decode(v) {
                            Ok(entry) => {
                                events += entry.events.len() as u64;
                                latest.insert(key.to_vec(), entry.last_seq.0);
                            }
                            Err(e) if failure.is_none() => {
                                failure = Some(format!("key {} at offset {offset}: {e}", printable_key(key)))
                            }
                            Err(_) => {}
                        }
                    }
                }
            })
            .await;
            bar.finish_and_clear();
            scanned?;
            if let Some(f) = failure {
                bail!("a record of {name} does not decode ({f}); `journal verify` lists every one");
            }
            match args.format {
                Format::Json => writeln!(
                    out,
                    "{}",
                    json!({ "journal": name, "partitions": journal.partitions(), "keys": latest.len(),
                        "records": records, "tombstones": tombstones, "events": events, "bytes": bytes })
                )?,
                Format::Text => {
                    writeln!(out, "journal      {name}")?;
                    writeln!(out, "partitions   {}", journal.partitions())?;
                    writeln!(out, "keys         {} (with an entry, not deleted)", latest.len())?;
                    writeln!(
                        out,
                        "records      {records} ({tombstones} tombstones; compaction keeps each key's newest)"
                    )?;
                    writeln!(out, "events       {events} (in the records still in the topic)")?;
                    writeln!(out, "bytes        {bytes} (record values)")?;
                }
            }
            ExitCode::SUCCESS
        }
        JournalCommand::Dump(d) => {
            let point = PointArgs { from_seq: d.from_seq, ..d.point.clone() };
            let query = point.query();
            let stage_name = chosen.map_or_else(|| name.clone(), |(stage, _)| stage.to_string());
            if stage.is_none() {
                tracing::warn!(journal = %name, "no --stage given ({}); printing payloads as base64", registry.choices());
            }
            let (mut printed, mut failure) = (0u64, None);
            let b = bar.clone();
            let mut lines = Vec::new();
            let scanned = scan(&journal, &partitions, |_, offset, key, value| {
                b.inc(1);
                let Some(v) = value else { return };
                if query.key.as_deref().is_some_and(|k| k != key) || failure.is_some() {
                    return;
                }
                let entry = match JournalEntry::decode(v) {
                    Ok(entry) => entry,
                    Err(e) => {
                        failure = Some(format!("key {} at offset {offset}: {e}", printable_key(key)));
                        return;
                    }
                };
                let first = entry.last_seq.0 + 1 - entry.events.len() as u64;
                for (i, envelope) in entry.events.into_iter().enumerate() {
                    let seq = SeqNo(first + i as u64);
                    if seq < query.from_seq || query.is_past(seq, envelope.timestamp_ms) {
                        continue;
                    }
                    let rec = EventRecord { key: key.to_vec(), seq, envelope };
                    lines.push(event_line(args.format, stage, &stage_name, &rec));
                }
            })
            .await;
            bar.finish_and_clear();
            scanned?;
            for line in lines {
                writeln!(out, "{}", line?)?;
                printed += 1;
            }
            if let Some(f) = failure {
                out.flush()?;
                bail!("a record of {name} does not decode ({f}) after {printed} events were printed; `journal verify` lists every damaged record");
            }
            match &point.key {
                Some(key) if printed == 0 => {
                    out.flush()?;
                    eprintln!("no events of key `{key}` in {name} (within the range asked for); compaction keeps each key's newest entry only");
                    ExitCode::from(1)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        JournalCommand::Replay(point) => {
            let Some(stage) = stage else { unreachable!("checked above") };
            let mut latest: BTreeMap<Vec<u8>, Latest> = BTreeMap::new();
            let mut failure = None;
            let b = bar.clone();
            let scanned = scan(&journal, &partitions, |_, offset, key, value| {
                b.inc(1);
                if point.key.as_deref().is_some_and(|k| k.as_bytes() != key) {
                    return;
                }
                match value.map(JournalEntry::decode) {
                    None => {
                        latest.remove(key);
                    }
                    Some(Ok(entry)) => {
                        latest.insert(key.to_vec(), Latest { seq: entry.last_seq.0, state: entry.state });
                    }
                    Some(Err(e)) if failure.is_none() => {
                        failure = Some(format!("key {} at offset {offset}: {e}", printable_key(key)))
                    }
                    Some(Err(_)) => {}
                }
            })
            .await;
            bar.finish_and_clear();
            scanned?;
            if let Some(f) = failure {
                bail!("a record of {name} does not decode ({f}); `journal verify` lists every one");
            }
            for (key, l) in &latest {
                // An entry without state and with positions marks a deleted entity.
                let Some(env) = &l.state else { continue };
                let state =
                    stage.state_json(env).with_context(|| format!("the state of key {}", printable_key(key)))?;
                let key = printable_key(key);
                match args.format {
                    Format::Json => {
                        writeln!(out, "{}", json!({ "journal": name, "key": key, "seq": l.seq, "state": state }))?
                    }
                    Format::Text => writeln!(out, "{key:<16} {:>8}  {state}", l.seq)?,
                }
            }
            ExitCode::SUCCESS
        }
        JournalCommand::Archive => {
            bail!("`journal archive` applies to sled journals; a Kafka journal is compacted by the broker")
        }
    };
    out.flush()?;
    Ok(code)
}

/// Scans every record of `partitions` off the async runtime.
async fn scan<F>(journal: &KafkaJournal, partitions: &[(i32, i64)], on_record: F) -> anyhow::Result<()>
where
    F: FnMut(i32, i64, &[u8], Option<&[u8]>),
{
    let mut on_record = on_record;
    // The scan blocks on the consumer; block_in_place keeps the callback's borrows.
    tokio::task::block_in_place(|| {
        journal.scan(partitions, STALL, |p, offset, key, value| {
            on_record(p, offset, key, value);
            Ok(())
        })
    })
    .with_context(|| format!("reading the Kafka journal `{}`", journal.topic()))?;
    Ok(())
}
