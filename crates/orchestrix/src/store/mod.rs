//! The idempotency store contract: one small trait every backend implements.
//!
//! A store keeps one [`Record`] per key and answers one question atomically:
//! *may this caller run the operation now?* ([`IdempotencyStore::start`]). Everything
//! else — what to do with a completed record, how to wait for a running one, when a
//! fingerprint mismatch is an error — is decided by the engine, never by a store.
//! Stores know nothing about flows: they store opaque result bytes and fence owners.
//!
//! # Guarantees a store must give
//!
//! * **Atomic acquire.** Of any number of concurrent `start` calls for a free key,
//!   exactly one returns [`StartOutcome::Acquired`]; the others see the record it wrote.
//! * **Fencing.** Every acquire issues a fresh [`FencingToken`]. `finish` (and so
//!   `complete` and `fail`), `renew` and `release` succeed only for the current token and
//!   otherwise return [`StoreError::StaleToken`], so an owner that lost its lease can never
//!   overwrite a newer run.
//! * **Expiry.** A running record whose lease has lapsed, and a finished record whose
//!   TTL has lapsed, are treated exactly like an absent record. Where the backend has a
//!   clock of its own (Redis `TIME`, SQL `now()`), that clock decides.
//! * **Typed failures.** A record that cannot be decoded is [`StoreError::Decode`] or
//!   [`StoreError::UnsupportedVersion`], never a panic and never "free".
//! * **One round trip** per operation for remote backends.
//!
//! The engine admits runs through [`IdempotencyStore::start_seen`], which by default is
//! `start` with the existing record shown to a visitor. A store whose records live in its
//! own memory can override it to show a record where it lies, so that a replay decodes its
//! result without a copy: the memory store does.
//!
//! The shared conformance suite (`orchestrix-conformance`) checks all of this; every
//! backend runs it.
//!
//! # Implementing a store
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//! use orchestrix::store::{
//!     FencingToken, FinalStatus, IdempotencyStore, Record, RecordStatus, StartOutcome,
//!     StartRequest, StoreError,
//! };
//!
//! /// A toy store without expiry, to show the shape of the contract.
//! #[derive(Debug, Default)]
//! struct ToyStore(Mutex<HashMap<String, Record>>);
//!
//! impl ToyStore {
//!     fn with_owner<T>(
//!         &self,
//!         key: &str,
//!         token: FencingToken,
//!         f: impl FnOnce(&mut HashMap<String, Record>) -> T,
//!     ) -> Result<T, StoreError> {
//!         let mut map = self.0.lock().map_err(|_| StoreError::backend_msg("poisoned"))?;
//!         match map.get(key) {
//!             Some(r) if r.token == token && r.status == RecordStatus::Running => Ok(f(&mut map)),
//!             _ => Err(StoreError::StaleToken),
//!         }
//!     }
//! }
//!
//! #[async_trait::async_trait]
//! impl IdempotencyStore for ToyStore {
//!     async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
//!         let map = self.0.lock().map_err(|_| StoreError::backend_msg("poisoned"))?;
//!         Ok(map.get(key).cloned())
//!     }
//!     async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
//!         let mut map = self.0.lock().map_err(|_| StoreError::backend_msg("poisoned"))?;
//!         if let Some(existing) = map.get(req.key) {
//!             if !req.may_take_over(existing.status, existing.fingerprint.as_deref()) {
//!                 return Ok(StartOutcome::Existing(existing.clone()));
//!             }
//!         }
//!         let token = FencingToken::generate();
//!         map.insert(req.key.to_owned(), Record::running(req.key, token, req.fingerprint));
//!         Ok(StartOutcome::Acquired(token))
//!     }
//!     async fn finish(
//!         &self,
//!         key: &str,
//!         token: FencingToken,
//!         status: FinalStatus,
//!         result: &[u8],
//!         _ttl: Option<Duration>,
//!     ) -> Result<(), StoreError> {
//!         self.with_owner(key, token, |map| {
//!             if let Some(r) = map.get_mut(key) {
//!                 r.status = status.into();
//!                 r.result = Some(result.to_vec());
//!             }
//!         })
//!     }
//!     async fn renew(&self, key: &str, token: FencingToken, _lease: Duration) -> Result<(), StoreError> {
//!         self.with_owner(key, token, |_| ())
//!     }
//!     async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
//!         self.with_owner(key, token, |map| { map.remove(key); })
//!     }
//!     async fn delete(&self, key: &str) -> Result<(), StoreError> {
//!         let mut map = self.0.lock().map_err(|_| StoreError::backend_msg("poisoned"))?;
//!         map.remove(key);
//!         Ok(())
//!     }
//! }
//! ```

