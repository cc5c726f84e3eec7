//! Idempotent execution: keys, options, the decision table, leases and fencing.
//!
//! A run with a key asks the store, in one atomic operation, whether it may run
//! ([`admit`]); while it runs it holds a lease that a heartbeat renews
//! ([`Ownership::hold`]); when it ends, its outcome is stored or its key freed
//! ([`Ownership::settle`]). Both halves of the decision table of the specification live in
//! this module: [`admit`] for what the store holds before a run, [`Settlement::after`]
//! for what happens to the record after it.
//!
//! Flows use this through [`Flow::run`](crate::Flow::run). Other integrations (the HTTP
//! `Idempotency-Key` layer) use [`admit`] and [`Ownership`] directly, with their own
//! payloads.

mod canonical;
mod fingerprint;
mod options;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::result::Status;
use crate::store::{
    FencingToken, FinalStatus, IdempotencyStore, Record, RecordStatus, RecordView, StartRequest,
    StartSeen, StoreError, fingerprints_agree,
};

pub use fingerprint::{Fingerprint, fingerprint_of};
pub use options::{
    DEFAULT_LEASE, KeyError, KeyScope, MAX_KEY_BYTES, OnRunning, OptionError, RunOptions,
    validate_key, validate_lease, validate_on_running, validate_ttl,
};

