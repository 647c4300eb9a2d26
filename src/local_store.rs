//! What the local stores of flows and tables have in common: how their fjall keyspaces of rows
//! are configured.

/// How many flushed tables the first level of a flow's keyspace of rows gathers before fjall merges
/// them into the level below (its default: 4, which tables keep).
///
/// Rows arrive in the order their keys change, not in key order, so each table of the first level
/// spans the whole key range and every merge rewrites the keyspace's rows below it: with 4 MiB
/// memtables and 4 tables, a partition of 2.5 * 10^6 accounts was rewritten for every 16 MiB of
/// changed rows. With 12 fjall's worker took 0.19-0.23 cores instead of 0.33-0.48 during 10^6
/// uniform deposits over 10^7 accounts, and the process 17.8-20.3 µs of CPU per deposit instead of
/// 21.5-28.2 (`benches/RESULTS.md`, "Where the CPU goes on uniform keys"). It costs no memory: the
/// tables are on disk, their filters about 2 bytes per row as before. A point read checks up to 12
/// in-memory filters of the first level instead of 4, and fjall slows writes from 20 tables on, which
/// leaves a merge time to finish.
///
/// A table's store keeps 4: it is written once, in a catch-up, where 12 raised the peak memory of
/// a 10^7-row table with a 64 MiB cache from 247-250 to 269 MiB (its budget is 256 MiB).
const FLOW_FIRST_LEVEL_TABLES: u8 = 12;

/// The data block size of a flow's keyspace of rows (fjall's default: 4 KiB, which tables keep).
///
/// A command whose key is not in memory reads one data block, nearly always from outside fjall's
/// block cache when the state is far larger than the budget: the kernel copies it from the page
/// cache into a fresh buffer, fjall checksums it and searches it. With rows of a few bytes (see
/// `row` in the flow's local store) a 4 KiB block holds about 120 of them, and the one read is
/// paid for all. At 2 KiB, 10^6 uniform deposits over 10^7 accounts took 17.2-17.6 µs of the
/// process's CPU per deposit instead of 18.3-18.4, at 64-67k deposits/s instead of 61k; at 1 KiB
/// 16.9-18.8 µs (`benches/RESULTS.md`, "Smaller rows, written in key order"). The index, pinned in
/// memory, has one entry per block: twice as many, a few MiB at 10^7 accounts.
const FLOW_DATA_BLOCK: u32 = 2 * 1024;

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

/// [`rows_keyspace`] for a flow's local store, whose rows change all the time and are read by
/// key on every command whose key is not in memory:
///
/// - its first level gathers [`FLOW_FIRST_LEVEL_TABLES`] tables before a merge;
/// - its data blocks are [`FLOW_DATA_BLOCK`] bytes;
/// - **data blocks are not compressed** (fjall compresses those of its third level on with LZ4,
///   where most rows of a large store live). With a state cache far smaller than the state, a
///   command's key is read from a block not in fjall's block cache: read from the page cache, and
///   decompressed. Uncompressed, 10^6 uniform deposits over 10^7 accounts took 33.8 µs of the
///   process's CPU per deposit instead of 37.4-40.8, and 10^7 opens 14.4 µs instead of 17.3-17.9
///   (`benches/RESULTS.md`, "The local store's rows uncompressed"); Kafka Streams' RocksDB stores
///   do not compress either. The store takes more disk (never memory: the block cache keeps its
///   size).
///
/// A store created before keeps the threshold, compression and block size it was created with
/// (fjall keeps them with the keyspace).
pub(crate) fn flow_rows_keyspace(memtable: u64) -> fjall::KeyspaceCreateOptions {
    let merges = fjall::compaction::Leveled::default().with_l0_threshold(FLOW_FIRST_LEVEL_TABLES);
    let uncompressed = fjall::config::CompressionPolicy::all(fjall::CompressionType::None);
    rows_keyspace(memtable)
        .compaction_strategy(std::sync::Arc::new(merges))
        .data_block_compression_policy(uncompressed)
        .data_block_size_policy(fjall::config::BlockSizePolicy::all(FLOW_DATA_BLOCK))
}

/// Rows to write, in key order. fjall inserts a batch's rows into its memtable's skip list one by
/// one: rows in a hash map's order sent each insert down a path of nodes not in the CPU's caches,
/// and the flush later walked nodes laid out in that order. Sorted, consecutive inserts share most
/// of their path. During 10^6 uniform deposits over 10^7 accounts the store's follower and fjall's
/// worker took 0.13 cores instead of 0.15-0.23, and the process 18.3-18.4 µs of CPU per deposit
/// instead of 19.4-21.3 (`benches/RESULTS.md`, "Smaller rows, written in key order").
pub(crate) fn in_key_order<V>(rows: impl IntoIterator<Item = (Vec<u8>, V)>) -> Vec<(Vec<u8>, V)> {
    let mut rows: Vec<_> = rows.into_iter().collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rows
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
