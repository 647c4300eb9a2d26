//! Exactly-once Kafka flows: consume → stage → produce, inside Kafka transactions.
//!
//! A flow is Alpakka Kafka's `Transactional.source → flow → Transactional.sink` as one builder. One
//! Kafka transaction per `commit_interval` holds the output records, the journal records (the
//! [`KafkaJournal`](crate::journal::KafkaJournal): one per key the transaction changed, carrying
//! the key's events of the transaction and its state after them, like the changelog behind Kafka
//! Streams' record cache; a hot key's events are split over records of at most 1000 events) and
//! the consumed offsets (`send_offsets_to_transaction` with the consumer group's
//! metadata, KIP-447 style, so one transactional producer per instance is safe across rebalances).
//! Consumers of the outputs and of the journal read with `isolation.level=read_committed`.
//!
//! - **State follows partitions.** Input partition `p`'s entities live in journal partition `p`. On
//!   assignment the flow restores `p` from the journal (newest record per key, up to the partition's
//!   end as of that moment) before processing it; on revocation it commits the in-flight transaction
//!   and releases the state.
//! - **Local state store** ([`FlowBuilder::state_dir`]). The compacted journal stays the state of
//!   record; a local sled store is a checkpoint of it, like Kafka Streams' stores over their
//!   changelogs. A follower thread reads the committed journal (`read_committed`, so never an
//!   aborted transaction) and writes each key's newest entry and the journal offset the rows are
//!   complete up to, off the flow thread. An assignment reads only the journal's records after the
//!   checkpoint, and a key's state is read from the store when the key is first used, so a restart
//!   or a takeover costs the tail, not the partition's history. A crash wipes nothing (the
//!   checkpoint is older, the tail makes it current); a store that cannot be trusted (a row that
//!   does not decode, a checkpoint ahead of the journal, a store of another journal or stage) is
//!   dropped with a warning and the partition restored from the journal in full. Revoked
//!   partitions' rows stay until [`FlowBuilder::state_retention`]; [`Standby`] replicas keep
//!   partitions this instance does not own current, so taking them over reads almost nothing.
//! - **Failures.** A transaction that must abort is aborted, the consumer rewinds to the last
//!   committed offsets and the in-memory state of the transaction is discarded, then processing goes
//!   on. Fencing by a newer instance with the same `transactional.id` stops the flow with
//!   [`FlowError::Fenced`] and commits nothing. A fence of a transaction open longer than
//!   `transaction.timeout.ms` (the broker timed it out: the flow was paused, or a commit outlasted a
//!   coordinator's move) is an abort: the flow replaces its producer, rewinds and goes on. So are a
//!   librdkafka call that does not return (`send_offsets_to_transaction` after the group
//!   coordinator's broker died) and any other fatal producer error but a refused authorization, up
//!   to five replacements without a commit between them. A broker that is down is retried with
//!   backoff.
//! - **Bad input.** A record the decoder rejects (or whose handler panics) goes to the dead-letter
//!   topic with headers naming its source topic, partition, offset and the error, inside the same
//!   transaction; or, by policy, stops the flow.
//! - **Threads.** The flow runs on a thread of its own, so librdkafka's blocking calls never block
//!   the tokio runtime; [`FlowControl`] is async. The output mapping and the produce calls run on a
//!   second thread (the emitter), in the order the flow thread handled the commands: a produce call
//!   costs about as much as decoding and handling a command, so the two threads keep up with about
//!   twice the input one would. Before every commit or abort the flow thread waits until the
//!   emitter has produced everything it was given, so a transaction holds exactly the outputs of
//!   the inputs it commits. A panic in the output mapping stops the flow with
//!   [`FlowError::Crashed`].
//!
//! The same builder runs the other patterns of Alpakka Kafka, on the same machinery:
//!
//! - **At least once** ([`Guarantee::AtLeastOnce`], [`CommitterSettings`]): no transactions; a batch's
//!   journal is written once its outputs are acknowledged and its offsets are committed once its
//!   journal is. Outputs may repeat after a crash; events are never applied twice (journal records
//!   carry the input positions they include). [`consume`] is the consumer-only variant: an async
//!   function per record, then the commit.
//! - **Async enrichment** ([`FlowBuilder::enrich`], [`EnrichSettings`]): an async call per record
//!   between the decoder and the stage, `parallelism` in flight at most, results in input order per
//!   partition, retries with backoff, then the bad-input policy.
//! - **Rebalance listeners** ([`FlowBuilder::on_rebalance`], [`FlowBuilder::on_rebalance_async`]):
//!   a synchronous hook inside the rebalance (after the flow restored or committed the partitions,
//!   before their state is released), and an async one fed in order without blocking the poll loop.

mod app;
mod builder;
mod consume;
mod control;
mod engine;
mod error;
mod exported;
mod record;
mod route;
mod settings;
mod shared;
pub(crate) mod view;

pub use app::{AppStopper, Application, Running};
pub use builder::FlowBuilder;
pub use control::{FlowControl, FlowMetrics, FlowStatus, FlowStopper};
pub use engine::Standby;
pub use error::{BoxError, FlowError};
pub use record::{InputRecord, OutputRecord, Processed};
pub use route::{commands_topic, timers_topic, Routed, Sender, To};

pub use exported::names as metric_names;

pub use consume::{consume, ConsumeBuilder};
pub use settings::{
    BadInput, CommitterSettings, EnrichSettings, FlowJournal, Guarantee, RebalanceActions, RebalanceEvent,
    TopicPartition,
};
