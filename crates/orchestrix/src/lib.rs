//! Orchestrix: typed workflows with idempotent execution.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod store;
