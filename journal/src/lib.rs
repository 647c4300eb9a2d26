//! # eventstage-journal
//!
//! The bytes-level event journal under [eventstage](https://docs.rs/eventstage): it stores opaque,
//! keyed records and knows nothing of stages, commands or codecs beyond an id in each record.
//!
//! - [`Journal`]: atomic batch append (events of many keys, snapshots and the source positions that
//!   produced them, in one write), per-key sequence numbers, replay of one key or of everything,
//!   recovery (latest snapshot plus tail per key), positions, stats and verification.
//! - [`Envelope`]: every stored record is wrapped in magic, format version, kind, codec id, type
//!   version, timestamp, length and CRC32, so damage is detected and located, never replayed.
//! - Backends: [`MemoryJournal`] (tests, always built) and [`SledJournal`] (feature `sled`, default):
//!   an embedded, durable store with group-commit friendly flushing and a commit mark that notices when
//!   the storage engine silently dropped committed batches.
//! - [`testkit`] (feature `testkit`): the conformance suite every backend runs.
//!
//! | feature   | default | what it adds |
//! |-----------|---------|--------------|
//! | `sled`    | yes     | [`SledJournal`], [`SledStore`] |
//! | `kafka`   | no      | [`KafkaJournal`]: a compacted topic as a journal, written inside flow transactions |
//! | `testkit` | no      | [`testkit`]: conformance suite and proptest strategies |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(clippy::unwrap_used)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]

mod envelope;
mod error;
#[cfg_attr(not(feature = "sled"), allow(dead_code))]
mod keys;
mod memory;
#[cfg_attr(not(feature = "sled"), allow(dead_code))]
mod stream;
mod types;

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "sled")]
mod mark;
#[cfg(feature = "sled")]
mod sled_store;
#[cfg(feature = "testkit")]
pub mod testkit;

#[cfg(feature = "sled")]
pub use crate::sled_store::{SledJournal, SledStore, SledStoreBuilder, DEFAULT_ARCHIVE_AFTER, STORE_FORMAT_VERSION};
pub use envelope::{CodecId, Envelope, Header, RecordKind, FORMAT_VERSION, HEADER_LEN, MAGIC};
pub use error::{EnvelopeError, JournalError, Result};
#[cfg(feature = "kafka")]
pub use kafka::{Claim, JournalEntry, KafkaJournal, RestoreStats};
pub use keys::printable_key;
pub use memory::MemoryJournal;
pub use types::{
    Batch, Committed, EventQuery, EventRecord, JournalStats, Problem, Progress, Recovered, SeqNo, SnapshotRecord,
    SourcePosition, VerifyReport,
};

use futures::Stream;
use std::future::Future;

/// A bytes-level event journal.
///
/// Implementations store [`EventRecord`]s per key with contiguous sequence numbers starting at 1,
/// at most one (the latest) [`SnapshotRecord`] per key, and the latest [`SourcePosition`] per
/// `(topic, partition)`. [`append`](Journal::append) is atomic: after any crash a journal holds a
/// prefix of its whole batches, never part of one.
///
/// Streams yield records in bounded chunks, so replaying a key with millions of events never holds
/// them all in memory; they must be polled inside a tokio runtime.
pub trait Journal: Send + Sync + 'static {
    /// The journal's name (the stage it belongs to, plus a partition suffix in flows).
    fn name(&self) -> &str;

    /// Appends a batch atomically. Each key's events must continue its sequence (the first event of a
    /// new key has seq 1); otherwise nothing is written and [`JournalError::SequenceConflict`] is
    /// returned. The batch is applied when this returns; it is durable after [`flush`](Journal::flush).
    fn append(&self, batch: Batch) -> impl Future<Output = Result<Committed>> + Send;

    /// Makes every applied batch durable (fsync). Concurrent flushes are coalesced by the backend.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// Events matching `query`, in key order, then sequence order.
    fn events(&self, query: EventQuery) -> impl Stream<Item = Result<Vec<EventRecord>>> + Send + 'static;

    /// Everything needed to rebuild the state: per key (in key order), its latest snapshot if any,
    /// then the events after it.
    fn recover(&self) -> impl Stream<Item = Result<Vec<Recovered>>> + Send + 'static;

    /// What [`recover`](Journal::recover) yields for the given keys only, in the order given: per
    /// key, its latest snapshot if any, then the events after it; a key without events yields
    /// nothing. A runtime that holds only some keys in memory reads a key with this when it is
    /// first used, so its cost follows the keys asked for (a seek per key), not the journal.
    fn recover_keys(&self, keys: Vec<Vec<u8>>) -> impl Stream<Item = Result<Vec<Recovered>>> + Send + 'static;

    /// The number of keys with at least one event. May read the journal's whole key index.
    fn key_count(&self) -> impl Future<Output = Result<u64>> + Send;

    /// The last stored source position of every `(topic, partition)`.
    fn positions(&self) -> impl Future<Output = Result<Vec<SourcePosition>>> + Send;

    /// The metadata value stored under `key` by [`Batch::meta`], if any.
    fn meta(&self, key: &[u8]) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;

    /// Counts and sizes.
    fn stats(&self) -> impl Future<Output = Result<JournalStats>> + Send;

    /// Checks every record (CRC, sequence continuity, indexes) and reports all problems found;
    /// `progress` is called with the number of records checked so far.
    fn verify(&self, progress: Progress) -> impl Future<Output = Result<VerifyReport>> + Send;
}
