//! The journal: what a store keeps for durable flows.
//!
//! A durable flow ([`FlowBuilder::durable`](crate::FlowBuilder::durable)) records, for each
//! keyed run, the run's input at acquire and one entry per step it finished. When the run's
//! owner dies (crash, dropped future, lost lease), the next owner receives that journal and
//! resumes where the run stopped instead of starting over. Stores keep the journal as
//! opaque bytes: the input, then entries in the order they were appended. What an entry
//! means is the engine's business, never the store's.
//!
//! A store that keeps journals implements [`JournalStore`] and returns itself from
//! [`IdempotencyStore::journal_store`](super::IdempotencyStore::journal_store).
//!
//! # Guarantees a journal store must give
//!
//! * **A durable record outlives its lease.** A durable run's record has a lease (who owns
//!   it now) and a retention (how long it is kept). When the lease lapses the record stays,
//!   with its journal, for the retention given at acquire (`None`: until deleted); it is
//!   *abandoned*, and [`abandoned`](JournalStore::abandoned) lists it.
//! * **Atomic takeover with the journal.** [`start_durable`](JournalStore::start_durable)
//!   on an abandoned record whose fingerprint agrees acquires it under a fresh token and
//!   returns its journal in the same operation; of concurrent callers exactly one does.
//!   A free key (absent, expired, or a failure the caller re-runs) is acquired with an
//!   empty journal holding only the caller's input.
//! * **Fenced appends.** [`append`](JournalStore::append) adds one entry only for the
//!   current owner (running, its token, lease alive), in one round trip, and otherwise
//!   answers [`StoreError::StaleToken`] and changes nothing. So a stale owner can never
//!   make the journal disagree with what the current owner acts on.
//! * **The journal lives as long as the record.** [`finish`](super::IdempotencyStore::finish)
//!   keeps it (a failed run can be [redriven](JournalStore::redrive)), the record's TTL
//!   expires it, and `release` or `delete` remove it.
//! * **Bounded.** An append that would make the record larger than the store can hold is
//!   [`StoreError::TooLarge`] and appends nothing: a journal is never truncated silently.
//!   What counts against the limit is the store's to say (the memory store counts input
//!   and entries; a remote store may count its whole record) and each store documents it.
//!
//! The other operations of [`IdempotencyStore`](super::IdempotencyStore) apply to durable
//! records as to any: `get` reads one (an abandoned one reads as running), `finish` and
//! `renew` are fenced on its lease, `release` and `delete` remove it with its journal.
//!
//! The shared conformance suite checks all of this for every store that keeps journals.
//!
//! # Implementing a journal store
//!
//! The toy store of the [`store`](super) module documentation, with journals. Expiry is
//! left out again; leases are decided by a flag a real store would compute from its clock.
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//! use orchestrix::store::{
//!     DurableStart, DurableStartOutcome, FencingToken, FinalStatus, IdempotencyStore, Journal,
//!     JournalStore, Record, RecordStatus, Redrive, StartOutcome, StartRequest, StoreError,
//! };
//!
//! #[derive(Debug, Clone)]
//! struct Durable {
//!     record: Record,
//!     journal: Journal,
//!     lapsed: bool,
//! }
//!
//! #[derive(Debug, Default)]
//! struct ToyStore(Mutex<HashMap<String, Durable>>);
//!
//! fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, StoreError> {
//!     m.lock().map_err(|_| StoreError::backend_msg("poisoned"))
//! }
//!
//! impl ToyStore {
//!     /// Runs `f` on the record `token` owns, or answers `StaleToken`.
//!     fn owned<T>(&self, key: &str, token: FencingToken, f: impl FnOnce(&mut Durable) -> T)
//!         -> Result<T, StoreError>
//!     {
//!         let mut map = lock(&self.0)?;
//!         match map.get_mut(key) {
//!             Some(d) if d.record.token == token
//!                 && d.record.status == RecordStatus::Running && !d.lapsed => Ok(f(d)),
//!             _ => Err(StoreError::StaleToken),
//!         }
//!     }
//! }
//!
//! #[async_trait::async_trait]
//! impl IdempotencyStore for ToyStore {
//!     async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
//!         Ok(lock(&self.0)?.get(key).map(|d| d.record.clone()))
//!     }
//!     async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
//!         // Non-durable runs: the toy store of the `store` module, on the same map.
//!         let durable = DurableStart { key: req.key, fingerprint: req.fingerprint,
//!             lease: req.lease, rerun_failed: req.rerun_failed, input: &[], retain: None };
//!         Ok(match self.start_durable(durable).await? {
//!             DurableStartOutcome::Acquired { token, .. } => StartOutcome::Acquired(token),
//!             DurableStartOutcome::Existing(record) => StartOutcome::Existing(record),
//!         })
//!     }
//!     async fn finish(&self, key: &str, token: FencingToken, status: FinalStatus,
//!         result: &[u8], _ttl: Option<Duration>) -> Result<(), StoreError>
//!     {
//!         // The journal stays with the finished record.
//!         self.owned(key, token, |d| {
//!             d.record.status = status.into();
//!             d.record.result = Some(result.to_vec());
//!         })
//!     }
//!     async fn renew(&self, key: &str, token: FencingToken, _lease: Duration)
//!         -> Result<(), StoreError>
//!     {
//!         self.owned(key, token, |_| ())
//!     }
//!     async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
//!         self.owned(key, token, |_| ())?;
//!         lock(&self.0)?.remove(key);
//!         Ok(())
//!     }
//!     async fn delete(&self, key: &str) -> Result<(), StoreError> {
//!         lock(&self.0)?.remove(key);
//!         Ok(())
//!     }
//!     fn journal_store(&self) -> Option<&dyn JournalStore> {
//!         Some(self)
//!     }
//! }
//!
//! #[async_trait::async_trait]
//! impl JournalStore for ToyStore {
//!     async fn start_durable(&self, req: DurableStart<'_>)
//!         -> Result<DurableStartOutcome, StoreError>
//!     {
//!         let mut map = lock(&self.0)?;
//!         let token = FencingToken::generate();
//!         let mut resumed = None;
//!         if let Some(held) = map.get(req.key) {
//!             let rec = &held.record;
//!             let agree = orchestrix::store::fingerprints_agree(
//!                 req.fingerprint, rec.fingerprint.as_deref());
//!             if rec.status == RecordStatus::Running && held.lapsed && agree {
//!                 resumed = Some(held.journal.clone()); // take over, journal kept
//!             } else if !req.may_take_over(rec.status, rec.fingerprint.as_deref()) {
//!                 return Ok(DurableStartOutcome::Existing(rec.clone()));
//!             }
//!         }
//!         let journal = resumed.clone().unwrap_or_else(|| Journal {
//!             input: req.input.to_vec(),
//!             entries: Vec::new(),
//!         });
//!         let record = Record::running(req.key, token, req.fingerprint);
//!         map.insert(req.key.to_owned(), Durable { record, journal, lapsed: false });
//!         Ok(DurableStartOutcome::Acquired { token, resumed })
//!     }
//!     async fn append(&self, key: &str, token: FencingToken, entry: &[u8])
//!         -> Result<(), StoreError>
//!     {
//!         self.owned(key, token, |d| d.journal.entries.push(entry.to_vec()))
//!     }
//!     async fn suspend(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
//!         self.owned(key, token, |d| d.lapsed = true)
//!     }
//!     async fn redrive(&self, key: &str, _lease: Duration, _retain: Option<Duration>)
//!         -> Result<Redrive, StoreError>
//!     {
//!         let mut map = lock(&self.0)?;
//!         let Some(held) = map.get_mut(key) else { return Ok(Redrive::Absent) };
//!         if held.record.status != RecordStatus::Failed {
//!             return Ok(Redrive::NotFailed(held.record.clone()));
//!         }
//!         let token = FencingToken::generate();
//!         held.record.status = RecordStatus::Running;
//!         held.record.token = token;
//!         held.record.result = None;
//!         held.lapsed = false;
//!         Ok(Redrive::Acquired { token, journal: held.journal.clone() })
//!     }
//!     async fn read_journal(&self, key: &str) -> Result<Option<Journal>, StoreError> {
//!         Ok(lock(&self.0)?.get(key).map(|d| d.journal.clone()))
//!     }
//!     async fn abandoned(&self, prefix: &str, after: Option<&str>, limit: usize)
//!         -> Result<Vec<String>, StoreError>
//!     {
//!         let map = lock(&self.0)?;
//!         let mut keys: Vec<String> = map.iter()
//!             .filter(|(k, d)| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a)
//!                 && d.record.status == RecordStatus::Running && d.lapsed)
//!             .map(|(k, _)| k.clone())
//!             .collect();
//!         keys.sort();
//!         keys.truncate(limit);
//!         Ok(keys)
//!     }
//! }
//! ```

