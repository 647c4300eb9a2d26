//! `verify` of the sled backend: walks every record and reports all damage, never stopping at the first.

use super::{be_u64, decode_group, lock, parse_event_key, parse_position, read, JournalInner, E, K, P, S};
use crate::error::{JournalError, Result};
use crate::keys::{decode_key, printable_key};
use crate::types::{Problem, Progress, VerifyReport};
use crate::{Envelope, RecordKind};
use std::collections::BTreeMap;

/// Stop collecting problems after this many (the count of the rest is still reported).
const MAX_PROBLEMS: usize = 10_000;

impl JournalInner {
    pub(super) fn verify_blocking(&self, progress: &Progress) -> Result<VerifyReport> {
        let mut report = VerifyReport { name: self.name.clone(), ..VerifyReport::default() };
        let mut problems = Problems::default();
        // Pass 0: the history archive, whose records are older than every record of their key in
        // sled. Each key's last seq is kept (memory follows the keys, not the history).
        let mut lasts: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        let archive = read(&self.archive);
        match archive.frames() {
            Err(e) => problems.push(Problem::general(e.to_string())),
            Ok(frames) => {
                for frame in frames {
                    let frame = match frame {
                        Ok(frame) => frame,
                        Err((at, what)) => {
                            problems.push(Problem::general(format!(
                                "history archive {} at byte {at}: {what}; the archived events from there on cannot be read",
                                archive.path().display()
                            )));
                            break;
                        }
                    };
                    report.records += 1;
                    if report.records % 4096 == 0 {
                        progress.report(report.records);
                    }
                    let expected = lasts.get(&frame.key).map_or(1, |l| l + 1);
                    check_event_record(&mut report, &mut problems, &frame.key, frame.seq, &frame.value, expected);
                    lasts.insert(frame.key, frame.seq);
                }
            }
        }
        // Pass 1: events in sled. Keys come in order, each key's seqs in order.
        let mut current: Option<(Vec<u8>, u64)> = None;
        let mut unread = None;
        for (k, v) in self.readable(E, "events", &mut unread) {
            report.records += 1;
            if report.records % 4096 == 0 {
                progress.report(report.records);
            }
            let Some((key, seq)) = parse_event_key(&k) else {
                report.events += 1;
                problems.push(Problem::general(format!("unparseable event storage key {}", printable_key(&k))));
                continue;
            };
            let expected = match &current {
                Some((ck, last)) if *ck == key => last + 1,
                _ => {
                    if let Some((ck, last)) = current.take() {
                        lasts.insert(ck, last);
                    }
                    lasts.get(&key).map_or(1, |l| l + 1)
                }
            };
            check_event_record(&mut report, &mut problems, &key, seq, &v, expected);
            current = Some((key, seq));
        }
        if let Some((ck, last)) = current.take() {
            lasts.insert(ck, last);
        }
        report.keys = lasts.len() as u64;
        // The checks below that need every key's last event are left out when sled could not read
        // them all: each key after the damage would be reported again.
        let events_read = unread.is_none();
        problems.extend(unread.take());
        // Pass 2: the head index must agree with the events.
        let mut heads = 0u64;
        for (k, v) in self.readable(K, "head index", &mut unread) {
            report.records += 1;
            heads += 1;
            let Some((key, _)) = decode_key(&k[1..]) else {
                problems.push(Problem::general(format!("unparseable head storage key {}", printable_key(&k))));
                continue;
            };
            let head = be_u64(&v);
            match (head, lasts.get(&key)) {
                (None, _) => problems.push(Problem::at(&key, None, "head index value is not 8 bytes")),
                _ if !events_read => {}
                (Some(h), Some(&l)) if h != l => problems.push(Problem::at(
                    &key,
                    Some(h),
                    format!("head index says the last event is {h}, the events end at {l}"),
                )),
                (Some(h), None) => problems.push(Problem::at(
                    &key,
                    Some(h),
                    "head index names a key with no events (its events are missing)",
                )),
                _ => {}
            }
        }
        let heads_read = unread.is_none();
        problems.extend(unread.take());
        if heads < report.keys && events_read && heads_read {
            problems
                .push(Problem::general(format!("{} keys have events but no head index entry", report.keys - heads)));
        }
        // Pass 3: snapshots.
        for (k, v) in self.readable(S, "snapshots", &mut unread) {
            report.records += 1;
            report.snapshots += 1;
            let Some((key, _)) = decode_key(&k[1..]) else {
                problems.push(Problem::general(format!("unparseable snapshot storage key {}", printable_key(&k))));
                continue;
            };
            match self.decode_snapshot(&key, &v) {
                Ok(s) if s.envelope.kind != RecordKind::Snapshot => {
                    problems.push(Problem::at(&key, Some(s.seq.0), "snapshot slot holds an event record"))
                }
                Ok(s) if events_read && lasts.get(&key).is_none_or(|&l| s.seq.0 > l) => {
                    problems.push(Problem::at(&key, Some(s.seq.0), "snapshot is ahead of the key's events"))
                }
                Ok(_) => {}
                Err(JournalError::Corrupt { seq, source, .. }) => {
                    problems.push(Problem::at(&key, Some(seq), format!("snapshot: {source}")))
                }
                Err(e) => problems.push(Problem::at(&key, None, e.to_string())),
            }
        }
        problems.extend(unread.take());
        // Pass 4: positions and the batch counter against the commit mark.
        for (k, v) in self.readable(P, "input positions", &mut unread) {
            report.records += 1;
            if parse_position(&k, &v).is_none() {
                problems.push(Problem::general(format!("unparseable position record {}", printable_key(&k))));
            }
        }
        problems.extend(unread.take());
        let found = *lock(&self.write);
        if self.marked > found {
            problems.push(Problem::general(format!(
                "committed batches {}..={} are missing: the commit mark says {} batches were committed, the store holds {found}",
                found + 1,
                self.marked,
                self.marked
            )));
        }
        if self.mark_missing && !self.store.mark_lost {
            problems.push(Problem::general(format!(
                "the commit mark is missing although the journal holds {found} committed batches: batches sled loses can no longer be detected; restore the marks directory from the same backup, or pass --mark-lost if you know it is gone"
            )));
        }
        progress.report(report.records);
        report.problems = problems.finish();
        Ok(report)
    }

