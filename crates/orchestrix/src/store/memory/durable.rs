//! The memory store's durable records: a map of their own beside the table.
//!
//! Durable records are few and carry a journal, a lease and a retention, so they do not use
//! the table's packed single-allocation layout: the hot path of non-durable runs stays as it
//! was, and only looks here when the table has nothing under a key (and this map is not
//! empty). Leases are indexed by deadline (for [`abandoned`](JournalStore::abandoned)) and
//! expiries kept in a min-heap swept a little on every operation, like the table's.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{MemoryStore, NEVER, State, Tick, after, wake};
use crate::store::{
    DurableStart, DurableStartOutcome, FencingToken, FinalStatus, Journal, JournalStore, Record,
    RecordStatus, RecordView, Redrive, StoreError, fingerprints_agree,
};

/// The largest journal (input and entries) a memory store keeps unless configured otherwise.
pub const DEFAULT_MAX_JOURNAL_BYTES: usize = 64 * 1024 * 1024;

/// The durable records of a memory store.
#[derive(Default)]
pub(super) struct Durables {
    map: HashMap<Arc<str>, Durable>,
    /// Running records by lease deadline: the abandoned ones are a prefix of it.
    leases: BTreeSet<(Tick, Arc<str>)>,
    /// Pending removals, soonest first; an entry whose generation is not the record's is
    /// stale and ignored.
    expiries: BinaryHeap<Reverse<(Tick, u64, Arc<str>)>>,
    next_generation: u64,
}

struct Durable {
    status: RecordStatus,
    token: FencingToken,
    fingerprint: Option<Box<str>>,
    result: Option<Box<[u8]>>,
    /// Until when the owner holds it (running records only).
    lease_until: Tick,
    /// When the record goes: lease plus retention while running, the TTL once finished.
    expires_at: Tick,
    retain: Option<Duration>,
    generation: u64,
    journal: Journal,
    /// `journal.len_bytes()`, kept as entries are appended.
    journal_bytes: usize,
}

/// A durable record seen by the record admin.
pub(super) struct Snapshot<'a> {
    pub(super) view: RecordView<'a>,
    /// Until when the owner holds it (running records only).
    pub(super) lease_until: Tick,
    /// When the record goes.
    pub(super) expires_at: Tick,
    pub(super) journal: &'a Journal,
}

impl Durable {
    fn snapshot<'a>(&'a self, key: &'a str) -> Snapshot<'a> {
        Snapshot {
            view: self.view(key),
            lease_until: self.lease_until,
            expires_at: self.expires_at,
            journal: &self.journal,
        }
    }

    fn is_live(&self, now: Tick) -> bool {
        self.expires_at > now
    }

    fn is_owned_by(&self, token: FencingToken, now: Tick) -> bool {
        self.is_live(now)
            && self.status == RecordStatus::Running
            && self.token == token
            && self.lease_until > now
    }

    fn is_abandoned(&self, now: Tick) -> bool {
        self.is_live(now) && self.status == RecordStatus::Running && self.lease_until <= now
    }

    fn view<'a>(&'a self, key: &'a str) -> RecordView<'a> {
        RecordView {
            key,
            status: self.status,
            token: self.token,
            fingerprint: self.fingerprint.as_deref(),
            result: self.result.as_deref(),
        }
    }
}

impl Durables {
    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The live record under `key`; an expired one is removed on the way.
    fn live(&mut self, key: &str, now: Tick) -> Option<&mut Durable> {
        if self.map.get(key).is_some_and(|d| !d.is_live(now)) {
            self.remove(key);
        }
        self.map.get_mut(key)
    }

    /// The live record's view, for the table's operations that found nothing there.
    pub(super) fn view<'a>(&'a mut self, key: &'a str, now: Tick) -> Option<RecordView<'a>> {
        self.live(key, now).map(|d| d.view(key))
    }

    fn remove(&mut self, key: &str) -> Option<Durable> {
        let gone = self.map.remove(key)?;
        if gone.status == RecordStatus::Running {
            self.leases.remove(&(gone.lease_until, Arc::from(key)));
        }
        Some(gone)
    }

