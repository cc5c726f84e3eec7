//! The one entry point of a run: validate → acquire → execute → persist → notify.
//!
//! A durable flow's keyed run takes the same stages in [`crate::durable`], with two more
//! between acquire and execute: restore (the journal of an interrupted run) and journal
//! (each step as it completes).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::{Context, RunIdentity};
use crate::execute::{Progress, Track};
use crate::flow::{AsyncValidatorFn, Flow, Validator};
use crate::hooks::Event;
use crate::idempotency::{
    AdmitRequest, Computed, Decided, Ending, IdempotencyError, Ownership, RunOptions, Settlement,
    admit_with,
};
use crate::result::{FlowError, FlowResult, Status};
use crate::step::panic_message;
use crate::store::{RecordView, StoreError};
use crate::stored::StoredError;
use crate::telemetry::{Outcome, execution_result};
use crate::validation::Issue;

/// Why [`Flow::run`] returned no result, or returned one that could not be persisted.
///
/// A failed *flow* is not an error: it is an `Ok` [`FlowResult`] with status `Failed`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError<O> {
    /// The run could not start (bad key or option, key reused, already running, store
    /// unreachable) or its stored result could not be replayed. No step ran.
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
    /// The flow **ran**, but its outcome could not be stored. The result is here — act on
    /// it. If the lease was lost (`StoreError::StaleToken`) another owner has the key; if
    /// the store failed, the record stays running until its lease lapses.
    #[error("the run executed but its outcome was not stored: {source}")]
    NotPersisted {
        /// The run's result.
        result: Box<FlowResult<O>>,
        /// Why it was not stored.
        #[source]
        source: StoreError,
    },
}

impl<O> RunError<O> {
    /// The executed run's result, for [`RunError::NotPersisted`].
    pub fn into_result(self) -> Option<FlowResult<O>> {
        match self {
            Self::NotPersisted { result, .. } => Some(*result),
            Self::Idempotency(_) => None,
        }
    }
}

