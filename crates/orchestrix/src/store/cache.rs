//! [`CachedStore`]: finished records kept in this process, so replays of hot keys make no
//! round trip to a remote store.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use quick_cache::Weighter;
use tokio::time::Instant;

use super::{
    FencingToken, FinalStatus, IdempotencyStore, JournalStore, Record, RecordAdmin, RecordStatus,
    RecordVisitor, StartOutcome, StartRequest, StartSeen, StoreError, Wait,
};

/// The default bound on the bytes a [`CachedStore`] keeps: 64 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// The default longest life of a cache entry: 10 s.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(10);

/// What one entry costs besides its key and result: the record's other fields and the
/// cache's own bookkeeping, roughly.
const ENTRY_OVERHEAD: u64 = 128;

/// A store in front of another that keeps **finished** records in a bounded in-process
/// cache, so that a replay of a key this process finished makes no round trip.
///
/// # What is cached
///
/// * A record this process finished through the `CachedStore` (`complete`, or `fail`),
///   once the store confirmed it and the next `start` or `get` of the key has read it back
///   (so the cached record is exactly the stored one, fingerprint included). From then on,
///   `start`, [`start_seen`](IdempotencyStore::start_seen) and `get` of the key answer from
///   the cache: a completed record is replayed, a failed one too unless the caller asks to
///   re-run failures ([`StartRequest::may_take_over`]), which goes to the store.
/// * Never a running record, and never a record finished by another process: the cache
///   knows a record's expiry only from the TTL its own `finish` asked for.
///
/// Everything else — acquires, `renew`, `release`, `delete`, `cleanup`, waiting, journals
/// (durable flows), the record admin — goes to the inner store.
///
/// # How long an entry lives
///
/// An entry lives until the **first** of:
///
/// * its record's expiry: the TTL given to `finish`, counted from the moment the finish
///   was *sent* — before the store started its own clock — so an entry never outlives its
///   record;
/// * [`max_age`](Self::max_age) after the finish was sent (default 10 s);
/// * a `delete` or `release` of the key through this `CachedStore`, which removes it
///   before returning;
/// * eviction, when the cache holds more than [`max_bytes`](Self::max_bytes) of keys and
///   results (default 64 MiB).
///
/// # Staleness
///
/// A change made **through another handle** (another process, another store value on
/// the same backend, the command-line tool, an administrator's `DELETE`, a durable run's
/// redrive through [`journal_store`](IdempotencyStore::journal_store)) is not seen by
/// this cache: for at most `max_age` after the finish, a record deleted there (or a
/// failure re-run there) may still be replayed here. A finished record never changes in the
/// store otherwise (it is never rewritten, and expiry is bounded as above), so this is the
/// only staleness. Lower `max_age` to tighten it, down to `Duration::ZERO`, which
/// disables the cache.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use orchestrix::store::{CachedStore, IdempotencyStore, MemoryStore};
/// use orchestrix::{Flow, RunOptions, StepError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // In production the inner store is a remote one (Redis, PostgreSQL, DynamoDB).
/// let remote: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::new());
/// let store = CachedStore::new(remote)
///     .max_bytes(16 << 20)
///     .max_age(Duration::from_secs(5));
/// let flow = Flow::<u64, ()>::builder("charge")
///     .store(Arc::new(store))
///     .step("charge", |_ctx| async { Ok::<_, StepError>(()) })
///     .build()?;
/// let first = flow.run(4200, RunOptions::key("order-1")).await?;
/// // The first replay reads the record back once; every later one is served here.
/// let replay = flow.run(4200, RunOptions::key("order-1")).await?;
/// let again = flow.run(4200, RunOptions::key("order-1")).await?;
/// assert!(!first.replayed && replay.replayed && again.replayed);
/// # Ok(())
/// # }
/// ```
pub struct CachedStore {
    inner: Arc<dyn IdempotencyStore>,
    entries: quick_cache::sync::Cache<String, Arc<Entry>, EntryWeight>,
    max_age: Duration,
    max_bytes: u64,
    /// Bumped by every local `delete` and `release`: a read of the inner store that began
    /// before one does not fill the cache, since it may have read what was deleted.
    invalidations: AtomicU64,
}

