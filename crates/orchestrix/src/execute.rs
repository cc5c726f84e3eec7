//! Runs a flow's steps: retries, timeouts, parallel groups, cancellation, compensation.
//!
//! Nothing here knows about idempotency; [`crate::run`] wraps this in the store stages.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::Context;
use crate::hooks::{Event, Hooks};
use crate::result::{CompensationFailure, FlowError, FlowResult, Status, StepResult};
use crate::step::{Step, StepError, panic_message};

/// Builds the output from the context once every step completed.
pub(crate) type OutputFn<I, O> = Box<dyn Fn(&Context<I>) -> Result<O, StepError> + Send + Sync>;

/// Where the steps of a stage are in [`Plan::steps`].
pub(crate) enum Stage {
    Single(usize),
    Parallel {
        steps: Range<usize>,
        fail_fast: bool,
    },
}

/// A flow's definition, fixed at build time.
pub(crate) struct Plan<I, O> {
    pub(crate) name: Arc<str>,
    /// Every step in declaration order.
    pub(crate) steps: Vec<Step<I>>,
    pub(crate) step_names: Vec<Arc<str>>,
    pub(crate) stages: Vec<Stage>,
    pub(crate) output: Option<OutputFn<I, O>>,
    pub(crate) hooks: Hooks,
    pub(crate) compensate_on_cancel: bool,
}