    /// The records under `prefix`, in order, until one sled cannot read (damage in its files that
    /// it finds only on reading a page): that one becomes the problem left in `unread`, naming
    /// where the walk stopped, and the walk ends there (sled does not step past such a page).
    fn readable<'a>(
        &'a self,
        prefix: u8,
        part: &'a str,
        unread: &'a mut Option<Problem>,
    ) -> impl Iterator<Item = (sled::IVec, sled::IVec)> + 'a {
        let mut after: Option<sled::IVec> = None;
        self.tree.scan_prefix([prefix]).map_while(move |item| match item {
            Ok((k, v)) => {
                after = Some(k.clone());
                Some((k, v))
            }
            Err(e) => {
                let from = match after.as_deref() {
                    None => "from the first on".to_string(),
                    Some(k) => match parse_event_key(k) {
                        Some((key, seq)) => format!("after key {} seq {seq}", printable_key(&key)),
                        None => match decode_key(&k[1..]) {
                            Some((key, _)) => format!("after key {}", printable_key(&key)),
                            None => format!("after storage key {}", printable_key(k)),
                        },
                    },
                };
                // sled's own text of a corruption ends in a backtrace placeholder.
                let why = match e {
                    sled::Error::Corruption { at: Some(at), .. } => format!("corrupted data in its files at {at:?}"),
                    sled::Error::Corruption { at: None, .. } => "corrupted data in its files".into(),
                    other => other.to_string(),
                };
                *unread = Some(Problem::general(format!(
                    "{part}: sled cannot read the records {from} ({why}); they were not checked: restore the journal from a backup"
                )));
                None
            }
        })
    }
}

/// Checks one stored event record (one event, or a group) of `key` under `seq`, the key's next
/// expected seq being `expected`.
fn check_event_record(
    report: &mut VerifyReport,
    problems: &mut Problems,
    key: &[u8],
    seq: u64,
    v: &[u8],
    expected: u64,
) {
    // The seqs this record holds: one, or a group's (unknown when a group is damaged: it
    // may cover the seqs before it, so no gap is reported for it).
    let mut first = Some(seq);
    match Envelope::check(v) {
        Ok(h) if h.kind == RecordKind::Events => match decode_group(v, seq) {
            Ok(group) => {
                report.events += group.len() as u64;
                first = group.first().map(|(s, _)| *s);
            }
            Err(what) => {
                report.events += 1;
                first = None;
                problems.push(Problem::at(key, Some(seq), what));
            }
        },
        Ok(h) if h.kind != RecordKind::Event => {
            report.events += 1;
            problems.push(Problem::at(key, Some(seq), "a snapshot record stored as an event"))
        }
        Ok(_) => report.events += 1,
        Err(e) => {
            report.events += 1;
            if v.get(3) == Some(&(RecordKind::Events as u8)) {
                first = None;
            }
            problems.push(Problem::at(key, Some(seq), e.to_string()))
        }
    }
    match first {
        Some(first) if first != expected => {
            let what = if first > expected {
                format!("sequence gap: events {expected}..={} are missing", first - 1)
            } else {
                format!("sequence out of order: expected {expected}")
            };
            problems.push(Problem::at(key, Some(first), what));
        }
        None if seq < expected => {
            problems.push(Problem::at(key, Some(seq), format!("sequence out of order: expected {expected}")))
        }
        _ => {}
    }
}

#[derive(Default)]
struct Problems {
    list: Vec<Problem>,
    dropped: u64,
}

impl Problems {
    fn push(&mut self, p: Problem) {
        if self.list.len() < MAX_PROBLEMS {
            self.list.push(p);
        } else {
            self.dropped += 1;
        }
    }

    fn extend(&mut self, more: impl IntoIterator<Item = Problem>) {
        for p in more {
            self.push(p);
        }
    }

    fn finish(mut self) -> Vec<Problem> {
        if self.dropped > 0 {
            self.list.push(Problem::general(format!("... and {} more problems", self.dropped)));
        }
        self.list
    }
}