/// A cache entry: a record finished here, read back or not yet.
#[derive(Debug)]
enum Entry {
    /// This process finished the record under `token`; it is cached once read back.
    FinishedHere {
        token: FencingToken,
        status: RecordStatus,
        until: Instant,
    },
    /// The finished record, as the store returned it.
    Record { record: Record, until: Instant },
}

impl Entry {
    fn until(&self) -> Instant {
        match self {
            Self::FinishedHere { until, .. } | Self::Record { until, .. } => *until,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct EntryWeight;

impl Weighter<String, Arc<Entry>> for EntryWeight {
    fn weight(&self, key: &String, entry: &Arc<Entry>) -> u64 {
        let result = match &**entry {
            Entry::Record { record, .. } => record.result.as_ref().map_or(0, Vec::len),
            Entry::FinishedHere { .. } => 0,
        };
        ENTRY_OVERHEAD + key.len() as u64 * 2 + result as u64
    }
}

impl CachedStore {
    /// A cache of up to [`DEFAULT_CACHE_BYTES`] in front of `inner`, each entry living at
    /// most [`DEFAULT_MAX_AGE`].
    pub fn new(inner: Arc<dyn IdempotencyStore>) -> Self {
        Self::build(inner, DEFAULT_CACHE_BYTES, DEFAULT_MAX_AGE)
    }

    fn build(inner: Arc<dyn IdempotencyStore>, max_bytes: u64, max_age: Duration) -> Self {
        // quick_cache sizes its tables from an estimate of the number of entries.
        let estimated = usize::try_from(max_bytes / (ENTRY_OVERHEAD * 4)).unwrap_or(1 << 20);
        Self {
            inner,
            entries: quick_cache::sync::Cache::with_weighter(
                estimated.max(16),
                max_bytes.max(1),
                EntryWeight,
            ),
            max_age,
            max_bytes,
            invalidations: AtomicU64::new(0),
        }
    }

    /// Keeps at most about `bytes` of keys and results (plus a small overhead per entry),
    /// evicting the least used entries first. An empty cache is rebuilt.
    #[must_use]
    pub fn max_bytes(self, bytes: u64) -> Self {
        Self::build(self.inner, bytes, self.max_age)
    }

    /// Keeps each entry at most `age` after its record was finished: the longest a
    /// delete made through another handle can go unseen here. `Duration::ZERO` caches
    /// nothing.
    #[must_use]
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &Arc<dyn IdempotencyStore> {
        &self.inner
    }

    /// How many entries the cache holds now (expired ones included until they are read or
    /// evicted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The live cache entry under `key`, if any; an expired one is removed.
    fn cached(&self, key: &str) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        if entry.until() <= Instant::now() {
            self.entries
                .remove_if(key, |current| Arc::ptr_eq(current, &entry));
            return None;
        }
        Some(entry)
    }

    /// The cached record that answers `start` for `req` without the store, if any.
    fn replay_for(&self, req: &StartRequest<'_>) -> Option<Arc<Entry>> {
        let entry = self.cached(req.key)?;
        match &*entry {
            Entry::Record { record, .. }
                if !req.may_take_over(record.status, record.fingerprint.as_deref()) =>
            {
                Some(entry)
            }
            _ => None,
        }
    }

    /// Caches `record`, read from the store after the invalidation count was `seen`, if
    /// this process finished it and nothing was invalidated meanwhile.
    fn read_back(&self, record: &Record, seen: u64) {
        let Some(entry) = self.entries.get(record.key.as_str()) else {
            return;
        };
        let Entry::FinishedHere {
            token,
            status,
            until,
        } = &*entry
        else {
            return;
        };
        if *token != record.token
            || *status != record.status
            || self.invalidations.load(Ordering::Acquire) != seen
        {
            return;
        }
        let cached = Arc::new(Entry::Record {
            record: record.clone(),
            until: *until,
        });
        // Only over the entry read above: a delete in between removed it, and stays seen.
        if self
            .entries
            .remove_if(record.key.as_str(), |current| Arc::ptr_eq(current, &entry))
            .is_some()
        {
            self.entries.insert(record.key.clone(), cached);
        }
    }

    fn invalidate(&self, key: &str) {
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        self.entries.remove(key);
    }
}

#[async_trait]
impl IdempotencyStore for CachedStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        if let Some(entry) = self.cached(key)
            && let Entry::Record { record, .. } = &*entry
        {
            return Ok(Some(record.clone()));
        }
        let seen = self.invalidations.load(Ordering::Acquire);
        let record = self.inner.get(key).await?;
        if let Some(record) = &record {
            self.read_back(record, seen);
        }
        Ok(record)
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        if let Some(entry) = self.replay_for(&req)
            && let Entry::Record { record, .. } = &*entry
        {
            return Ok(StartOutcome::Existing(record.clone()));
        }
        let seen = self.invalidations.load(Ordering::Acquire);
        let outcome = self.inner.start(req).await?;
        match &outcome {
            StartOutcome::Existing(record) => self.read_back(record, seen),
            // A failure re-run (or an expired record taken over) is not replayed any more.
            StartOutcome::Acquired(_) => self.invalidate(req.key),
        }
        Ok(outcome)
    }