impl<I, O> Flow<I, O>
where
    I: Serialize + Send + Sync + 'static,
    O: Serialize + DeserializeOwned + Send + 'static,
{
    /// Runs the flow on `input`.
    ///
    /// Without a key ([`RunOptions::new`]) the steps simply run and the store is never
    /// touched. With a key, the store decides first (see [`crate::idempotency::admit`]):
    /// the steps run at most once per key, and duplicates get the stored result
    /// (`replayed = true`), a `Running` result, an error, or the owner's result after a
    /// wait, as the options say.
    ///
    /// # Errors
    /// [`RunError::Idempotency`] when a keyed run cannot start or replay; nothing ran.
    /// [`RunError::NotPersisted`] when the run executed but storing its outcome failed;
    /// the result is inside.
    ///
    /// # Cancel safety
    /// Dropping the future mid-run (a timeout around `run`, a request handler dropped when
    /// its client hangs up) stops the steps at their next await, without compensation. A
    /// keyed run's record is then settled by a task spawned on the current Tokio runtime,
    /// as a cancellation without compensation would settle it: freed when no step had
    /// completed, kept as a failure with a `Cancelled` error when one had (so it never runs
    /// again), and for a durable flow given up with its journal so the next caller resumes
    /// at once. Outside a runtime (or if that task cannot run) the record stays running
    /// until its lease lapses, like after a crash: never longer than one lease after the
    /// last renewal. To stop a run with compensation, fire the token given to
    /// [`RunOptions::cancellation`] (see the rule in [`crate::idempotency`]).
    pub async fn run(&self, input: I, options: RunOptions) -> Result<FlowResult<O>, RunError<O>> {
        let name = &self.inner.plan.name;
        let span = tracing::info_span!(
            "flow",
            flow = %name,
            key = options.key.as_deref(),
            workflow.name = %name,
            workflow.execution.id = tracing::field::Empty,
            workflow.execution.result = tracing::field::Empty,
            replayed = tracing::field::Empty,
        );
        let mut waited = false;
        // Instrumenting costs a little even when no subscriber listens: skip it then, and
        // keep no span in the future across the run.
        if span.is_disabled() {
            drop(span);
            let outcome = self.decide(input, options, None, &mut waited).await;
            self.inner.metrics.run(|| classify(&outcome, waited));
            return outcome;
        }
        let outcome = self
            .decide(input, options, Some(&span), &mut waited)
            .instrument(span.clone())
            .await;
        self.inner.metrics.run(|| classify(&outcome, waited));
        if let Ok(result) = &outcome {
            span.record("workflow.execution.result", execution_result(result.status));
            span.record("replayed", result.replayed);
        }
        outcome
    }

    /// Validates, then runs the steps unkeyed or lets the store decide.
    ///
    /// The execution itself is boxed ([`execute`](Self::execute), [`own`](Self::own)), so
    /// the future every run builds, moves and awaits holds only the decision (1.1 KB instead
    /// of 2.3 KB for the benchmarks' flow), and a replay never copies the rest.
    async fn decide(
        &self,
        input: I,
        options: RunOptions,
        span: Option<&tracing::Span>,
        waited: &mut bool,
    ) -> Result<FlowResult<O>, RunError<O>> {
        options.validate()?;
        if let Some(rejected) = self.validate(&input).await {
            return Ok(self.notify(rejected));
        }
        let Some(key) = options.scoped_key(&self.inner.key_prefix) else {
            let id = fastrand::u128(..);
            if let Some(span) = span {
                span.record("workflow.execution.id", format_args!("{id:032x}"));
            }
            let run = RunIdentity::Random(id);
            let result = self
                .execute(input, run, options.cancel_token(), Track::Off)
                .await;
            return Ok(self.notify(result));
        };
        if let Some(span) = span {
            span.record("workflow.execution.id", key.as_str());
        }
        if self.inner.durable.is_some() {
            return Box::pin(self.run_durable(&key, input, &options, waited)).await;
        }
        match self.acquire(&key, &input, &options).await? {
            Decided::Acquired(owner) => Box::pin(self.own(owner, input, &options)).await,
            Decided::Finished(replay) => Ok(replay?),
            Decided::Waited(replay) => {
                *waited = true;
                Ok(replay?)
            }
            Decided::Running => Ok(self.running()),
        }
    }

    /// The result for a key another caller is running.
    pub(crate) fn running(&self) -> FlowResult<O> {
        let plan = &self.inner.plan;
        FlowResult::without_steps(&plan.name, Status::Running, &plan.step_names, None)
    }

    /// Runs the steps under an acquired key, then stores the outcome.
    async fn own(
        &self,
        owner: Ownership,
        input: I,
        options: &RunOptions,
    ) -> Result<FlowResult<O>, RunError<O>> {
        // Made only now: a replay or a refused run never needs a cancellation token.
        let cancel = options.cancel_token();
        let progress = Arc::new(Progress::default());
        let run = RunIdentity::Key(Arc::from(owner.key()));
        let owner = Unsettled::new(owner, self.if_dropped(&progress, options.ttl));
        let result = owner
            .owner()
            .hold(
                &cancel,
                self.execute(input, run, cancel.clone(), Track::Progress(&progress)),
            )
            .await;
        let persisted = self.persist(owner, &result, options).await;
        self.conclude(result, persisted)
    }

    /// Stage 5 and the answer: notify, then hand the result over, inside
    /// [`RunError::NotPersisted`] when its outcome could not be stored.
    pub(crate) fn conclude(
        &self,
        result: FlowResult<O>,
        persisted: Result<(), StoreError>,
    ) -> Result<FlowResult<O>, RunError<O>> {
        let result = self.notify(result);
        match persisted {
            Ok(()) => Ok(result),
            Err(source) => Err(RunError::NotPersisted {
                result: Box::new(result),
                source,
            }),
        }
    }

    /// How a non-durable run's record is settled if its future is dropped: freed when no
    /// step completed, otherwise kept as a cancelled failure listing the completed steps.
    fn if_dropped(&self, progress: &Arc<Progress>, ttl: Option<Duration>) -> IfDropped {
        IfDropped::ReleaseOrFail {
            progress: Arc::clone(progress),
            flow: Arc::clone(&self.inner.plan.name),
            names: Arc::clone(&self.inner.plan.step_names),
            ttl,
        }
    }

    /// Stage 1: the input validator. `Some` is the failed result to return. A validator
    /// (or its future) that panics rejects the input rather than unwinding through the run.
    async fn validate(&self, input: &I) -> Option<FlowResult<O>> {
        let verdict = match self.inner.validator.as_ref()? {
            Validator::Sync(validate) => catch_unwind(AssertUnwindSafe(|| validate(input))),
            // Boxed: the future of every run stays the size it is without an async validator.
            Validator::Async(validate) => Box::pin(validate_async(validate, input)).await,
        };
        let issues = match verdict {
            Ok(verdict) => verdict.err()?,
            Err(payload) => vec![Issue::new(format!(
                "the validator panicked: {}",
                panic_message(&*payload)
            ))],
        };
        let plan = &self.inner.plan;
        Some(FlowResult::without_steps(
            &plan.name,
            Status::Failed,
            &plan.step_names,
            Some(FlowError::Validation { issues }),
        ))
    }

    /// Stage 2: one atomic store operation decides whether this caller runs. A finished
    /// record's result is decoded where the store holds it, as the replay.
    async fn acquire(
        &self,
        key: &str,
        input: &I,
        options: &RunOptions,
    ) -> Result<Decided<Result<FlowResult<O>, IdempotencyError>>, IdempotencyError> {
        let fingerprint = self.fingerprint(input)?;
        admit_with(
            &self.inner.store,
            AdmitRequest {
                key,
                fingerprint: fingerprint.as_ref().map(|f| f.as_str()),
                lease: options.lease,
                cache_result: options.cache_result,
                on_running: options.on_running,
            },
            |record| self.replay(record),
        )
        .await
    }

    /// The input's fingerprint. Its `Serialize` (or a custom fingerprint function) is the
    /// user's code: a panic in it is a typed error, before the store is touched.
    pub(crate) fn fingerprint(&self, input: &I) -> Result<Option<Computed>, IdempotencyError> {
        catch_unwind(AssertUnwindSafe(|| self.inner.fingerprint.of(input)))
            .unwrap_or_else(|payload| {
                Err(serde::ser::Error::custom(format_args!(
                    "fingerprinting the input panicked: {}",
                    panic_message(&*payload)
                )))
            })
            .map_err(IdempotencyError::Fingerprint)
    }

    /// A finished record's result, as a replay: a typed "result not stored" when the
    /// record was finished without it (too large, refused, or an output that could not be
    /// kept).
    pub(crate) fn replay(&self, record: RecordView<'_>) -> Result<FlowResult<O>, IdempotencyError> {
        let not_stored = || IdempotencyError::ResultNotStored {
            key: record.key.to_owned(),
        };
        let bytes = record.result.ok_or_else(not_stored)?;
        let plan = &self.inner.plan;
        // The output's `Deserialize` is the user's code, and may run under a store's lock.
        let decoded = catch_unwind(AssertUnwindSafe(|| {
            FlowResult::from_stored(&plan.name, &plan.step_names, bytes)
        }));
        match decoded {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(StoredError::OutputNotKept)) => Err(not_stored()),
            Ok(Err(e)) => Err(IdempotencyError::Store(StoreError::decode(e))),
            Err(payload) => Err(IdempotencyError::Store(StoreError::decode(format!(
                "decoding the stored output panicked: {}",
                panic_message(&*payload)
            )))),
        }
    }

    /// Stage 3: the steps.
    pub(crate) async fn execute(
        &self,
        input: I,
        run: RunIdentity,
        cancel: CancellationToken,
        track: Track<'_>,
    ) -> FlowResult<O> {
        let ctx = self.context(input, run, cancel);
        Box::pin(self.inner.plan.execute(ctx, track)).await
    }

    /// The context of one run.
    pub(crate) fn context(
        &self,
        input: I,
        run: RunIdentity,
        cancel: CancellationToken,
    ) -> Context<I> {
        let names = Some(Arc::clone(&self.inner.plan.step_names));
        Context::for_run(input, cancel, run, names)
    }

    /// Stage 4: store the outcome, or free the key (see [`Settlement::after`]).
    pub(crate) async fn persist(
        &self,
        owner: Unsettled,
        result: &FlowResult<O>,
        options: &RunOptions,
    ) -> Result<(), StoreError> {
        let ending = Ending {
            status: result.status,
            transient: result.error.as_ref().is_some_and(FlowError::is_transient),
            effects_remain: result.steps.iter().any(|s| s.status == Status::Completed),
            durable: self.inner.durable.is_some(),
        };
        let settlement = Settlement::after(ending, options.cache_result);
        if matches!(settlement, Settlement::Release | Settlement::Suspend) {
            return owner.settle(settlement, &[], None).await;
        }
        let stored = result.to_stored();
        owner.settle(settlement, &stored.bytes, options.ttl).await?;
        // An output that could not be kept: the outcome is stored without it, so the
        // operation never runs twice, and the caller learns why a replay will not have it.
        match stored.output_not_kept {
            Some(why) => Err(StoreError::Encode(Box::new(why))),
            None => Ok(()),
        }
    }

    /// Stage 5: tell the plugins (and the metrics) how the run ended.
    pub(crate) fn notify(&self, result: FlowResult<O>) -> FlowResult<O> {
        self.inner.metrics.executed(&result);
        let plan = &self.inner.plan;
        match &result.error {
            None => plan.hooks.emit(Event::FlowComplete {
                flow: &plan.name,
                duration: result.duration,
            }),
            Some(error) => plan.hooks.emit(Event::FlowFail {
                flow: &plan.name,
                status: result.status,
                error,
                duration: result.duration,
            }),
        }
        result
    }
}