    /// Sets the record's lease and expiry (the lease index and the expiry heap follow).
    fn schedule(&mut self, key: &Arc<str>, lease_until: Option<Tick>, expires_at: Tick) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(d) = self.map.get_mut(key) else {
            return;
        };
        if d.status == RecordStatus::Running {
            self.leases.remove(&(d.lease_until, Arc::clone(key)));
        }
        if let Some(lease_until) = lease_until {
            d.lease_until = lease_until;
            self.leases.insert((lease_until, Arc::clone(key)));
        }
        d.expires_at = expires_at;
        d.generation = generation;
        if expires_at != NEVER {
            self.expiries
                .push(Reverse((expires_at, generation, Arc::clone(key))));
        }
    }

    /// Removes up to `budget` expired records; how many it removed.
    pub(super) fn sweep(&mut self, now: Tick, budget: usize, waiters: &mut super::Waiters) -> u64 {
        let mut removed = 0;
        for _ in 0..budget {
            match self.expiries.peek() {
                Some(Reverse((at, _, _))) if *at <= now => {}
                _ => break,
            }
            let Some(Reverse((_, generation, key))) = self.expiries.pop() else {
                break;
            };
            let current = self
                .map
                .get(&key)
                .is_some_and(|d| d.generation == generation && !d.is_live(now));
            if current {
                self.remove(&key);
                wake(waiters, key.as_bytes());
                removed += 1;
            }
        }
        removed
    }

    /// A new running record under `key`, with `journal`.
    fn insert_running(
        &mut self,
        key: &str,
        req: &DurableStart<'_>,
        fingerprint: Option<Box<str>>,
        journal: Journal,
        now: Tick,
    ) -> FencingToken {
        let token = FencingToken::generate();
        self.remove(key);
        let key: Arc<str> = Arc::from(key);
        self.map.insert(
            Arc::clone(&key),
            Durable {
                status: RecordStatus::Running,
                token,
                fingerprint,
                result: None,
                lease_until: now,
                expires_at: NEVER,
                retain: req.retain,
                generation: 0,
                journal_bytes: journal.len_bytes(),
                journal,
            },
        );
        let lease_until = after(now, Some(req.lease));
        self.schedule(&key, Some(lease_until), after(lease_until, req.retain));
        token
    }

    /// `finish` of a durable record `token` owns; `StaleToken` if there is none.
    pub(super) fn finish(
        &mut self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
        now: Tick,
    ) -> Result<(), StoreError> {
        if self.map.get(key).is_some_and(|d| {
            d.is_live(now)
                && d.token == token
                && d.status == RecordStatus::from(status)
                && d.result.as_deref() == Some(result)
        }) {
            // The same finish again (a caller retrying it): it was applied.
            return Ok(());
        }
        let lease_until = {
            let d = self.owned(key, token, now)?;
            d.status = status.into();
            d.result = Some(result.into());
            d.lease_until
        };
        let key = self.arc_key(key);
        self.leases.remove(&(lease_until, Arc::clone(&key)));
        self.schedule(&key, None, after(now, ttl));
        Ok(())
    }

    pub(super) fn renew(
        &mut self,
        key: &str,
        token: FencingToken,
        lease: Duration,
        now: Tick,
    ) -> Result<(), StoreError> {
        let retain = self.owned(key, token, now)?.retain;
        let lease_until = after(now, Some(lease));
        let key = self.arc_key(key);
        self.schedule(&key, Some(lease_until), after(lease_until, retain));
        Ok(())
    }

    pub(super) fn release(
        &mut self,
        key: &str,
        token: FencingToken,
        now: Tick,
    ) -> Result<(), StoreError> {
        self.owned(key, token, now)?;
        self.remove(key);
        Ok(())
    }

    pub(super) fn delete(&mut self, key: &str) -> bool {
        self.remove(key).is_some()
    }

    /// The lease deadline of the live running record under `key`, for waiters.
    pub(super) fn running_lease(&mut self, key: &str, now: Tick) -> Option<Tick> {
        self.live(key, now)
            .filter(|d| d.status == RecordStatus::Running)
            .map(|d| d.lease_until)
    }

    fn owned(
        &mut self,
        key: &str,
        token: FencingToken,
        now: Tick,
    ) -> Result<&mut Durable, StoreError> {
        match self.map.get_mut(key) {
            Some(d) if d.is_owned_by(token, now) => Ok(d),
            _ => Err(StoreError::StaleToken),
        }
    }

    /// The live record under `key` as the record admin shows it.
    pub(super) fn snapshot<'a>(&'a self, key: &'a str, now: Tick) -> Option<Snapshot<'a>> {
        let d = self.map.get(key).filter(|d| d.is_live(now))?;
        Some(d.snapshot(key))
    }

    /// Every live record, in no order, as the record admin shows it.
    pub(super) fn snapshots(&self, now: Tick) -> impl Iterator<Item = Snapshot<'_>> {
        self.map
            .iter()
            .filter(move |(_, d)| d.is_live(now))
            .map(|(key, d)| d.snapshot(key))
    }

    /// The record admin's release: a running record's lease lapses now (unless it had
    /// already), its journal kept. The live record's status, or `None` when there is none.
    pub(super) fn lapse(&mut self, key: &str, now: Tick) -> Option<RecordStatus> {
        let d = self.live(key, now)?;
        if d.status != RecordStatus::Running {
            return Some(d.status);
        }
        if d.lease_until > now {
            let retain = d.retain;
            let key = self.arc_key(key);
            self.schedule(&key, Some(now), after(now, retain));
        }
        Some(RecordStatus::Running)
    }

    /// The map's own `Arc` of `key` (the lease index and the heap share it).
    fn arc_key(&self, key: &str) -> Arc<str> {
        self.map
            .get_key_value(key)
            .map_or_else(|| Arc::from(key), |(k, _)| Arc::clone(k))
    }
}

/// What a durable start found in the table of non-durable records under its key.
enum TableHolds {
    Nothing,
    Existing(Record),
}

