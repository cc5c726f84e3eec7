//! What a run reports: [`FlowResult`], per-step [`StepResult`]s and [`FlowError`].

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a flow or a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Status {
    /// Not started.
    Pending,
    /// In progress (for a flow result: another caller owns the idempotency key).
    Running,
    /// Finished successfully.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped by cancellation; for a step, also: compensated.
    Cancelled,
}

/// One step's part in a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    /// The step's name.
    pub name: Arc<str>,
    /// `Completed`, `Failed`, `Cancelled` (compensated, or stopped by cancellation), or
    /// `Pending` when the run never reached it.
    pub status: Status,
    /// Attempts made (first attempt plus retries).
    pub attempts: u32,
    /// Time from the first attempt's start to the last attempt's end.
    pub duration: Duration,
    /// The last attempt's error, if it failed.
    pub error: Option<String>,
    /// Whether the step was not run by this run but restored from a durable run's journal
    /// (it completed in an earlier run of the same key, which was interrupted).
    #[serde(default)]
    pub restored: bool,
}

impl StepResult {
    pub(crate) fn pending(name: &Arc<str>) -> Self {
        Self {
            name: Arc::clone(name),
            status: Status::Pending,
            attempts: 0,
            duration: Duration::ZERO,
            error: None,
            restored: false,
        }
    }
}

/// Why a run did not complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FlowError {
    /// The input validator rejected the input; no step ran.
    #[error("invalid input: {}", issues.join("; "))]
    Validation {
        /// Every issue the validator found.
        issues: Vec<String>,
    },
    /// A step failed after its retries.
    #[error("step {step:?} failed after {attempts} attempt(s): {message}")]
    Step {
        /// The failing step.
        step: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        message: String,
        /// Whether the step marked its error transient.
        transient: bool,
    },
    /// The flow's output function failed after every step completed.
    #[error("building the flow's output failed: {message}")]
    Output {
        /// The error.
        message: String,
    },
    /// The run was cancelled (by the caller, or because it lost its idempotency lease).
    #[error("run cancelled")]
    Cancelled,
    /// An at-most-once step ([`Step::at_most_once`](crate::Step::at_most_once)) had started
    /// in an earlier run of this durable key that was interrupted before it finished, so it
    /// may or may not have taken effect. It is not run again: the run fails (and
    /// compensates) instead.
    #[error("step {step:?} was interrupted in an earlier run and is at most once: not run again")]
    StepInterrupted {
        /// The interrupted step.
        step: String,
    },
    /// A durable run could not write a step's checkpoint to its journal (the journal is
    /// full, or the store kept failing), so it stopped rather than go on unrecorded.
    #[error("the journal entry of step {step:?} could not be written: {message}")]
    JournalWrite {
        /// The step whose entry was not written.
        step: String,
        /// Why.
        message: String,
    },
}

impl FlowError {
    /// Whether this failure may be retried under the same idempotency key: a step failed
    /// with an error marked transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Step {
                transient: true,
                ..
            }
        )
    }
}

/// A compensation that failed. Reported, but it never replaces the run's original error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompensationFailure {
    /// The step whose compensation failed.
    pub step: String,
    /// The compensation's error.
    pub message: String,
}

/// The outcome of one run of a flow.
///
/// Replays of an idempotent run return the stored result with [`replayed`](Self::replayed)
/// set; a replay never runs a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowResult<O> {
    /// The flow's name.
    pub flow: Arc<str>,
    /// `Completed`, `Failed`, `Cancelled`, or `Running` (another caller owns the key).
    pub status: Status,
    /// Wall time of the run (of the original run, for a replay).
    pub duration: Duration,
    /// Every step in declaration order.
    pub steps: Vec<StepResult>,
    /// The flow's output, when it completed and has an output function.
    pub output: Option<O>,
    /// Why the run did not complete.
    pub error: Option<FlowError>,
    /// Compensations that failed, if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compensation_failures: Vec<CompensationFailure>,
    /// Whether this result was read from the idempotency store instead of running.
    #[serde(skip)]
    pub replayed: bool,
}

impl<O> FlowResult<O> {
    /// Whether the run completed.
    pub fn is_completed(&self) -> bool {
        self.status == Status::Completed
    }

    /// The result for a run that stopped before any step: validation failure or another
    /// caller owning the key.
    pub(crate) fn without_steps(
        flow: &Arc<str>,
        status: Status,
        steps: &[Arc<str>],
        error: Option<FlowError>,
    ) -> Self {
        Self {
            flow: Arc::clone(flow),
            status,
            duration: Duration::ZERO,
            steps: steps.iter().map(StepResult::pending).collect(),
            output: None,
            error,
            compensation_failures: Vec::new(),
            replayed: false,
        }
    }

    /// The step result named `name`.
    pub fn step(&self, name: &str) -> Option<&StepResult> {
        self.steps.iter().find(|s| &*s.name == name)
    }
}
