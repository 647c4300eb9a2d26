//! Errors of the journal crate.

use std::path::PathBuf;

/// What is wrong with the bytes of one envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Fewer bytes than a header.
    #[error("record is truncated: {len} bytes, a header alone needs {needed}")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The record does not start with the envelope magic.
    #[error("record does not start with the eventstage magic \"ES\" (found {found:02x?})")]
    BadMagic {
        /// The first two bytes.
        found: [u8; 2],
    },
    /// Written by a newer eventstage.
    #[error("record has envelope format version {found}, this build reads up to {supported}: upgrade eventstage")]
    NewerFormat {
        /// Version in the record.
        found: u8,
        /// Newest version this build reads.
        supported: u8,
    },
    /// An invalid format version.
    #[error("record has invalid envelope format version {found}")]
    BadFormat {
        /// Version in the record.
        found: u8,
    },
    /// The length field disagrees with the bytes present.
    #[error("record length mismatch: header says {declared} payload bytes, {actual} present")]
    LengthMismatch {
        /// Length in the header.
        declared: usize,
        /// Length present.
        actual: usize,
    },
    /// The checksum does not match: the bytes were damaged.
    #[error("record checksum mismatch (stored {stored:08x}, computed {computed:08x}): the bytes are damaged")]
    CrcMismatch {
        /// CRC in the record.
        stored: u32,
        /// CRC of the bytes present.
        computed: u32,
    },
    /// An unknown record kind.
    #[error("record has unknown kind {0}")]
    UnknownKind(u8),
    /// The reserved header byte is not 0: a flag this build does not know (a newer writer, or bytes
    /// that are not an eventstage record).
    #[error("record sets the reserved header byte to {found:#04x} (this build reads only 0): written by a newer eventstage, or not by eventstage")]
    Reserved {
        /// The byte in the record.
        found: u8,
    },
}

/// Errors of journal operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// A stored record failed its checks. Nothing is skipped: the read stops here.
    #[error("journal `{journal}`: record of key {key} seq {seq} is unreadable: {source}. Run `eventstage journal verify` to list all damage, then restore the journal from a backup")]
    Corrupt {
        /// Journal name.
        journal: String,
        /// Entity key, printed.
        key: String,
        /// Sequence number (0 when unknown).
        seq: u64,
        /// What is wrong.
        source: EnvelopeError,
    },
    /// A stored record is damaged in a way the envelope cannot describe (bad storage key, bad index).
    #[error("journal `{journal}` is damaged: {what}. Run `eventstage journal verify` to list all damage, then restore the journal from a backup")]
    Damaged {
        /// Journal name.
        journal: String,
        /// What is wrong.
        what: String,
    },
    /// Committed batches are gone: the storage engine dropped part of its log.
    #[error("journal `{journal}` at {path} has lost committed batches: its commit mark says batch {marked} was committed, the store holds only up to batch {found}. The storage files were damaged or replaced by an older copy; restore them from a backup (nothing was written since)")]
    MissingBatches {
        /// Journal name.
        journal: String,
        /// Journal directory.
        path: PathBuf,
        /// Last batch recorded by the commit mark.
        marked: u64,
        /// Last batch found in the store.
        found: u64,
    },
    /// An append's sequence numbers do not continue the key's history.
    #[error("journal `{journal}`: key {key} expected seq {expected}, the batch carries {found} (another writer, or a stale state)")]
    SequenceConflict {
        /// Journal name.
        journal: String,
        /// Entity key, printed.
        key: String,
        /// The next sequence number the journal expects.
        expected: u64,
        /// The one the batch carries.
        found: u64,
    },
    /// The path is not an eventstage journal.
    #[error(
        "{path} is not an eventstage journal ({why}); pass the directory a stage or `eventstage demo --data` wrote"
    )]
    NotAJournal {
        /// The path given.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Written by a newer eventstage.
    #[error("journal at {path} has format version {found}; this build reads up to {supported}: upgrade eventstage")]
    NewerFormat {
        /// The path given.
        path: PathBuf,
        /// Version on disk.
        found: u32,
        /// Newest this build reads.
        supported: u32,
    },
    /// A Kafka journal another consumer group owns (see `KafkaJournal::claim`).
    #[error("the journal topic `{journal}` belongs to consumer group `{owner}` (recorded in the topic `{registry}`); this flow's group is `{group}`. Two applications on one journal apply each other's inputs on top of each other's state: give this flow a journal of its own (the default is named after the group), or, if group `{group}` replaces `{owner}`, take the journal over (FlowBuilder::take_over_journal, `eventstage demo --take-over-journal`): it continues from the journal's state and from `{owner}`'s committed input offsets")]
    Foreign {
        /// The journal topic.
        journal: String,
        /// The group that owns it.
        owner: String,
        /// The group that opened it.
        group: String,
        /// The topic recording the owners.
        registry: String,
    },
    /// No journal of that name in the store.
    #[error("no journal named `{name}` at {path}; journals there: {available}")]
    UnknownJournal {
        /// Name asked for.
        name: String,
        /// Store path.
        path: PathBuf,
        /// Comma-separated names present.
        available: String,
    },
    /// The storage engine failed.
    #[error("storage engine error on journal at {path}: {message}")]
    Storage {
        /// Store path.
        path: PathBuf,
        /// The engine's message.
        message: String,
    },
    /// Filesystem error.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The journal was closed or its background worker stopped.
    #[error("journal `{0}` is closed")]
    Closed(String),
}

impl JournalError {
    /// True when retrying the same operation later may succeed (storage hiccups), false when the data
    /// or the request is wrong.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Storage { .. } | Self::Io { .. })
    }

    /// True when the journal's contents are damaged or missing: stop and tell an operator.
    pub fn is_damage(&self) -> bool {
        matches!(self, Self::Corrupt { .. } | Self::Damaged { .. } | Self::MissingBatches { .. })
    }
}

/// `Result` with [`JournalError`].
pub type Result<T, E = JournalError> = std::result::Result<T, E>;
