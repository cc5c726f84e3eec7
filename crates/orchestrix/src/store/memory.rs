//! The embedded, in-process store.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    FencingToken, IdempotencyStore, Record, RecordStatus, StartOutcome, StartRequest, StoreError,
};

/// How many expired records one store operation removes at most. Each operation schedules
/// at most one expiry, so removing up to two keeps the backlog shrinking: memory stays
/// bounded by the live records when a TTL is set, without ever scanning the whole map.
const SWEEP_PER_OPERATION: usize = 2;

/// The embedded default store: a map in this process's memory.
///
/// Every operation is one hash-map access under a mutex plus amortised expiry work, so its
/// cost does not grow with the number of stored records: expiries are kept in a min-heap
/// and each call removes at most a couple of expired records (deadlines are pushed mostly in
/// increasing order, which keeps pushes O(1); each record is popped once). Expired records
/// are also ignored on access, so a lapsed lease frees a key at once.
///
/// [`wait_for_change`](IdempotencyStore::wait_for_change) is woken by notification the
/// moment a running record finishes or is released, with no polling.
///
/// Time is [`tokio::time::Instant`], so tests that pause tokio's clock control expiry too.
/// Records do not survive the process; use the SQLite store for a durable single node.
///
/// ```
/// use std::sync::Arc;
/// use orchestrix::store::{IdempotencyStore, MemoryStore};
///
/// let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::new());
/// # let _ = store;
/// ```
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    records: HashMap<Arc<str>, Entry>,
    expiries: Expiries,
}

/// Pending removals, soonest first.
#[derive(Default)]
struct Expiries {
    heap: BinaryHeap<Reverse<Expiry>>,
    next_generation: u64,
}

struct Entry {
    /// The map's own key, shared with the entry's pending expiries.
    key: Arc<str>,
    status: RecordStatus,
    token: FencingToken,
    fingerprint: Option<Box<str>>,
    result: Option<Box<[u8]>>,
    deadline: Option<Instant>,
    /// Matches the heap entry that may remove this record; older heap entries are ignored.
    generation: u64,
    waiters: Option<Arc<Notify>>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Expiry {
    at: Instant,
    generation: u64,
    key: Arc<str>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records are held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated (every mutation
        // is a single insert/remove), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks, sweeps a little, and hands the state to `f`.
    fn with_state<T>(&self, f: impl FnOnce(&mut State, Instant) -> T) -> T {
        let mut state = self.lock();
        let now = Instant::now();
        state.sweep(now, SWEEP_PER_OPERATION);
        f(&mut state, now)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.len())
            .finish()
    }
}

impl Expiries {
    /// Sets `entry`'s deadline and schedules its removal then; earlier schedules of the
    /// entry become stale.
    fn schedule(&mut self, entry: &mut Entry, at: Option<Instant>) {
        self.next_generation += 1;
        entry.generation = self.next_generation;
        entry.deadline = at;
        if let Some(at) = at {
            self.heap.push(Reverse(Expiry {
                at,
                generation: entry.generation,
                key: Arc::clone(&entry.key),
            }));
        }
    }
}

impl State {
    fn sweep(&mut self, now: Instant, budget: usize) -> u64 {
        let mut removed = 0;
        for _ in 0..budget {
            match self.expiries.heap.peek() {
                Some(Reverse(e)) if e.at <= now => {}
                _ => break,
            }
            let Some(Reverse(expiry)) = self.expiries.heap.pop() else {
                break;
            };
            let current = self
                .records
                .get(&expiry.key)
                .is_some_and(|e| e.generation == expiry.generation && e.is_expired(now));
            if current {
                if let Some(entry) = self.records.remove(&expiry.key) {
                    entry.wake();
                }
                removed += 1;
            }
        }
        removed
    }

    /// The live entry under `key`. An expired entry reads as absent; it stays in the map
    /// until swept or overwritten, so the hot path is a single lookup.
    fn live(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
        self.records.get_mut(key).filter(|e| !e.is_expired(now))
    }