mod admin;
#[cfg(feature = "cache")]
mod cache;
pub mod journal;
mod memory;
mod record;
pub mod wait;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

pub use admin::{
    DEFAULT_PAGE_SIZE, Lease, ListRequest, Listed, Page, RecordAdmin, RecordInfo, Released,
    StatusFilter,
};
#[cfg(feature = "cache")]
pub use cache::{CachedStore, DEFAULT_CACHE_BYTES, DEFAULT_MAX_AGE};
pub use journal::{
    DurableStart, DurableStartOutcome, Journal, JournalDescription, JournalEntryInfo,
    JournalEntryKind, JournalStore, Redrive,
};
pub use memory::{DEFAULT_MAX_JOURNAL_BYTES, MemoryStore};
pub use record::{FencingToken, Record, RecordStatus, RecordView, SCHEMA_VERSION};
pub use wait::{POLL_BACKOFF_FIRST, Wait, Waiters, Watch};

/// A boxed error from a backend's client library, kept as the source of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong inside a store. Every backend maps its failures into these variants.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The fencing token is not the current owner's: the lease was lost and another run
    /// took the key over, or the record was released or expired.
    #[error("fencing token is stale: another run owns this key now, or the record is gone")]
    StaleToken,
    /// A result could not be encoded for storage.
    #[error("result could not be encoded for storage: {0}")]
    Encode(#[source] BoxError),
    /// The stored record could not be decoded (missing field, malformed value, garbage
    /// written by something else under the key).
    #[error("stored record could not be decoded: {0}")]
    Decode(#[source] BoxError),
    /// The stored record was written by a newer (or unknown) schema version.
    #[error("stored record has schema version {found}, this build understands {SCHEMA_VERSION}")]
    UnsupportedVersion {
        /// The version found in the record.
        found: u32,
    },
    /// The result is larger than the backend can hold. The record was still marked
    /// finished (without its result), so the operation never runs again under this key.
    #[error("result of {size} bytes exceeds the store's limit of {limit} bytes")]
    TooLarge {
        /// Size of the encoded result.
        size: usize,
        /// The backend's limit.
        limit: usize,
    },
    /// The backend refused to store the result for a reason of size or resources (a
    /// server-side value limit, out of memory, a full disk). As for
    /// [`TooLarge`](Self::TooLarge), the record was still marked finished without its
    /// result, so the operation never runs again under this key.
    #[error(
        "the store refused a result of {size} bytes ({source}); the record was finished without it"
    )]
    ResultRefused {
        /// Size of the encoded result.
        size: usize,
        /// What the backend said.
        #[source]
        source: BoxError,
    },
    /// The backend could not be reached or failed (connection refused, timeout, I/O).
    #[error("store backend failed: {0}")]
    Backend(#[source] BoxError),
}

impl StoreError {
    /// A [`StoreError::Backend`] from any error of a client library.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        Self::Backend(err.into())
    }

    /// A [`StoreError::Backend`] from a message.
    pub fn backend_msg(msg: impl fmt::Display) -> Self {
        Self::Backend(msg.to_string().into())
    }

    /// A [`StoreError::Decode`] from any error or message.
    pub fn decode(err: impl Into<BoxError>) -> Self {
        Self::Decode(err.into())
    }

    /// Whether a `finish` that returned this error still finished the record, without its
    /// result ([`TooLarge`](Self::TooLarge), [`ResultRefused`](Self::ResultRefused)): the
    /// operation will not run again, but its result cannot be replayed.
    pub fn finished_without_result(&self) -> bool {
        matches!(self, Self::TooLarge { .. } | Self::ResultRefused { .. })
    }
}

/// Arguments of [`IdempotencyStore::start`].
#[derive(Debug, Clone, Copy)]
pub struct StartRequest<'a> {
    /// The full (already scoped and validated) key.
    pub key: &'a str,
    /// Fingerprint of the input, stored with the record. `None` when fingerprinting is off.
    pub fingerprint: Option<&'a str>,
    /// How long the acquired record stays owned without a renewal.
    pub lease: Duration,
    /// Whether a `Failed` record with a matching fingerprint may be taken over
    /// (the run's `cache_result` is false).
    pub rerun_failed: bool,
}

