//! The context a step runs in: the run's input, its shared state, its cancellation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
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
}

struct Shared<I> {
    input: I,
    state: Mutex<HashMap<String, Value>>,
    cancel: CancellationToken,
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
        Self {
            shared: Arc::new(Shared {
                input,
                state: Mutex::new(HashMap::new()),
                cancel,
            }),
            group: None,
        }
    }

    /// The same run's context under another cancellation token (a parallel group's).
    pub(crate) fn with_token(&self, cancel: CancellationToken) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            group: Some(Arc::new(cancel)),
        }
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
                self.state().insert(key, v);
                Ok(())
            }
            Err(source) => Err(StateError::Encode { key, source }),
        }
    }

    /// The value under `key` as a `T`, or `None` if nothing was set.
    ///
    /// # Errors
    /// [`StateError::Decode`] if the stored value is not a `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
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

    /// Whether a value is stored under `key`.
    pub fn has(&self, key: &str) -> bool {
        self.state().contains_key(key)
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

impl<I: std::fmt::Debug> std::fmt::Debug for Context<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
