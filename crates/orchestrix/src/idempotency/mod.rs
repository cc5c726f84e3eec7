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
//! * **A dropped `run` future** (a caller's timeout around `run`, a request handler
//!   dropped on disconnect) is settled by a task spawned on the current Tokio runtime as
//!   a cancellation without compensation: the key is freed if no step had completed, and
//!   the outcome kept as a cancelled failure if one had (a durable flow gives the key up
//!   with its journal, so the next caller resumes at once).
//! * **A durable flow** ([`FlowBuilder::durable`](crate::FlowBuilder::durable)) journals
//!   each completed step: after a crash the next owner resumes at the first unfinished
//!   step, and only the step in flight may run again (never an
//!   [`at_most_once`](crate::Step::at_most_once) step).
//!
//! The exceptions, where a completed step **can** run again:
//!
//! * **A crash of a non-durable run** (the process killed, or a `run` future dropped
//!   outside a Tokio runtime): the record stays running until its lease lapses (30 s by
//!   default, never longer than one lease after the last renewal), then the next caller
//!   runs the flow again from its first step. Make the flow durable to resume instead.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::result::Status;
use crate::store::{
    DurableStart, DurableStartOutcome, FencingToken, FinalStatus, IdempotencyStore, Journal,
    JournalStore, Record, RecordStatus, RecordView, StartRequest, StartSeen, StoreError, Wait,
    fingerprints_agree,
};
use crate::telemetry;

pub(crate) use fingerprint::Computed;
pub use fingerprint::{Fingerprint, fingerprint_of};
pub(crate) use options::flow_prefix;
pub use options::{
    DEFAULT_LEASE, KeyError, KeyScope, MAX_KEY_BYTES, OnRunning, OptionError, RunOptions,
    scoped_key, validate_key, validate_lease, validate_on_running, validate_ttl,
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
    /// A durable run's journal does not match this build's flow: the step at `position`
    /// has another name (the flow changed between the interrupted run and its resumption).
    /// Nothing ran; the journal is kept for a build that matches it.
    #[error(
        "the journal of {key:?} does not match the flow: at position {position} it has step {found:?}, the flow has {expected:?}"
    )]
    JournalMismatch {
        /// The (scoped) key.
        key: String,
        /// The step position that differs.
        position: usize,
        /// The flow's step at that position, if it has one.
        expected: Option<String>,
        /// The step the journal names there.
        found: String,
    },
    /// A durable run's journal was written by another version of the flow
    /// ([`FlowBuilder::version`](crate::FlowBuilder::version)). Nothing ran; the journal is
    /// kept for a build of that version.
    #[error(
        "the journal of {key:?} was written by flow version {found:?}, this flow is version {expected:?}"
    )]
    JournalVersion {
        /// The (scoped) key.
        key: String,
        /// The version that wrote the journal.
        found: String,
        /// This flow's version.
        expected: String,
    },
    /// A durable run's journal could not be read back (it is malformed, or its input does
    /// not decode as the flow's input). Nothing ran.
    #[error("the journal of {key:?} cannot be read: {message}")]
    JournalUnreadable {
        /// The (scoped) key.
        key: String,
        /// Why.
        message: String,
    },
    /// The input of a durable run would not read back from its journal (for example a
    /// `NaN`, which JSON writes as `null`), so the run could not be resumed. Nothing ran.
    #[error("the input cannot be journaled: {0}")]
    InputNotJournaled(#[source] serde_json::Error),
    /// `resume`, `redrive` or `recover` on a flow that is not durable.
    #[error("flow {flow:?} is not durable: it keeps no journal to resume or redrive")]
    NotDurable {
        /// The flow.
        flow: String,
    },
    /// `resume` or `redrive` of a key with no durable run under it.
    #[error("no durable run under key {key:?}")]
    NoDurableRun {
        /// The (scoped) key.
        key: String,
    },
    /// `redrive` of a durable run that did not fail (it is running or completed).
    #[error(
        "the durable run under key {key:?} is {status}, not failed: only a failure is redriven"
    )]
    NotFailed {
        /// The (scoped) key.
        key: String,
        /// Its status.
        status: RecordStatus,
    },
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
            Decided::Finished(record) | Decided::Waited(record) => Admission::Finished(record),
            Decided::Running => Admission::Running,
        },
    )
}