    /// Shows a cached record in place, with no copy and no round trip.
    async fn start_seen(
        &self,
        req: StartRequest<'_>,
        visit: &mut RecordVisitor<'_>,
    ) -> Result<StartSeen, StoreError> {
        if let Some(entry) = self.replay_for(&req)
            && let Entry::Record { record, .. } = &*entry
        {
            visit(record.view());
            return Ok(StartSeen::Existing);
        }
        let seen = self.invalidations.load(Ordering::Acquire);
        Ok(match self.inner.start(req).await? {
            StartOutcome::Acquired(token) => {
                self.invalidate(req.key);
                StartSeen::Acquired(token)
            }
            StartOutcome::Existing(record) => {
                self.read_back(&record, seen);
                visit(record.view());
                StartSeen::Existing
            }
        })
    }

    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        // Counted from before the store sees the finish: the store's TTL starts later.
        let sent = Instant::now();
        self.inner.finish(key, token, status, result, ttl).await?;
        let age = ttl.map_or(self.max_age, |ttl| ttl.min(self.max_age));
        if !age.is_zero()
            && let Some(until) = sent.checked_add(age)
        {
            let entry = Entry::FinishedHere {
                token,
                status: status.into(),
                until,
            };
            self.entries.insert(key.to_owned(), Arc::new(entry));
        }
        Ok(())
    }

    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        let released = self.inner.release(key, token).await;
        self.invalidate(key);
        released
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let deleted = self.inner.delete(key).await;
        self.invalidate(key);
        deleted
    }

    async fn cleanup(&self) -> Result<u64, StoreError> {
        self.inner.cleanup().await
    }

    async fn wait_for_change(&self, key: &str, wait: Wait) -> Result<(), StoreError> {
        self.inner.wait_for_change(key, wait).await
    }

    fn journal_store(&self) -> Option<&dyn JournalStore> {
        self.inner.journal_store()
    }

    fn admin(&self) -> Option<&dyn RecordAdmin> {
        self.inner.admin()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

impl fmt::Debug for CachedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedStore")
            .field("inner", &self.inner)
            .field("entries", &self.entries.len())
            .field("max_bytes", &self.max_bytes)
            .field("max_age", &self.max_age)
            .finish()
    }
}
