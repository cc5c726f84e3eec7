//! The context a step runs in: the run's input, its shared state, its cancellation.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// What one step hands the next: the input, typed state by name, and the cancellation
/// token of the run.
///
/// Cheap to clone (an `Arc` inside); every step of a run sees the same state. State
/// values are stored as JSON values, so they are serde types and could be persisted.
///
/// ```
/// # tokio_test_block(async {
/// use orchestrix::{Context, StepError};
///
/// async fn reserve(ctx: Context<u32>) -> Result<(), StepError> {
///     let quantity = *ctx.input();
///     ctx.set("reservation", format!("rsv-{quantity}"))?;
///     Ok(())
/// }
///
/// let ctx = Context::new(3);
/// reserve(ctx.clone()).await?;
/// assert_eq!(ctx.get::<String>("reservation")?.as_deref(), Some("rsv-3"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # });
/// # fn tokio_test_block<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
pub struct Context<I> {
    shared: Arc<Shared<I>>,
    /// A parallel group's token, overriding the run's. Behind an `Arc`: cloning a
    /// `CancellationToken` takes a lock, cloning an `Arc` does not, and the engine clones
    /// the context for every step attempt.
    group: Option<Arc<CancellationToken>>,
    /// The step (or compensation) this context was handed to, if any.
    step: Option<StepSlot>,
    /// Durable runs only: the state keys the step has written, for its checkpoint.
    writes: Option<Arc<Mutex<Vec<String>>>>,
}

struct Shared<I> {
    input: I,
    state: Mutex<HashMap<String, Value>>,
    cancel: CancellationToken,
    /// What step keys derive from: the run's scoped key, or a random id for a run without.
    run: RunIdentity,
    /// The flow's step names, by position.
    names: Option<Arc<[Arc<str>]>>,
}

/// Where a context is being used: a step's position, and whether for its compensation.
/// Small on purpose: the engine clones the context for every attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepSlot {
    pub(crate) position: u32,
    pub(crate) compensation: bool,
}

/// What a run's step keys derive from.
#[derive(Debug, Clone)]
pub(crate) enum RunIdentity {
    /// The run's scoped idempotency key: step keys are the same in every run of the key.
    Key(Arc<str>),
    /// A run without a key: step keys are stable within the run only.
    Random(u128),
}

/// The name and type of a state value: declare it once, and every use is checked by the
/// compiler (the type of what is put and got, and the name, which a typo no longer
/// splits in two).
///
/// ```
/// use orchestrix::{Context, StateKey};
///
/// const CHARGE_ID: StateKey<String> = StateKey::new("charge_id");
///
/// let ctx = Context::new(());
/// ctx.put(CHARGE_ID, "ch_1".to_owned())?;
/// assert_eq!(ctx.get(CHARGE_ID)?.as_deref(), Some("ch_1"));
/// // The same value under its name, as the string form reads it.
/// assert_eq!(ctx.get::<String>("charge_id")?.as_deref(), Some("ch_1"));
/// # Ok::<(), orchestrix::StateError>(())
/// ```
pub struct StateKey<T> {
    name: &'static str,
    value: PhantomData<fn() -> T>,
}

impl<T> StateKey<T> {
    /// The key named `name`, for values of type `T`.
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            value: PhantomData,
        }
    }

    /// The key's name: where the value is stored (and journaled, in a durable run).
    pub const fn name(&self) -> &'static str {
        self.name
    }
}

impl<T> Clone for StateKey<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for StateKey<T> {}

impl<T> fmt::Debug for StateKey<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StateKey").field(&self.name).finish()
    }
}

impl<T> AsRef<str> for StateKey<T> {
    fn as_ref(&self) -> &str {
        self.name
    }
}

/// A key that [`Context::get`] reads a `T` under: a typed [`StateKey<T>`], or a name
/// (`&str`, `String`) with the type given at the call (`ctx.get::<T>("name")`).
pub trait ReadKey<T> {
    /// The name the value is stored under.
    fn key_name(&self) -> &str;
}

impl<T> ReadKey<T> for StateKey<T> {
    fn key_name(&self) -> &str {
        self.name
    }
}

impl<T> ReadKey<T> for &str {
    fn key_name(&self) -> &str {
        self
    }
}

impl<T> ReadKey<T> for String {
    fn key_name(&self) -> &str {
        self
    }
}

