//! Metrics and spans: what a run tells the service operating it.
//!
//! # Metrics
//!
//! Through the [`metrics`](https://docs.rs/metrics) facade: install any recorder (for
//! example `metrics-exporter-prometheus`) **before building flows** — a flow registers its
//! handles when it is built; a flow built without a recorder records nothing and skips the
//! calls altogether, at no measurable cost. Names follow Prometheus conventions (base units, counters end in `_total`).
//! Labels are the flow's name, a step's name, the store's kind and fixed words; never an
//! idempotency key or anything from an input or output.
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `orchestrix_flow_info` | gauge | `flow` | 1 for each flow built |
//! | `orchestrix_runs_total` | counter | `flow`, `outcome` | every `run`, by outcome: `executed`, `resumed` (a durable run that restored steps), `replayed`, `waited` (replayed after waiting for the owner), `running`, `key_reused`, `already_running`, `wait_timed_out`, `not_persisted`, `rejected` (validation), `error` |
//! | `orchestrix_flow_duration_seconds` | histogram | `flow`, `status` | executed runs, `completed` / `failed` / `cancelled` |
//! | `orchestrix_step_duration_seconds` | histogram | `flow`, `step`, `status` | each step that ran |
//! | `orchestrix_step_attempts_total` | counter | `flow`, `step` | attempts made |
//! | `orchestrix_step_retries_total` | counter | `flow`, `step` | attempts after the first |
//! | `orchestrix_store_operation_duration_seconds` | histogram | `store`, `operation` | each store call of the engine (not timed for the in-process memory store) |
//! | `orchestrix_store_errors_total` | counter | `store`, `operation`, `kind` | store calls that failed: `stale_token`, `decode`, `unsupported_version`, `too_large`, `result_refused`, `encode`, `backend` |
//! | `orchestrix_lease_renewals_total` | counter | `store` | heartbeat renewals |
//! | `orchestrix_leases_lost_total` | counter | `store` | runs cancelled because their lease was lost |
//!
//! # Spans
//!
//! Every run is a `flow` span, and every step that runs a `step` span inside it, carrying
//! the attributes of the OpenTelemetry workflow conventions being proposed beside the
//! plain ones: `workflow.name`, `workflow.execution.id` (the scoped key, or a run id for
//! a run without one), `workflow.execution.result`, and on steps `workflow.task.name` and
//! `workflow.task.run.result` (`success`, `failure`, `error` for a panic, `timeout`,
//! `cancellation`, `skip` for a step restored from a durable journal). A replayed run is
//! one short `flow` span with `replayed = true` and no step spans. A failed attempt that
//! will be retried is an event in its step's span, with the attempt number and the
//! delay. Payloads are never recorded.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::cell::Cell;

use metrics::{Counter, Histogram, IntoF64, Label, Unit};

use crate::result::{FlowResult, Status};
use crate::store::{IdempotencyStore, StoreError};

const FLOW_INFO: &str = "orchestrix_flow_info";
const RUNS: &str = "orchestrix_runs_total";
const FLOW_DURATION: &str = "orchestrix_flow_duration_seconds";
const STEP_DURATION: &str = "orchestrix_step_duration_seconds";
const STEP_ATTEMPTS: &str = "orchestrix_step_attempts_total";
const STEP_RETRIES: &str = "orchestrix_step_retries_total";
const STORE_DURATION: &str = "orchestrix_store_operation_duration_seconds";
const STORE_ERRORS: &str = "orchestrix_store_errors_total";
const RENEWALS: &str = "orchestrix_lease_renewals_total";
const LEASES_LOST: &str = "orchestrix_leases_lost_total";

/// How one call of `run` ended, as `orchestrix_runs_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Outcome {
    Executed,
    Resumed,
    Replayed,
    Waited,
    Running,
    KeyReused,
    AlreadyRunning,
    WaitTimedOut,
    NotPersisted,
    Rejected,
    Error,
}

