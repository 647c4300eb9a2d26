//! What the local stores of flows and tables have in common: how their fjall keyspaces of rows
//! are configured.

/// The options of a keyspace of rows read by key, with memtables of `memtable` bytes.
///
/// Every filter and index block stays in memory (fjall pins only those of its first levels by
/// default). A point read of a row not in memory then costs one data block, about 5 µs, instead
/// of loading a level's whole filter through the block cache: with fjall's defaults, 10^7 rows
/// and an 8 MiB block cache, a `get` took 108 µs at the median and 347 µs at p99
/// (`benches/RESULTS.md`, "A table larger than memory"). They weigh about 2 bytes per row (bloom
/// filters of 10 bits per key, and one index entry per 4 KiB block).
pub(crate) fn rows_keyspace(memtable: u64) -> fjall::KeyspaceCreateOptions {
    fjall::KeyspaceCreateOptions::default()
        .max_memtable_size(memtable)
        .filter_block_pinning_policy(fjall::config::PinningPolicy::all(true))
        .index_block_pinning_policy(fjall::config::PinningPolicy::all(true))
}

/// A database at `dir` with a block cache of `cache` bytes.
///
/// - **fjall's smallest journal bound** (64 MiB; 512 MiB by default): a start after SIGKILL replays
///   at most this much. A keyspace written rarely (the checkpoints) keeps old journals alive until
///   it is flushed; with the default a flow's restart spent 2 s replaying them.
/// - **One worker thread** for flushes and compactions. fjall 3.1's worker 0 hands a compaction
///   back to the queue whenever it has other workers, and takes it again at once while they are
///   busy: it spins (`worker_tick` and `flume` sends were 20 % of a flow's CPU in a profile, its
///   workers 45 %), taking a core from the flow and the broker on a small machine.
pub(crate) fn database(dir: &std::path::Path, cache: u64) -> fjall::DatabaseBuilder<fjall::Database> {
    fjall::Database::builder(dir).cache_size(cache).max_journaling_size(64 << 20).worker_threads(1)
}
