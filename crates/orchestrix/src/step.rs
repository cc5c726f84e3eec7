//! Steps, parallel groups, and the error a step returns.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::context::Context;
use crate::retry::RetryPolicy;
use crate::store::BoxError;

/// The error a step (or a compensation) returns.
///
/// Any `std::error::Error` converts into it, so `?` works inside steps. Mark an error
/// [`transient`](Self::transient) when the operation did not happen and may be retried
/// later: an idempotent run that fails with a transient error frees its key instead of
/// caching the failure.
///
/// ```
/// use orchestrix::StepError;
///
/// fn parse(qty: &str) -> Result<u32, StepError> {
///     let n: u32 = qty.parse()?; // any std error converts
///     if n == 0 {
///         return Err(StepError::msg("quantity must be positive"));
///     }
///     Ok(n)
/// }
/// assert!(parse("x").is_err());
/// let gateway_down = StepError::msg("gateway unavailable").transient();
/// assert!(gateway_down.is_transient());
/// ```
pub struct StepError {
    source: BoxError,
    transient: bool,
    kind: ErrorKind,
}

/// How an attempt ended badly, for spans: the step's own error, its timeout, or a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    Failed,
    TimedOut,
    Panicked,
}

impl StepError {
    /// Wraps any error.
    pub fn new(err: impl Into<BoxError>) -> Self {
        Self {
            source: err.into(),
            transient: false,
            kind: ErrorKind::Failed,
        }
    }

    /// An error from a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self::new(message.to_string())
    }

    /// Marks the error transient: the operation did not take effect and may be retried.
    #[must_use]
    pub fn transient(mut self) -> Self {
        self.transient = true;
        self
    }

    /// Whether the error was marked transient.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The underlying error, shared: the source of
    /// [`FlowError::Step`](crate::FlowError::Step).
    pub(crate) fn into_shared(self) -> Arc<dyn std::error::Error + Send + Sync + 'static> {
        Arc::from(self.source)
    }

    pub(crate) fn timed_out(after: Duration) -> Self {
        Self {
            kind: ErrorKind::TimedOut,
            ..Self::msg(format_args!("attempt timed out after {after:?}"))
        }
    }

    pub(crate) fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        Self {
            kind: ErrorKind::Panicked,
            ..Self::msg(format_args!("panicked: {}", panic_message(payload)))
        }
    }

    pub(crate) fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// The message a panic carried, for errors that report a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for StepError {
    fn from(err: E) -> Self {
        Self::new(err)
    }
}

impl From<StepError> for BoxError {
    fn from(err: StepError) -> Self {
        err.source
    }
}

impl From<StepError> for Box<dyn std::error::Error + 'static> {
    fn from(err: StepError) -> Self {
        err.source
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepError")
            .field("source", &self.source)
            .field("transient", &self.transient)
            .finish()
    }
}

pub(crate) type StepFn<I> =
    Arc<dyn Fn(Context<I>) -> BoxFuture<'static, Result<(), StepError>> + Send + Sync>;

fn boxed<I, F, Fut>(f: F) -> StepFn<I>
where
    F: Fn(Context<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), StepError>> + Send + 'static,
{
    Arc::new(move |ctx| {
        // A panicking step fails its attempt like any error instead of unwinding through
        // the run, which would leave an idempotency record owned until its lease lapses.
        std::panic::AssertUnwindSafe(f(ctx))
            .catch_unwind()
            .map(|r| r.unwrap_or_else(|payload| Err(StepError::panicked(&*payload))))
            .boxed()
    })
}