/// An async validator's verdict; a panic while it builds or polls its future is caught.
async fn validate_async<I>(
    validate: &AsyncValidatorFn<I>,
    input: &I,
) -> std::thread::Result<Result<(), Vec<Issue>>> {
    match catch_unwind(AssertUnwindSafe(|| validate(input))) {
        Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
        Err(payload) => Err(payload),
    }
}

/// How one call of `run` ended, for `orchestrix_runs_total`.
fn classify<O>(outcome: &Result<FlowResult<O>, RunError<O>>, waited: bool) -> Outcome {
    match outcome {
        Ok(r) if r.replayed && waited => Outcome::Waited,
        Ok(r) if r.replayed => Outcome::Replayed,
        Ok(r) if r.status == Status::Running => Outcome::Running,
        Ok(r) if matches!(r.error, Some(FlowError::Validation { .. })) => Outcome::Rejected,
        Ok(r) if r.steps.iter().any(|s| s.restored) => Outcome::Resumed,
        Ok(_) => Outcome::Executed,
        Err(RunError::NotPersisted { .. }) => Outcome::NotPersisted,
        Err(RunError::Idempotency(e)) => match e {
            IdempotencyError::KeyReused { .. } => Outcome::KeyReused,
            IdempotencyError::AlreadyRunning { .. } => Outcome::AlreadyRunning,
            IdempotencyError::WaitTimedOut { .. } => Outcome::WaitTimedOut,
            _ => Outcome::Error,
        },
    }
}