impl Outcome {
    const ALL: [Self; 11] = [
        Self::Executed,
        Self::Resumed,
        Self::Replayed,
        Self::Waited,
        Self::Running,
        Self::KeyReused,
        Self::AlreadyRunning,
        Self::WaitTimedOut,
        Self::NotPersisted,
        Self::Rejected,
        Self::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Resumed => "resumed",
            Self::Replayed => "replayed",
            Self::Waited => "waited",
            Self::Running => "running",
            Self::KeyReused => "key_reused",
            Self::AlreadyRunning => "already_running",
            Self::WaitTimedOut => "wait_timed_out",
            Self::NotPersisted => "not_persisted",
            Self::Rejected => "rejected",
            Self::Error => "error",
        }
    }
}

/// The statuses durations are kept by.
const STATUSES: [Status; 3] = [Status::Completed, Status::Failed, Status::Cancelled];

#[inline]
fn status_index(status: Status) -> Option<usize> {
    match status {
        Status::Completed => Some(0),
        Status::Failed => Some(1),
        Status::Cancelled => Some(2),
        _ => None,
    }
}

fn status_label(status: Status) -> &'static str {
    match status {
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
        Status::Running => "running",
        _ => "pending",
    }
}

/// One flow's metric handles, registered when the flow is built.
pub(crate) struct FlowMetrics {
    /// Whether a recorder was installed when the flow was built: without one every handle
    /// does nothing, and the run skips even the calls.
    enabled: bool,
    runs: Vec<Counter>,
    duration: Vec<Histogram>,
    steps: Vec<StepMetrics>,
}

struct StepMetrics {
    duration: Vec<Histogram>,
    attempts: Counter,
    retries: Counter,
}

impl FlowMetrics {
    /// Registers the handles of flow `flow` with steps `steps` with the current recorder.
    pub(crate) fn register(flow: &str, steps: &[Arc<str>]) -> Self {
        describe();
        let flow_label = || Label::new("flow", flow.to_owned());
        // `orchestrix_flow_info` (1 per flow built) doubles as the probe that tells whether
        // a recorder is installed: a handle only converts the value it records when a
        // recorder is behind it.
        let recording = Cell::new(false);
        metrics::gauge!(FLOW_INFO, vec![flow_label()]).set(Probe(&recording));
        let enabled = recording.get();
        let runs = Outcome::ALL
            .iter()
            .map(|o| metrics::counter!(RUNS, vec![flow_label(), Label::new("outcome", o.label())]))
            .collect();
        let duration = STATUSES
            .iter()
            .map(|s| {
                metrics::histogram!(
                    FLOW_DURATION,
                    vec![flow_label(), Label::new("status", status_label(*s))]
                )
            })
            .collect();
        let steps = steps
            .iter()
            .map(|step| {
                let labels = || vec![flow_label(), Label::new("step", step.to_string())];
                StepMetrics {
                    duration: STATUSES
                        .iter()
                        .map(|s| {
                            let mut labels = labels();
                            labels.push(Label::new("status", status_label(*s)));
                            metrics::histogram!(STEP_DURATION, labels)
                        })
                        .collect(),
                    attempts: metrics::counter!(STEP_ATTEMPTS, labels()),
                    retries: metrics::counter!(STEP_RETRIES, labels()),
                }
            })
            .collect();
        Self {
            enabled,
            runs,
            duration,
            steps,
        }
    }

    /// Counts one call of `run`.
    #[inline]
    pub(crate) fn run(&self, outcome: impl FnOnce() -> Outcome) {
        if !self.enabled {
            return;
        }
        // `Outcome::ALL` lists the variants in declaration order: the index is the variant.
        if let Some(counter) = self.runs.get(outcome() as usize) {
            counter.increment(1);
        }
    }

    /// Records an executed run's duration and each step that ran. Without a recorder the
    /// handles do nothing, and a duration is not even converted (`record` takes the
    /// `Duration` itself).
    #[inline]
    pub(crate) fn executed<O>(&self, result: &FlowResult<O>) {
        if self.enabled {
            self.record_executed(result);
        }
    }

