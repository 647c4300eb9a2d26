//! Helpers shared by the benchmark targets (`mod shared;` in each). Not every target uses every
//! helper, hence the `dead_code` allowance.
#![allow(dead_code)]

use eventstage::journal::{Batch, CodecId, Envelope, EventRecord, Journal, SeqNo, SledJournal, SnapshotRecord};
use eventstage::Codec;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A multi-threaded tokio runtime sized for the machine (the stage runtime's writer, the clients and
/// sled's blocking calls share it).
pub fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("build the tokio runtime")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The entity key of account / entity number `i`.
pub fn key(i: usize) -> String {
    format!("key-{i:06}")
}

/// An event record with an opaque payload.
pub fn raw_event(key: &str, seq: u64, ts: u64, payload: Vec<u8>) -> EventRecord {
    EventRecord {
        key: key.as_bytes().to_vec(),
        seq: SeqNo(seq),
        envelope: Envelope::event(CodecId::RAW, 1, ts, payload),
    }
}

/// An event record holding `event` encoded with bincode, as the stage runtime writes it.
pub fn bincode_event<E: Serialize>(key: &str, seq: u64, ts: u64, type_version: u16, event: &E) -> EventRecord {
    let payload = Codec::Bincode.encode(event).expect("bincode-encode an event");
    EventRecord {
        key: key.as_bytes().to_vec(),
        seq: SeqNo(seq),
        envelope: Envelope::event(CodecId::BINCODE, type_version, ts, payload),
    }
}

/// A snapshot record holding `state` encoded with bincode, as the stage runtime writes it.
pub fn bincode_snapshot<T: Serialize>(key: &str, seq: u64, ts: u64, type_version: u16, state: &T) -> SnapshotRecord {
    let payload = Codec::Bincode.encode(state).expect("bincode-encode a snapshot");
    SnapshotRecord {
        key: key.as_bytes().to_vec(),
        seq: SeqNo(seq),
        envelope: Envelope::snapshot(CodecId::BINCODE, type_version, ts, payload),
    }
}

/// Appends every batch, then flushes once.
pub async fn write_all(journal: &SledJournal, batches: impl IntoIterator<Item = Batch>) {
    for batch in batches {
        journal.append(batch).await.expect("append a batch while populating");
    }
    journal.flush().await.expect("flush the populated journal");
}

/// A small deterministic pseudo-random generator (splitmix64), so datasets are the same every run.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Where criterion writes its results: `$CRITERION_HOME`, `$CARGO_TARGET_DIR/criterion`, or the
/// `criterion` directory next to `release/` above this executable (`target/release/deps/<bench>`).
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

/// The time per iteration criterion measured for `group/function` (plain ASCII names without
/// `/`) since `since`, if it can be read back from criterion's `new/estimates.json` (not when the
/// benchmark was filtered out or run in `--test` mode: the file is then older or missing).
pub fn measured_mean(group: &str, function: &str, since: SystemTime) -> Option<Duration> {
    let path = criterion_dir()?.join(group).join(function).join("new").join("estimates.json");
    if std::fs::metadata(&path).and_then(|m| m.modified()).ok()? < since {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    // The figure criterion prints: the slope (linear sampling), else the mean (flat sampling).
    let estimate = |name: &str| json.get(name)?.get("point_estimate")?.as_f64();
    let ns = estimate("slope").or_else(|| estimate("mean"))?;
    Some(Duration::from_secs_f64(ns / 1e9))
}

/// `elements` per `time`, per second.
pub fn per_second(elements: u64, time: Duration) -> f64 {
    elements as f64 / time.as_secs_f64()
}

/// A rate for humans: `1.23 M/s`.
pub fn rate(per_second: f64) -> String {
    if per_second >= 1e6 {
        format!("{:.2} M/s", per_second / 1e6)
    } else if per_second >= 1e3 {
        format!("{:.1} K/s", per_second / 1e3)
    } else {
        format!("{per_second:.0} /s")
    }
}

/// Bytes of the files under `path`, all the way down.
pub fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
