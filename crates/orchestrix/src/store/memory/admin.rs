//! The memory store's [`RecordAdmin`]: the reference implementation.
//!
//! `inspect` and `release` are one table access, like every other operation. `list` walks
//! the table and the durable map once per page under the lock, keeping the `limit`
//! smallest keys after the cursor in a bounded heap: O(records · log limit) time and
//! O(limit) memory per page, and the store waits for the walk (a few milliseconds per
//! 100,000 records). Records live in this process only, so this is what an admin endpoint
//! of the service itself would show; the `orchestrix` command-line tool cannot reach them.

use std::collections::BinaryHeap;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::durable::Snapshot;
use super::{Entry, MemoryStore, NEVER, Tick, wake};
use crate::store::{
    Lease, ListRequest, Listed, Page, RecordAdmin, RecordInfo, RecordStatus, Released,
    SCHEMA_VERSION, StoreError,
};

/// The span from `now` to `deadline`, or `None` for no deadline.
fn left(deadline: Tick, now: Tick) -> Option<Duration> {
    (deadline != NEVER).then(|| Duration::from_nanos(deadline.saturating_sub(now)))
}

/// A running record's lease ending at `lease_until`, seen at `now`.
fn lease(lease_until: Tick, now: Tick) -> Lease {
    if lease_until > now {
        Lease::Held {
            left: Duration::from_nanos(lease_until - now),
        }
    } else {
        Lease::Lapsed {
            ago: Duration::from_nanos(now - lease_until),
        }
    }
}

/// A plain record of the table, live at `now`, under `key` (its own key).
fn plain_info(entry: &Entry, key: &str, now: Tick) -> RecordInfo {
    let view = entry.view(key, entry.fingerprint(None));
    let running = view.status == RecordStatus::Running;
    RecordInfo {
        key: key.to_owned(),
        status: view.status,
        token: view.token,
        fingerprint: view.fingerprint.map(str::to_owned),
        result_bytes: view.result.map(|r| r.len() as u64),
        schema_version: SCHEMA_VERSION,
        durable: false,
        // A plain record's deadline is its lease while it runs, its TTL once finished.
        lease: running.then(|| lease(entry.deadline(), now)),
        expires_in: left(entry.deadline(), now),
        journal: None,
    }
}

/// A durable record, live at `now`; with its journal when `journal` says so.
fn durable_info(snapshot: &Snapshot<'_>, now: Tick, journal: bool) -> RecordInfo {
    let view = snapshot.view;
    RecordInfo {
        key: view.key.to_owned(),
        status: view.status,
        token: view.token,
        fingerprint: view.fingerprint.map(str::to_owned),
        result_bytes: view.result.map(|r| r.len() as u64),
        schema_version: SCHEMA_VERSION,
        durable: true,
        lease: (view.status == RecordStatus::Running).then(|| lease(snapshot.lease_until, now)),
        expires_in: left(snapshot.expires_at, now),
        journal: journal.then(|| snapshot.journal.clone()),
    }
}

/// The `limit` smallest keys offered, with their records: a max-heap that drops its
/// largest key once it holds one more than the page needs (that one more tells whether a
/// next page exists).
struct Smallest {
    heap: BinaryHeap<ByKey>,
    keep: usize,
}

struct ByKey(RecordInfo);

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}
impl Eq for ByKey {}
impl PartialOrd for ByKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.key.as_bytes().cmp(other.0.key.as_bytes())
    }
}

impl Smallest {
    fn new(limit: usize) -> Self {
        Self {
            heap: BinaryHeap::with_capacity(limit + 1),
            keep: limit + 1,
        }
    }

    /// Whether a key would be kept: the heap is not full, or `key` is below its largest.
    fn wants(&self, key: &str) -> bool {
        self.heap.len() < self.keep
            || self
                .heap
                .peek()
                .is_some_and(|top| key.as_bytes() < top.0.key.as_bytes())
    }

    fn offer(&mut self, info: RecordInfo) {
        self.heap.push(ByKey(info));
        if self.heap.len() > self.keep {
            self.heap.pop();
        }
    }

    /// The page: the smallest `limit` records in key order, and the cursor after the last
    /// one when more were found.
    fn into_page(self) -> Page {
        let limit = self.keep - 1;
        let mut records: Vec<RecordInfo> = self
            .heap
            .into_sorted_vec()
            .into_iter()
            .map(|k| k.0)
            .collect();
        let next = if records.len() > limit {
            records.truncate(limit);
            records.last().map(|info| info.key.clone())
        } else {
            None
        };
        Page {
            records: records.into_iter().map(Listed::Record).collect(),
            next,
        }
    }
}

#[async_trait]
impl RecordAdmin for MemoryStore {
    async fn inspect(&self, key: &str) -> Result<Option<RecordInfo>, StoreError> {
        Ok(self.with_state(key, |s, hash, now| {
            if let Some(entry) = s.live(key, hash, now) {
                return Some(plain_info(entry, key, now));
            }
            s.durables
                .snapshot(key, now)
                .map(|snapshot| durable_info(&snapshot, now, true))
        }))
    }

    async fn list(&self, req: ListRequest<'_>) -> Result<Page, StoreError> {
        let state = self.lock();
        let now = self.tick(Instant::now());
        let mut page = Smallest::new(req.page_size());
        let after_cursor = |key: &str| req.cursor.is_none_or(|c| key.as_bytes() > c.as_bytes());
        let wanted = |key: &str, page: &Smallest| {
            key.starts_with(req.prefix) && after_cursor(key) && page.wants(key)
        };
        for entry in &state.records {
            // Keys are written from `&str`, so they are UTF-8.
            let Ok(key) = std::str::from_utf8(entry.key()) else {
                continue;
            };
            if entry.is_expired(now) || !wanted(key, &page) {
                continue;
            }
            let info = plain_info(entry, key, now);
            if req.filter.matches(&info) {
                page.offer(info);
            }
        }
        for snapshot in state.durables.snapshots(now) {
            if !wanted(snapshot.view.key, &page) {
                continue;
            }
            let info = durable_info(&snapshot, now, false);
            if req.filter.matches(&info) {
                page.offer(info);
            }
        }
        Ok(page.into_page())
    }

    async fn release(&self, key: &str) -> Result<Released, StoreError> {
        Ok(self.with_state(key, |s, hash, now| {
            if let Some(entry) = s.live(key, hash, now) {
                let status = entry.status();
                if status != RecordStatus::Running {
                    return Released::NotRunning(status);
                }
                // Waiters are woken by the removal, and find the key free.
                s.remove_if(key, hash, |_| true);
                return Released::Deleted;
            }
            match s.durables.lapse(key, now) {
                Some(RecordStatus::Running) => {
                    // Waiters look again: one of them may resume the run now.
                    wake(&mut s.waiters, key.as_bytes());
                    Released::LeaseLapsed
                }
                Some(status) => Released::NotRunning(status),
                None => Released::Absent,
            }
        }))
    }
}
