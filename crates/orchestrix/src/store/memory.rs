//! The embedded, in-process store.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    FencingToken, FinalStatus, IdempotencyStore, Record, RecordStatus, RecordView, RecordVisitor,
    StartOutcome, StartRequest, StartSeen, StoreError,
};

/// How many expired records one store operation removes at most. Each operation schedules
/// at most one expiry, so removing up to two keeps the backlog shrinking: memory stays
/// bounded by the live records when a TTL is set, without ever scanning the whole map.
const SWEEP_PER_OPERATION: usize = 2;

/// The embedded default store: a map in this process's memory.
///
/// Every operation is one hash-table access under a mutex plus amortised expiry work, so
/// its cost does not grow with the number of stored records: expiries are kept in a
/// min-heap and each call removes at most a couple of expired records (deadlines are pushed
/// mostly in increasing order, which keeps pushes O(1); each record is popped once).
/// Expired records are also ignored on access, so a lapsed lease frees a key at once.
///
/// Each record is one 64-byte table slot plus one allocation holding its token, key,
/// fingerprint and result side by side, so a lookup in a large store touches few cache
/// lines. Keys are hashed with the standard library's randomly keyed SipHash, since they
/// often come from outside (an `Idempotency-Key` header) and must not be able to collide
/// on purpose.
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
    records: HashTable<Entry>,
    hasher: RandomState,
    expiries: Expiries,
}

/// Pending removals, soonest first.
#[derive(Default)]
struct Expiries {
    heap: BinaryHeap<Reverse<Expiry>>,
    next_generation: u64,
}

/// One record. `data` holds the token (16 bytes, little-endian), the key, the fingerprint
/// and the result, in that order; the lengths below cut it apart.
struct Entry {
    data: Box<[u8]>,
    deadline: Option<Instant>,
    /// Matches the heap entry that may remove this record; older heap entries are ignored.
    generation: u64,
    waiters: Option<Arc<Notify>>,
    key_len: u32,
    /// [`NO_FINGERPRINT`] when the record has none.
    fingerprint_len: u32,
    status: RecordStatus,
    has_result: bool,
}

const TOKEN_BYTES: usize = 16;
const NO_FINGERPRINT: u32 = u32::MAX;

