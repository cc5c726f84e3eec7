//! What a run reports: [`FlowResult`], per-step [`StepResult`]s and [`FlowError`].

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validation::Issue;

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
///
/// Equality compares what the stored form keeps (a step error's message, not its
/// [`source`](FlowError::Step::source)), so a live result equals its replay.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FlowError {
    /// The input validator rejected the input; no step ran.
    #[error("invalid input: {}", Joined(issues))]
    Validation {
        /// Every issue the validator found, with the path of the field it is about.
        issues: Vec<Issue>,
    },
    /// A step failed after its retries.
    ///
    /// In the result of a run that executed, [`source`](FlowError::Step::source) is the
    /// error the step returned, typed: match on it with
    /// [`FlowError::step_error`]. A replay (and a durable run that resumed a failure from
    /// its journal) has the message, the attempts and the transient flag, but no source:
    /// the stored form keeps the error's text, never its type.
    #[error("step {step:?} failed after {attempts} attempt(s): {message}")]
    Step {
        /// The failing step.
        step: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error, as text (what a replay has).
        message: String,
        /// Whether the step marked its error transient.
        transient: bool,
        /// The last attempt's error itself, in the run that executed; `None` in a replay.
        /// Not stored, not compared by `==`.
        #[source]
        #[serde(skip)]
        source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
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

/// Issues separated by `; `.
struct Joined<'a>(&'a [Issue]);

impl std::fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            std::fmt::Display::fmt(issue, f)?;
        }
        Ok(())
    }
}

impl PartialEq for FlowError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Validation { issues: a }, Self::Validation { issues: b }) => a == b,
            (
                Self::Step {
                    step: s1,
                    attempts: a1,
                    message: m1,
                    transient: t1,
                    source: _,
                },
                Self::Step {
                    step: s2,
                    attempts: a2,
                    message: m2,
                    transient: t2,
                    source: _,
                },
            ) => s1 == s2 && a1 == a2 && m1 == m2 && t1 == t2,
            (Self::Output { message: a }, Self::Output { message: b }) => a == b,
            (Self::Cancelled, Self::Cancelled) => true,
            (Self::StepInterrupted { step: a }, Self::StepInterrupted { step: b }) => a == b,
            (
                Self::JournalWrite {
                    step: s1,
                    message: m1,
                },
                Self::JournalWrite {
                    step: s2,
                    message: m2,
                },
            ) => s1 == s2 && m1 == m2,
            _ => false,
        }
    }
}

impl Eq for FlowError {}

impl FlowError {
    /// The failing step's own error as an `E`, when the run executed and the step failed
    /// with an `E` (returned with `?`, [`StepError::new`](crate::StepError::new) or `From`),
    /// or with an error whose [`source`](std::error::Error::source) chain holds one.
    ///
    /// `None` for any other variant, another error type, and for a **replay**: the store
    /// keeps a step error's message, attempts and transient flag, never its type, so a
    /// duplicate that is answered from the store can read
    /// [`message`](FlowError::Step::message) but not match on the type.
    ///
    /// ```
    /// use orchestrix::{Flow, FlowError, RunOptions, StepError};
    ///
    /// #[derive(Debug, PartialEq, thiserror::Error)]
    /// enum PaymentError {
    ///     #[error("card declined")]
    ///     Declined,
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let flow = Flow::<u64>::builder("billing")
    ///     .step("charge", |_ctx| async { Err(PaymentError::Declined.into()) })
    ///     .build()?;
    /// let result = flow.run(4200, RunOptions::key("order-1")).await?;
    /// let error = result.error.as_ref().expect("the charge failed");
    /// assert_eq!(error.step_error::<PaymentError>(), Some(&PaymentError::Declined));
    ///
    /// // The duplicate is answered from the store: the message, not the type.
    /// let replay = flow.run(4200, RunOptions::key("order-1")).await?;
    /// let error = replay.error.as_ref().expect("the cached failure");
    /// assert_eq!(error.step_error::<PaymentError>(), None);
    /// assert!(matches!(error, FlowError::Step { message, .. } if message == "card declined"));
    /// # Ok(()) }
    /// ```
    pub fn step_error<E: StdError + 'static>(&self) -> Option<&E> {
        let Self::Step {
            source: Some(source),
            ..
        } = self
        else {
            return None;
        };
        let mut error: &(dyn StdError + 'static) = &**source;
        loop {
            if let Some(found) = error.downcast_ref::<E>() {
                return Some(found);
            }
            error = error.source()?;
        }
    }

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
