//! What a run reports: [`FlowResult`], per-step [`StepResult`]s and [`FlowError`].

use std::borrow::Cow;
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
}

impl StepResult {
    pub(crate) fn pending(name: &Arc<str>) -> Self {
        Self {
            name: Arc::clone(name),
            status: Status::Pending,
            attempts: 0,
            duration: Duration::ZERO,
            error: None,
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

/// A step in the stored form: name, status, attempts, duration in ns, error.
type StoredStep<'a> = (Cow<'a, str>, Status, u32, u64, Option<Cow<'a, str>>);

/// The stored form of a finished run: compact JSON, versioned, self-describing (so a
/// changed output type is a decode error, not silent garbage). Durations are whole
/// nanoseconds and steps are arrays, which keeps records small and replays cheap.
#[derive(Serialize, Deserialize)]
struct Stored<'a, O> {
    /// Payload version.
    v: u8,
    status: Status,
    ns: u64,
    steps: Vec<StoredStep<'a>>,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    output: Option<O>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<FlowError>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    compensation_failures: Vec<CompensationFailure>,
}

fn none<O>() -> Option<O> {
    None
}

const STORED_VERSION: u8 = 1;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<O: Serialize> FlowResult<O> {
    /// Encodes the result for the idempotency store; `with_output: false` leaves the output
    /// out (for an output that cannot be encoded).
    pub(crate) fn to_stored(&self, with_output: bool) -> Result<Vec<u8>, serde_json::Error> {
        let stored = Stored {
            v: STORED_VERSION,
            status: self.status,
            ns: nanos(self.duration),
            steps: self
                .steps
                .iter()
                .map(|s| {
                    (
                        Cow::Borrowed(&*s.name),
                        s.status,
                        s.attempts,
                        nanos(s.duration),
                        s.error.as_deref().map(Cow::Borrowed),
                    )
                })
                .collect(),
            output: self.output.as_ref().filter(|_| with_output),
            error: self.error.clone(),
            compensation_failures: self.compensation_failures.clone(),
        };
        serde_json::to_vec(&stored)
    }
}

/// Why a stored result could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoredError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("stored result has payload version {0}, this build reads {STORED_VERSION}")]
    Version(u8),
}

impl<O: serde::de::DeserializeOwned> FlowResult<O> {
    /// Decodes a result written by [`to_stored`](Self::to_stored), as a replay of `flow`.
    pub(crate) fn from_stored(flow: &Arc<str>, bytes: &[u8]) -> Result<Self, StoredError> {
        let stored: Stored<'_, O> = serde_json::from_slice(bytes)?;
        if stored.v != STORED_VERSION {
            return Err(StoredError::Version(stored.v));
        }
        Ok(Self {
            flow: Arc::clone(flow),
            status: stored.status,
            duration: Duration::from_nanos(stored.ns),
            steps: stored
                .steps
                .into_iter()
                .map(|(name, status, attempts, ns, error)| StepResult {
                    name: Arc::from(name.as_ref()),
                    status,
                    attempts,
                    duration: Duration::from_nanos(ns),
                    error: error.map(Cow::into_owned),
                })
                .collect(),
            output: stored.output,
            error: stored.error,
            compensation_failures: stored.compensation_failures,
            replayed: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FlowResult<Vec<u32>> {
        FlowResult {
            flow: Arc::from("f"),
            status: Status::Failed,
            duration: Duration::from_nanos(1_234_567),
            steps: vec![
                StepResult {
                    name: Arc::from("a \"quoted\" step"),
                    status: Status::Cancelled,
                    attempts: 2,
                    duration: Duration::from_micros(5),
                    error: None,
                },
                StepResult {
                    name: Arc::from("b"),
                    status: Status::Failed,
                    attempts: 3,
                    duration: Duration::from_millis(7),
                    error: Some("boom".into()),
                },
            ],
            output: Some(vec![1, 2]),
            error: Some(FlowError::Step {
                step: "b".into(),
                attempts: 3,
                message: "boom".into(),
                transient: false,
            }),
            compensation_failures: vec![CompensationFailure {
                step: "a".into(),
                message: "refund failed".into(),
            }],
            replayed: false,
        }
    }

    #[test]
    fn stored_results_round_trip_as_replays() {
        let original = sample();
        let bytes = original.to_stored(true).unwrap_or_default();
        let back = FlowResult::<Vec<u32>>::from_stored(&original.flow, &bytes).ok();
        let expected = FlowResult {
            replayed: true,
            ..original
        };
        assert_eq!(back, Some(expected));
    }

    #[test]
    fn stored_results_without_output_replay_without_output() {
        let bytes = sample().to_stored(false).unwrap_or_default();
        let back = FlowResult::<Vec<u32>>::from_stored(&Arc::from("f"), &bytes).ok();
        assert_eq!(back.map(|r| r.output), Some(None));
    }

    #[test]
    fn a_stored_result_of_another_payload_version_is_refused() {
        let bytes = br#"{"v":2,"status":"completed","ns":0,"steps":[]}"#;
        let decoded = FlowResult::<()>::from_stored(&Arc::from("f"), bytes);
        assert!(matches!(decoded, Err(StoredError::Version(2))));
    }

    #[test]
    fn a_stored_result_of_another_output_type_is_a_decode_error() {
        let bytes = sample().to_stored(true).unwrap_or_default();
        let decoded = FlowResult::<String>::from_stored(&Arc::from("f"), &bytes);
        assert!(matches!(decoded, Err(StoredError::Json(_))));
    }
}