/// A scheduled removal: the record's hash finds it, its generation proves it is the same.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Expiry {
    at: Instant,
    generation: u64,
    hash: u64,
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

    /// Locks, sweeps a little, and hands the state, the key's hash and the time to `f`.
    fn with_state<T>(&self, key: &str, f: impl FnOnce(&mut State, u64, Instant) -> T) -> T {
        let mut state = self.lock();
        let now = Instant::now();
        state.sweep(now, SWEEP_PER_OPERATION);
        // Hashed as bytes, like the stored keys when the table grows (`str` hashes differently).
        let hash = state.hasher.hash_one(key.as_bytes());
        f(&mut state, hash, now)
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
    fn schedule(&mut self, entry: &mut Entry, hash: u64, at: Option<Instant>) {
        self.next_generation += 1;
        entry.generation = self.next_generation;
        entry.deadline = at;
        if let Some(at) = at {
            self.heap.push(Reverse(Expiry {
                at,
                generation: entry.generation,
                hash,
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
            let found = self
                .records
                .find_entry(expiry.hash, |e| e.generation == expiry.generation);
            if let Ok(slot) = found
                && slot.get().is_expired(now)
            {
                slot.remove().0.wake();
                removed += 1;
            }
        }
        removed
    }

    /// The live entry under `key`. An expired entry reads as absent; it stays in the table
    /// until swept or overwritten, so the hot path is a single lookup.
    fn live(&mut self, key: &str, hash: u64, now: Instant) -> Option<&mut Entry> {
        self.records
            .find_mut(hash, |e| e.key() == key.as_bytes())
            .filter(|e| !e.is_expired(now))
    }

    /// The owned, live entry under `key`, and the expiry schedule, or `StaleToken`.
    fn owned(
        &mut self,
        key: &str,
        hash: u64,
        token: FencingToken,
        now: Instant,
    ) -> Result<(&mut Entry, &mut Expiries), StoreError> {
        match self.records.find_mut(hash, |e| e.key() == key.as_bytes()) {
            Some(e) if e.is_owned_by(token, now) => Ok((e, &mut self.expiries)),
            _ => Err(StoreError::StaleToken),
        }
    }
}

impl Entry {
    /// A running record for `req`, without a schedule yet.
    fn running(req: &StartRequest<'_>, token: FencingToken) -> Result<Self, StoreError> {
        let length = |len: usize| {
            u32::try_from(len)
                .ok()
                .filter(|&n| n != NO_FINGERPRINT)
                .ok_or(StoreError::TooLarge {
                    size: len,
                    limit: NO_FINGERPRINT as usize - 1,
                })
        };
        let key_len = length(req.key.len())?;
        let fingerprint_len = match req.fingerprint {
            Some(fp) => length(fp.len())?,
            None => NO_FINGERPRINT,
        };
        let fingerprint = req.fingerprint.unwrap_or_default();
        let mut data = Vec::with_capacity(TOKEN_BYTES + req.key.len() + fingerprint.len());
        data.extend_from_slice(&token.as_u128().to_le_bytes());
        data.extend_from_slice(req.key.as_bytes());
        data.extend_from_slice(fingerprint.as_bytes());
        Ok(Self {
            data: data.into_boxed_slice(),
            deadline: None,
            generation: 0,
            waiters: None,
            key_len,
            fingerprint_len,
            status: RecordStatus::Running,
            has_result: false,
        })
    }

    fn key_end(&self) -> usize {
        TOKEN_BYTES + self.key_len as usize
    }

    fn key(&self) -> &[u8] {
        self.data
            .get(TOKEN_BYTES..self.key_end())
            .unwrap_or_default()
    }

    fn token(&self) -> FencingToken {
        let mut raw = [0; TOKEN_BYTES];
        if let Some(bytes) = self.data.get(..TOKEN_BYTES) {
            raw.copy_from_slice(bytes);
        }
        FencingToken::from_u128(u128::from_le_bytes(raw))
    }

    /// Where the fingerprint ends (and the result begins).
    fn fingerprint_end(&self) -> usize {
        match self.fingerprint_len {
            NO_FINGERPRINT => self.key_end(),
            len => self.key_end() + len as usize,
        }
    }

    fn fingerprint(&self) -> Option<&str> {
        if self.fingerprint_len == NO_FINGERPRINT {
            return None;
        }
        // Written from a `&str` by `running`, so always UTF-8.
        let bytes = self.data.get(self.key_end()..self.fingerprint_end())?;
        std::str::from_utf8(bytes).ok()
    }

    fn result(&self) -> Option<&[u8]> {
        self.has_result
            .then(|| self.data.get(self.fingerprint_end()..))
            .flatten()
    }

    fn is_expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    fn is_owned_by(&self, token: FencingToken, now: Instant) -> bool {
        !self.is_expired(now) && self.status == RecordStatus::Running && self.token() == token
    }

    fn wake(&self) {
        if let Some(w) = &self.waiters {
            w.notify_waiters();
        }
    }

    /// The record under `key` (this entry's own key), in place.
    fn view<'a>(&'a self, key: &'a str) -> RecordView<'a> {
        RecordView {
            key,
            status: self.status,
            token: self.token(),
            fingerprint: self.fingerprint(),
            result: self.result(),
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.with_state(key, |s, hash, now| {
            s.live(key, hash, now).map(|e| e.view(key).to_record())
        }))
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        let mut existing = None;
        let seen = self
            .start_seen(req, &mut |record| existing = Some(record.to_record()))
            .await?;
        match (seen, existing) {
            (StartSeen::Acquired(token), _) => Ok(StartOutcome::Acquired(token)),
            (StartSeen::Existing, Some(record)) => Ok(StartOutcome::Existing(record)),
            // `start_seen` below shows every existing record before it reports one.
            (StartSeen::Existing, None) => Err(StoreError::backend_msg(
                "the memory store reported a record it did not show",
            )),
        }
    }

    /// The record is read under the lock, where it lies: a replay copies nothing out.
    async fn start_seen(
        &self,
        req: StartRequest<'_>,
        visit: &mut RecordVisitor<'_>,
    ) -> Result<StartSeen, StoreError> {
        self.with_state(req.key, |s, hash, now| {
            let State {
                records,
                hasher,
                expiries,
            } = s;
            let slot = records.entry(
                hash,
                |e| e.key() == req.key.as_bytes(),
                |e| hasher.hash_one(e.key()),
            );
            if let Slot::Occupied(slot) = &slot {
                let held = slot.get();
                if !held.is_expired(now) && !req.may_take_over(held.status, held.fingerprint()) {
                    visit(held.view(req.key));
                    return Ok(StartSeen::Existing);
                }
            }
            let token = FencingToken::generate();
            let mut entry = Entry::running(&req, token)?;
            expiries.schedule(&mut entry, hash, now.checked_add(req.lease));
            match slot {
                Slot::Occupied(mut slot) => {
                    let held = slot.get_mut();
                    // A failure taken over keeps its waiters, who now wait for the new owner;
                    // an expired record's waiters are woken to look again.
                    if !held.is_expired(now) {
                        entry.waiters = held.waiters.take();
                    }
                    std::mem::replace(held, entry).wake();
                }
                Slot::Vacant(slot) => {
                    slot.insert(entry);
                }
            }
            Ok(StartSeen::Acquired(token))
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
        self.with_state(key, |s, hash, now| {
            let (entry, expiries) = s.owned(key, hash, token, now)?;
            let mut data = Vec::with_capacity(entry.data.len() + result.len());
            data.extend_from_slice(&entry.data);
            data.extend_from_slice(result);
            entry.data = data.into_boxed_slice();
            entry.has_result = true;
            entry.status = status.into();
            entry.wake();
            // A TTL too long to represent is no expiry at all.
            expiries.schedule(entry, hash, ttl.and_then(|t| now.checked_add(t)));
            Ok(())
        })
    }

    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.with_state(key, |s, hash, now| {
            let (entry, expiries) = s.owned(key, hash, token, now)?;
            expiries.schedule(entry, hash, now.checked_add(lease));
            Ok(())
        })
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.with_state(key, |s, hash, now| {
            match s.records.find_entry(hash, |e| e.key() == key.as_bytes()) {
                Ok(slot) if slot.get().is_owned_by(token, now) => {
                    slot.remove().0.wake();
                    Ok(())
                }
                _ => Err(StoreError::StaleToken),
            }
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.with_state(key, |s, hash, _| {
            if let Ok(slot) = s.records.find_entry(hash, |e| e.key() == key.as_bytes()) {
                slot.remove().0.wake();
            }
        });
        Ok(())
    }

    async fn cleanup(&self) -> Result<u64, StoreError> {
        Ok(self.with_state("", |s, _, now| s.sweep(now, usize::MAX)))
    }

    async fn wait_for_change(&self, key: &str, max: Duration) -> Result<(), StoreError> {
        let watched = self.with_state(key, |s, hash, now| match s.live(key, hash, now) {
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
        let still_running = self.with_state(key, |s, hash, now| {
            s.live(key, hash, now)
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
