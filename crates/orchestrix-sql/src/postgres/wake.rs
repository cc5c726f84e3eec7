//! Waking waiters with `LISTEN`/`NOTIFY`.
//!
//! Every statement that ends a running record (finish, release, suspend, delete) calls
//! `pg_notify(<table>_wake, <key>)` in its `RETURNING` clause, so the notification is sent
//! when — and only if — its implicit transaction commits, and only for a row it changed.
//!
//! Each store (and its clones) keeps **one** listening connection, taken from its pool
//! the first time anyone waits and kept from then on. A task reads its notifications and
//! wakes the waiters of each key in a [`Waiters`] registry. Keys longer than
//! [`PAYLOAD_CHARS`] characters are notified by their prefix, which wakes the waiters of
//! every key sharing it (each simply looks again).
//!
//! A notification can be lost (the listening connection dies, or a change commits between
//! a waiter's last check and its registration), and a lost notification must not strand a
//! waiter, so:
//!
//! * a waiter waits at most the store's safety poll (default 1 s,
//!   [`PgStore::with_wait_safety_poll`](super::PgStore::with_wait_safety_poll)) before the
//!   engine looks again;
//! * while the listener is not connected (before its first `LISTEN`, or after its
//!   connection died), waiters poll with the default backoff (2 ms doubling to 50 ms);
//! * whenever the listener (re)connects, every waiter is woken to look again, since
//!   notifications sent while it was away are gone. A dead connection is replaced at once,
//!   then with a growing pause (up to 1 s) while the server stays unreachable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use orchestrix::store::{Wait, Waiters};
use sqlx::postgres::{PgListener, PgPool};
use tokio::task::JoinHandle;

/// The longest key prefix a notification carries, in characters (at most 4000 bytes:
/// PostgreSQL refuses a payload of 8000 bytes or more).
pub(super) const PAYLOAD_CHARS: usize = 1000;

/// How long a waiter waits for a notification before the engine looks again anyway.
pub(super) const DEFAULT_SAFETY_POLL: Duration = Duration::from_secs(1);

/// The longest pause between two attempts to connect the listener.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// The channel of a table's notifications: `<table>_wake` (at most 53 bytes, under
/// PostgreSQL's 63 for an identifier).
pub(super) fn channel(table: &str) -> String {
    format!("{table}_wake")
}

/// The SQL expression that notifies the waiters of the row's key.
pub(super) fn notify_sql(table: &str) -> String {
    format!(
        "pg_notify('{}', left(key, {PAYLOAD_CHARS}))::text AS notified",
        channel(table)
    )
}

/// What a waiter registers under: the key as a notification carries it.
fn payload_of(key: &str) -> &str {
    match key.char_indices().nth(PAYLOAD_CHARS) {
        Some((end, _)) => &key[..end],
        None => key,
    }
}

/// One store's listener and its waiters, shared by the store's clones. Dropping the last
/// clone stops the listener and gives its connection back.
pub(super) struct Wake {
    pool: PgPool,
    channel: String,
    safety_poll: Duration,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// What the listener task and the waiters share.
#[derive(Default)]
struct Shared {
    waiters: Waiters,
    /// Whether the listener is connected and listening: only then are notifications
    /// worth waiting for.
    listening: AtomicBool,
}

impl Wake {
    pub(super) fn new(pool: PgPool, table: &str, safety_poll: Duration) -> Self {
        Self {
            pool,
            channel: channel(table),
            safety_poll,
            shared: Arc::default(),
            task: Mutex::default(),
        }
    }

    pub(super) fn safety_poll(&self) -> Duration {
        self.safety_poll
    }

    /// Waits until `key` is notified, for at most the safety poll and `wait.max()`; while
    /// the listener is not listening, for the poll interval of `wait` instead.
    pub(super) async fn wait(&self, key: &str, wait: Wait) {
        // Registered before the listener's state is read: a (re)connection after this
        // point wakes this waiter.
        let watch = self.shared.waiters.watch(payload_of(key));
        self.start_listener();
        let limit = if self.shared.listening.load(Ordering::Acquire) {
            self.safety_poll.min(wait.max())
        } else {
            wait.poll_interval()
        };
        let _ = tokio::time::timeout(limit, watch.changed()).await;
    }

    /// Starts the listener task, once.
    fn start_listener(&self) {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if task.is_none() {
            let listen = listen(
                self.pool.clone(),
                self.channel.clone(),
                Arc::clone(&self.shared),
            );
            *task = Some(tokio::spawn(listen));
        }
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// The listener task: connect, `LISTEN`, wake the waiters of each notified key; on any
/// failure, wake everyone (notifications may have been missed) and connect again.
async fn listen(pool: PgPool, channel: String, shared: Arc<Shared>) {
    let mut pause = Duration::ZERO;
    loop {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        pause = (pause * 2).clamp(Duration::from_millis(50), MAX_RECONNECT_PAUSE);
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(_) if pool.is_closed() => break,
            Err(_) => continue,
        };
        // A lost connection is reported (try_recv answers `None`) rather than silently
        // re-established, so that the waiters it may have failed are woken.
        listener.eager_reconnect(false);
        if listener.listen(&channel).await.is_err() {
            continue;
        }
        shared.listening.store(true, Ordering::Release);
        shared.waiters.wake_all();
        pause = Duration::ZERO;
        // Until the connection is lost (`None`) or fails (`Err`).
        while let Ok(Some(notification)) = listener.try_recv().await {
            shared.waiters.wake(notification.payload());
        }
        shared.listening.store(false, Ordering::Release);
        shared.waiters.wake_all();
        if pool.is_closed() {
            break;
        }
    }
    shared.listening.store(false, Ordering::Release);
    shared.waiters.wake_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_notified_by_their_prefix() {
        let short = "order-1";
        assert_eq!(payload_of(short), short);
        let long = "é".repeat(PAYLOAD_CHARS + 5);
        assert_eq!(payload_of(&long).chars().count(), PAYLOAD_CHARS);
        assert!(payload_of(&long).len() < 8000);
    }
}
