//! Waiting for a record to change without polling: [`IdempotencyStore::wait_for_change`]
//! woken by Redis's sharded pub/sub.
//!
//! The finish and release scripts `SPUBLISH` an empty message on a channel named like the
//! record's Redis key, so on a cluster the message stays on the key's shard. A store's
//! waiters share **one** subscription connection (RESP3, opened on the first wait), and a
//! registry of channel → waiters: the first waiter of a key `SSUBSCRIBE`s its channel, the
//! last one to leave `SUNSUBSCRIBE`s it, and a message wakes every waiter of its channel.
//!
//! A notification can be lost (a connection that drops, a record that expires or is
//! deleted, which publishes nothing), and a lost notification must never lose a waiter:
//!
//! * A waiter registers before it subscribes, and once subscribed reads the record's status
//!   and remaining lease (`GETRANGE`, `PTTL`, one round trip): a finish that happened before
//!   the subscription is seen there, and one after it is published to a subscribed channel.
//! * It then sleeps until a message, or the record's lease would lapse, or the safety poll
//!   interval (default [`DEFAULT_SAFETY_POLL`]), or the caller's `max`, whichever is first;
//!   the engine then asks the store again.
//! * The subscription connection's loss wakes every waiter at once; the next wait opens a
//!   new connection and subscribes again every channel that still has waiters.
//! * A store that cannot subscribe (a store built from a `ConnectionManager`, which gives
//!   no way to open a second connection, or a failed subscription) polls as the default
//!   implementation does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionInfo, PushInfo, PushKind, Value};
use tokio::sync::Notify;

/// How long a waiter sleeps at most between two looks at the record when no message
/// comes: the bound on how late a lost notification makes it.
pub const DEFAULT_SAFETY_POLL: Duration = Duration::from_secs(1);

/// How a store without notifications polls (the core's default interval).
const POLL: Duration = orchestrix::store::DEFAULT_POLL_INTERVAL;

/// Where the subscription connection is opened.
#[derive(Clone)]
pub(crate) enum Opener {
    /// One server: a multiplexed RESP3 connection of its own.
    Standalone {
        info: Box<ConnectionInfo>,
        connection_timeout: Duration,
        response_timeout: Duration,
    },
    /// A cluster: a RESP3 cluster connection of its own, which subscribes each channel
    /// on its shard's node (and subscribes again after it reconnects).
    Cluster {
        nodes: Vec<ConnectionInfo>,
        connection_timeout: Duration,
        response_timeout: Duration,
    },
    /// No way to open one: poll.
    None,
}

/// The subscription connection.
enum Subscriber {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Subscriber {
    async fn command(&mut self, command: &str, channel: &[u8]) -> redis::RedisResult<()> {
        let mut cmd = redis::cmd(command);
        cmd.arg(channel);
        match self {
            Self::Standalone(conn) => cmd.exec_async(conn).await,
            Self::Cluster(conn) => cmd.exec_async(conn).await,
        }
    }
}

/// The waiters of each channel, shared with the connection's push handler.
#[derive(Default)]
struct Registry {
    channels: Mutex<HashMap<Vec<u8>, Waiting>>,
    /// The subscription connection was lost: reopen it on the next wait.
    broken: AtomicBool,
}

struct Waiting {
    notify: Arc<Notify>,
    waiters: usize,
    /// `SSUBSCRIBE` answered for this channel on the current connection.
    subscribed: bool,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Waiting>> {
        // A panic while holding this lock leaves the map consistent (each operation is a
        // single insert, update or removal), so a poisoned lock is used as it is.
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes the waiters of `channel`, or all of them.
    fn wake(&self, channel: Option<&[u8]>) {
        let channels = self.lock();
        match channel {
            Some(channel) => {
                if let Some(waiting) = channels.get(channel) {
                    waiting.notify.notify_waiters();
                }
            }
            None => channels
                .values()
                .for_each(|waiting| waiting.notify.notify_waiters()),
        }
    }

    /// What the subscription connection receives: messages wake their channel's waiters;
    /// the connection's loss wakes everyone and marks it for reopening.
    fn push(&self, push: PushInfo) {
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    self.wake(Some(channel));
                }
            }
            PushKind::Disconnection => {
                self.broken.store(true, Ordering::SeqCst);
                self.wake(None);
            }
            _ => {}
        }
    }
}

/// One waiter's place in the registry; leaving it unsubscribes the channel when it was
/// the last.
struct Entry<'a> {
    wakeups: &'a Arc<Wakeups>,
    channel: Vec<u8>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let last = {
            let mut channels = self.wakeups.registry.lock();
            match channels.get_mut(&self.channel) {
                Some(waiting) if waiting.waiters > 1 => {
                    waiting.waiters -= 1;
                    false
                }
                Some(_) => {
                    channels.remove(&self.channel);
                    true
                }
                None => false,
            }
        };
        if last && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (wakeups, channel) = (self.wakeups.clone(), std::mem::take(&mut self.channel));
            runtime.spawn(async move { wakeups.unsubscribe(channel).await });
        }
    }
}

/// A store's wake-ups: see the [module documentation](self).
pub(crate) struct Wakeups {
    registry: Arc<Registry>,
    opener: Opener,
    /// Opened on the first wait. Held while (un)subscribing, so that a subscription and
    /// the unsubscription of the same channel never cross.
    subscriber: tokio::sync::Mutex<Option<Subscriber>>,
    safety_poll: Duration,
}

impl Wakeups {
    pub(crate) fn new(opener: Opener, safety_poll: Duration) -> Arc<Self> {
        Arc::new(Self {
            registry: Arc::default(),
            opener,
            subscriber: tokio::sync::Mutex::new(None),
            safety_poll,
        })
    }

