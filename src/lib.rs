#![doc = include_str!("../README.md")]
//!
//! # The library
//!
//! | module | what |
//! |---|---|
//! | [`EventSourced`], [`Effect`] | the stage API: command handler, event handler, upcasting |
//! | [`StageRuntime`], [`StageHandle`] | the in-process runtime: group commit, back-pressure, queries |
//! | [`rebuild`] | state at any point of a journal's history |
// The rows of modules behind features link only where the feature is on.
#![cfg_attr(
    feature = "kafka",
    doc = "| [`flow`] | Kafka flows: consume → stage → produce, exactly once (transactions) or at least once; async enrichment; rebalance listeners (feature `kafka`) |"
)]
#![cfg_attr(
    not(feature = "kafka"),
    doc = "| `flow` | Kafka flows: consume → stage → produce, exactly once (transactions) or at least once; async enrichment; rebalance listeners (feature `kafka`) |"
)]
#![cfg_attr(
    all(feature = "kafka", feature = "sled"),
    doc = "| [`table`] | KTable emulation: a compacted topic as a queryable local table (features `kafka`, `sled`) |"
)]
#![cfg_attr(
    not(all(feature = "kafka", feature = "sled")),
    doc = "| `table` | KTable emulation: a compacted topic as a queryable local table (features `kafka`, `sled`) |"
)]
//! | [`testkit`] | given / when / then tests for stages |
#![cfg_attr(
    feature = "cli",
    doc = "| [`cli`] | the `eventstage` command line, for your own binary with your own stages (feature `cli`) |"
)]
#![cfg_attr(
    not(feature = "cli"),
    doc = "| `cli` | the `eventstage` command line, for your own binary with your own stages (feature `cli`) |"
)]
//! | [`journal`] | the bytes-level journal crate (`eventstage-journal`) re-exported |
//!
//! ## Delivery and durability
//! With [`Durability::Durable`] (the default) a reply means the command's events are fsynced; with
//! [`Durability::Buffered`] a reply means they are written and will be fsynced within the flush
//! interval. Either way the journal holds whole batches only, and reopening a journal rebuilds
//! exactly the state live processing had (replay = live).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(clippy::unwrap_used)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]

#[cfg(feature = "cli")]
pub mod cli;
mod codec;
mod error;
#[cfg(feature = "kafka")]
pub mod flow;
#[cfg(feature = "kafka")]
mod local_store;
#[cfg(feature = "query")]
pub mod query;
mod replay;
mod runtime;
mod stage;
// The demo's stages and their wire contract: the binary, the examples, the tests and the benches use
// them; they are not the library's API (see examples/ for how to write a stage).
#[doc(hidden)]
pub mod stages;
#[cfg(all(feature = "kafka", feature = "sled"))]
pub mod table;
pub mod testkit;

pub use codec::{Codec, CodecError};
pub use error::{Error, Result};
pub use eventstage_journal as journal;
pub use replay::{rebuild, RecoveryStats};
pub use runtime::{Durability, RuntimeConfig, StageHandle, StageRuntime, StateCacheStats};
pub use stage::{Effect, EntityKey, EventSourced, PersistThen};
