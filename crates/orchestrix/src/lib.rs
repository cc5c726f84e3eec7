//! # Orchestrix
//!
//! Typed workflows with **idempotent execution**: the same logical operation (a payment,
//! an order, a webhook delivery) submitted twice runs its side effects once, on one
//! machine or across a fleet.
//!
//! A [`Flow`] is a sequence of named async steps over a typed input, with retries,
//! per-attempt timeouts, compensation (saga rollback), parallel groups, cancellation,
//! input validation, hooks and a console logger. Run it with a key and it becomes
//! idempotent: the [`IdempotencyStore`](store::IdempotencyStore) decides atomically
//! whether this caller runs, holds a fenced lease while it does, and keeps the result for
//! duplicates to replay.
//!
//! ```
//! use orchestrix::{Flow, RunOptions, StateKey};
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//!
//! const RECEIPT: StateKey<String> = StateKey::new("receipt");
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let charges = Arc::new(AtomicU32::new(0));
//! let counter = Arc::clone(&charges);
//! let flow = Flow::<u64, String>::builder("payment")
//!     .step("charge", move |ctx| {
//!         let counter = Arc::clone(&counter);
//!         async move {
//!             counter.fetch_add(1, Ordering::SeqCst);
//!             ctx.put(RECEIPT, format!("rcpt-{}", ctx.input()))?;
//!             Ok(())
//!         }
//!     })
//!     .output(|ctx| Ok(ctx.get(RECEIPT)?.unwrap_or_default()))
//!     .build()?;
//!
//! let first = flow.run(4200, RunOptions::key("order_123")).await?;
//! let again = flow.run(4200, RunOptions::key("order_123")).await?;
//! assert!(!first.replayed && again.replayed);
//! assert_eq!(again.output.as_deref(), Some("rcpt-4200"));
//! assert_eq!(charges.load(Ordering::SeqCst), 1); // charged once
//! # Ok(()) }
//! ```
//!
//! A step is any `Fn(Context<I>) -> impl Future<Output = Result<(), StepError>>`: an
//! `async fn`, or a closure whose types the builder infers (no annotation is needed, `?`
//! included). Its own error type stays reachable in a failed result
//! ([`FlowError::step_error`]); state between steps is typed by [`StateKey`]s; a key's
//! record is read and deleted with [`Flow::record`] and [`Flow::forget`].
//!
//! Modules: [`store`] (the store contract and the in-memory store), [`idempotency`]
//! (keys, options, the decision table, leases), [`hooks`] (plugins and the logger),
//! [`validation`] (structured issues, async validators, `garde`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod context;
mod durable;
mod execute;
mod flow;
pub mod hooks;
pub mod idempotency;
mod records;
mod result;
mod retry;
mod run;
mod step;
pub mod store;
mod stored;
pub mod telemetry;
pub mod validation;

pub use context::{Context, ReadKey, StateError, StateKey};
pub use durable::Recovered;
pub use flow::{BuildError, Flow, FlowBuilder};
pub use hooks::{ConsoleLogger, Event, LogLevel, Plugin};
pub use idempotency::{
    Fingerprint, IdempotencyError, KeyError, KeyScope, OnRunning, RunOptions, fingerprint_of,
};
pub use records::FlowRecord;
pub use result::{CompensationFailure, FlowError, FlowResult, Status, StepResult};
pub use retry::{Backoff, RetryPolicy};
pub use run::RunError;
pub use step::{Parallel, Step, StepError};
pub use stored::OutputNotKept;
pub use tokio_util::sync::CancellationToken;
