//! The embedded, in-process store.

mod admin;
mod durable;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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
    FencingToken, FinalStatus, IdempotencyStore, JournalStore, Record, RecordAdmin, RecordStatus,
    RecordView, RecordVisitor, StartOutcome, StartRequest, StartSeen, StoreError, Wait,
};
pub use durable::DEFAULT_MAX_JOURNAL_BYTES;
use durable::Durables;

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
/// Each record is a single allocation (header, key, fingerprint and result side by side)
/// behind a 16-byte table slot, so the table stays small (about 2 MB at 100k records) and
/// a lookup touches the table and then the one record it finds. Keys are hashed with the
/// standard library's randomly keyed SipHash, since they often come from outside (an
/// `Idempotency-Key` header) and must not be able to collide on purpose.
///
/// [`wait_for_change`](IdempotencyStore::wait_for_change) is woken by notification the
/// moment a running record finishes or is released, with no polling.
///
/// It keeps journals for durable flows ([`JournalStore`]), in a map of their own beside the
/// table, so non-durable runs pay nothing for them.
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
pub struct MemoryStore {
    state: Mutex<State>,
    /// Deadlines are kept as nanoseconds since this instant.
    epoch: Instant,
    max_journal_bytes: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            epoch: Instant::now(),
            max_journal_bytes: DEFAULT_MAX_JOURNAL_BYTES,
        }
    }
}

#[derive(Default)]
struct State {
    records: HashTable<Entry>,
    hasher: RandomState,
    expiries: Expiries,
    /// Callers waiting for a running record to change, by key. Kept beside the table
    /// (waiting is rare) and emptied whenever the record finishes or goes.
    waiters: Waiters,
    /// Durable records, with their journals.
    durables: Durables,
}

/// Pending removals, soonest first.
#[derive(Default)]
struct Expiries {
    heap: BinaryHeap<Reverse<Expiry>>,
    next_generation: u64,
}

/// A point in time, as nanoseconds since the store's epoch; [`NEVER`] is no deadline.
type Tick = u64;
const NEVER: Tick = Tick::MAX;

/// One record, in one allocation: a fixed header, then the key, the fingerprint and the
/// result. All integers are little-endian.
///
/// ```text
/// deadline:u64  generation:u64  token:u128  key_len:u32  fingerprint_len:u32  status:u8  has_result:u8
/// key  fingerprint  result
/// ```
struct Entry(Box<[u8]>);

const DEADLINE: usize = 0;
/// Matches the heap entry that may remove this record; older heap entries are ignored.
const GENERATION: usize = 8;
const TOKEN: usize = 16;
const KEY_LEN: usize = 32;
/// [`NO_FINGERPRINT`] when the record has none.
const FINGERPRINT_LEN: usize = 36;
const STATUS: usize = 40;
const HAS_RESULT: usize = 41;
const HEADER: usize = 42;
const NO_FINGERPRINT: u32 = u32::MAX;

/// A scheduled removal: the record's hash finds it, its generation proves it is the same.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Expiry {
    at: Tick,
    generation: u64,
    hash: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps durable runs' journals up to `bytes` each (input and entries; default
    /// [`DEFAULT_MAX_JOURNAL_BYTES`]); an append past it is
    /// [`StoreError::TooLarge`](super::StoreError::TooLarge).
    #[must_use]
    pub fn with_max_journal_bytes(mut self, bytes: usize) -> Self {
        self.max_journal_bytes = bytes;
        self
    }

    /// How many records are held (durable ones included), expired ones not yet swept
    /// included.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.records.len() + state.durables.len()
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

    /// `at` on the store's clock.
    fn tick(&self, at: Instant) -> Tick {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        Tick::try_from(nanos).unwrap_or(NEVER - 1).min(NEVER - 1)
    }

    /// Locks, sweeps a little, and hands the state, the key's hash and the time to `f`.
    fn with_state<T>(&self, key: &str, f: impl FnOnce(&mut State, u64, Tick) -> T) -> T {
        let mut state = self.lock();
        let now = self.tick(Instant::now());
        state.sweep(now, SWEEP_PER_OPERATION);
        if !state.durables.is_empty() {
            let State {
                durables, waiters, ..
            } = &mut *state;
            durables.sweep(now, SWEEP_PER_OPERATION, waiters);
        }
        // Hashed as bytes, like the stored keys when the table grows (`str` hashes differently).
        let hash = state.hasher.hash_one(key.as_bytes());
        f(&mut state, hash, now)
    }
}