impl MemoryStore {
    /// The non-durable record under `key`, if a live one blocks a durable start. An
    /// expired one, or a failure the caller may re-run, is removed.
    fn table_holds(state: &mut State, req: &DurableStart<'_>, hash: u64, now: Tick) -> TableHolds {
        let blocking = state.live(req.key, hash, now).map(|e| {
            let fingerprint = e.fingerprint(None);
            let view = e.view(req.key, fingerprint);
            (!req.may_take_over(view.status, view.fingerprint)).then(|| view.to_record())
        });
        match blocking {
            Some(Some(record)) => TableHolds::Existing(record),
            Some(None) | None => {
                state.remove_if(req.key, hash, |_| true);
                TableHolds::Nothing
            }
        }
    }

    /// The largest journal this store keeps.
    fn journal_limit(&self) -> usize {
        self.max_journal_bytes
    }
}

#[async_trait]
impl JournalStore for MemoryStore {
    async fn start_durable(
        &self,
        req: DurableStart<'_>,
    ) -> Result<DurableStartOutcome, StoreError> {
        if req.input.len() > self.journal_limit() {
            return Err(StoreError::TooLarge {
                size: req.input.len(),
                limit: self.journal_limit(),
            });
        }
        self.with_state(req.key, |s, hash, now| {
            if let TableHolds::Existing(record) = Self::table_holds(s, &req, hash, now) {
                return Ok(DurableStartOutcome::Existing(record));
            }
            let durables = &mut s.durables;
            let mut resumed = None;
            if let Some(held) = durables.live(req.key, now) {
                let agree = fingerprints_agree(req.fingerprint, held.fingerprint.as_deref());
                if held.is_abandoned(now) && agree {
                    resumed = Some(std::mem::take(&mut held.journal));
                } else if !req.may_take_over(held.status, held.fingerprint.as_deref()) {
                    return Ok(DurableStartOutcome::Existing(
                        held.view(req.key).to_record(),
                    ));
                }
            }
            // A takeover keeps the stored fingerprint: it describes the journal's input.
            let fingerprint = match (&resumed, durables.map.get(req.key)) {
                (Some(_), Some(held)) => held.fingerprint.clone(),
                _ => req.fingerprint.map(Box::from),
            };
            let journal = resumed.clone().unwrap_or_else(|| Journal {
                input: req.input.to_vec(),
                entries: Vec::new(),
            });
            let token = durables.insert_running(req.key, &req, fingerprint, journal, now);
            Ok(DurableStartOutcome::Acquired { token, resumed })
        })
    }

    async fn append(&self, key: &str, token: FencingToken, entry: &[u8]) -> Result<(), StoreError> {
        let limit = self.journal_limit();
        self.with_state(key, |s, _, now| {
            let d = s.durables.owned(key, token, now)?;
            let size = d.journal_bytes + entry.len();
            if size > limit {
                return Err(StoreError::TooLarge { size, limit });
            }
            d.journal.entries.push(entry.to_vec());
            d.journal_bytes = size;
            Ok(())
        })
    }

    async fn suspend(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.with_state(key, |s, _, now| {
            let retain = s.durables.owned(key, token, now)?.retain;
            let arc = s.durables.arc_key(key);
            s.durables.schedule(&arc, Some(now), after(now, retain));
            // Waiters look again: one of them may resume the run now.
            wake(&mut s.waiters, key.as_bytes());
            Ok(())
        })
    }

    async fn redrive(
        &self,
        key: &str,
        lease: Duration,
        retain: Option<Duration>,
    ) -> Result<Redrive, StoreError> {
        self.with_state(key, |s, hash, now| {
            if let Some(e) = s.live(key, hash, now) {
                return Ok(Redrive::NotFailed(
                    e.view(key, e.fingerprint(None)).to_record(),
                ));
            }
            let durables = &mut s.durables;
            let Some(held) = durables.live(key, now) else {
                return Ok(Redrive::Absent);
            };
            if held.status != RecordStatus::Failed {
                return Ok(Redrive::NotFailed(held.view(key).to_record()));
            }
            let token = FencingToken::generate();
            held.status = RecordStatus::Running;
            held.token = token;
            held.result = None;
            held.retain = retain;
            let journal = held.journal.clone();
            let arc = durables.arc_key(key);
            let lease_until = after(now, Some(lease));
            durables.schedule(&arc, Some(lease_until), after(lease_until, retain));
            Ok(Redrive::Acquired { token, journal })
        })
    }

    async fn read_journal(&self, key: &str) -> Result<Option<Journal>, StoreError> {
        Ok(self.with_state(key, |s, _, now| {
            s.durables.live(key, now).map(|d| d.journal.clone())
        }))
    }

    async fn abandoned(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self.with_state(prefix, |s, _, now| {
            let durables = &s.durables;
            let mut keys: Vec<String> = durables
                .leases
                .iter()
                .take_while(|(lease_until, _)| *lease_until <= now)
                .filter(|(_, key)| key.starts_with(prefix) && after.is_none_or(|a| &**key > a))
                .filter(|(_, key)| durables.map.get(key).is_some_and(|d| d.is_abandoned(now)))
                .map(|(_, key)| key.to_string())
                .collect();
            keys.sort_unstable();
            keys.truncate(limit);
            keys
        }))
    }
}