/// One named step: an async function of the [`Context`], with its retry policy, per-attempt
/// timeout and optional compensation.
///
/// A step is an `async fn(Context<I>) -> Result<(), StepError>`, or a closure returning an
/// async block. A closure needs no type annotation where the flow's input type is known
/// when the closure is checked: handed to [`FlowBuilder::step`](crate::FlowBuilder::step),
/// or to `Step::new` in a function returning `Step<I>`; the error type comes from the
/// bound, so `?` and `Ok(())` need no `Ok::<_, StepError>`. Only a closure that reads the
/// input's fields inside a chain the compiler checks before it learns `I`
/// (`.then(Step::new("a", |ctx| ..).retry(..))`, `Parallel::new().step(..)`) needs it:
/// `Step::<Order>::new`, `Parallel::<Order>::new()`, or a type alias
/// (`type OrderStep = Step<Order>;`) names it once.
///
/// ```
/// use std::time::Duration;
/// use orchestrix::{Context, RetryPolicy, Step, StepError};
///
/// async fn charge(_ctx: Context<u64>) -> Result<(), StepError> { Ok(()) }
/// async fn refund(_ctx: Context<u64>) -> Result<(), StepError> { Ok(()) }
///
/// let step = Step::new("charge", charge)
///     .retry(RetryPolicy::retries(3).exponential(Duration::from_millis(50)).with_jitter())
///     .timeout(Duration::from_secs(2))
///     .compensate(refund);
/// assert_eq!(step.name(), "charge");
/// ```
pub struct Step<I> {
    pub(crate) name: Arc<str>,
    pub(crate) run: StepFn<I>,
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Option<Duration>,
    pub(crate) compensate: Option<StepFn<I>>,
    pub(crate) at_most_once: bool,
}

impl<I> Step<I> {
    /// A step named `name` running `f`, with no retries, no timeout, no compensation.
    pub fn new<F, Fut>(name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Context<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        Self {
            name: Arc::from(name.into()),
            run: boxed(f),
            retry: RetryPolicy::none(),
            timeout: None,
            compensate: None,
            at_most_once: false,
        }
    }

    /// Retries failed attempts according to `policy`.
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Fails an attempt that takes longer than `limit` (the attempt counts as failed and
    /// may be retried).
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Undoes the step when a later step fails (or the run is cancelled): compensations
    /// run in reverse completion order.
    #[must_use]
    pub fn compensate<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Context<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        self.compensate = Some(boxed(f));
        self
    }

    /// Makes the step at most once across crashes, in a durable flow: a "started" mark is
    /// journaled before its first attempt, and a resumed run that finds the step started
    /// but not finished does not run it again; it fails with
    /// [`FlowError::StepInterrupted`](crate::FlowError::StepInterrupted) (and compensates).
    ///
    /// By default a step is at least once across a crash: the step in flight when the
    /// owner died runs again when the run resumes (every step before it never does). Use
    /// this for a side effect you would rather lose than repeat and that has no downstream
    /// idempotency key ([`Context::step_key`](crate::Context::step_key)). Retries within
    /// one run are unaffected. It costs one more journal write per run of the step, and
    /// means nothing outside durable flows.
    #[must_use]
    pub fn at_most_once(mut self) -> Self {
        self.at_most_once = true;
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<I> fmt::Debug for Step<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("compensate", &self.compensate.is_some())
            .field("at_most_once", &self.at_most_once)
            .finish()
    }
}

/// Steps that start together.
///
/// By default the group fails only if **all** its steps fail (best-effort fan-out, e.g.
/// notifications). With [`fail_fast`](Self::fail_fast) any failure fails the group,
/// cancels the siblings still running, and compensates the group's completed steps first.
///
/// ```
/// use orchestrix::{Context, Parallel, StepError};
///
/// async fn email(_ctx: Context<u64>) -> Result<(), StepError> { Ok(()) }
/// async fn sms(_ctx: Context<u64>) -> Result<(), StepError> { Ok(()) }
///
/// let notify = Parallel::new().step("email", email).step("sms", sms);
/// let must_all_succeed = Parallel::new().step("email", email).step("sms", sms).fail_fast();
/// # let _ = (notify, must_all_succeed);
/// ```
pub struct Parallel<I> {
    pub(crate) steps: Vec<Step<I>>,
    pub(crate) fail_fast: bool,
}

impl<I> Parallel<I> {
    /// An empty group.
    pub fn new() -> Self {
        Self {
            steps: Vec::new(),
            fail_fast: false,
        }
    }

    /// Adds a step with default options.
    #[must_use]
    pub fn step<F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Context<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        self.with(Step::new(name, f))
    }

    /// Adds a configured step.
    #[must_use]
    pub fn with(mut self, step: Step<I>) -> Self {
        self.steps.push(step);
        self
    }

    /// Any failure fails the group and cancels its running siblings.
    #[must_use]
    pub fn fail_fast(mut self) -> Self {
        self.fail_fast = true;
        self
    }
}

impl<I> Default for Parallel<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I> fmt::Debug for Parallel<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parallel")
            .field("steps", &self.steps)
            .field("fail_fast", &self.fail_fast)
            .finish()
    }
}