impl StartRequest<'_> {
    /// The takeover rule for a record that exists and has **not** expired: only a failed
    /// record may be taken over, and only when the caller asked to re-run failures and the
    /// fingerprints do not disagree (a missing fingerprint on either side agrees with any).
    ///
    /// Backends whose decision runs in the server (Lua, SQL, DynamoDB conditions) encode
    /// this same rule there.
    pub fn may_take_over(&self, status: RecordStatus, fingerprint: Option<&str>) -> bool {
        status == RecordStatus::Failed
            && self.rerun_failed
            && fingerprints_agree(self.fingerprint, fingerprint)
    }
}

/// Two fingerprints agree when they are equal or either is absent.
pub fn fingerprints_agree(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// What [`IdempotencyStore::start`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// The key was free (absent, expired, or a re-runnable failure): the caller owns it now
    /// as a running record under this token.
    Acquired(FencingToken),
    /// A live record holds the key; the caller must not run. The engine decides what to
    /// do with it (replay, report running, wait, or reject a reused key).
    Existing(Record),
}

/// How an owned record ends: the status [`IdempotencyStore::finish`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinalStatus {
    /// The operation completed; its result is replayed.
    Completed,
    /// The operation failed; its failure is replayed (or re-run, per the caller).
    Failed,
}

impl From<FinalStatus> for RecordStatus {
    fn from(status: FinalStatus) -> Self {
        match status {
            FinalStatus::Completed => Self::Completed,
            FinalStatus::Failed => Self::Failed,
        }
    }
}

/// What [`IdempotencyStore::start_seen`] found: like [`StartOutcome`], with the existing
/// record already shown to the visitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartSeen {
    /// The caller owns the key now, as for [`StartOutcome::Acquired`].
    Acquired(FencingToken),
    /// A live record holds the key; the visitor has seen it.
    Existing,
}

/// The visitor of [`IdempotencyStore::start_seen`].
pub type RecordVisitor<'v> = dyn FnMut(RecordView<'_>) + Send + 'v;

