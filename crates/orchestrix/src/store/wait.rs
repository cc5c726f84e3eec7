//! Waiting for a running record to change: the [`Wait`] the engine hands a store, and the
//! [`Waiters`] registry that stores able to notify wake.
//!
//! `OnRunning::Wait` is a loop in the engine: `start` sees the record running, the engine
//! calls [`IdempotencyStore::wait_for_change`](super::IdempotencyStore::wait_for_change)
//! with a [`Wait`], and calls `start` again when it returns. How a store waits is its own
//! business:
//!
//! * **Stores that cannot notify poll.** The default `wait_for_change` sleeps
//!   [`Wait::poll_interval`]: [`POLL_BACKOFF_FIRST`] (2 ms) on the first wait of a caller,
//!   doubling on each further wait up to [`DEFAULT_POLL_INTERVAL`] (50 ms). A short run is
//!   picked up within a few milliseconds, a long one costs one check per 50 ms per waiter.
//!   The DynamoDB store polls, and the SQLite store polls for changes made by other
//!   processes.
//! * **Stores that can notify wake their waiters** when the record finishes or is
//!   released, and keep a slow poll as a safety net, so that a lost notification delays a
//!   waiter but never strands it: the memory store (in its own lock), the PostgreSQL store
//!   (`LISTEN`/`NOTIFY`), and the SQLite store for changes made through the same store in
//!   this process. [`Waiters`] is the registry they share.
//!
//! [`DEFAULT_POLL_INTERVAL`]: super::DEFAULT_POLL_INTERVAL

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use super::DEFAULT_POLL_INTERVAL;

/// The first poll interval of a caller that waits on a store that cannot notify.
pub const POLL_BACKOFF_FIRST: Duration = Duration::from_millis(2);

/// One wait of `OnRunning::Wait` on a running record: at most [`max`](Self::max), and
/// the how-manyth wait of this caller on the key it is ([`attempt`](Self::attempt)), from
/// which a polling store takes its [`poll_interval`](Self::poll_interval).
///
/// ```
/// use std::time::Duration;
/// use orchestrix::store::Wait;
///
/// let first = Wait::new(Duration::from_secs(5));
/// assert_eq!(first.poll_interval(), Duration::from_millis(2));
/// assert_eq!(first.next(Duration::from_secs(5)).poll_interval(), Duration::from_millis(4));
/// // Capped at 50 ms, and never past what is left of the wait.
/// assert_eq!(Wait::new(Duration::from_secs(5)).attempt_no(30).poll_interval(), Duration::from_millis(50));
/// assert_eq!(Wait::new(Duration::from_millis(1)).poll_interval(), Duration::from_millis(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    max: Duration,
    attempt: u32,
}

impl Wait {
    /// A caller's first wait, of at most `max`.
    pub const fn new(max: Duration) -> Self {
        Self { max, attempt: 0 }
    }

    /// The same caller's next wait, of at most `max` (what is left of its timeout).
    #[must_use]
    pub const fn next(self, max: Duration) -> Self {
        Self {
            max,
            attempt: self.attempt.saturating_add(1),
        }
    }

    /// This wait as the caller's `attempt`-th (0 for the first).
    #[must_use]
    pub const fn attempt_no(self, attempt: u32) -> Self {
        Self { attempt, ..self }
    }

    /// The longest this wait may take: `wait_for_change` returns by then at the latest.
    pub const fn max(&self) -> Duration {
        self.max
    }

    /// How many times this caller waited on the key before (0 on its first wait).
    pub const fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How long a store that cannot notify sleeps before the engine looks again:
    /// [`POLL_BACKOFF_FIRST`] doubled per earlier wait, capped at
    /// [`DEFAULT_POLL_INTERVAL`](super::DEFAULT_POLL_INTERVAL) and at [`max`](Self::max).
    pub fn poll_interval(&self) -> Duration {
        let doubled = POLL_BACKOFF_FIRST.saturating_mul(1u32 << self.attempt.min(16));
        doubled.min(DEFAULT_POLL_INTERVAL).min(self.max)
    }
}