use std::time::Duration;

use async_trait::async_trait;

use super::{FencingToken, Record, StoreError};

/// Arguments of [`JournalStore::start_durable`]: those of
/// [`StartRequest`](super::StartRequest), and the journal's beginning.
#[derive(Debug, Clone, Copy)]
pub struct DurableStart<'a> {
    /// The full (already scoped and validated) key.
    pub key: &'a str,
    /// Fingerprint of the input, stored with the record. `None` when fingerprinting is off.
    pub fingerprint: Option<&'a str>,
    /// How long the acquired record stays owned without a renewal.
    pub lease: Duration,
    /// Whether a `Failed` record with a matching fingerprint may be taken over, with a
    /// fresh journal (the run's `cache_result` is false).
    pub rerun_failed: bool,
    /// The run's input, as the engine encoded it: the start of a new journal. A takeover
    /// keeps the journal it finds and ignores this.
    pub input: &'a [u8],
    /// How long the record is kept once its lease lapsed (an abandoned run stays
    /// resumable that long); `None`: until deleted. Renewals carry the lease forward, so a
    /// run that is alive is never expired by this. The engine passes the run's TTL,
    /// validated like any TTL (at most 10 years).
    pub retain: Option<Duration>,
}

impl DurableStart<'_> {
    /// The takeover rule for a live record, as for
    /// [`StartRequest::may_take_over`](super::StartRequest::may_take_over): a failed record
    /// the caller re-runs. (An abandoned running record is taken over *with* its journal;
    /// see [`JournalStore::start_durable`].)
    pub fn may_take_over(&self, status: super::RecordStatus, fingerprint: Option<&str>) -> bool {
        status == super::RecordStatus::Failed
            && self.rerun_failed
            && super::fingerprints_agree(self.fingerprint, fingerprint)
    }
}