/// `lease` (or TTL) from `now`; a span too long to represent is no deadline at all.
fn after(now: Tick, span: Option<Duration>) -> Tick {
    span.and_then(|d| Tick::try_from(d.as_nanos()).ok())
        .and_then(|d| now.checked_add(d))
        .filter(|&at| at != NEVER)
        .unwrap_or(NEVER)
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
    fn schedule(&mut self, entry: &mut Entry, hash: u64, at: Tick) {
        self.next_generation += 1;
        entry.put(GENERATION, self.next_generation.to_le_bytes());
        entry.put(DEADLINE, at.to_le_bytes());
        if at != NEVER {
            self.heap.push(Reverse(Expiry {
                at,
                generation: self.next_generation,
                hash,
            }));
        }
    }
}

impl State {
    fn sweep(&mut self, now: Tick, budget: usize) -> u64 {
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
                .find_entry(expiry.hash, |e| e.generation() == expiry.generation);
            if let Ok(slot) = found
                && slot.get().is_expired(now)
            {
                let (gone, _) = slot.remove();
                wake(&mut self.waiters, gone.key());
                removed += 1;
            }
        }
        removed
    }

    /// The live entry under `key`. An expired entry reads as absent; it stays in the table
    /// until swept or overwritten, so the hot path is a single lookup.
    fn live(&mut self, key: &str, hash: u64, now: Tick) -> Option<&mut Entry> {
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
        now: Tick,
    ) -> Result<(&mut Entry, &mut Expiries, &mut Waiters), StoreError> {
        match self.records.find_mut(hash, |e| e.key() == key.as_bytes()) {
            Some(e) if e.is_owned_by(token, now) => Ok((e, &mut self.expiries, &mut self.waiters)),
            _ => Err(StoreError::StaleToken),
        }
    }

    /// Whether the live record under `key` was finished by `token` as `status` with
    /// exactly `result`: what a repeated `finish` finds.
    fn finished_as(
        &mut self,
        key: &str,
        hash: u64,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        now: Tick,
    ) -> bool {
        self.live(key, hash, now).is_some_and(|e| {
            e.token() == token
                && e.status() == RecordStatus::from(status)
                && e.result() == Some(result)
        })
    }

    /// Removes the record under `key` if `remove` says so, waking its waiters. Whether it
    /// was removed.
    fn remove_if(&mut self, key: &str, hash: u64, remove: impl FnOnce(&Entry) -> bool) -> bool {
        let Ok(slot) = self.records.find_entry(hash, |e| e.key() == key.as_bytes()) else {
            return false;
        };
        if !remove(slot.get()) {
            return false;
        }
        let (gone, _) = slot.remove();
        wake(&mut self.waiters, gone.key());
        true
    }
}

type Waiters = HashMap<Box<[u8]>, Arc<Notify>>;