impl<T> ReadKey<T> for &String {
    fn key_name(&self) -> &str {
        self
    }
}

/// A state value could not be converted to or from JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The value given to [`Context::set`] could not be serialized.
    #[error("state value {key:?} could not be serialized: {source}")]
    Encode {
        /// The state key.
        key: String,
        /// The serde error.
        source: serde_json::Error,
    },
    /// The stored value is not of the type asked for by [`Context::get`].
    #[error("state value {key:?} is not of the requested type: {source}")]
    Decode {
        /// The state key.
        key: String,
        /// The serde error.
        source: serde_json::Error,
    },
}

impl<I> Clone for Context<I> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            group: self.group.clone(),
            step: self.step,
            writes: self.writes.clone(),
        }
    }
}

impl<I> Context<I> {
    /// A context for `input` with empty state and a fresh cancellation token.
    pub fn new(input: I) -> Self {
        Self::with_cancellation(input, CancellationToken::new())
    }

    /// A context for `input` cancelled through `cancel`.
    pub fn with_cancellation(input: I, cancel: CancellationToken) -> Self {
        Self::for_run(input, cancel, RunIdentity::Random(fastrand::u128(..)), None)
    }

    /// The context of one run of a flow: its identity and step names give steps their keys.
    pub(crate) fn for_run(
        input: I,
        cancel: CancellationToken,
        run: RunIdentity,
        names: Option<Arc<[Arc<str>]>>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                input,
                state: Mutex::new(HashMap::new()),
                cancel,
                run,
                names,
            }),
            group: None,
            step: None,
            writes: None,
        }
    }

    /// The same run's context under another cancellation token (a parallel group's).
    pub(crate) fn with_token(&self, cancel: CancellationToken) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            group: Some(Arc::new(cancel)),
            step: self.step,
            writes: self.writes.clone(),
        }
    }

    /// The same run's context, handed to the step (or compensation) in `slot`; with
    /// `writes`, every key the step sets is recorded there.
    pub(crate) fn for_step(&self, slot: StepSlot, writes: Option<Arc<Mutex<Vec<String>>>>) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            group: self.group.clone(),
            step: Some(slot),
            writes,
        }
    }

    /// The state under `keys`, as stored (a key without a value is left out).
    pub(crate) fn state_of(&self, keys: &[String]) -> Vec<(String, Value)> {
        let state = self.state();
        keys.iter()
            .filter_map(|k| state.get(k).map(|v| (k.clone(), v.clone())))
            .collect()
    }

    /// Restores state written by an earlier run (a resumed durable run).
    pub(crate) fn restore(&self, values: impl IntoIterator<Item = (String, Value)>) {
        self.state().extend(values);
    }

    /// A key for what the current step does downstream, to send as the `Idempotency-Key`
    /// of the payment (or any) API it calls: 32 hex digits, derived from the run's
    /// idempotency key, the step's position and name, and whether this is the step or its
    /// compensation.
    ///
    /// The same in every attempt of the step, and in every run of the same key: after a
    /// crash, a resumed durable run (or a re-run of a non-durable one) sends the same key,
    /// so the downstream API does not act twice either. A compensation gets a key of its
    /// own. For a run without an idempotency key the step keys are stable within the run
    /// only. `None` outside a step (a context you built yourself).
    ///
    /// ```
    /// # use orchestrix::{Context, StepError};
    /// async fn charge(ctx: Context<u64>) -> Result<(), StepError> {
    ///     let idempotency_key = ctx.step_key().unwrap_or_default();
    ///     // POST /v1/charges with `Idempotency-Key: {idempotency_key}` ...
    ///     # let _ = idempotency_key;
    ///     Ok(())
    /// }
    /// ```
    pub fn step_key(&self) -> Option<String> {
        let slot = self.step?;
        let name = self
            .shared
            .names
            .as_ref()
            .and_then(|names| names.get(slot.position as usize))
            .map_or("", |n| &**n);
        let mut hasher = Sha256::new();
        match &self.shared.run {
            RunIdentity::Key(key) => {
                hasher.update(b"k");
                hasher.update((key.len() as u64).to_le_bytes());
                hasher.update(key.as_bytes());
            }
            RunIdentity::Random(id) => {
                hasher.update(b"r");
                hasher.update(id.to_le_bytes());
            }
        }
        hasher.update(u64::from(slot.position).to_le_bytes());
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update([u8::from(slot.compensation)]);
        let digest = hasher.finalize();
        let mut hex = String::with_capacity(32);
        for byte in &digest[..16] {
            let _ = write!(hex, "{byte:02x}");
        }
        Some(hex)
    }

    /// The run's input.
    pub fn input(&self) -> &I {
        &self.shared.input
    }

    /// Stores `value` under `key`, replacing any earlier value.
    ///
    /// # Errors
    /// [`StateError::Encode`] if `value` cannot be serialized to JSON.
    pub fn set<T: Serialize>(&self, key: impl Into<String>, value: T) -> Result<(), StateError> {
        let key = key.into();
        match serde_json::to_value(value) {
            Ok(v) => {
                if let Some(writes) = &self.writes {
                    let mut writes = writes.lock().unwrap_or_else(|p| p.into_inner());
                    if !writes.contains(&key) {
                        writes.push(key.clone());
                    }
                }
                self.state().insert(key, v);
                Ok(())
            }
            Err(source) => Err(StateError::Encode { key, source }),
        }
    }

    /// Stores `value` under the typed `key`, replacing any earlier value: [`set`](Self::set)
    /// with the name and the type checked by the compiler.
    ///
    /// # Errors
    /// [`StateError::Encode`] if `value` cannot be serialized to JSON.
    pub fn put<T: Serialize>(&self, key: StateKey<T>, value: T) -> Result<(), StateError> {
        self.set(key.name, value)
    }

    /// The value under `key` as a `T`, or `None` if nothing was set. `key` is a typed
    /// [`StateKey<T>`] (`ctx.get(CHARGE_ID)`), or a name with the type given at the call
    /// (`ctx.get::<String>("charge_id")`).
    ///
    /// # Errors
    /// [`StateError::Decode`] if the stored value is not a `T`.
    pub fn get<T: DeserializeOwned>(&self, key: impl ReadKey<T>) -> Result<Option<T>, StateError> {
        let key = key.key_name();
        let value = self.state().get(key).cloned();
        value
            .map(|v| {
                serde_json::from_value(v).map_err(|source| StateError::Decode {
                    key: key.to_owned(),
                    source,
                })
            })
            .transpose()
    }

    /// Whether a value is stored under `key` (a name, or a [`StateKey`]).
    pub fn has(&self, key: impl AsRef<str>) -> bool {
        self.state().contains_key(key.as_ref())
    }

    /// The run's cancellation token: fires when the caller cancels the run, when the run
    /// loses its idempotency lease, or when a `fail_fast` parallel sibling fails. Long
    /// steps should watch it (`token.cancelled().await` in a `select!`).
    pub fn cancellation(&self) -> &CancellationToken {
        self.group.as_deref().unwrap_or(&self.shared.cancel)
    }

    /// Whether the run has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancellation().is_cancelled()
    }

    fn state(&self) -> MutexGuard<'_, HashMap<String, Value>> {
        // Every access is a single map operation, so a panic elsewhere cannot leave the
        // map inconsistent: a poisoned lock is safe to use.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<I: fmt::Debug> fmt::Debug for Context<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("input", &self.shared.input)
            .field("state", &*self.state())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_set_by_one_clone_is_seen_by_another() {
        let a = Context::new(());
        let b = a.clone();
        assert!(a.set("n", 5u8).is_ok());
        assert!(b.has("n"));
        assert_eq!(b.get::<u8>("n").ok().flatten(), Some(5));
        assert_eq!(b.get::<u8>("missing").ok().flatten(), None);
    }

    #[test]
    fn reading_state_as_the_wrong_type_is_a_typed_error() {
        let ctx = Context::new(());
        assert!(ctx.set("name", "alice").is_ok());
        assert!(matches!(
            ctx.get::<u32>("name"),
            Err(StateError::Decode { ref key, .. }) if key == "name"
        ));
    }

    #[test]
    fn unserializable_state_is_a_typed_error() {
        let ctx = Context::new(());
        let mut bad = HashMap::new();
        bad.insert(vec![1u8], 1u8); // JSON object keys must be strings
        assert!(matches!(
            ctx.set("bad", bad),
            Err(StateError::Encode { .. })
        ));
        assert!(!ctx.has("bad"));
    }
}