/// A durable run's journal, as stored: the input it started with, and the entries appended
/// since, in order. Both are the engine's encoding; stores never look inside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Journal {
    /// The run's input, as given to [`DurableStart::input`] by the run that began it.
    pub input: Vec<u8>,
    /// Every entry appended, oldest first.
    pub entries: Vec<Vec<u8>>,
}

impl Journal {
    /// Bytes the journal takes: input and entries.
    pub fn len_bytes(&self) -> usize {
        self.input.len() + self.entries.iter().map(Vec::len).sum::<usize>()
    }

    /// What the journal says, for people (an operator tool, a log line): the flow version
    /// the run started under and, per entry, its kind, step and sizes. State values and
    /// the run's input are left out (they are the user's payload). Never fails: bytes this
    /// build cannot read are described as [`JournalEntryKind::Undecodable`].
    ///
    /// ```
    /// use orchestrix::store::Journal;
    ///
    /// let journal = Journal { input: b"not written by the engine".to_vec(), entries: vec![] };
    /// let described = journal.describe();
    /// assert!(!described.input_readable);
    /// assert!(described.entries.is_empty());
    /// ```
    pub fn describe(&self) -> JournalDescription {
        crate::durable::describe(self)
    }
}

/// A journal, described by [`Journal::describe`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct JournalDescription {
    /// Bytes of the journal's input (the run's settings and its input).
    pub input_bytes: usize,
    /// Whether the input is in a format this build reads.
    pub input_readable: bool,
    /// The flow version the run started under ([`FlowBuilder::version`](crate::FlowBuilder::version));
    /// `None` for the default, empty version or an unreadable input.
    pub flow_version: Option<String>,
    /// The entries, oldest first.
    pub entries: Vec<JournalEntryInfo>,
}

/// What kind of entry a journal entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum JournalEntryKind {
    /// An [`at_most_once`](crate::Step::at_most_once) step is about to run its first attempt.
    Started,
    /// A step completed; its state writes are in the entry.
    Completed,
    /// A step was compensated.
    Compensated,
    /// The run failed (at a step, or after its steps).
    Failed,
    /// Bytes this build does not read (another format, or damage).
    Undecodable,
}

impl JournalEntryKind {
    /// The kind as one lower-case word: `started`, `completed`, `compensated`, `failed`,
    /// `undecodable` (its JSON form too).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
            Self::Undecodable => "undecodable",
        }
    }
}

impl std::fmt::Display for JournalEntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One journal entry, described.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct JournalEntryInfo {
    /// The entry's kind.
    pub kind: JournalEntryKind,
    /// The step's position in the flow's plan (`None`: no step, or undecodable).
    pub position: Option<u32>,
    /// The step's name.
    pub step: Option<String>,
    /// A completed step's attempts.
    pub attempts: Option<u32>,
    /// A completed step's duration.
    pub duration: Option<Duration>,
    /// The state keys a completed step wrote (the values are left out).
    pub state_keys: Vec<String>,
    /// A failure's error message.
    pub error: Option<String>,
    /// The entry's size in bytes.
    pub bytes: usize,
}

