//! The integration tests: one binary (every extra test binary would link everything again).

mod util;

mod app;
mod cli;
mod crash;
pub(crate) mod damage;
mod flow;
mod flow_journal;
mod fuzz;
mod instances;
mod journal_kafka;
pub(crate) mod kafka;
mod own_stage;
mod patterns;
mod queries;
mod runtime;
mod setup;
mod store;
mod table;
mod table_partitions;
mod timers;