    fn record_executed<O>(&self, result: &FlowResult<O>) {
        if let Some(h) = status_index(result.status).and_then(|i| self.duration.get(i)) {
            h.record(result.duration);
        }
        for (step, metrics) in result.steps.iter().zip(&self.steps) {
            if step.restored || step.attempts == 0 {
                continue;
            }
            metrics.attempts.increment(u64::from(step.attempts));
            if step.attempts > 1 {
                metrics.retries.increment(u64::from(step.attempts - 1));
            }
            if let Some(h) = status_index(step.status).and_then(|i| metrics.duration.get(i)) {
                h.record(step.duration);
            }
        }
    }
}

/// Describes every metric to the current recorder (once per flow built: cheap, and a
/// recorder installed between two builds still gets the descriptions).
fn describe() {
    metrics::describe_gauge!(FLOW_INFO, Unit::Count, "1 for each flow built, by name.");
    metrics::describe_counter!(RUNS, Unit::Count, "Calls of Flow::run, by outcome.");
    metrics::describe_histogram!(
        FLOW_DURATION,
        Unit::Seconds,
        "Duration of executed runs, by status."
    );
    metrics::describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Duration of each step that ran, all attempts, by status."
    );
    metrics::describe_counter!(STEP_ATTEMPTS, Unit::Count, "Attempts made by steps.");
    metrics::describe_counter!(STEP_RETRIES, Unit::Count, "Attempts after the first.");
    metrics::describe_histogram!(
        STORE_DURATION,
        Unit::Seconds,
        "Duration of the engine's store calls, by store kind and operation."
    );
    metrics::describe_counter!(
        STORE_ERRORS,
        Unit::Count,
        "Store calls that failed, by store kind, operation and error kind."
    );
    metrics::describe_counter!(RENEWALS, Unit::Count, "Lease renewals by heartbeats.");
    metrics::describe_counter!(
        LEASES_LOST,
        Unit::Count,
        "Runs cancelled because their lease was lost."
    );
}

/// A value that notes it was converted: a handle converts what it records only when a
/// recorder is behind it.
struct Probe<'a>(&'a Cell<bool>);

impl IntoF64 for Probe<'_> {
    fn into_f64(self) -> f64 {
        self.0.set(true);
        1.0
    }
}

/// The label of a store error's kind.
fn error_kind(error: &StoreError) -> &'static str {
    match error {
        StoreError::StaleToken => "stale_token",
        StoreError::Encode(_) => "encode",
        StoreError::Decode(_) => "decode",
        StoreError::UnsupportedVersion { .. } => "unsupported_version",
        StoreError::TooLarge { .. } => "too_large",
        StoreError::ResultRefused { .. } => "result_refused",
        _ => "backend",
    }
}

/// Runs one store call of the engine, timing it (unless the store is in this process) and
/// counting its failures.
pub(crate) async fn observe<T>(
    store: &dyn IdempotencyStore,
    operation: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let kind = store.kind();
    let outcome = if kind == "memory" {
        call.await
    } else {
        let started = std::time::Instant::now();
        let outcome = call.await;
        let elapsed: Duration = started.elapsed();
        metrics::histogram!(STORE_DURATION, "store" => kind, "operation" => operation)
            .record(elapsed.as_secs_f64());
        outcome
    };
    if let Err(error) = &outcome {
        metrics::counter!(
            STORE_ERRORS,
            "store" => kind,
            "operation" => operation,
            "kind" => error_kind(error)
        )
        .increment(1);
    }
    outcome
}

/// A heartbeat renewed a lease on `store`.
pub(crate) fn renewed(store: &dyn IdempotencyStore) {
    metrics::counter!(RENEWALS, "store" => store.kind()).increment(1);
}

/// A run lost its lease on `store`.
pub(crate) fn lease_lost(store: &dyn IdempotencyStore) {
    metrics::counter!(LEASES_LOST, "store" => store.kind()).increment(1);
}

/// The span attribute values of a result, for `workflow.execution.result`.
pub(crate) fn execution_result(status: Status) -> &'static str {
    match status {
        Status::Completed => "success",
        Status::Cancelled => "cancellation",
        Status::Running => "running",
        _ => "failure",
    }
}
