//! What the local state store, its follower and the checkpoints share: the settings, the
//! follower's commands, a loaded checkpoint.

use super::store::Rows;
pub(crate) use super::store::StoreMemory;
use crate::flow::error::FlowError;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

/// How long closing the store waits for the follower to read the journal up to its end.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which journal partitions an instance keeps current in its local state store besides those it
/// owns (standby replicas, see [`FlowBuilder::standby`](crate::flow::FlowBuilder::standby)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Standby {
    /// None: a partition that goes to another instance is read up to the end of what was committed
    /// before it went, then left. Getting it back reads what the other instance wrote since.
    #[default]
    None,
    /// The partitions this instance owned before (in this process or, from its store, an earlier
    /// one): followed on after they went, until the retention drops them. Getting one back, after
    /// a rebalance or a crash of its new owner, reads almost nothing. Costs one journal reader and
    /// the sled writes of those partitions.
    Recent,
    /// Every partition of the journal, from the start: any takeover reads almost nothing, at the
    /// price of every instance reading and storing the whole journal (for small state, or few
    /// instances).
    All,
}

/// How the local state store is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreSettings {
    pub(crate) dir: PathBuf,
    /// Rows of partitions this instance no longer holds are dropped after this long.
    pub(crate) retention: Duration,
    /// A checkpoint is written at least this often while the journal changes.
    pub(crate) interval: Duration,
    pub(crate) standby: Standby,
    /// What the store may hold in memory.
    pub(crate) memory: StoreMemory,
}

/// A partition's checkpoint, for a restore.
pub(crate) struct Loaded {
    /// The newest entry per key as of the checkpoint (perhaps newer: see the module docs), read
    /// when a key is first used (`None`: nothing stored).
    pub(crate) rows: Option<Rows>,
    /// The journal offset to read the tail from.
    pub(crate) from: i64,
}

impl Loaded {
    pub(super) fn empty() -> Self {
        Self { rows: None, from: 0 }
    }
}

pub(super) fn config_err(dir: &Path, message: impl std::fmt::Display) -> FlowError {
    FlowError::Config(format!("state directory {}: {message}", dir.display()))
}

pub(super) enum Command {
    /// Keep partition `p`'s checkpoint current: it is assigned here.
    Follow(i32),
    /// As `Follow`, for a restore that waits for the store to have partition `p` up to its end:
    /// its rows are written as soon as the end is reached, not at the next checkpoint.
    Restore(i32),
    /// Keep partition `p`'s checkpoint current: it is assigned here, to a flow that hands over the
    /// rows of each transaction it commits (exactly once, see [`Command::Rows`]). The journal is
    /// read up to `until` (the end of what the restore read: records from there on are the flow's
    /// own), and from then on the flow's rows are written.
    Own(i32, i64),
    /// The records of partition `p` of a transaction the flow committed, in the order written, and
    /// the journal offset they are all below (the newest acknowledged record of the partition).
    Rows(i32, Arc<Vec<JournalRecord>>, i64),
    /// Keep partition `p`'s checkpoint current: a standby (it may be owned elsewhere).
    Standby(i32),
    /// Partition `p` went to another instance: read it up to its end when it went (taken on the
    /// flow thread; `None`: it could not be, take it now), then let go.
    Release(i32, Option<i64>),
    /// Read every followed partition up to its end as of now, write, and stop.
    Close(Sender<()>),
    /// Write what was read, and stop (the flow failed or was aborted).
    Quit,
    /// Stop following partition `p` and drop its rows and checkpoint; answer when done.
    Reset(i32, Sender<()>),
}

/// A journal record: key, value (`None`: a tombstone).
pub(crate) type JournalRecord = (Vec<u8>, Option<Vec<u8>>);

/// The partitions the flow owns (see [`Checkpoints::owned`]).
pub(super) type Owned = Arc<std::sync::Mutex<std::collections::BTreeSet<i32>>>;
