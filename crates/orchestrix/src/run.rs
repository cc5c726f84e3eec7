//! The one entry point of a run: validate → acquire → execute → persist → notify.

use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::Context;
use crate::flow::Flow;
use crate::hooks::Event;
use crate::idempotency::{
    AdmitRequest, Decided, Ending, IdempotencyError, Ownership, RunOptions, Settlement, admit_with,
};
use crate::result::{FlowError, FlowResult, Status};
use crate::step::panic_message;
use crate::store::{RecordView, StoreError};
use crate::stored::StoredError;

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
    /// its client hangs up) stops the steps at their next await and leaves a keyed record
    /// running until its lease lapses, exactly like a crash: never longer than one lease
    /// after the last renewal, and a record dropped before its heartbeat started is
    /// free after one lease from its acquire. The next caller then runs the flow again.
    /// To stop a run cleanly, fire the token given to [`RunOptions::cancellation`]: the
    /// run compensates, and frees its key when nothing it did remains (see the rule in
    /// [`crate::idempotency`]).
    pub async fn run(&self, input: I, options: RunOptions) -> Result<FlowResult<O>, RunError<O>> {
        let span = tracing::info_span!(
            "flow",
            flow = %self.inner.plan.name,
            key = options.key.as_deref()
        );
        self.decide(input, options).instrument(span).await
    }

    /// Validates, then runs the steps unkeyed or lets the store decide.
    ///
    /// The execution itself is boxed ([`execute`](Self::execute), [`own`](Self::own)), so
    /// the future every run builds, moves and awaits holds only the decision (1.1 KB instead
    /// of 2.3 KB for the benchmarks' flow), and a replay never copies the rest.
    async fn decide(&self, input: I, options: RunOptions) -> Result<FlowResult<O>, RunError<O>> {
        options.validate()?;
        if let Some(rejected) = self.validate(&input) {
            return Ok(self.notify(rejected));
        }
        let Some(key) = options.scoped_key(&self.inner.key_prefix) else {
            let result = self.execute(input, options.cancel_token()).await;
            return Ok(self.notify(result));
        };
        match self.acquire(&key, &input, &options).await? {
            Decided::Acquired(owner) => Box::pin(self.own(owner, input, &options)).await,
            Decided::Finished(replay) => Ok(replay?),
            Decided::Running => {
                let plan = &self.inner.plan;
                Ok(FlowResult::without_steps(
                    &plan.name,
                    Status::Running,
                    &plan.step_names,
                    None,
                ))
            }
        }
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
        let result = owner
            .hold(&cancel, self.execute(input, cancel.clone()))
            .await;
        let persisted = self.persist(owner, &result, options).await;
        let result = self.notify(result);
        match persisted {
            Ok(()) => Ok(result),
            Err(source) => Err(RunError::NotPersisted {
                result: Box::new(result),
                source,
            }),
        }
    }

    /// Stage 1: the input validator. `Some` is the failed result to return. A validator
    /// that panics rejects the input rather than unwinding through the run.
    fn validate(&self, input: &I) -> Option<FlowResult<O>> {
        let validator = self.inner.validator.as_ref()?;
        let issues = match catch_unwind(AssertUnwindSafe(|| validator(input))) {
            Ok(verdict) => verdict.err()?,
            Err(payload) => vec![format!(
                "the validator panicked: {}",
                panic_message(&*payload)
            )],
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
        // The input's `Serialize` (or a custom fingerprint function) is the user's code: a
        // panic in it is a typed error, before the store is touched.
        let fingerprint = catch_unwind(AssertUnwindSafe(|| self.inner.fingerprint.of(input)))
            .unwrap_or_else(|payload| {
                Err(serde::ser::Error::custom(format_args!(
                    "fingerprinting the input panicked: {}",
                    panic_message(&*payload)
                )))
            })
            .map_err(IdempotencyError::Fingerprint)?;
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

    /// A finished record's result, as a replay: a typed "result not stored" when the
    /// record was finished without it (too large, refused, or an output that could not be
    /// kept).
    fn replay(&self, record: RecordView<'_>) -> Result<FlowResult<O>, IdempotencyError> {
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
    async fn execute(&self, input: I, cancel: CancellationToken) -> FlowResult<O> {
        Box::pin(
            self.inner
                .plan
                .execute(Context::with_cancellation(input, cancel)),
        )
        .await
    }

    /// Stage 4: store the outcome, or free the key (see [`Settlement::after`]).
    async fn persist(
        &self,
        owner: Ownership,
        result: &FlowResult<O>,
        options: &RunOptions,
    ) -> Result<(), StoreError> {
        let ending = Ending {
            status: result.status,
            transient: result.error.as_ref().is_some_and(FlowError::is_transient),
            effects_remain: result.steps.iter().any(|s| s.status == Status::Completed),
        };
        let settlement = Settlement::after(ending, options.cache_result);
        if settlement == Settlement::Release {
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

    /// Stage 5: tell the plugins how the run ended.
    fn notify(&self, result: FlowResult<O>) -> FlowResult<O> {
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