    /// The owned, live entry under `key`, and the expiry schedule, or `StaleToken`.
    fn owned(
        &mut self,
        key: &str,
        token: FencingToken,
        now: Instant,
    ) -> Result<(&mut Entry, &mut Expiries), StoreError> {
        match self.records.get_mut(key) {
            Some(e)
                if !e.is_expired(now) && e.token == token && e.status == RecordStatus::Running =>
            {
                Ok((e, &mut self.expiries))
            }
            _ => Err(StoreError::StaleToken),
        }
    }

    fn finish(
        &mut self,
        key: &str,
        token: FencingToken,
        status: RecordStatus,
        result: &[u8],
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<(), StoreError> {
        let (entry, expiries) = self.owned(key, token, now)?;
        entry.status = status;
        entry.result = Some(result.into());
        entry.wake();
        // A TTL too long to represent is no expiry at all.
        expiries.schedule(entry, ttl.and_then(|t| now.checked_add(t)));
        Ok(())
    }
}

impl Entry {
    fn is_expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    fn wake(&self) {
        if let Some(w) = &self.waiters {
            w.notify_waiters();
        }
    }

    fn to_record(&self, key: &str) -> Record {
        Record {
            key: key.to_owned(),
            status: self.status,
            token: self.token,
            fingerprint: self.fingerprint.as_deref().map(str::to_owned),
            result: self.result.as_deref().map(<[u8]>::to_vec),
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.with_state(|s, now| s.live(key, now).map(|e| e.to_record(key))))
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        Ok(self.with_state(|s, now| {
            let waiters = match s.live(req.key, now) {
                Some(e) if !req.may_take_over(e.status, e.fingerprint.as_deref()) => {
                    return StartOutcome::Existing(e.to_record(req.key));
                }
                Some(e) => e.waiters.take(),
                None => None,
            };
            let token = FencingToken::generate();
            let mut entry = Entry {
                key: Arc::from(req.key),
                status: RecordStatus::Running,
                token,
                fingerprint: req.fingerprint.map(Into::into),
                result: None,
                deadline: None,
                generation: 0,
                waiters,
            };
            s.expiries.schedule(&mut entry, now.checked_add(req.lease));
            // Replaces an expired entry, if any: wake whoever waited on it.
            if let Some(old) = s.records.insert(Arc::clone(&entry.key), entry) {
                old.wake();
            }
            StartOutcome::Acquired(token)
        }))
    }

    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.with_state(|s, now| s.finish(key, token, RecordStatus::Completed, result, ttl, now))
    }

    async fn fail(
        &self,
        key: &str,
        token: FencingToken,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.with_state(|s, now| s.finish(key, token, RecordStatus::Failed, result, ttl, now))
    }

    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.with_state(|s, now| {
            let (entry, expiries) = s.owned(key, token, now)?;
            expiries.schedule(entry, now.checked_add(lease));
            Ok(())
        })
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.with_state(|s, now| {
            s.owned(key, token, now)?;
            if let Some(entry) = s.records.remove(key) {
                entry.wake();
            }
            Ok(())
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.with_state(|s, _| {
            if let Some(entry) = s.records.remove(key) {
                entry.wake();
            }
        });
        Ok(())
    }

    async fn cleanup(&self) -> Result<u64, StoreError> {
        Ok(self.with_state(|s, now| s.sweep(now, usize::MAX)))
    }

    async fn wait_for_change(&self, key: &str, max: Duration) -> Result<(), StoreError> {
        let watched = self.with_state(|s, now| match s.live(key, now) {
            Some(e) if e.status == RecordStatus::Running => {
                let notify = Arc::clone(e.waiters.get_or_insert_with(Default::default));
                Some((notify, e.deadline))
            }
            _ => None,
        });
        let Some((notify, lease_end)) = watched else {
            return Ok(());
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        // Register before re-checking, so a wake-up between the check above and the await
        // below is not missed.
        notified.as_mut().enable();
        let still_running = self.with_state(|s, now| {
            s.live(key, now)
                .is_some_and(|e| e.status == RecordStatus::Running)
        });
        if still_running {
            // An owner that crashed never notifies: wake when its lease lapses at the latest.
            let now = Instant::now();
            let mut until = now
                .checked_add(max)
                .unwrap_or(now + Duration::from_secs(86_400));
            if let Some(end) = lease_end {
                until = until.min(end);
            }
            let _ = tokio::time::timeout_at(until, notified).await;
        }
        Ok(())
    }
}