/// An acquired key whose outcome is not settled yet.
///
/// If the run's future is dropped before [`settle`](Self::settle) finishes (a caller's
/// timeout, a request handler dropped on disconnect), the guard settles the record in a
/// task spawned on the current Tokio runtime, as a cancellation without compensation
/// would: see [`IfDropped`]. So a dropped run never leaves a completed step runnable again
/// once its lease lapses. Without a runtime the record is left to its lease.
pub(crate) struct Unsettled {
    owner: Ownership,
    /// Cleared once the store answered the settlement.
    armed: bool,
    if_dropped: IfDropped,
}

/// What [`Unsettled`] does with a record whose run was dropped.
pub(crate) enum IfDropped {
    /// A durable run: give the key up with its journal, so the next caller resumes at once.
    Suspend,
    /// A plain keyed run: free the key if no step completed, else keep the outcome as a
    /// cancelled failure that lists the completed steps.
    ReleaseOrFail {
        progress: Arc<Progress>,
        flow: Arc<str>,
        names: Arc<[Arc<str>]>,
        ttl: Option<Duration>,
    },
}

impl Unsettled {
    pub(crate) fn new(owner: Ownership, if_dropped: IfDropped) -> Self {
        Self {
            owner,
            armed: true,
            if_dropped,
        }
    }

    /// The ownership.
    pub(crate) fn owner(&self) -> &Ownership {
        &self.owner
    }

    /// Settles the record; the guard is disarmed once the store has answered, whatever it
    /// answered.
    pub(crate) async fn settle(
        mut self,
        settlement: Settlement,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let settled = self.owner.settle_in_place(settlement, result, ttl).await;
        self.armed = false;
        settled
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let owner = self.owner.duplicate();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key = %owner.key(), "a keyed run was dropped outside a Tokio runtime; its record stays running until its lease lapses");
            return;
        };
        let (settlement, bytes, ttl) = match &self.if_dropped {
            IfDropped::Suspend => (Settlement::Suspend, Vec::new(), None),
            IfDropped::ReleaseOrFail {
                progress,
                flow,
                names,
                ttl,
            } => {
                let done = progress.snapshot();
                if done.is_empty() {
                    (Settlement::Release, Vec::new(), None)
                } else {
                    (Settlement::Fail, dropped_result(flow, names, &done), *ttl)
                }
            }
        };
        tracing::warn!(key = %owner.key(), ?settlement, "a keyed run was dropped before it ended; settling its record");
        runtime.spawn(async move {
            if let Err(e) = owner.settle_in_place(settlement, &bytes, ttl).await {
                tracing::warn!(key = %owner.key(), error = %e, "the record of a dropped run could not be settled; it stays running until its lease lapses");
            }
        });
    }
}

/// The stored outcome of a run dropped after `done` steps completed: cancelled, with
/// those steps completed and the others pending.
fn dropped_result(flow: &Arc<str>, names: &[Arc<str>], done: &[(usize, u32, Duration)]) -> Vec<u8> {
    let mut result =
        FlowResult::<()>::without_steps(flow, Status::Cancelled, names, Some(FlowError::Cancelled));
    for &(i, attempts, duration) in done {
        if let Some(step) = result.steps.get_mut(i) {
            step.status = Status::Completed;
            step.attempts = attempts;
            step.duration = duration;
        }
    }
    result.to_stored().bytes
}