/// The storage contract behind idempotent runs.
///
/// Implementations must be cheap to share (`Arc<dyn IdempotencyStore>`) and safe to call
/// concurrently. See the [module documentation](self) for the guarantees and an example.
///
/// `ttl` arguments are how long a finished record is kept (`None`: until deleted).
/// Durations handed to a store have been validated by the engine (non-zero, bounded).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug {
    /// Reads the live record under `key`, or `None` if absent or expired.
    ///
    /// # Errors
    /// [`StoreError::Decode`] / [`StoreError::UnsupportedVersion`] for a record that cannot
    /// be read; [`StoreError::Backend`] when the store is unreachable.
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError>;

    /// Atomically acquires the key, or reports the live record that holds it.
    ///
    /// Acquires when the key is absent, expired (running past its lease, finished past its
    /// TTL), or [`StartRequest::may_take_over`] allows it; the new record is `Running`
    /// with a fresh [`FencingToken`] and a lease of `req.lease`.
    ///
    /// # Errors
    /// As for [`get`](Self::get): an undecodable record is an error, never "free".
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError>;

    /// [`start`](Self::start), with an existing record shown to `visit` in place rather
    /// than returned: the engine reads what it needs (fingerprint, status, the stored
    /// result) without the record being copied out first. `visit` is called at most once,
    /// exactly when the outcome is [`StartSeen::Existing`], and may run while the store
    /// holds a lock, so it must be short and must not call the store.
    ///
    /// The default calls `start` and shows the returned record; a store that holds its
    /// records in memory overrides it to skip the copy.
    ///
    /// # Errors
    /// As for [`start`](Self::start).
    async fn start_seen(
        &self,
        req: StartRequest<'_>,
        visit: &mut RecordVisitor<'_>,
    ) -> Result<StartSeen, StoreError> {
        Ok(match self.start(req).await? {
            StartOutcome::Acquired(token) => StartSeen::Acquired(token),
            StartOutcome::Existing(record) => {
                visit(record.view());
                StartSeen::Existing
            }
        })
    }

    /// Marks the owned record finished, `Completed` or `Failed` as `status` says, with
    /// the encoded result, kept for `ttl`.
    ///
    /// A finished record is never rewritten. A caller retrying a finish whose reply it
    /// lost must be able to tell its own applied write from a stale owner: the same status
    /// and result under its token again answer `Ok`; a record it already finished without
    /// its result answers [`StoreError::ResultRefused`] (or `TooLarge`); anything else is
    /// [`StoreError::StaleToken`].
    ///
    /// # Errors
    /// [`StoreError::StaleToken`] if `token` is not the current owner's.
    /// [`StoreError::TooLarge`] if the backend cannot hold `result`, and
    /// [`StoreError::ResultRefused`] if the backend refused it for size or resources (a
    /// server-side value limit, out of memory, a full disk): in both cases the record must
    /// still be marked finished **without** a result (fenced, in a second write if need
    /// be), so the operation is never run again. Only a backend that cannot be reached at
    /// all (or refuses even the small write) returns [`StoreError::Backend`] and leaves
    /// the record running until its lease lapses.
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError>;

    /// [`finish`](Self::finish) as `Completed`.
    ///
    /// # Errors
    /// As for [`finish`](Self::finish).
    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.finish(key, token, FinalStatus::Completed, result, ttl)
            .await
    }

    /// [`finish`](Self::finish) as `Failed`.
    ///
    /// # Errors
    /// As for [`finish`](Self::finish).
    async fn fail(
        &self,
        key: &str,
        token: FencingToken,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.finish(key, token, FinalStatus::Failed, result, ttl)
            .await
    }

    /// Extends the owned record's lease to `lease` from now.
    ///
    /// # Errors
    /// [`StoreError::StaleToken`] if the lease was lost.
    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError>;

    /// Deletes the owned record, so the key is free again (the operation did not happen,
    /// or the caller asked not to keep its result).
    ///
    /// A release retried after its reply was lost may answer `StaleToken` (the record it
    /// deleted is gone); the engine counts that as released, since nothing of the run is
    /// kept either way.
    ///
    /// # Errors
    /// [`StoreError::StaleToken`] if `token` is not the current owner's.
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError>;

    /// Deletes whatever record is under `key`, owned or not (administrative use).
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Removes expired records and returns how many were removed. Stores whose backend
    /// expires records natively keep the default, which does nothing.
    async fn cleanup(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Resolves when the record under `key` may have changed, or after at most
    /// [`wait.max()`](Wait::max).
    ///
    /// Used by `OnRunning::Wait`: the engine calls [`start`](Self::start) again after each
    /// wake-up, and hands each further wait of the same caller [`Wait::next`]. The default
    /// polls: it sleeps [`Wait::poll_interval`], 2 ms on a caller's first wait doubling up
    /// to [`DEFAULT_POLL_INTERVAL`]. Stores that can notify (memory, PostgreSQL) override
    /// it to wake the moment the record finishes or is released, keeping a slow poll as a
    /// safety net; see the [`wait`] module.
    ///
    /// Returning early is always correct (the engine looks again); returning late only
    /// delays the waiter.
    async fn wait_for_change(&self, key: &str, wait: Wait) -> Result<(), StoreError> {
        let _ = key;
        tokio::time::sleep(wait.poll_interval()).await;
        Ok(())
    }

    /// The store's journal, if it keeps one: durable flows
    /// ([`FlowBuilder::durable`](crate::FlowBuilder::durable)) need it, and refuse to build
    /// on a store that answers `None` (the default, for stores that do not). Every store of
    /// this workspace keeps journals; see [`JournalStore`].
    fn journal_store(&self) -> Option<&dyn JournalStore> {
        None
    }

    /// The store's record admin, if it offers one: operators' access to its records
    /// (inspect one, list them by page, release a stuck one), which the `orchestrix`
    /// command-line tool uses. The engine never calls it. `None` by default; every store of
    /// this workspace offers one. See [`RecordAdmin`].
    fn admin(&self) -> Option<&dyn RecordAdmin> {
        None
    }

    /// What kind of store this is, as the `store` label of the engine's metrics:
    /// `memory`, `redis`, `postgres`, `sqlite`, `dynamodb` for this workspace's stores,
    /// `custom` by default. A fixed word, never anything from a record. The engine times
    /// the calls of every store but `memory` (in-process calls are not worth a clock read).
    fn kind(&self) -> &'static str {
        "custom"
    }
}

/// The longest poll interval of the default [`IdempotencyStore::wait_for_change`]: the
/// cap of its backoff from [`POLL_BACKOFF_FIRST`].
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(50);
