//! Runs a flow's steps: retries, timeouts, parallel groups, cancellation, compensation.
//!
//! Nothing here knows about stores: [`crate::run`] wraps this in the store stages. What a
//! run records as it goes is one parameter, [`Track`]: nothing (a plain run), which steps
//! completed (a keyed run, for when its future is dropped), or every step in a durable
//! run's journal, which also says what an earlier run of the key already did.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::{Context, StepSlot};
use crate::durable::entry::Entry;
use crate::durable::journaling::Journaling;
use crate::hooks::{Event, Hooks};
use crate::result::{CompensationFailure, FlowError, FlowResult, Status, StepResult};
use crate::step::{ErrorKind, Step, StepError, panic_message};

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
    pub(crate) step_names: Arc<[Arc<str>]>,
    pub(crate) stages: Vec<Stage>,
    pub(crate) output: Option<OutputFn<I, O>>,
    pub(crate) hooks: Hooks,
    pub(crate) compensate_on_cancel: bool,
}

/// What a run records as its steps go.
#[derive(Clone, Copy)]
pub(crate) enum Track<'a> {
    /// Nothing: a run without a key.
    Off,
    /// Which steps completed: a keyed run, whose record must say so if its future is
    /// dropped before the run ends.
    Progress(&'a Progress),
    /// Everything, in the journal of a durable run.
    Journal(&'a Journaling<'a>),
}

/// The steps a keyed run completed so far, by position, with attempts and duration.
#[derive(Debug, Default)]
pub(crate) struct Progress(Mutex<Vec<(usize, u32, Duration)>>);

impl Progress {
    fn completed(&self, position: usize, result: &StepResult) {
        let mut done = self.0.lock().unwrap_or_else(|p| p.into_inner());
        done.push((position, result.attempts, result.duration));
    }

