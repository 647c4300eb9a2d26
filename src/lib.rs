//! eventstage