/// Who waits on which key, for a store that can tell when a record changed.
///
/// A waiter [`watch`](Self::watch)es its key *before* it checks the record one last time
/// (so a change between the check and the wait is not missed), then awaits the [`Watch`];
/// whoever learns that the record finished or was released calls [`wake`](Self::wake), and
/// [`wake_all`](Self::wake_all) when changes may have been missed (a notification
/// connection that was lost). Waking is cheap when nobody waits. Cloning shares the
/// registry.
///
/// ```
/// use orchestrix::store::Waiters;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let waiters = Waiters::default();
/// let watch = waiters.watch("order-1");
/// assert!(waiters.wake("order-1"));
/// watch.changed().await; // returns at once: the key was woken after the watch began
/// assert!(!waiters.wake("order-1")); // nobody waits any more
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Waiters {
    keys: Arc<Mutex<HashMap<String, Slot>>>,
}

struct Slot {
    notify: Arc<Notify>,
    watchers: usize,
}

/// One waiter's registration on a key: resolves ([`changed`](Self::changed)) when the key
/// is woken after the watch began. Dropping it unregisters.
pub struct Watch {
    waiters: Waiters,
    key: String,
    notified: std::pin::Pin<Box<OwnedNotified>>,
}

impl Waiters {
    /// Registers a waiter on `key`. Wake-ups from now on resolve the returned watch.
    pub fn watch(&self, key: &str) -> Watch {
        let notify = {
            let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = keys.entry(key.to_owned()).or_insert_with(|| Slot {
                notify: Arc::new(Notify::new()),
                watchers: 0,
            });
            slot.watchers += 1;
            Arc::clone(&slot.notify)
        };
        let mut notified = Box::pin(notify.notified_owned());
        // Registered now, not at the first poll: a wake before the await counts.
        notified.as_mut().enable();
        Watch {
            waiters: self.clone(),
            key: key.to_owned(),
            notified,
        }
    }

    /// Wakes every waiter on `key`; whether there was one.
    pub fn wake(&self, key: &str) -> bool {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        match keys.get(key) {
            Some(slot) => {
                slot.notify.notify_waiters();
                true
            }
            None => false,
        }
    }

    /// Wakes every waiter on every key: for when wake-ups may have been missed.
    pub fn wake_all(&self) {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in keys.values() {
            slot.notify.notify_waiters();
        }
    }

    /// Whether anyone waits on any key.
    pub fn is_empty(&self) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

impl Watch {
    /// Resolves when the key is woken (at once if it was since the watch began).
    ///
    /// # Cancel safety
    /// Cancel-safe; a dropped wait unregisters.
    pub async fn changed(mut self) {
        self.notified.as_mut().await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut keys = self
            .waiters
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = keys.get_mut(&self.key) {
            slot.watchers = slot.watchers.saturating_sub(1);
            if slot.watchers == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

impl fmt::Debug for Waiters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.keys.lock().map_or(0, |k| k.len());
        f.debug_struct("Waiters").field("keys", &keys).finish()
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch").field("key", &self.key).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_interval_doubles_from_two_ms_to_the_cap() {
        let max = Duration::from_secs(10);
        let mut wait = Wait::new(max);
        let mut seen = Vec::new();
        for _ in 0..7 {
            seen.push(wait.poll_interval().as_millis());
            wait = wait.next(max);
        }
        assert_eq!(seen, [2, 4, 8, 16, 32, 50, 50]);
        assert_eq!(
            Wait::new(max).attempt_no(u32::MAX).poll_interval(),
            DEFAULT_POLL_INTERVAL
        );
    }

    #[tokio::test]
    async fn a_wake_reaches_only_the_watchers_of_its_key() {
        let waiters = Waiters::default();
        let a = waiters.watch("a");
        let b = waiters.watch("b");
        assert!(waiters.wake("a"));
        a.changed().await;
        let b_woken = tokio::time::timeout(Duration::from_millis(20), b.changed()).await;
        assert!(b_woken.is_err());
        assert!(waiters.is_empty());
    }

    #[tokio::test]
    async fn wake_all_reaches_every_watcher() {
        let waiters = Waiters::default();
        let a = waiters.watch("a");
        let b = waiters.watch("b");
        waiters.wake_all();
        a.changed().await;
        b.changed().await;
    }
}
