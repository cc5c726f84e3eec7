//! Building flows.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;

use crate::context::Context;
use crate::durable::Durability;
use crate::execute::{OutputFn, Plan, Stage};
use crate::hooks::{ConsoleLogger, Hooks, Plugin};
use crate::idempotency::{Fingerprint, flow_prefix};
use crate::step::{Parallel, Step, StepError};
use crate::store::{IdempotencyStore, MemoryStore};
use crate::telemetry::FlowMetrics;
use crate::validation::{IntoIssues, Issue};

/// A flow's input validator, synchronous or async, its issues already converted.
pub(crate) enum Validator<I> {
    Sync(Box<SyncValidatorFn<I>>),
    Async(Box<AsyncValidatorFn<I>>),
}

/// A synchronous validator.
pub(crate) type SyncValidatorFn<I> = dyn Fn(&I) -> Result<(), Vec<Issue>> + Send + Sync;

/// An async validator, its future boxed.
pub(crate) type AsyncValidatorFn<I> =
    dyn Fn(&I) -> BoxFuture<'static, Result<(), Vec<Issue>>> + Send + Sync;

/// The version of a durable flow that sets none.
const DEFAULT_VERSION: &str = "1";

/// A flow: named steps over a typed input `I`, producing an optional typed output `O`.
///
/// Built once with [`Flow::builder`], then run any number of times, concurrently, from
/// any task; cloning is cheap (an `Arc` inside). See [`Flow::run`] for running,
/// idempotently or not.
///
/// ```
/// use std::time::Duration;
/// use orchestrix::{Context, Flow, RetryPolicy, RunOptions, Status, Step, StepError};
///
/// #[derive(serde::Serialize)]
/// struct Signup { email: String }
///
/// async fn create_account(ctx: Context<Signup>) -> Result<(), StepError> {
///     ctx.set("user_id", format!("usr_{}", ctx.input().email.len()))?;
///     Ok(())
/// }
/// async fn send_welcome(_ctx: Context<Signup>) -> Result<(), StepError> { Ok(()) }
/// async fn delete_account(_ctx: Context<Signup>) -> Result<(), StepError> { Ok(()) }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let flow = Flow::<Signup, String>::builder("signup")
///     .then(Step::new("create-account", create_account).compensate(delete_account))
///     .then(
///         Step::new("send-welcome", send_welcome)
///             .retry(RetryPolicy::retries(3).exponential(Duration::from_millis(100)))
///             .timeout(Duration::from_secs(5)),
///     )
///     .output(|ctx| Ok(ctx.get::<String>("user_id")?.unwrap_or_default()))
///     .build()?;
///
/// let signup = Signup { email: "ada@example.com".into() };
/// let result = flow.run(signup, RunOptions::key("signup:ada@example.com")).await?;
/// assert_eq!(result.status, Status::Completed);
/// assert_eq!(result.output.as_deref(), Some("usr_15"));
/// # Ok(()) }
/// ```
pub struct Flow<I, O = ()> {
    pub(crate) inner: Arc<FlowInner<I, O>>,
}

pub(crate) struct FlowInner<I, O> {
    pub(crate) plan: Plan<I, O>,
    pub(crate) validator: Option<Validator<I>>,
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) fingerprint: Fingerprint<I>,
    /// What the flow's scoped keys start with: its name, escaped, and `:`.
    pub(crate) key_prefix: Box<str>,
    /// Set for a durable flow: its keyed runs are journaled.
    pub(crate) durable: Option<Durability<I>>,
    /// The flow's metric handles (see [`crate::telemetry`]).
    pub(crate) metrics: FlowMetrics,
}

impl<I, O> Clone for Flow<I, O> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<I, O> Flow<I, O> {
    /// Starts building a flow named `name`. The name scopes its idempotency keys: the
    /// record of key `k` is stored under `name:k` (a `:` or `%` in the name is escaped, so
    /// two flows never share a record).
    pub fn builder(name: impl Into<String>) -> FlowBuilder<I, O> {
        FlowBuilder::new(name)
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.inner.plan.name
    }

    /// The idempotency store keyed runs use.
    pub fn store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.inner.store
    }
}

impl<I, O> fmt::Debug for Flow<I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("name", &self.inner.plan.name)
            .field("steps", &self.inner.plan.step_names)
            .field("store", &self.inner.store)
            .finish()
    }
}

/// Why a flow could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The flow name is empty.
    #[error("flow name is empty")]
    EmptyName,
    /// The flow has no step.
    #[error("flow {flow:?} has no steps")]
    NoSteps {
        /// The flow.
        flow: String,
    },
    /// Two steps share a name.
    #[error("flow {flow:?} has two steps named {step:?}")]
    DuplicateStep {
        /// The flow.
        flow: String,
        /// The repeated name.
        step: String,
    },
    /// A step name is empty.
    #[error("flow {flow:?} has a step with an empty name")]
    EmptyStepName {
        /// The flow.
        flow: String,
    },
    /// A parallel group has no step.
    #[error("flow {flow:?} has an empty parallel group")]
    EmptyParallelGroup {
        /// The flow.
        flow: String,
    },
    /// A step's timeout is zero.
    #[error("step {step:?} has a zero timeout")]
    ZeroTimeout {
        /// The step.
        step: String,
    },
    /// The flow is durable, but its store keeps no journals
    /// ([`IdempotencyStore::journal_store`] is `None`).
    #[error("flow {flow:?} is durable, but its store keeps no journals")]
    StoreKeepsNoJournal {
        /// The flow.
        flow: String,
    },
}

