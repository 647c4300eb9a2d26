//! Errors of the stage runtime. Domain rejections are not errors: they are the stage's own typed
//! `Rejection`, returned inside `Ok` (see [`crate::StageHandle::ask`]).

use crate::codec::CodecError;
use eventstage_journal::JournalError;

/// Infrastructure failures of eventstage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A stored record could not be decoded into the stage's types.
    #[error("stage `{stage}`: record of key {key} seq {seq} does not decode: {source}. Was it written by another stage or an incompatible version of this one? Add an upcast for its type version, or open the right stage")]
    Decode {
        /// Stage name.
        stage: String,
        /// Entity key, printed.
        key: String,
        /// Sequence number.
        seq: u64,
        /// Why.
        source: CodecError,
    },
    /// An event or state could not be encoded, or would not read back from what was encoded
    /// ([`CodecError::Unreadable`]): nothing was persisted.
    #[error("stage `{stage}`: refused to persist for key {key}: {source}")]
    Encode {
        /// Stage name.
        stage: String,
        /// Entity key, printed.
        key: String,
        /// Why.
        source: CodecError,
    },
    /// A stored key does not decode into the stage's key type.
    #[error("stage `{stage}`: journal key {key} is not a valid key for this stage")]
    BadKey {
        /// Stage name.
        stage: String,
        /// The key, printed.
        key: String,
    },
    /// The command or event handler panicked. The command had no effect.
    #[error("stage `{stage}`: handler panicked on key {key}: {message}; the command had no effect")]
    HandlerPanicked {
        /// Stage name.
        stage: String,
        /// Entity key, printed.
        key: String,
        /// The panic message.
        message: String,
    },
    /// The command's effect scheduled or cancelled a durable timer, which the in-process runtime
    /// does not keep. The command had no effect.
    #[error("stage `{stage}`: the command for key {key} schedules or cancels a timer; durable timers run in the flows of an Application (eventstage::flow::Application), the in-process runtime has none; the command had no effect")]
    Timers {
        /// Stage name.
        stage: String,
        /// Entity key, printed.
        key: String,
    },
    /// The runtime stopped after a journal failure: the in-memory state may be ahead of the journal,
    /// so it refuses further commands. Reopen the stage to recover the journal's state.
    #[error("stage `{stage}` stopped after a journal failure ({cause}); reopen it to recover")]
    Stopped {
        /// Stage name.
        stage: String,
        /// The failure that stopped it.
        cause: String,
    },
    /// A stage runtime with a state cache could not read a key's state from its journal (damage,
    /// a record that does not decode, a storage failure): the command had no effect. Commands to
    /// other keys go on.
    #[error("stage `{stage}`: the state of key {key} cannot be read from the journal ({cause}); the command had no effect. Run `eventstage journal verify` on the journal to find the damage")]
    Unreadable {
        /// Stage name.
        stage: String,
        /// Entity key, printed.
        key: String,
        /// Why.
        cause: String,
    },
    /// The runtime was shut down.
    #[error("stage `{0}` is shut down")]
    Closed(String),
}

impl Error {
    /// True when the same request may succeed later without anyone changing anything.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Journal(e) if e.is_retriable())
    }

    /// True when the stage cannot go on and must be reopened (or the journal repaired).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Stopped { .. } | Self::Decode { .. } | Self::BadKey { .. })
            || matches!(self, Self::Journal(e) if e.is_damage())
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