/// [`admit`]'s decision, with a finished record already read by the caller's `read`; `A`
/// is what an acquire hands over (the ownership, and for a durable run its journal).
pub(crate) enum Decided<T, A = Ownership> {
    Acquired(A),
    Finished(T),
    /// Finished, after waiting for the owner (`OnRunning::Wait`).
    Waited(T),
    Running,
}

/// What the decision table makes of the record `start` found.
enum Seen<T> {
    Reused,
    Finished(T),
    Running,
}

impl<T> Seen<T> {
    /// The first half of the decision table, on a record that holds the key.
    fn judge(
        req: &AdmitRequest<'_>,
        record: RecordView<'_>,
        read: impl FnOnce(RecordView<'_>) -> T,
    ) -> Self {
        if !fingerprints_agree(req.fingerprint, record.fingerprint) {
            Self::Reused
        } else if record.status != RecordStatus::Running {
            Self::Finished(read(record))
        } else {
            Self::Running
        }
    }
}

/// What a caller that was shown a record does next.
enum Next<D> {
    /// Return this decision.
    Decide(D),
    /// Wait (at most this long) for the record to change, then ask the store again.
    Wait(Duration),
}

/// The decision table's answer to a record that holds the key. Synchronous, so that the
/// (possibly large) decoded replay is never held across an await.
fn after_seen<T, A>(
    req: &AdmitRequest<'_>,
    seen: Seen<T>,
    waiting_since: &mut Option<Instant>,
) -> Result<Next<Decided<T, A>>, IdempotencyError> {
    match seen {
        Seen::Reused => {
            return Err(IdempotencyError::KeyReused {
                key: req.key.to_owned(),
            });
        }
        Seen::Finished(read) if waiting_since.is_some() => {
            return Ok(Next::Decide(Decided::Waited(read)));
        }
        Seen::Finished(read) => return Ok(Next::Decide(Decided::Finished(read))),
        Seen::Running => {}
    }
    match req.on_running {
        OnRunning::ReturnRunning => Ok(Next::Decide(Decided::Running)),
        OnRunning::Error => Err(IdempotencyError::AlreadyRunning {
            key: req.key.to_owned(),
        }),
        OnRunning::Wait { timeout } => {
            let waited = waiting_since.get_or_insert_with(Instant::now).elapsed();
            match timeout.checked_sub(waited).filter(|d| !d.is_zero()) {
                Some(left) => Ok(Next::Wait(left)),
                None => Err(IdempotencyError::WaitTimedOut {
                    key: req.key.to_owned(),
                    waited,
                }),
            }
        }
    }
}

impl Ownership {
    /// A second handle on the same ownership, for the guard that settles a dropped run.
    pub(crate) fn duplicate(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            key: self.key.clone(),
            token: self.token,
            lease: self.lease,
            held: Arc::clone(&self.held),
        }
    }

    /// Keeps this process's own deadline of the lease, from `sent`, the moment the acquire
    /// that succeeded was sent (the store's lease began later, so it cannot have lapsed
    /// before): [`lapsed`](Self::lapsed) then tells a run that was frozen past its lease
    /// (a paused VM, a stalled process) before it acts again. Renewals carry it forward.
    /// Durable runs keep it; plain runs pay nothing for it.
    pub(crate) fn keep_deadline(self, sent: Instant) -> Self {
        *self.held.deadline() = Some(sent + self.lease);
        self
    }