/// Wakes whoever waits on `key`; the next change needs a new registration.
fn wake(waiters: &mut Waiters, key: &[u8]) {
    if waiters.is_empty() {
        return;
    }
    if let Some(notify) = waiters.remove(key) {
        notify.notify_waiters();
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
        let mut data = Vec::with_capacity(HEADER + req.key.len() + fingerprint.len());
        data.extend_from_slice(&NEVER.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        data.extend_from_slice(&token.as_u128().to_le_bytes());
        data.extend_from_slice(&key_len.to_le_bytes());
        data.extend_from_slice(&fingerprint_len.to_le_bytes());
        data.push(status_code(RecordStatus::Running));
        data.push(0);
        data.extend_from_slice(req.key.as_bytes());
        data.extend_from_slice(fingerprint.as_bytes());
        Ok(Self(data.into_boxed_slice()))
    }

    /// The `N` header bytes at `at`. The header is always whole (see [`Entry::running`]).
    fn get<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0; N];
        if let Some(bytes) = self.0.get(at..at + N) {
            out.copy_from_slice(bytes);
        }
        out
    }

    fn put<const N: usize>(&mut self, at: usize, value: [u8; N]) {
        if let Some(bytes) = self.0.get_mut(at..at + N) {
            bytes.copy_from_slice(&value);
        }
    }

    fn deadline(&self) -> Tick {
        Tick::from_le_bytes(self.get(DEADLINE))
    }

    fn generation(&self) -> u64 {
        u64::from_le_bytes(self.get(GENERATION))
    }

    fn token(&self) -> FencingToken {
        FencingToken::from_u128(u128::from_le_bytes(self.get(TOKEN)))
    }

    fn status(&self) -> RecordStatus {
        match self.get::<1>(STATUS) {
            [b'c'] => RecordStatus::Completed,
            [b'f'] => RecordStatus::Failed,
            _ => RecordStatus::Running,
        }
    }

    fn has_result(&self) -> bool {
        self.get::<1>(HAS_RESULT) == [1]
    }

    fn key_end(&self) -> usize {
        HEADER + u32::from_le_bytes(self.get(KEY_LEN)) as usize
    }

    fn key(&self) -> &[u8] {
        self.0.get(HEADER..self.key_end()).unwrap_or_default()
    }

    fn fingerprint_len(&self) -> u32 {
        u32::from_le_bytes(self.get(FINGERPRINT_LEN))
    }

    /// Where the fingerprint ends (and the result begins).
    fn fingerprint_end(&self) -> usize {
        match self.fingerprint_len() {
            NO_FINGERPRINT => self.key_end(),
            len => self.key_end() + len as usize,
        }
    }

    /// The stored fingerprint. `known` is one the caller holds: when the stored bytes are
    /// the same, `known` itself is returned, which spares the UTF-8 check of the hot path
    /// (a replay shows the fingerprint its caller sent).
    fn fingerprint<'a>(&'a self, known: Option<&'a str>) -> Option<&'a str> {
        if self.fingerprint_len() == NO_FINGERPRINT {
            return None;
        }
        let bytes = self.0.get(self.key_end()..self.fingerprint_end())?;
        match known {
            Some(known) if known.as_bytes() == bytes => Some(known),
            // Written from a `&str` by `running`, so always UTF-8.
            _ => std::str::from_utf8(bytes).ok(),
        }
    }

    fn result(&self) -> Option<&[u8]> {
        self.has_result()
            .then(|| self.0.get(self.fingerprint_end()..))
            .flatten()
    }

    /// This record, finished with `result`.
    fn finished(&self, status: FinalStatus, result: &[u8]) -> Self {
        let mut data = Vec::with_capacity(self.0.len() + result.len());
        data.extend_from_slice(&self.0);
        data.extend_from_slice(result);
        let mut entry = Self(data.into_boxed_slice());
        entry.put(STATUS, [status_code(status.into())]);
        entry.put(HAS_RESULT, [1]);
        entry
    }

    fn is_expired(&self, now: Tick) -> bool {
        self.deadline() <= now
    }

    fn is_owned_by(&self, token: FencingToken, now: Tick) -> bool {
        !self.is_expired(now) && self.status() == RecordStatus::Running && self.token() == token
    }

    /// The record under `key` (this entry's own key), in place, with its `fingerprint`.
    fn view<'a>(&'a self, key: &'a str, fingerprint: Option<&'a str>) -> RecordView<'a> {
        RecordView {
            key,
            status: self.status(),
            token: self.token(),
            fingerprint,
            result: self.result(),
        }
    }
}

