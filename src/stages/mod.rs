//! Example stages, compiled into the `eventstage` binary so its CLI can decode their journals and the
//! demo can run them. Copy one to start your own. Not part of the library's API (hidden from its
//! docs, and free to change): the examples and tests use them.

pub mod bank;
#[cfg(feature = "kafka")]
pub mod bank_flow;
pub mod inventory;
pub mod transfer;
#[cfg(feature = "kafka")]
pub mod transfer_flow;