/// What [`JournalStore::start_durable`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurableStartOutcome {
    /// The caller owns the key now, under `token`. `resumed` is the journal of the run it
    /// took over (its previous owner's lease lapsed), or `None` for a fresh journal.
    Acquired {
        /// The new owner's token.
        token: FencingToken,
        /// The abandoned run's journal, to resume from.
        resumed: Option<Journal>,
    },
    /// A live record holds the key (running under a live lease, finished, or abandoned
    /// with a fingerprint that disagrees); the caller must not run.
    Existing(Record),
}

/// What [`JournalStore::redrive`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// The failed record is running again under `token`, its journal kept.
    Acquired {
        /// The new owner's token.
        token: FencingToken,
        /// The failed run's journal.
        journal: Journal,
    },
    /// The record under the key is not a failure (running, completed, or not durable).
    NotFailed(Record),
    /// No record under the key.
    Absent,
}

/// A store that keeps step journals for durable flows. See the [module docs](self) for the
/// guarantees and a complete example.
///
/// Every operation but [`abandoned`](Self::abandoned) is one round trip for remote stores
/// (a store may take a second for a takeover, and must say so); `abandoned` takes a
/// bounded number of round trips per page, whatever the number of records.
#[async_trait]
pub trait JournalStore: Send + Sync {
    /// Atomically acquires the key for a durable run, or reports the record holding it.
    ///
    /// | the key holds | outcome |
    /// | --- | --- |
    /// | nothing, an expired record, or a failure [`DurableStart::may_take_over`] allows | `Acquired`, fresh journal holding `req.input` (`resumed: None`) |
    /// | a durable running record whose lease lapsed, fingerprints agreeing | `Acquired` with a new token and lease, the journal and the stored fingerprint (which describes the journal's input) kept, the journal returned (`resumed: Some`) |
    /// | a non-durable running record whose lease lapsed | `Acquired`, fresh journal |
    /// | anything else (running under a live lease, finished, abandoned with a disagreeing fingerprint) | `Existing` |
    ///
    /// # Errors
    /// As for [`IdempotencyStore::start`](super::IdempotencyStore::start); a record that
    /// cannot be decoded is an error, never "free".
    async fn start_durable(&self, req: DurableStart<'_>)
    -> Result<DurableStartOutcome, StoreError>;

    /// Appends `entry` to the journal of the running record `token` owns.
    ///
    /// # Errors
    /// [`StoreError::StaleToken`] unless `token` owns the record under a live lease;
    /// [`StoreError::TooLarge`] if the record would outgrow what the store holds. Either
    /// way nothing is appended.
    async fn append(&self, key: &str, token: FencingToken, entry: &[u8]) -> Result<(), StoreError>;

    /// Gives up ownership but keeps the record and its journal: the lease lapses now, so
    /// the next [`start_durable`](Self::start_durable) resumes the run at once.
    ///
    /// # Errors
    /// [`StoreError::StaleToken`] unless `token` owns the record under a live lease.
    async fn suspend(&self, key: &str, token: FencingToken) -> Result<(), StoreError>;

    /// Re-opens a **failed** durable record: running again under a new token and `lease`,
    /// kept for `retain` after its lease lapses, its journal kept and returned. Fenced like
    /// any acquire: of concurrent redrives exactly one acquires.
    ///
    /// # Errors
    /// As for [`start_durable`](Self::start_durable).
    async fn redrive(
        &self,
        key: &str,
        lease: Duration,
        retain: Option<Duration>,
    ) -> Result<Redrive, StoreError>;

    /// The journal under `key`, if a durable record is there (whatever its status).
    ///
    /// # Errors
    /// As for [`IdempotencyStore::get`](super::IdempotencyStore::get).
    async fn read_journal(&self, key: &str) -> Result<Option<Journal>, StoreError>;

    /// Keys of abandoned durable runs (running, lease lapsed, not expired) that start with
    /// `prefix`, in ascending byte order, after `after` when given, at most `limit`. Stores
    /// that can index lease deadlines answer without reading every record. A record this
    /// build cannot decode (another schema version) may be listed: resuming it then
    /// reports the typed error instead of hiding the record.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the store is unreachable.
    async fn abandoned(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
}