impl<I: Send + Sync + 'static, O> Plan<I, O> {
    /// Runs every stage in order, then compensates if the run did not complete.
    pub(crate) async fn execute(&self, ctx: Context<I>) -> FlowResult<O> {
        let started = Instant::now();
        self.hooks.emit(Event::FlowStart { flow: &self.name });
        let mut steps: Vec<StepResult> = self.step_names.iter().map(StepResult::pending).collect();
        // Steps to compensate, in completion order. Only steps that have a compensation are
        // recorded, so a flow without compensations never allocates here.
        let mut completed = Vec::new();
        let mut error = None;
        // Each step starts when the previous one ended: one clock read per step.
        let mut clock = started;
        for stage in &self.stages {
            if ctx.is_cancelled() {
                error = Some(FlowError::Cancelled);
                break;
            }
            let outcome = match stage {
                Stage::Single(i) => {
                    let (result, outcome, ended) = self.run_step(*i, &ctx, clock).await;
                    clock = ended;
                    steps[*i] = result;
                    outcome.map(|()| self.completed(*i, &mut completed))
                }
                Stage::Parallel {
                    steps: range,
                    fail_fast,
                } => {
                    let outcome = self
                        .run_group(
                            range.clone(),
                            *fail_fast,
                            &ctx,
                            clock,
                            &mut steps,
                            &mut completed,
                        )
                        .await;
                    clock = Instant::now();
                    outcome
                }
            };
            if let Err(e) = outcome {
                error = Some(e);
                break;
            }
        }
        if error.is_none() && ctx.is_cancelled() {
            // Checked once more after the last step, as before every other: a cancel that
            // arrived while the last step ran cancels the run like one during any step.
            error = Some(FlowError::Cancelled);
        }
        let output = match (&error, &self.output) {
            (None, Some(build)) => match self.build_output(build, &ctx) {
                Ok(output) => Some(output),
                Err(e) => {
                    error = Some(e);
                    None
                }
            },
            _ => None,
        };
        let mut compensation_failures = Vec::new();
        let status = match &error {
            None => Status::Completed,
            Some(FlowError::Cancelled) => Status::Cancelled,
            Some(_) => Status::Failed,
        };
        if status == Status::Failed || (status == Status::Cancelled && self.compensate_on_cancel) {
            self.compensate(&ctx, &completed, &mut steps, &mut compensation_failures)
                .await;
            clock = Instant::now();
        }
        FlowResult {
            flow: Arc::clone(&self.name),
            status,
            duration: clock.duration_since(started),
            steps,
            output,
            error,
            compensation_failures,
            replayed: false,
        }
    }

    /// The output, from the output builder. A builder that panics fails the run like a
    /// failing step instead of unwinding through it (which would leave a keyed record
    /// owned, and the steps runnable again once its lease lapsed).
    fn build_output(&self, build: &OutputFn<I, O>, ctx: &Context<I>) -> Result<O, FlowError> {
        match catch_unwind(AssertUnwindSafe(|| build(ctx))) {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(e)) => Err(FlowError::Output {
                message: e.to_string(),
            }),
            Err(payload) => Err(FlowError::Output {
                message: format!("the output builder panicked: {}", panic_message(&*payload)),
            }),
        }
    }

    /// Records a completed step for compensation, if it has one.
    fn completed(&self, i: usize, completed: &mut Vec<usize>) {
        if self.steps[i].compensate.is_some() {
            completed.push(i);
        }
    }

    /// Runs one step, started at `started`, to completion or exhaustion of its retries.
    /// Returns when it ended.
    async fn run_step(
        &self,
        i: usize,
        ctx: &Context<I>,
        started: Instant,
    ) -> (StepResult, Result<(), FlowError>, Instant) {
        let step = &self.steps[i];
        let mut result = StepResult::pending(&step.name);
        let mut attempt = 0;
        let outcome = loop {
            if attempt > 0 && ctx.is_cancelled() {
                result.status = Status::Cancelled;
                break Err(FlowError::Cancelled);
            }
            attempt += 1;
            result.attempts = attempt;
            self.hooks.emit(Event::StepStart {
                flow: &self.name,
                step: &step.name,
                attempt,
            });
            let span = tracing::info_span!("step", step = %step.name, attempt);
            let run = (step.run)(ctx.clone());
            // Instrumenting costs a little even when no subscriber listens: skip it then.
            let run = if span.is_disabled() {
                Either::Left(run)
            } else {
                Either::Right(run.instrument(span))
            };
            let outcome = match step.timeout {
                Some(limit) => tokio::time::timeout(limit, run)
                    .await
                    .unwrap_or_else(|_| Err(StepError::timed_out(limit))),
                None => run.await,
            };
            let err = match outcome {
                Ok(()) => {
                    let ended = Instant::now();
                    result.status = Status::Completed;
                    result.error = None;
                    result.duration = ended.duration_since(started);
                    self.hooks.emit(Event::StepComplete {
                        flow: &self.name,
                        step: &step.name,
                        attempts: attempt,
                        duration: result.duration,
                    });
                    return (result, Ok(()), ended);
                }
                Err(err) => err,
            };
            let message = err.to_string();
            if ctx.is_cancelled() {
                // A step failing while its run is cancelled is taken to have stopped because
                // of the cancellation: the run is cancelled, not failed (and not cached).
                result.status = Status::Cancelled;
                result.error = Some(message);
                break Err(FlowError::Cancelled);
            }
            let retry_in =
                (attempt <= step.retry.max_retries()).then(|| step.retry.sleep_before(attempt - 1));
            tracing::debug!(step = %step.name, attempt, error = %message, ?retry_in, "step attempt failed");
            self.hooks.emit(Event::StepFail {
                flow: &self.name,
                step: &step.name,
                attempt,
                error: &message,
                retry_in,
            });
            let Some(delay) = retry_in else {
                result.status = Status::Failed;
                result.error = Some(message.clone());
                break Err(FlowError::Step {
                    step: step.name.to_string(),
                    attempts: attempt,
                    message,
                    transient: err.is_transient(),
                });
            };
            result.error = Some(message);
            tokio::select! {
                () = ctx.cancellation().cancelled() => {
                    result.status = Status::Cancelled;
                    break Err(FlowError::Cancelled);
                }
                () = tokio::time::sleep(delay) => {}
            }
        };
        let ended = Instant::now();
        result.duration = ended.duration_since(started);
        (result, outcome, ended)
    }

    /// Starts the group's steps together and applies the group's failure rule.
    async fn run_group(
        &self,
        range: Range<usize>,
        fail_fast: bool,
        ctx: &Context<I>,
        started: Instant,
        steps: &mut [StepResult],
        completed: &mut Vec<usize>,
    ) -> Result<(), FlowError> {
        let token = ctx.cancellation().child_token();
        let group_ctx = ctx.with_token(token.clone());
        let mut running: FuturesUnordered<_> = range
            .clone()
            .map(|i| {
                let group_ctx = &group_ctx;
                async move {
                    let (result, outcome, _) = self.run_step(i, group_ctx, started).await;
                    (i, result, outcome)
                }
            })
            .collect();
        let mut first_error = None;
        let mut failures = 0;
        while let Some((i, result, outcome)) = running.next().await {
            steps[i] = result;
            match outcome {
                Ok(()) => self.completed(i, completed),
                Err(e) => {
                    failures += 1;
                    first_error.get_or_insert(e);
                    if fail_fast {
                        break;
                    }
                }
            }
        }
        if fail_fast && first_error.is_some() {
            // Dropping the futures stops the siblings at their next await; the token tells
            // steps that watch it.
            token.cancel();
            drop(running);
            for i in range.clone() {
                if steps[i].status == Status::Pending {
                    steps[i].status = Status::Cancelled;
                    steps[i].attempts = steps[i].attempts.max(1);
                }
            }
            return first_error.map_or(Ok(()), Err);
        }
        match first_error {
            Some(e) if failures == range.len() => Err(e),
            _ => Ok(()),
        }
    }

    /// Compensates completed steps in reverse completion order.
    async fn compensate(
        &self,
        ctx: &Context<I>,
        completed: &[usize],
        steps: &mut [StepResult],
        failures: &mut Vec<CompensationFailure>,
    ) {
        // Compensations must run even when the run was cancelled: give them a live token.
        let ctx = ctx.with_token(CancellationToken::new());
        for &i in completed.iter().rev() {
            let step = &self.steps[i];
            let Some(compensate) = &step.compensate else {
                continue;
            };
            self.hooks.emit(Event::CompensateStart {
                flow: &self.name,
                step: &step.name,
            });
            let span = tracing::info_span!("compensate", step = %step.name);
            let error = compensate(ctx.clone())
                .instrument(span)
                .await
                .err()
                .map(|e| e.to_string());
            self.hooks.emit(Event::CompensateComplete {
                flow: &self.name,
                step: &step.name,
                error: error.as_deref(),
            });
            match error {
                None => steps[i].status = Status::Cancelled,
                Some(message) => failures.push(CompensationFailure {
                    step: step.name.to_string(),
                    message,
                }),
            }
        }
    }
}