/// Why an idempotent run could not start (or could not be replayed). Nothing ran.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// The key is empty, too long, or contains control characters.
    #[error("invalid idempotency key: {0}")]
    InvalidKey(#[from] KeyError),
    /// A TTL, lease or wait timeout is zero or out of range.
    #[error("invalid run option: {0}")]
    InvalidOption(#[from] OptionError),
    /// The key is held by a run of a different input (same key, different payload).
    #[error("idempotency key {key:?} was already used with a different input")]
    KeyReused {
        /// The (scoped) key.
        key: String,
    },
    /// Another caller is running this key and `OnRunning::Error` was asked for.
    #[error("a run with idempotency key {key:?} is already in progress")]
    AlreadyRunning {
        /// The (scoped) key.
        key: String,
    },
    /// `OnRunning::Wait` gave up before the owner finished.
    #[error("waited {waited:?} for the run holding key {key:?} to finish")]
    WaitTimedOut {
        /// The (scoped) key.
        key: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The key's run finished, but its result was too large to store, so it cannot be
    /// replayed. The operation is not run again.
    #[error("the run under key {key:?} finished but its result was not stored (too large)")]
    ResultNotStored {
        /// The (scoped) key.
        key: String,
    },
    /// The input could not be serialized for its fingerprint.
    #[error("input could not be fingerprinted: {0}")]
    Fingerprint(#[source] serde_json::Error),
    /// The store failed or holds an undecodable record (fail closed: nothing ran).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`admit`] decided.
#[derive(Debug)]
#[non_exhaustive]
pub enum Admission {
    /// The caller owns the key now and must run the operation, then
    /// [`settle`](Ownership::settle).
    Acquired(Ownership),
    /// The operation already finished (completed, or failed with cached failures): replay
    /// the record's result. Never run.
    Finished(Record),
    /// Another caller is running it (`OnRunning::ReturnRunning`).
    Running,
}

/// What one admission needs to know. Built from [`RunOptions`] by flows.
#[derive(Debug, Clone, Copy)]
pub struct AdmitRequest<'a> {
    /// The full, validated key.
    pub key: &'a str,
    /// The input's fingerprint, if fingerprinting is on.
    pub fingerprint: Option<&'a str>,
    /// The lease to hold while running.
    pub lease: Duration,
    /// Whether finished records are replayed (`false`: a failed record is re-run).
    pub cache_result: bool,
    /// What to do while another caller runs the key.
    pub on_running: OnRunning,
}

/// The decision table, before a run: one atomic `start`, then what the record means.
///
/// | store holds | outcome |
/// | --- | --- |
/// | nothing, expired, or (failed and not `cache_result`) | [`Admission::Acquired`] |
/// | a record with a different fingerprint | [`IdempotencyError::KeyReused`] |
/// | completed, or failed with `cache_result` | [`Admission::Finished`] |
/// | running, lease alive | per [`OnRunning`]: [`Admission::Running`], [`IdempotencyError::AlreadyRunning`], or wait and decide again |
///
/// # Errors
/// See the table; plus [`IdempotencyError::Store`] when the store fails (fail closed).
pub async fn admit(
    store: &Arc<dyn IdempotencyStore>,
    req: AdmitRequest<'_>,
) -> Result<Admission, IdempotencyError> {
    Ok(
        match admit_with(store, req, |record| record.to_record()).await? {
            Decided::Acquired(owner) => Admission::Acquired(owner),
            Decided::Finished(record) => Admission::Finished(record),
            Decided::Running => Admission::Running,
        },
    )
}

/// [`admit`]'s decision, with a finished record already read by the caller's `read`.
pub(crate) enum Decided<T> {
    Acquired(Ownership),
    Finished(T),
    Running,
}

/// What the decision table makes of the record `start` found.
enum Seen<T> {
    Reused,
    Finished(T),
    Running,
}

/// [`admit`], reading a finished record in place with `read` (through
/// [`IdempotencyStore::start_seen`]) instead of copying it out of the store: a replay
/// decodes its result straight from where the store keeps it.
pub(crate) async fn admit_with<T: Send>(
    store: &Arc<dyn IdempotencyStore>,
    req: AdmitRequest<'_>,
    mut read: impl FnMut(RecordView<'_>) -> T + Send,
) -> Result<Decided<T>, IdempotencyError> {
    // Set when the first wait begins: a caller that never waits never reads the clock.
    let mut waiting_since = None;
    loop {
        let start = StartRequest {
            key: req.key,
            fingerprint: req.fingerprint,
            lease: req.lease,
            rerun_failed: !req.cache_result,
        };
        let mut seen = None;
        let outcome = store
            .start_seen(start, &mut |record| {
                seen = Some(
                    if !fingerprints_agree(req.fingerprint, record.fingerprint) {
                        Seen::Reused
                    } else if record.status != RecordStatus::Running {
                        Seen::Finished(read(record))
                    } else {
                        Seen::Running
                    },
                );
            })
            .await?;
        let seen = match (outcome, seen) {
            (StartSeen::Acquired(token), _) => {
                return Ok(Decided::Acquired(Ownership {
                    store: Arc::clone(store),
                    key: req.key.to_owned(),
                    token,
                    lease: req.lease,
                }));
            }
            (StartSeen::Existing, Some(seen)) => seen,
            (StartSeen::Existing, None) => {
                return Err(IdempotencyError::Store(StoreError::backend_msg(
                    "the store reported an existing record without showing it",
                )));
            }
        };
        match seen {
            Seen::Reused => {
                return Err(IdempotencyError::KeyReused {
                    key: req.key.to_owned(),
                });
            }
            Seen::Finished(read) => return Ok(Decided::Finished(read)),
            Seen::Running => {}
        }
        match req.on_running {
            OnRunning::ReturnRunning => return Ok(Decided::Running),
            OnRunning::Error => {
                return Err(IdempotencyError::AlreadyRunning {
                    key: req.key.to_owned(),
                });
            }
            OnRunning::Wait { timeout } => {
                let waited = waiting_since.get_or_insert_with(Instant::now).elapsed();
                let Some(left) = timeout.checked_sub(waited).filter(|d| !d.is_zero()) else {
                    return Err(IdempotencyError::WaitTimedOut {
                        key: req.key.to_owned(),
                        waited,
                    });
                };
                store.wait_for_change(req.key, left).await?;
            }
        }
    }
}

/// What happens to an owned record after the run: the second half of the decision table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Store the result as completed.
    Complete,
    /// Store the failure.
    Fail,
    /// Delete the record: the operation did not happen, or its result is not to be kept.
    Release,
}

impl Settlement {
    /// completed → `Complete` (or `Release` without `cache_result`); failed → `Fail` (or
    /// `Release` without `cache_result` or for a transient error); cancelled or anything
    /// unfinished → `Release`.
    pub fn after(status: Status, cache_result: bool, transient: bool) -> Self {
        match status {
            Status::Completed if cache_result => Self::Complete,
            Status::Failed if cache_result && !transient => Self::Fail,
            _ => Self::Release,
        }
    }
}

/// Ownership of an acquired key: the fencing token and the lease.
///
/// Dropping it without [`settle`](Self::settle) leaves the record running until its lease
/// lapses, after which another caller takes over: a crash behaves the same way.
#[derive(Debug)]
pub struct Ownership {
    store: Arc<dyn IdempotencyStore>,
    key: String,
    token: FencingToken,
    lease: Duration,
}

/// How many times persisting an outcome is attempted before the error is surfaced.
const SETTLE_ATTEMPTS: u32 = 3;

impl Ownership {
    /// The key owned.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token of this ownership.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Runs `work` while a heartbeat renews the lease every third of its length. If the
    /// lease is lost (another owner took over, or renewals kept failing until the lease
    /// would have lapsed), `cancel` fires so the work can stop; `work` still runs to its
    /// end and its output is returned.
    pub async fn hold<F: Future>(&self, cancel: &CancellationToken, work: F) -> F::Output {
        let heartbeat = self.heartbeat(cancel);
        tokio::pin!(work, heartbeat);
        let mut beating = true;
        loop {
            // Work first: a run that finishes on its first poll never arms the heartbeat's
            // timer at all.
            tokio::select! {
                biased;
                output = &mut work => return output,
                () = &mut heartbeat, if beating => beating = false,
            }
        }
    }

    /// Renews until the lease is lost, then cancels. Never returns while the lease holds.
    async fn heartbeat(&self, cancel: &CancellationToken) {
        let interval = self.lease / 3;
        let mut renewed_at = Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            match self.store.renew(&self.key, self.token, self.lease).await {
                Ok(()) => renewed_at = Instant::now(),
                Err(StoreError::StaleToken) => {
                    tracing::warn!(key = %self.key, "idempotency lease lost to another owner; cancelling the run");
                    cancel.cancel();
                    return;
                }
                Err(e) if renewed_at.elapsed() + interval >= self.lease => {
                    tracing::warn!(key = %self.key, error = %e, "could not renew the idempotency lease before it lapsed; cancelling the run");
                    cancel.cancel();
                    return;
                }
                Err(e) => {
                    tracing::debug!(key = %self.key, error = %e, "lease renewal failed; retrying");
                }
            }
        }
    }

    /// Applies `settlement` with the encoded `result`, retrying a failing backend a few
    /// times (briefly) before giving up.
    ///
    /// # Errors
    /// [`StoreError::StaleToken`] if the lease was lost meanwhile (another owner's record
    /// is left alone); [`StoreError::TooLarge`] if the result did not fit (the record is
    /// finished without it); the backend's last error after the retries.
    pub async fn settle(
        self,
        settlement: Settlement,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let mut attempt = 1;
        loop {
            let finish = |status| {
                self.store
                    .finish(&self.key, self.token, status, result, ttl)
            };
            let outcome = match settlement {
                Settlement::Complete => finish(FinalStatus::Completed).await,
                Settlement::Fail => finish(FinalStatus::Failed).await,
                Settlement::Release => self.store.release(&self.key, self.token).await,
            };
            match outcome {
                Err(StoreError::Backend(e)) if attempt < SETTLE_ATTEMPTS => {
                    tracing::warn!(key = %self.key, error = %e, attempt, "persisting the run's outcome failed; retrying");
                    tokio::time::sleep(Duration::from_millis(25) * 4u32.pow(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settlement_follows_the_decision_table() {
        use Settlement::*;
        use Status::*;
        assert_eq!(Settlement::after(Completed, true, false), Complete);
        assert_eq!(Settlement::after(Completed, false, false), Release);
        assert_eq!(Settlement::after(Failed, true, false), Fail);
        assert_eq!(Settlement::after(Failed, false, false), Release);
        assert_eq!(Settlement::after(Failed, true, true), Release);
        assert_eq!(Settlement::after(Cancelled, true, false), Release);
    }
}