fn status_code(status: RecordStatus) -> u8 {
    match status {
        RecordStatus::Completed => b'c',
        RecordStatus::Failed => b'f',
        _ => b'r',
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        Ok(
            self.with_state(key, |s, hash, now| match s.live(key, hash, now) {
                Some(e) => Some(e.view(key, e.fingerprint(None)).to_record()),
                None => s.durables.view(key, now).map(|d| d.to_record()),
            }),
        )
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
                waiters,
                durables,
            } = s;
            let slot = records.entry(
                hash,
                |e| e.key() == req.key.as_bytes(),
                |e| hasher.hash_one(e.key()),
            );
            if let Slot::Occupied(slot) = &slot {
                let held = slot.get();
                let fingerprint = held.fingerprint(req.fingerprint);
                if !held.is_expired(now) && !req.may_take_over(held.status(), fingerprint) {
                    visit(held.view(req.key, fingerprint));
                    return Ok(StartSeen::Existing);
                }
            }
            if !durables.is_empty()
                && let Some(held) = durables.view(req.key, now)
            {
                // A durable flow's record under this key (a global key, or a flow made
                // durable since): it holds the key like any record.
                if !req.may_take_over(held.status, held.fingerprint) {
                    visit(held);
                    return Ok(StartSeen::Existing);
                }
                durables.delete(req.key);
            }
            let token = FencingToken::generate();
            let mut entry = Entry::running(&req, token)?;
            expiries.schedule(&mut entry, hash, after(now, Some(req.lease)));
            match slot {
                Slot::Occupied(mut slot) => {
                    // A failure taken over keeps its waiters, who now wait for the new owner;
                    // an expired record's waiters are woken to look again.
                    if slot.get().is_expired(now) {
                        wake(waiters, req.key.as_bytes());
                    }
                    *slot.get_mut() = entry;
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
            if let Ok((entry, expiries, waiters)) = s.owned(key, hash, token, now) {
                *entry = entry.finished(status, result);
                wake(waiters, key.as_bytes());
                // A TTL too long to represent is no expiry at all.
                expiries.schedule(entry, hash, after(now, ttl));
                return Ok(());
            }
            if s.finished_as(key, hash, token, status, result, now) {
                // The same finish again (a caller retrying it): it was applied.
                return Ok(());
            }
            s.durables.finish(key, token, status, result, ttl, now)?;
            wake(&mut s.waiters, key.as_bytes());
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
            if let Ok((entry, expiries, _)) = s.owned(key, hash, token, now) {
                expiries.schedule(entry, hash, after(now, Some(lease)));
                return Ok(());
            }
            s.durables.renew(key, token, lease, now)
        })
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.with_state(key, |s, hash, now| {
            if s.remove_if(key, hash, |e| e.is_owned_by(token, now)) {
                return Ok(());
            }
            s.durables.release(key, token, now)?;
            wake(&mut s.waiters, key.as_bytes());
            Ok(())
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.with_state(key, |s, hash, _| {
            s.remove_if(key, hash, |_| true);
            if s.durables.delete(key) {
                wake(&mut s.waiters, key.as_bytes());
            }
        });
        Ok(())
    }

    /// Removes every expired record and returns how many it removed (the amortised sweep
    /// of other operations is not run first, so none is left uncounted).
    async fn cleanup(&self) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let now = self.tick(Instant::now());
        let State {
            durables, waiters, ..
        } = &mut *state;
        let durable = durables.sweep(now, usize::MAX, waiters);
        Ok(state.sweep(now, usize::MAX) + durable)
    }

    async fn wait_for_change(&self, key: &str, wait: Wait) -> Result<(), StoreError> {
        let max = wait.max();
        let watched = self.with_state(key, |s, hash, now| {
            let lease_end = match s.live(key, hash, now) {
                Some(e) if e.status() == RecordStatus::Running => e.deadline(),
                Some(_) => return None,
                None => s.durables.running_lease(key, now)?,
            };
            let notify = s.waiters.entry(key.as_bytes().into()).or_default();
            Some((Arc::clone(notify), lease_end))
        });
        let Some((notify, lease_end)) = watched else {
            return Ok(());
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        // Register before re-checking, so a wake-up between the check above and the await
        // below is not missed.
        notified.as_mut().enable();
        let still_running = self.with_state(key, |s, hash, now| match s.live(key, hash, now) {
            Some(e) => e.status() == RecordStatus::Running,
            None => s
                .durables
                .running_lease(key, now)
                .is_some_and(|end| end > now),
        });
        if still_running {
            // An owner that crashed never notifies: wake when its lease lapses at the latest.
            let now = Instant::now();
            let mut until = now
                .checked_add(max)
                .unwrap_or(now + Duration::from_secs(86_400));
            if lease_end != NEVER
                && let Some(end) = self.epoch.checked_add(Duration::from_nanos(lease_end))
            {
                until = until.min(end);
            }
            let _ = tokio::time::timeout_at(until, notified).await;
        }
        Ok(())
    }

    fn journal_store(&self) -> Option<&dyn JournalStore> {
        Some(self)
    }

    fn admin(&self) -> Option<&dyn RecordAdmin> {
        Some(self)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