/// Builds a [`Flow`]. Obtained from [`Flow::builder`].
pub struct FlowBuilder<I, O> {
    name: String,
    steps: Vec<Step<I>>,
    stages: Vec<Stage>,
    empty_group: bool,
    output: Option<OutputFn<I, O>>,
    validator: Option<Validator<I>>,
    plugins: Vec<Arc<dyn Plugin>>,
    store: Option<Arc<dyn IdempotencyStore>>,
    fingerprint: Fingerprint<I>,
    compensate_on_cancel: bool,
    durable: Option<Durability<I>>,
    version: Option<String>,
}

impl<I, O> FlowBuilder<I, O> {
    /// A builder for a flow named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            steps: Vec::new(),
            stages: Vec::new(),
            empty_group: false,
            output: None,
            validator: None,
            plugins: Vec::new(),
            store: None,
            fingerprint: Fingerprint::Input,
            compensate_on_cancel: true,
            durable: None,
            version: None,
        }
    }

    /// Adds a step with default options (one attempt, no timeout, no compensation).
    #[must_use]
    pub fn step<F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Context<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        self.then(Step::new(name, f))
    }

    /// Adds a configured [`Step`].
    #[must_use]
    pub fn then(mut self, step: Step<I>) -> Self {
        self.stages.push(Stage::Single(self.steps.len()));
        self.steps.push(step);
        self
    }

    /// Adds a [`Parallel`] group: its steps start together.
    #[must_use]
    pub fn parallel(mut self, group: Parallel<I>) -> Self {
        let first = self.steps.len();
        self.empty_group |= group.steps.is_empty();
        self.steps.extend(group.steps);
        self.stages.push(Stage::Parallel {
            steps: first..self.steps.len(),
            fail_fast: group.fail_fast,
        });
        self
    }

    /// Builds the output from the final context once every step completed. Without it,
    /// results carry no output.
    #[must_use]
    pub fn output(
        mut self,
        f: impl Fn(&Context<I>) -> Result<O, StepError> + Send + Sync + 'static,
    ) -> Self {
        self.output = Some(Box::new(f));
        self
    }

    /// Validates the input before anything else (before the store is touched). Return
    /// every issue found ([`Issue`]s with a path, bare messages, or anything
    /// [`IntoIssues`], such as a `garde` report with the `garde` feature: see
    /// [`crate::validation`]); any issue fails the run with
    /// [`FlowError::Validation`](crate::FlowError::Validation) and no step runs. A
    /// validator that panics rejects the input. Replaces any earlier validator.
    #[must_use]
    pub fn validate<E: IntoIssues>(
        mut self,
        f: impl Fn(&I) -> Result<(), E> + Send + Sync + 'static,
    ) -> Self {
        self.validator = Some(Validator::Sync(Box::new(move |input| {
            f(input).map_err(IntoIssues::into_issues)
        })));
        self
    }

    /// Validates the input with an async function (a lookup in a database, a call to
    /// another service), before anything else, as [`validate`](Self::validate) does. The
    /// future it returns owns what it needs (clone the fields it reads), and is `Send`.
    /// A validator that panics, or whose future does, rejects the input. Replaces any
    /// earlier validator.
    ///
    /// ```
    /// use orchestrix::validation::Issue;
    /// use orchestrix::{Flow, RunOptions, Status};
    ///
    /// async fn sku_exists(sku: &str) -> bool { sku.starts_with("TEE-") }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let flow = Flow::<String>::builder("restock")
    ///     .validate_async(|sku: &String| {
    ///         let sku = sku.clone();
    ///         async move {
    ///             if sku_exists(&sku).await { Ok(()) } else { Err(Issue::at("sku", "unknown")) }
    ///         }
    ///     })
    ///     .step("order", |_ctx| async { Ok(()) })
    ///     .build()?;
    /// let result = flow.run("MUG-1".to_owned(), RunOptions::new()).await?;
    /// assert_eq!(result.status, Status::Failed);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn validate_async<F, Fut, E>(mut self, f: F) -> Self
    where
        F: Fn(&I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: IntoIssues,
    {
        self.validator = Some(Validator::Async(Box::new(move |input| {
            f(input).map(|r| r.map_err(IntoIssues::into_issues)).boxed()
        })));
        self
    }

    /// Attaches a plugin (any `Fn(&Event)` closure is one).
    #[must_use]
    pub fn plugin(mut self, plugin: impl Plugin) -> Self {
        self.plugins.push(Arc::new(plugin));
        self
    }

    /// Logs every run to standard error in human-readable form (a [`ConsoleLogger`]).
    #[must_use]
    pub fn logger(self) -> Self {
        self.plugin(ConsoleLogger::stderr())
    }

    /// The idempotency store for keyed runs. Default: a private [`MemoryStore`].
    #[must_use]
    pub fn store(mut self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// How inputs are fingerprinted to detect key reuse (default: canonical input hash).
    #[must_use]
    pub fn fingerprint(mut self, fingerprint: Fingerprint<I>) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// Whether a cancelled run compensates its completed steps (default `true`).
    #[must_use]
    pub fn compensate_on_cancel(mut self, compensate: bool) -> Self {
        self.compensate_on_cancel = compensate;
        self
    }

    /// The version of a durable flow, stored in every journal it writes (default `"1"`).
    /// A run interrupted under another version is not resumed by this one
    /// ([`IdempotencyError::JournalVersion`](crate::idempotency::IdempotencyError::JournalVersion)):
    /// change it when the flow's steps change in a way journals cannot follow (see
    /// [`FlowBuilder::durable`]).
    #[must_use]
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Checks the definition and builds the flow.
    ///
    /// # Errors
    /// [`BuildError`] for an empty name, no steps, a duplicate or empty step name, an
    /// empty parallel group, a zero timeout, or a durable flow on a store without
    /// journals.
    pub fn build(self) -> Result<Flow<I, O>, BuildError> {
        let flow = || self.name.clone();
        if self.name.is_empty() {
            return Err(BuildError::EmptyName);
        }
        if self.empty_group {
            return Err(BuildError::EmptyParallelGroup { flow: flow() });
        }
        if self.steps.is_empty() {
            return Err(BuildError::NoSteps { flow: flow() });
        }
        let mut seen = HashSet::new();
        for step in &self.steps {
            if step.name.is_empty() {
                return Err(BuildError::EmptyStepName { flow: flow() });
            }
            if !seen.insert(Arc::clone(&step.name)) {
                return Err(BuildError::DuplicateStep {
                    flow: flow(),
                    step: step.name.to_string(),
                });
            }
            if step.timeout.is_some_and(|t| t.is_zero()) {
                return Err(BuildError::ZeroTimeout {
                    step: step.name.to_string(),
                });
            }
        }
        let step_names: Arc<[Arc<str>]> = self.steps.iter().map(|s| Arc::clone(&s.name)).collect();
        let metrics = FlowMetrics::register(&self.name, &step_names);
        let key_prefix = flow_prefix(&self.name).into_boxed_str();
        let store: Arc<dyn IdempotencyStore> =
            self.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        if self.durable.is_some() && store.journal_store().is_none() {
            return Err(BuildError::StoreKeepsNoJournal { flow: flow() });
        }
        let durable = self.durable.map(|d| Durability {
            version: self.version.unwrap_or_else(|| DEFAULT_VERSION.to_owned()),
            ..d
        });
        Ok(Flow {
            inner: Arc::new(FlowInner {
                plan: Plan {
                    name: Arc::from(self.name),
                    steps: self.steps,
                    step_names,
                    stages: self.stages,
                    output: self.output,
                    hooks: Hooks::new(self.plugins),
                    compensate_on_cancel: self.compensate_on_cancel,
                },
                validator: self.validator,
                store,
                fingerprint: self.fingerprint,
                key_prefix,
                durable,
                metrics,
            }),
        })
    }
}

impl<I: DeserializeOwned, O> FlowBuilder<I, O> {
    /// Makes the flow **durable**: each keyed run journals its input and every step it
    /// completes (with the state the step wrote), so that a run whose owner died (a crash,
    /// a dropped future, a lost lease) resumes where it stopped when the key is run again,
    /// [resumed](Flow::resume) or [recovered](Flow::recover), instead of starting over. A
    /// completed step never runs again; the step in flight may, unless it is
    /// [at most once](crate::Step::at_most_once). Unkeyed runs are not journaled. The input
    /// type must also be `DeserializeOwned`, to be read back from the journal.
    ///
    /// Needs a store that keeps journals (every store of this workspace does); each step
    /// costs one more store write. See [`crate::durable`'s guarantees](crate::Flow::resume)
    /// and the README's "Durable flows" for which step may run again when, and how to
    /// change a durable flow safely (positions and names identify steps;
    /// [`version`](Self::version)).
    ///
    /// ```
    /// use orchestrix::{Flow, RunOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let flow = Flow::<u64, ()>::builder("order")
    ///     .durable()
    ///     .step("charge", |ctx| async move {
    ///         // The same key in every run of this order: send it downstream.
    ///         let _idempotency_key = ctx.step_key();
    ///         Ok(())
    ///     })
    ///     .step("ship", |_ctx| async { Ok(()) })
    ///     .build()?;
    /// let result = flow.run(4200, RunOptions::key("order-17")).await?;
    /// assert!(result.is_completed());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn durable(mut self) -> Self {
        self.durable = Some(Durability {
            decode: decode_input::<I>,
            version: String::new(),
        });
        self
    }
}

/// A journaled input, read back.
fn decode_input<I: DeserializeOwned>(json: &[u8]) -> Result<I, serde_json::Error> {
    serde_json::from_slice(json)
}

impl<I, O> fmt::Debug for FlowBuilder<I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowBuilder")
            .field("name", &self.name)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}