    /// Whether the lease surely lapsed by this process's clock: no acquire or renewal sent
    /// within the last lease succeeded. Only for an ownership that
    /// [keeps its deadline](Self::keep_deadline); `false` otherwise.
    pub(crate) fn lapsed(&self) -> bool {
        self.held.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// The ownership of `key` under `token`, acquired some other way than [`admit`] (a
    /// durable run's redrive).
    pub(crate) fn new(
        store: &Arc<dyn IdempotencyStore>,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Self {
        Self {
            store: Arc::clone(store),
            key: key.to_owned(),
            token,
            lease,
            held: Arc::default(),
        }
    }

    fn acquired(
        store: &Arc<dyn IdempotencyStore>,
        req: &AdmitRequest<'_>,
        token: FencingToken,
    ) -> Self {
        Self {
            store: Arc::clone(store),
            key: req.key.to_owned(),
            token,
            lease: req.lease,
            held: Arc::default(),
        }
    }
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
    // The caller's last wait, from which a polling store backs off.
    let mut waits = None;
    loop {
        let start = StartRequest {
            key: req.key,
            fingerprint: req.fingerprint,
            lease: req.lease,
            rerun_failed: !req.cache_result,
        };
        let mut seen = None;
        let mut visit = |record: RecordView<'_>| seen = Some(Seen::judge(&req, record, &mut read));
        let started = store.start_seen(start, &mut visit);
        let outcome = telemetry::observe(&**store, "start", started).await?;
        let seen = match (outcome, seen) {
            (StartSeen::Acquired(token), _) => {
                return Ok(Decided::Acquired(Ownership::acquired(store, &req, token)));
            }
            (StartSeen::Existing, Some(seen)) => seen,
            (StartSeen::Existing, None) => {
                return Err(IdempotencyError::Store(StoreError::backend_msg(
                    "the store reported an existing record without showing it",
                )));
            }
        };
        match after_seen(&req, seen, &mut waiting_since)? {
            Next::Decide(decided) => return Ok(decided),
            Next::Wait(left) => {
                let wait = waits.map_or(Wait::new(left), |earlier: Wait| earlier.next(left));
                store.wait_for_change(req.key, wait).await?;
                waits = Some(wait);
            }
        }
    }
}

/// [`admit_with`] for a durable run: the store's [`JournalStore::start_durable`], which
/// also takes over an abandoned run of the same input and hands back its journal.
pub(crate) async fn admit_durable<T: Send>(
    store: &Arc<dyn IdempotencyStore>,
    journal: &dyn JournalStore,
    req: AdmitRequest<'_>,
    input: &[u8],
    retain: Option<Duration>,
    mut read: impl FnMut(RecordView<'_>) -> T + Send,
) -> Result<Decided<T, (Ownership, Option<Journal>)>, IdempotencyError> {
    let mut waiting_since = None;
    // The caller's last wait, from which a polling store backs off.
    let mut waits = None;
    loop {
        let start = DurableStart {
            key: req.key,
            fingerprint: req.fingerprint,
            lease: req.lease,
            rerun_failed: !req.cache_result,
            input,
            retain,
        };
        let sent = Instant::now();
        let started = telemetry::observe(&**store, "start_durable", journal.start_durable(start));
        let seen = match started.await? {
            DurableStartOutcome::Acquired { token, resumed } => {
                let owner = Ownership::acquired(store, &req, token).keep_deadline(sent);
                return Ok(Decided::Acquired((owner, resumed)));
            }
            DurableStartOutcome::Existing(record) => Seen::judge(&req, record.view(), &mut read),
        };
        match after_seen(&req, seen, &mut waiting_since)? {
            Next::Decide(decided) => return Ok(decided),
            Next::Wait(left) => {
                let wait = waits.map_or(Wait::new(left), |earlier: Wait| earlier.next(left));
                store.wait_for_change(req.key, wait).await?;
                waits = Some(wait);
            }
        }
    }
}

/// What happens to an owned record after the run: the second half of the decision table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settlement {
    /// Store the result as completed.
    Complete,
    /// Store the failure.
    Fail,
    /// Delete the record: the operation did not happen, or its result is not to be kept.
    Release,
    /// Durable runs: keep the record and its journal, and give the key up now, so the next
    /// caller resumes the run where it stopped ([`JournalStore::suspend`]).
    Suspend,
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
    /// The run is durable: it keeps a journal, and can be resumed instead of re-run.
    pub durable: bool,
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
    /// A durable run differs in two rows, where it keeps its journal for the next caller to
    /// resume instead ([`Suspend`](Self::Suspend)): a cancelled run whose completed steps
    /// remain, and a transient failure (with `cache_result`).
    ///
    /// A `Release` is what lets a later caller run the operation again, so it is chosen
    /// only where nothing the run did remains or the caller asked for it
    /// (`cache_result(false)`, a transient error).
    pub fn after(ending: Ending, cache_result: bool) -> Self {
        match ending.status {
            Status::Completed if cache_result => Self::Complete,
            Status::Failed if !cache_result => Self::Release,
            Status::Failed if ending.transient && ending.durable => Self::Suspend,
            Status::Failed if ending.transient => Self::Release,
            Status::Failed => Self::Fail,
            Status::Cancelled if ending.effects_remain && ending.durable => Self::Suspend,
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
    /// What this process knows of its hold, shared by the ownership's handles.
    held: Arc<Held>,
}

/// What a process knows of its hold on a lease.
#[derive(Debug, Default)]
struct Held {
    /// Set when the heartbeat (or a journal append) learned the lease was lost.
    lost: AtomicBool,
    /// When the lease lapses at the latest by this process's clock, for an ownership that
    /// [keeps it](Ownership::keep_deadline).
    deadline: std::sync::Mutex<Option<Instant>>,
}

impl Held {
    fn deadline(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How many times persisting an outcome is attempted before the error is surfaced.
const SETTLE_ATTEMPTS: u32 = 3;

impl Ownership {
    /// The key owned.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The store the key is owned in.
    pub(crate) fn store(&self) -> &dyn IdempotencyStore {
        &*self.store
    }

    /// The fencing token of this ownership.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Whether the lease was lost while the work ran ([`hold`](Self::hold) then fired
    /// its token): another owner may have the key now.
    pub fn lease_lost(&self) -> bool {
        self.held.lost.load(Ordering::SeqCst)
    }

    /// Marks the lease lost and cancels the work.
    pub(crate) fn lose(&self, cancel: &CancellationToken) {
        if !self.held.lost.swap(true, Ordering::SeqCst) {
            telemetry::lease_lost(&*self.store);
        }
        cancel.cancel();
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
            let sent = Instant::now();
            let renewal = self.store.renew(&self.key, self.token, self.lease);
            match telemetry::observe(&*self.store, "renew", renewal).await {
                Ok(()) => {
                    renewed_at = Instant::now();
                    if let Some(deadline) = self.held.deadline().as_mut() {
                        *deadline = sent + self.lease;
                    }
                    telemetry::renewed(&*self.store);
                }
                Err(StoreError::StaleToken) => {
                    tracing::warn!(key = %self.key, "idempotency lease lost to another owner; cancelling the run");
                    self.lose(cancel);
                    return;
                }
                Err(e) if renewed_at.elapsed() + interval >= self.lease => {
                    tracing::warn!(key = %self.key, error = %e, "could not renew the idempotency lease before it lapsed; cancelling the run");
                    self.lose(cancel);
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
        self.settle_in_place(settlement, result, ttl).await
    }

    /// [`settle`](Self::settle), keeping the ownership: a guard can still act on it if the
    /// future settling it is dropped half-way.
    pub(crate) async fn settle_in_place(
        &self,
        settlement: Settlement,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let mut attempt = 1;
        let mut ambiguous = false;
        loop {
            let store = &*self.store;
            let finish = |status| {
                let finish = store.finish(&self.key, self.token, status, result, ttl);
                telemetry::observe(store, "finish", finish)
            };
            let outcome = match settlement {
                Settlement::Complete => finish(FinalStatus::Completed).await,
                Settlement::Fail => finish(FinalStatus::Failed).await,
                Settlement::Release => {
                    let release = store.release(&self.key, self.token);
                    telemetry::observe(store, "release", release).await
                }
                Settlement::Suspend => match store.journal_store() {
                    Some(journal) => {
                        let suspend = journal.suspend(&self.key, self.token);
                        telemetry::observe(store, "suspend", suspend).await
                    }
                    None => Err(StoreError::backend_msg(
                        "a run can only be suspended on a store that keeps journals",
                    )),
                },
            };
            match outcome {
                Err(StoreError::Backend(e)) if attempt < SETTLE_ATTEMPTS => {
                    tracing::warn!(key = %self.key, error = %e, attempt, "persisting the run's outcome failed; retrying");
                    tokio::time::sleep(Duration::from_millis(25) * 4u32.pow(attempt)).await;
                    attempt += 1;
                    ambiguous = true;
                }
                // A release (or suspend) that failed without an answer may have been
                // applied: a retry then finds the record gone or no longer ours. Either
                // way the key is not held by this run and nothing of it is kept.
                Err(StoreError::StaleToken)
                    if ambiguous
                        && matches!(settlement, Settlement::Release | Settlement::Suspend) =>
                {
                    return Ok(());
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
                durable: false,
            };
            Settlement::after(ending, cache)
        };
        let durable = |status, cache, transient, effects_remain| {
            let ending = Ending {
                status,
                transient,
                effects_remain,
                durable: true,
            };
            Settlement::after(ending, cache)
        };
        assert_eq!(durable(Completed, true, false, true), Complete);
        assert_eq!(durable(Failed, true, false, true), Fail);
        assert_eq!(durable(Failed, true, true, true), Suspend);
        assert_eq!(durable(Failed, false, true, true), Release);
        assert_eq!(durable(Cancelled, true, false, true), Suspend);
        assert_eq!(durable(Cancelled, true, false, false), Release);
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