    /// The steps completed so far.
    pub(crate) fn snapshot(&self) -> Vec<(usize, u32, Duration)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl<I: Send + Sync + 'static, O> Plan<I, O> {
    /// Runs every stage in order, then compensates if the run did not complete. A durable
    /// run skips what its journal says earlier runs completed.
    pub(crate) async fn execute(&self, ctx: Context<I>, track: Track<'_>) -> FlowResult<O> {
        let started = Instant::now();
        self.hooks.emit(Event::FlowStart { flow: &self.name });
        let mut steps: Vec<StepResult> = self.step_names.iter().map(StepResult::pending).collect();
        // Steps to compensate, in completion order. Only steps that have a compensation are
        // recorded, so a flow without compensations never allocates here.
        let mut completed = Vec::new();
        let mut error = None;
        if let Track::Journal(journal) = track {
            error = self.restore(journal, &mut steps, &mut completed);
        }
        // Each step starts when the previous one ended: one clock read per step.
        let mut clock = started;
        for stage in &self.stages {
            if error.is_some() {
                break;
            }
            if ctx.is_cancelled() {
                error = Some(FlowError::Cancelled);
                break;
            }
            let outcome = match stage {
                Stage::Single(i) => {
                    let i = *i;
                    let outcome = if let Track::Journal(journal) = track {
                        // Boxed: the journal's writes stay out of the future of plain runs.
                        let (result, outcome) =
                            Box::pin(self.journaled_step(i, &ctx, clock, journal)).await;
                        if let Some(result) = result {
                            clock += result.duration.saturating_sub(clock - started);
                            steps[i] = result;
                        }
                        outcome
                    } else {
                        let (result, outcome, ended) = self.run_step(i, &ctx, None, clock).await;
                        clock = ended;
                        if outcome.is_ok()
                            && let Track::Progress(progress) = track
                        {
                            progress.completed(i, &result);
                        }
                        steps[i] = result;
                        outcome.map(|()| true)
                    };
                    outcome.map(|ran| {
                        if ran {
                            self.completed(i, &mut completed);
                        }
                    })
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
                            track,
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
        // A durable run that lost its ownership stops without compensating: its next owner
        // resumes from the journal and counts the journaled steps as done.
        let owner_gone = matches!(track, Track::Journal(journal) if journal.lost());
        let compensate =
            status == Status::Failed || (status == Status::Cancelled && self.compensate_on_cancel);
        if compensate && !owner_gone {
            if let (Track::Journal(journal), Some(error)) = (track, &error)
                && status == Status::Failed
                && journal.resume.failed.is_none()
            {
                // A crash while compensating resumes the compensation, not the run.
                let position = steps.iter().position(|s| s.status == Status::Failed);
                let name = position.map_or("", |p| &*self.step_names[p]);
                let failed = Entry::Failed {
                    position,
                    name: name.to_owned(),
                    error: error.clone(),
                };
                Box::pin(journal.note(name, &failed)).await;
            }
            self.compensate(
                &ctx,
                track,
                &completed,
                &mut steps,
                &mut compensation_failures,
            )
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

    /// A resumed durable run: marks the steps its journal says completed (in completion
    /// order, so they compensate in reverse), and returns the failure of a run that was
    /// already failing. The state they wrote was restored with the context.
    fn restore(
        &self,
        journal: &Journaling<'_>,
        steps: &mut [StepResult],
        completed: &mut Vec<usize>,
    ) -> Option<FlowError> {
        let resume = &journal.resume;
        for &i in &resume.order {
            let Some(Some(restored)) = resume.restored.get(i) else {
                continue;
            };
            steps[i].status = Status::Completed;
            steps[i].attempts = restored.attempts;
            steps[i].duration = restored.duration;
            steps[i].restored = true;
            self.hooks.emit(Event::StepRestored {
                flow: &self.name,
                step: &self.step_names[i],
                attempts: restored.attempts,
            });
            let span = tracing::info_span!(
                "step",
                step = %self.step_names[i],
                workflow.task.name = %self.step_names[i],
                attempts = restored.attempts,
                workflow.task.run.result = "skip",
                restored = true,
            );
            span.in_scope(|| tracing::info!("step restored from the journal"));
            self.completed(i, completed);
        }
        for (i, step) in steps.iter_mut().enumerate() {
            if resume.was_compensated(i) {
                step.status = Status::Cancelled;
            }
        }
        let (position, error) = resume.failed.clone()?;
        if let Some(step) = position.and_then(|p| steps.get_mut(p)) {
            step.status = Status::Failed;
        }
        Some(error)
    }

    /// The step at `i` as a parallel branch: run and tracked as [`execute`](Self::execute)
    /// does a single step, returning its result (`None` when restored) and whether it ran.
    async fn tracked_step(
        &self,
        i: usize,
        ctx: &Context<I>,
        started: Instant,
        track: Track<'_>,
    ) -> (Option<StepResult>, Result<bool, FlowError>) {
        if let Track::Journal(journal) = track {
            return Box::pin(self.journaled_step(i, ctx, started, journal)).await;
        }
        let (result, outcome, _) = self.run_step(i, ctx, None, started).await;
        if outcome.is_ok()
            && let Track::Progress(progress) = track
        {
            progress.completed(i, &result);
        }
        (Some(result), outcome.map(|()| true))
    }

    /// A step in a durable run: skipped when the journal has
    /// it, refused when an at-most-once step was interrupted, its start marked when it is
    /// at most once, and its checkpoint (with the state it wrote) written once it completed.
    async fn journaled_step(
        &self,
        i: usize,
        ctx: &Context<I>,
        started: Instant,
        journal: &Journaling<'_>,
    ) -> (Option<StepResult>, Result<bool, FlowError>) {
        let step = &self.steps[i];
        if journal.resume.is_restored(i) {
            return (None, Ok(false));
        }
        if let Err(e) = journal.stop_if_lapsed(&step.name) {
            return (Some(StepResult::pending(&step.name)), Err(e));
        }
        if step.at_most_once {
            if journal.resume.is_interrupted(i) {
                let mut result = StepResult::pending(&step.name);
                result.status = Status::Failed;
                let error = FlowError::StepInterrupted {
                    step: step.name.to_string(),
                };
                result.error = Some(error.to_string());
                return (Some(result), Err(error));
            }
            let mark = Entry::Started {
                position: i,
                name: step.name.to_string(),
            };
            if let Err(e) = journal.write(&step.name, &mark).await {
                return (Some(StepResult::pending(&step.name)), Err(e));
            }
            // Again once the mark is stored, which a stall may also have outlived: the
            // step is then left interrupted (never run) rather than run after another
            // owner failed the run for it. Checked before the mark too, so a lease that
            // had lapsed already does not leave the step marked.
            if let Err(e) = journal.stop_if_lapsed(&step.name) {
                return (Some(StepResult::pending(&step.name)), Err(e));
            }
        }
        let writes = Arc::new(Mutex::new(Vec::new()));
        let (result, outcome, _) = self
            .run_step(i, ctx, Some(Arc::clone(&writes)), started)
            .await;
        if outcome.is_err() {
            return (Some(result), outcome.map(|()| true));
        }
        let written = writes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let entry = Entry::Completed {
            position: i,
            name: step.name.to_string(),
            attempts: result.attempts,
            duration: result.duration,
            state: ctx.state_of(&written),
        };
        if let Err(e) = journal.write(&step.name, &entry).await {
            // The step completed but is not recorded: it is compensated with the others,
            // and a resumed run would run it again.
            return (Some(result), Err(e));
        }
        (Some(result), Ok(true))
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

    /// Runs one step, started at `started`, to completion or exhaustion of its retries;
    /// beside its result, when it ended. `writes`, in a durable run, collects the state
    /// keys the step sets.
    ///
    /// The step is a span of its own when a subscriber listens; each attempt's future is
    /// instrumented with it, and the plain future runs as it is when nobody does.
    async fn run_step(
        &self,
        i: usize,
        ctx: &Context<I>,
        writes: Option<Arc<Mutex<Vec<String>>>>,
        started: Instant,
    ) -> (StepResult, Result<(), FlowError>, Instant) {
        let slot = StepSlot {
            position: position(i),
            compensation: false,
        };
        let step = &self.steps[i];
        let span = tracing::info_span!(
            "step",
            step = %step.name,
            workflow.task.name = %step.name,
            attempts = tracing::field::Empty,
            workflow.task.run.result = tracing::field::Empty,
        );
        let traced = !span.is_disabled();
        let mut result = StepResult::pending(&step.name);
        let mut attempt = 0;
        let mut last = None;
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
            let run = (step.run)(ctx.for_step(slot, writes.clone()));
            let run = if traced {
                Either::Right(run.instrument(span.clone()))
            } else {
                Either::Left(run)
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
                    if traced {
                        record_step(&span, &result, None);
                    }
                    return (result, Ok(()), ended);
                }
                Err(err) => err,
            };
            last = Some(err.kind());
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
            if let Some(delay) = retry_in {
                // A retry is an event of the step's span: which attempt failed, and when the
                // next one starts. The message is the step's own error text.
                span.in_scope(|| {
                    tracing::info!(
                        attempt,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        error = %message,
                        "step attempt failed; retrying"
                    );
                });
            } else {
                tracing::debug!(step = %step.name, attempt, error = %message, "step attempt failed");
            }
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
                let transient = err.is_transient();
                break Err(FlowError::Step {
                    step: step.name.to_string(),
                    attempts: attempt,
                    message,
                    transient,
                    source: Some(err.into_shared()),
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
        if traced {
            record_step(&span, &result, last);
        }
        (result, outcome, ended)
    }

    /// Starts the group's steps together and applies the group's failure rule. In a durable
    /// run each branch is journaled as it completes; branches the journal already has are
    /// not run again, and count as succeeded.
    #[allow(clippy::too_many_arguments)]
    async fn run_group(
        &self,
        range: Range<usize>,
        fail_fast: bool,
        ctx: &Context<I>,
        started: Instant,
        track: Track<'_>,
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
                    let (result, outcome) = self.tracked_step(i, group_ctx, started, track).await;
                    (i, result, outcome)
                }
            })
            .collect();
        let mut first_error = None;
        let mut failures = 0;
        while let Some((i, result, outcome)) = running.next().await {
            if let Some(result) = result {
                steps[i] = result;
            }
            match outcome {
                Ok(true) => self.completed(i, completed),
                Ok(false) => {}
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
            // A journaling failure (or a lost lease) stops the run whatever the group's rule.
            Some(e @ (FlowError::JournalWrite { .. } | FlowError::StepInterrupted { .. })) => {
                Err(e)
            }
            Some(e) if failures == range.len() => Err(e),
            _ => Ok(()),
        }
    }

    /// Compensates completed steps in reverse completion order. A durable run journals
    /// each compensation, and skips those its journal says already ran.
    async fn compensate(
        &self,
        ctx: &Context<I>,
        track: Track<'_>,
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
            if let Track::Journal(journal) = track
                && journal.resume.was_compensated(i)
            {
                continue;
            }
            self.hooks.emit(Event::CompensateStart {
                flow: &self.name,
                step: &step.name,
            });
            let span = tracing::info_span!("compensate", step = %step.name);
            let slot = StepSlot {
                position: position(i),
                compensation: true,
            };
            let error = compensate(ctx.for_step(slot, None))
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
                None => {
                    steps[i].status = Status::Cancelled;
                    if let Track::Journal(journal) = track {
                        let entry = Entry::Compensated {
                            position: i,
                            name: step.name.to_string(),
                        };
                        Box::pin(journal.note(&step.name, &entry)).await;
                    }
                }
                Some(message) => failures.push(CompensationFailure {
                    step: step.name.to_string(),
                    message,
                }),
            }
        }
    }
}

/// Records how a step ended on its span.
fn record_step(span: &tracing::Span, result: &StepResult, last: Option<ErrorKind>) {
    span.record("attempts", result.attempts);
    span.record("workflow.task.run.result", task_result(result.status, last));
}

/// A step's `workflow.task.run.result`, from its status and how its last attempt ended.
fn task_result(status: Status, last: Option<ErrorKind>) -> &'static str {
    match (status, last) {
        (Status::Completed, _) => "success",
        (Status::Cancelled, _) => "cancellation",
        (_, Some(ErrorKind::TimedOut)) => "timeout",
        (_, Some(ErrorKind::Panicked)) => "error",
        _ => "failure",
    }
}

/// A step's index as the context's slot holds it. A flow has far fewer than 2³² steps.
fn position(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}
