//! Durable flows: a keyed run journals its steps, so a run whose owner died resumes where
//! it stopped instead of starting over.
//!
//! A durable flow ([`FlowBuilder::durable`](crate::FlowBuilder::durable)) stores, for each
//! keyed run, its input at acquire and then one entry per step as the step completes (each
//! branch of a parallel group on its own): the step's position and name, its attempts, and
//! the context state it wrote. Each entry is one fenced write to the store
//! ([`JournalStore::append`](crate::store::JournalStore::append)): a run that lost its
//! lease cannot add to a journal another owner acts on, and stops.
//!
//! When a caller (a retry of the same key, [`Flow::resume`](crate::Flow::resume), or
//! [`Flow::recover`](crate::Flow::recover)) acquires a record whose owner lost its lease,
//! it receives the journal in the same store operation, restores the state, and skips the
//! journaled steps: they appear in the result as completed with
//! [`restored`](crate::StepResult::restored) set, and plugins see
//! [`Event::StepRestored`](crate::Event::StepRestored). A later failure compensates them
//! too, in reverse order, with their restored state. Unkeyed runs of a durable flow are
//! not journaled.
//!
//! # Which step may run again
//!
//! | situation | steps that completed before it | the step in flight |
//! | --- | --- | --- |
//! | crash, dropped future or lost lease, then resume | never again | may run again; never for [`at_most_once`](crate::Step::at_most_once) (the run fails with `StepInterrupted`) |
//! | cancellation, then a new call | never again (a compensated step is undone, and runs again) | compensated, or resumed per its status |
//! | [redrive](crate::Flow::redrive) of a failed run | never again (a compensated step runs again) | the failed step runs again |
//! | a process frozen past its lease goes on after another caller resumed the run | never again: it stops before its next step and compensates nothing | may have run twice |
//! | crash during a compensation, then resume | journaled compensations never again | the compensation in flight may run again |
//!
//! A step that completed is recorded only once its entry is written: a crash between the
//! step's end and its entry is a crash during the step. A run that was frozen rather than
//! killed (a paused VM, a stalled process) and goes on after its lease lapsed stops before
//! its next step, and compensates nothing, as soon as its own clock says the lease lapsed
//! (counted from when its last successful acquire or renewal was sent): another owner may
//! have resumed it meanwhile. Only the step it was in when frozen may have run twice. To make even that step safe, send
//! [`Context::step_key`](crate::Context::step_key) as the idempotency key of what it calls
//! downstream: it is the same in every run of the key.
//!
//! # Changing a durable flow safely
//!
//! A step is identified by its position and name. A journal whose entries name other steps
//! than this build's flow at their positions is refused
//! ([`IdempotencyError::JournalMismatch`](crate::idempotency::IdempotencyError::JournalMismatch))
//! and nothing runs; the journal is kept for a build that matches it. So:
//!
//! * **adding steps at the end** is safe: journals of the old flow are a prefix of the new;
//! * **renaming, removing, reordering** steps breaks runs in flight: finish them first
//!   (let them complete, or run [`recover`](crate::Flow::recover) with the old build), or
//!   give the changed flow a new [version](crate::FlowBuilder::version), which refuses the
//!   old journals outright
//!   ([`JournalVersion`](crate::idempotency::IdempotencyError::JournalVersion)) rather than
//!   matching them step by step;
//! * **changing what a step writes** to the context is safe as long as later steps still
//!   read what the old one wrote: a resumed run restores the old step's state.

mod describe;
pub(crate) use describe::describe;
pub(crate) mod entry;
pub(crate) mod journaling;
mod run;

pub use run::Recovered;

/// What a durable flow needs beyond a plain one: how to read its input back from a
/// journal, and the version its journals are written with.
pub(crate) struct Durability<I> {
    pub(crate) decode: fn(&[u8]) -> Result<I, serde_json::Error>,
    pub(crate) version: String,
}
