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
//!
//! # The rule: a step that completed never runs again
//!
//! A step that completed is never run again by this library unless the caller asked for
//! it. The caller asks in exactly these ways:
//!
//! * `cache_result(false)`: a failed (or completed) run's record is not kept, so the next
//!   caller runs the operation again;
//! * a step error marked [`transient`](crate::StepError::transient): the operation did not
//!   happen, so the run frees its key for a retry;
//! * deleting the record ([`IdempotencyStore::delete`]), or letting its TTL end: after
//!   that, the same key is a new operation.
//!
//! Everything else keeps the record, so nothing runs twice:
//!
//! * **Panics** in a step, a compensation, the output builder, a validator, a plugin, or
//!   the output's `Serialize`/`Deserialize` are caught: the run fails (or its output is
//!   left out) and its outcome is stored like any other.
//! * **An output that would not read back** (a `NaN`, which JSON writes as `null`, or a
//!   lopsided serde implementation) is left out: the outcome is stored without it, the
//!   owner gets [`RunError::NotPersisted`](crate::RunError::NotPersisted) with its result,
//!   and a replay gets [`IdempotencyError::ResultNotStored`], never a decode error.
//! * **A result the store refuses** for size or resources is not stored, but the record is
//!   still finished, fenced ([`StoreError::TooLarge`], [`StoreError::ResultRefused`]).
//! * **Cancellation** (the token of [`RunOptions::cancellation`] fires) frees the key only
//!   when nothing the run did remains: no step completed, or every completed step was
//!   compensated. Otherwise the outcome is stored as a failure with a
//!   [`Cancelled`](crate::FlowError::Cancelled) error and replayed like any cached failure.
//!   The token is checked before every step, during retry delays, and once more after the
//!   last step; a step already running is never interrupted by the library (it sees the
//!   token through [`Context::cancellation`](crate::Context::cancellation)), and a step
//!   that completes after the token fired counts as completed (and is compensated).
//! * **A lost lease** cancels the run that lost it, through the run's own child token:
//!   the library never cancels a token it was given, which may be shared by other runs.
//!
//! The exceptions, where a completed step **can** run again:
//!
//! * **A crash, or a dropped `run` future** (a caller's timeout around `run`, a request
//!   handler dropped on disconnect): the record stays running until its lease lapses
//!   (30 s by default, never longer than one lease after the last renewal), then the next
//!   caller runs the flow again from its first step. Durable flows, when they land,
//!   resume instead (see the README's list of what is not there yet).
//! * **A store that cannot be reached** when the outcome is stored (or that refuses even
//!   the small write of a finish without its result): the owner gets
//!   [`RunError::NotPersisted`](crate::RunError::NotPersisted) with its result, and the
//!   record stays running until its lease lapses, as after a crash.
//! * **[`OnRunning::Wait`] on a store that polls** (Redis, SQL, DynamoDB re-check every
//!   50 ms): a record whose TTL is shorter than the poll can expire between two checks,
//!   and the waiter then finds the key free and runs the operation. Use a TTL well above
//!   the poll interval with `Wait` (the memory store wakes its waiters directly).
//! * **[`KeyScope::Global`]** keys are stored as given: a global key equal to a scoped one
//!   (`flow:key`) is the same record.

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
pub(crate) use options::flow_prefix;
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
    /// The key's run finished, but its result was not stored, so it cannot be replayed:
    /// it was too large for the store, the store refused it, or its output could not be
    /// kept (see [`OutputNotKept`](crate::OutputNotKept)). The operation is not run again.
    #[error("the run under key {key:?} finished but its result was not stored")]
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

/// How an owned run ended, as far as its record is concerned: what
/// [`Settlement::after`] decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    /// The run's status: `Completed`, `Failed` or `Cancelled`.
    pub status: Status,
    /// The run failed with a step error marked transient: the operation did not happen
    /// and may be retried under the same key.
    pub transient: bool,
    /// Something the run did remains: a step completed and was not compensated.
    pub effects_remain: bool,
}

impl Settlement {
    /// The second half of the decision table:
    ///
    /// | the run | `cache_result` | settlement |
    /// | --- | --- | --- |
    /// | completed | true | `Complete` |
    /// | completed | false | `Release` |
    /// | failed | true | `Fail` (`Release` for a transient error) |
    /// | failed | false | `Release` |
    /// | cancelled, nothing remains (no step completed, or all were compensated) | any | `Release` |
    /// | cancelled, a completed step remains | any | `Fail`: kept as a failure with a `Cancelled` error, so the step never runs again |
    ///
    /// A `Release` is what lets a later caller run the operation again, so it is chosen
    /// only where nothing the run did remains or the caller asked for it
    /// (`cache_result(false)`, a transient error).
    pub fn after(ending: Ending, cache_result: bool) -> Self {
        match ending.status {
            Status::Completed if cache_result => Self::Complete,
            Status::Failed if cache_result && !ending.transient => Self::Fail,
            Status::Cancelled if ending.effects_remain => Self::Fail,
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
        let after = |status, cache, transient, effects_remain| {
            let ending = Ending {
                status,
                transient,
                effects_remain,
            };
            Settlement::after(ending, cache)
        };
        assert_eq!(after(Completed, true, false, true), Complete);
        assert_eq!(after(Completed, false, false, true), Release);
        assert_eq!(after(Failed, true, false, true), Fail);
        assert_eq!(after(Failed, false, false, true), Release);
        assert_eq!(after(Failed, true, true, true), Release);
        assert_eq!(after(Cancelled, true, false, false), Release);
        assert_eq!(after(Cancelled, false, false, false), Release);
        assert_eq!(after(Cancelled, true, false, true), Fail);
        assert_eq!(after(Cancelled, false, false, true), Fail);
    }
}
