//! A flow's records, reached by the caller's key: [`Flow::record`] and [`Flow::forget`].
//!
//! Both scope the key as the flow's runs do by default ([`KeyScope::Flow`](crate::KeyScope)),
//! so a caller never rebuilds the stored key by hand. A run under
//! [`KeyScope::Global`](crate::KeyScope::Global) is stored under its key as given: reach
//! its record through [`Flow::store`] (`get`, `delete`) with that key.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::flow::Flow;
use crate::idempotency::{IdempotencyError, validate_key};
use crate::result::FlowResult;
use crate::store::{FencingToken, RecordStatus};

/// A flow's record of one key, as [`Flow::record`] reads it.
#[derive(Debug)]
#[non_exhaustive]
pub struct FlowRecord<O> {
    /// The key as stored (the flow's scope, then the caller's key).
    pub stored_key: String,
    /// `Running` (an owner holds the lease), `Completed` or `Failed`.
    pub status: RecordStatus,
    /// The current owner's token (of the last owner, for a finished record).
    pub token: FencingToken,
    /// The fingerprint of the input that acquired the record, if fingerprinting is on.
    pub fingerprint: Option<String>,
    /// For a finished record, its result as a duplicate run would replay it
    /// (`replayed = true`): `Err(ResultNotStored)` when it was finished without one, or the
    /// decode error of a result this build cannot read. `None` while running.
    pub replay: Option<Result<FlowResult<O>, IdempotencyError>>,
}

impl<I, O> Flow<I, O>
where
    I: Serialize + Send + Sync + 'static,
    O: Serialize + DeserializeOwned + Send + 'static,
{
    /// The record of `key` for this flow (scoped by the flow's name, as its runs store
    /// it), with its result decoded as a replay where the run finished. `None` when no
    /// live record holds the key (never run, deleted, or expired).
    ///
    /// ```
    /// use orchestrix::{Flow, RunOptions};
    /// use orchestrix::store::RecordStatus;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let flow = Flow::<u64, u64>::builder("billing")
    ///     .step("charge", |_ctx| async { Ok(()) })
    ///     .output(|ctx| Ok(*ctx.input()))
    ///     .build()?;
    /// flow.run(4200, RunOptions::key("order-1")).await?;
    ///
    /// let record = flow.record("order-1").await?.expect("a record");
    /// assert_eq!(record.status, RecordStatus::Completed);
    /// assert_eq!(record.stored_key, "billing:order-1");
    /// let replay = record.replay.expect("finished")?;
    /// assert_eq!(replay.output, Some(4200));
    ///
    /// flow.forget("order-1").await?; // the next run of the key runs again
    /// assert!(flow.record("order-1").await?.is_none());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`IdempotencyError::InvalidKey`] for a key a run would refuse, and
    /// [`IdempotencyError::Store`] when the store fails or holds a record it cannot
    /// decode.
    pub async fn record(&self, key: &str) -> Result<Option<FlowRecord<O>>, IdempotencyError> {
        let stored_key = self.stored_key(key)?;
        let Some(record) = self.inner.store.get(&stored_key).await? else {
            return Ok(None);
        };
        let replay = match record.status {
            RecordStatus::Running => None,
            _ => Some(self.replay(record.view())),
        };
        Ok(Some(FlowRecord {
            stored_key,
            status: record.status,
            token: record.token,
            fingerprint: record.fingerprint,
            replay,
        }))
    }

    /// Deletes the record of `key` for this flow, whatever its status, so that the next
    /// run of the key runs the flow again (an explicit redrive, in the terms of the
    /// guarantees; a durable run's journal goes with it). Deleting a key nobody holds is
    /// not an error.
    ///
    /// Forgetting a **running** record lets a second run start while the first still
    /// runs; the first run's outcome is then refused by the store (its token is stale) and
    /// returned to its caller as [`RunError::NotPersisted`](crate::RunError::NotPersisted).
    ///
    /// # Errors
    /// [`IdempotencyError::InvalidKey`] for a key a run would refuse, and
    /// [`IdempotencyError::Store`] when the store fails.
    pub async fn forget(&self, key: &str) -> Result<(), IdempotencyError> {
        let stored_key = self.stored_key(key)?;
        self.inner.store.delete(&stored_key).await?;
        Ok(())
    }

    /// `key` as this flow's runs store it.
    fn stored_key(&self, key: &str) -> Result<String, IdempotencyError> {
        validate_key(key)?;
        let mut stored = String::with_capacity(self.inner.key_prefix.len() + key.len());
        stored.push_str(&self.inner.key_prefix);
        stored.push_str(key);
        Ok(stored)
    }
}