    /// Waits until `channel`'s record may have changed or `max` passed. `look` reads the
    /// record once the subscription is in place: `None` when it is no longer running (or
    /// cannot be read), else the lease it has left.
    pub(crate) async fn wait<F, Fut>(self: &Arc<Self>, channel: Vec<u8>, max: Duration, look: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<Duration>>,
    {
        if matches!(self.opener, Opener::None) {
            tokio::time::sleep(max.min(POLL)).await;
            return;
        }
        let notify = {
            let mut channels = self.registry.lock();
            let waiting = channels.entry(channel.clone()).or_insert_with(|| Waiting {
                notify: Arc::default(),
                waiters: 0,
                subscribed: false,
            });
            waiting.waiters += 1;
            waiting.notify.clone()
        };
        let entry = Entry {
            wakeups: self,
            channel,
        };
        // Registered before subscribing and before looking: nothing published from now on
        // is missed.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.subscribe(&entry.channel).await {
            tokio::time::sleep(max.min(POLL)).await;
            return;
        }
        let Some(lease_left) = look().await else {
            return;
        };
        // Once the lease lapses the key can be taken over, and nothing publishes that.
        let nap = max
            .min(self.safety_poll)
            .min(lease_left + Duration::from_millis(1));
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep(nap) => {}
        }
        drop(entry);
    }

    /// Whether `channel` is subscribed on a live connection.
    fn subscribed(&self, channel: &[u8]) -> bool {
        !self.registry.broken.load(Ordering::SeqCst)
            && self
                .registry
                .lock()
                .get(channel)
                .is_some_and(|waiting| waiting.subscribed)
    }

    /// Marks `channels` subscribed (those that still have waiters).
    fn mark_subscribed(&self, channels: &[Vec<u8>]) {
        let mut registry = self.registry.lock();
        for channel in channels {
            if let Some(waiting) = registry.get_mut(channel) {
                waiting.subscribed = true;
            }
        }
    }

    /// Makes sure `channel` is subscribed, opening the connection (again, after it was
    /// lost) if needed: `false` when it cannot be.
    async fn subscribe(&self, channel: &[u8]) -> bool {
        if self.subscribed(channel) {
            return true;
        }
        let mut subscriber = self.subscriber.lock().await;
        if subscriber.is_none() || self.registry.broken.swap(false, Ordering::SeqCst) {
            *subscriber = None;
            let Some(mut opened) = self.open().await else {
                return false;
            };
            // Every channel that has waiters now, this one among them.
            let channels: Vec<Vec<u8>> = self.registry.lock().keys().cloned().collect();
            for channel in &channels {
                if opened.command("SSUBSCRIBE", channel).await.is_err() {
                    return false;
                }
            }
            *subscriber = Some(opened);
            self.mark_subscribed(&channels);
            return true;
        }
        if self.subscribed(channel) {
            return true;
        }
        let Some(conn) = subscriber.as_mut() else {
            return false;
        };
        if let Err(err) = conn.command("SSUBSCRIBE", channel).await {
            // A refusal (ACLs) leaves the connection as it is; a lost one is reopened.
            if err.is_connection_dropped() || err.is_io_error() || err.is_timeout() {
                self.registry.broken.store(true, Ordering::SeqCst);
            }
            return false;
        }
        self.mark_subscribed(&[channel.to_vec()]);
        true
    }

    /// Unsubscribes `channel` if it still has no waiter (one may have come since).
    async fn unsubscribe(&self, channel: Vec<u8>) {
        let mut subscriber = self.subscriber.lock().await;
        if self.registry.lock().contains_key(&channel) {
            return;
        }
        if let Some(conn) = subscriber.as_mut()
            && conn.command("SUNSUBSCRIBE", &channel).await.is_err()
        {
            self.registry.broken.store(true, Ordering::SeqCst);
        }
    }

    /// A new subscription connection whose pushes go to the registry.
    async fn open(&self) -> Option<Subscriber> {
        let registry: Weak<Registry> = Arc::downgrade(&self.registry);
        let sender = move |push: PushInfo| -> Result<(), redis::aio::SendError> {
            let registry = registry.upgrade().ok_or(redis::aio::SendError)?;
            registry.push(push);
            Ok(())
        };
        match &self.opener {
            Opener::None => None,
            Opener::Standalone {
                info,
                connection_timeout,
                response_timeout,
            } => {
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(redis::ProtocolVersion::RESP3);
                let client =
                    Client::open(info.as_ref().clone().set_redis_settings(settings)).ok()?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(*connection_timeout))
                    .set_response_timeout(Some(*response_timeout))
                    .set_push_sender(sender);
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .ok()?;
                // Named, so an operator (or a test) can tell it in CLIENT LIST.
                let _: Result<(), _> = redis::cmd("CLIENT")
                    .arg("SETNAME")
                    .arg(SUBSCRIBER_NAME)
                    .exec_async(&mut conn)
                    .await;
                Some(Subscriber::Standalone(conn))
            }
            Opener::Cluster {
                nodes,
                connection_timeout,
                response_timeout,
            } => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .connection_timeout(*connection_timeout)
                    .response_timeout(*response_timeout)
                    .push_sender(sender)
                    .build()
                    .ok()?;
                let conn = client.get_async_connection().await.ok()?;
                Some(Subscriber::Cluster(conn))
            }
        }
    }
}

/// The client name of a store's subscription connection on a standalone server.
pub const SUBSCRIBER_NAME: &str = "orchestrix-wakeups";
