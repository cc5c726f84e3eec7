//! Building a [`RedisStore`]: where Redis is, and the few options the store has.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ConnectionInfo, IntoConnectionInfo, RedisError};

use crate::RedisStore;
use crate::connection::Connection;
use crate::durable::{DEFAULT_MAX_JOURNAL_BYTES, REDIS_MAX_VALUE};
use crate::wakeups::{Opener, Wakeups};

/// The key prefix used unless [`RedisStoreBuilder::key_prefix`] sets another.
pub const DEFAULT_KEY_PREFIX: &str = "orchestrix:";

/// The largest result stored unless [`RedisStoreBuilder::max_result_size`] sets another:
/// Redis's own default limit for one value (`proto-max-bulk-len`, 512 MiB), less the most
/// a record adds around its result (65,573 bytes: the header, the longest fingerprint and
/// the result flag), so a stored record never exceeds 512 MiB.
pub const DEFAULT_MAX_RESULT_SIZE: usize = 512 * 1024 * 1024 - crate::record::MAX_OVERHEAD;

const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection attempts after a failed connect, before an operation fails. Kept low so an
/// unreachable server fails a run within a few seconds (three connection timeouts at most)
/// instead of hanging it; the next operation tries again.
const RECONNECT_RETRIES: usize = 2;

/// Why a [`RedisStore`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisStoreError {
    /// The connection URL or client settings were rejected.
    #[error("invalid Redis connection settings: {0}")]
    InvalidSettings(#[source] RedisError),
    /// Redis did not answer (connection refused, timed out, authentication failed).
    #[error("could not connect to Redis: {0}")]
    Connect(#[source] RedisError),
    /// [`RedisStoreBuilder::connect_lazy`] was called outside a Tokio runtime, which the
    /// connection's background task needs.
    #[error("a lazily connected Redis store must be built inside a Tokio runtime")]
    NoRuntime,
}

/// Builds a [`RedisStore`]; start from [`RedisStore::builder`] (a URL),
/// [`RedisStore::cluster`] (a Redis Cluster's seed nodes), or convert a [`redis::Client`] or
/// a [`ConnectionManager`] with `RedisStoreBuilder::from`.
///
/// ```no_run
/// # async fn demo() -> Result<(), orchestrix_redis::RedisStoreError> {
/// use std::time::Duration;
/// use orchestrix_redis::RedisStore;
///
/// let store = RedisStore::builder("redis://:secret@127.0.0.1:6379/0")
///     .key_prefix("shop:idempotency:")
///     .response_timeout(Duration::from_secs(1))
///     .connect()
///     .await?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until `connect` or `connect_lazy` is called"]
pub struct RedisStoreBuilder {
    source: Source,
    key_prefix: String,
    connection_timeout: Duration,
    response_timeout: Duration,
    max_result_size: usize,
    max_journal_bytes: usize,
    replicas: Option<crate::Replicas>,
    safety_poll: Duration,
}

#[derive(Debug)]
enum Source {
    /// A URL is parsed when the builder is made, but its error is reported by `connect`,
    /// so a builder chain never needs `?` half-way. Boxed: with TLS settings a client is
    /// a few hundred bytes, and a builder is moved at every call of the chain.
    Client(Box<Result<Client, RedisError>>),
    Manager(ConnectionManager),
    /// A Redis Cluster's seed nodes (any of them will do; the client learns the rest).
    Cluster(Result<Vec<ConnectionInfo>, RedisError>),
}

impl RedisStoreBuilder {
    pub(crate) fn new(info: impl IntoConnectionInfo) -> Self {
        Self::with_source(Source::Client(Box::new(Client::open(info))))
    }

    pub(crate) fn cluster<T: IntoConnectionInfo>(nodes: impl IntoIterator<Item = T>) -> Self {
        let nodes = nodes
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect();
        Self::with_source(Source::Cluster(nodes))
    }

    fn with_source(source: Source) -> Self {
        Self {
            source,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_result_size: DEFAULT_MAX_RESULT_SIZE,
            max_journal_bytes: DEFAULT_MAX_JOURNAL_BYTES,
            replicas: None,
            safety_poll: crate::wakeups::DEFAULT_SAFETY_POLL,
        }
    }

    /// How to open the subscription connection of the store's waiters.
    fn opener(&self) -> Opener {
        let (connection_timeout, response_timeout) =
            (self.connection_timeout, self.response_timeout);
        match &self.source {
            Source::Client(client) => match client.as_ref() {
                Ok(client) => Opener::Standalone {
                    info: Box::new(client.get_connection_info().clone()),
                    connection_timeout,
                    response_timeout,
                },
                Err(_) => Opener::None,
            },
            Source::Cluster(Ok(nodes)) => Opener::Cluster {
                nodes: nodes.clone(),
                connection_timeout,
                response_timeout,
            },
            Source::Cluster(Err(_)) | Source::Manager(_) => Opener::None,
        }
    }

    /// Prepended to every key (default [`DEFAULT_KEY_PREFIX`]), so records never collide
    /// with other data in the same Redis database. Stores with different prefixes are
    /// independent.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// How long one connection attempt may take (default 1 s). Ignored when the builder
    /// was made from a [`ConnectionManager`], which has its own settings.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long one operation waits for Redis's reply before failing with
    /// [`StoreError::Backend`](orchestrix::store::StoreError::Backend) (default 2 s).
    /// Ignored when the builder was made from a [`ConnectionManager`].
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The largest result, in bytes, that is stored (default
    /// [`DEFAULT_MAX_RESULT_SIZE`]). A larger one still finishes its record, without the
    /// result, and is reported as
    /// [`StoreError::TooLarge`](orchestrix::store::StoreError::TooLarge).
    pub fn max_result_size(mut self, bytes: usize) -> Self {
        self.max_result_size = bytes;
        self
    }

    /// The largest, in bytes, a durable run's record may grow to: its journal (input and
    /// entries, each with an 8-byte length), fingerprint and 76-byte header (default
    /// [`DEFAULT_MAX_JOURNAL_BYTES`], 64 MiB; at most Redis's own limit for one value,
    /// 512 MiB, to which larger settings are lowered). A durable start whose input, or an
    /// append whose entry, would pass it is
    /// [`StoreError::TooLarge`](orchestrix::store::StoreError::TooLarge), and nothing is
    /// written. The result a finished run stores after its journal is bounded by
    /// [`max_result_size`](Self::max_result_size) instead.
    pub fn max_journal_bytes(mut self, bytes: usize) -> Self {
        self.max_journal_bytes = bytes.min(REDIS_MAX_VALUE);
        self
    }

    /// Opt-in: after each acquire (`start` that takes the key) and each finish of a plain
    /// run, `WAIT` until `replicas` replicas of the key's primary hold the write, for at
    /// most `timeout` (keep it under the [response timeout](Self::response_timeout)).
    ///
    /// Redis replicates asynchronously: a write its primary acknowledged may not have
    /// reached a replica when the primary dies, and the replica promoted in its place has
    /// never seen it, so a second caller can acquire the key and run it again. With this
    /// option an acquire that is not confirmed by `replicas` replicas in time is released
    /// and answered as [`StoreError::Backend`](orchestrix::store::StoreError::Backend)
    /// (nothing runs), and a finish not confirmed in time is answered as a backend error
    /// too (the record is finished on the primary, but may be lost with it). `WAIT` narrows
    /// the window, it does not close it: a failover may still promote the one replica that
    /// did not receive the write, and a write acknowledged by replicas is still lost if
    /// every one of them fails too. Each acquire and finish costs one more round trip and
    /// the replication delay (measured in `BENCHMARKS.md`). Durable runs' journal writes
    /// are not waited for.
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = Some(crate::Replicas { replicas, timeout });
        self
    }

    /// How long a run waiting for another caller's (`OnRunning::Wait`) sleeps at most
    /// between two looks at the record when no notification comes (default
    /// [`DEFAULT_SAFETY_POLL`](crate::DEFAULT_SAFETY_POLL), 1 s). Waiters are woken by the
    /// owner's finish or release through Redis pub/sub; this bounds how late a lost
    /// notification (or a record deleted, or expired, which publishes nothing) makes them.
    /// A store built from a [`ConnectionManager`] cannot open its subscription connection
    /// and polls every 50 ms instead.
    pub fn safety_poll_interval(mut self, interval: Duration) -> Self {
        self.safety_poll = interval;
        self
    }

    /// Connects now and returns the store.
    ///
    /// The connection reconnects by itself afterwards; an operation made while Redis is
    /// unreachable fails with `StoreError::Backend` within a few seconds.
    ///
    /// # Errors
    /// [`RedisStoreError::InvalidSettings`] for a malformed URL (or a `rediss://` URL
    /// without the `tls` feature); [`RedisStoreError::Connect`] when Redis does not answer.
    pub async fn connect(self) -> Result<RedisStore, RedisStoreError> {
        let wakeups = Wakeups::new(self.opener(), self.safety_poll);
        let conn = match self.source {
            Source::Manager(manager) => Connection::Standalone(manager),
            Source::Client(client) => {
                let client = (*client).map_err(RedisStoreError::InvalidSettings)?;
                let config = manager_config(self.connection_timeout, self.response_timeout);
                let manager = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(RedisStoreError::Connect)?;
                Connection::Standalone(manager)
            }
            Source::Cluster(nodes) => {
                let client = cluster_client(nodes, self.connection_timeout, self.response_timeout)?;
                let cluster: ClusterConnection = client
                    .get_async_connection()
                    .await
                    .map_err(RedisStoreError::Connect)?;
                Connection::Cluster(cluster)
            }
        };
        let limits = Limits {
            max_result_size: self.max_result_size,
            max_journal_bytes: self.max_journal_bytes,
            replicas: self.replicas,
            wakeups,
        };
        Ok(store(conn, self.key_prefix, limits))
    }

    /// Returns the store at once and connects on its first operation, for services that
    /// may start before Redis does. Until Redis answers, operations fail with
    /// `StoreError::Backend`: no run proceeds without an acquired record.
    ///
    /// # Errors
    /// [`RedisStoreError::InvalidSettings`] as for [`connect`](Self::connect);
    /// [`RedisStoreError::NoRuntime`] outside a Tokio runtime.
    pub fn connect_lazy(self) -> Result<RedisStore, RedisStoreError> {
        let wakeups = Wakeups::new(self.opener(), self.safety_poll);
        let conn = match self.source {
            Source::Manager(manager) => Connection::Standalone(manager),
            Source::Client(client) => {
                let client = (*client).map_err(RedisStoreError::InvalidSettings)?;
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(RedisStoreError::NoRuntime);
                }
                let config = manager_config(self.connection_timeout, self.response_timeout);
                let manager = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(RedisStoreError::InvalidSettings)?;
                Connection::Standalone(manager)
            }
            Source::Cluster(nodes) => {
                let client = cluster_client(nodes, self.connection_timeout, self.response_timeout)?;
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(RedisStoreError::NoRuntime);
                }
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(self.connection_timeout)
                    .set_response_timeout(self.response_timeout);
                Connection::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        let limits = Limits {
            max_result_size: self.max_result_size,
            max_journal_bytes: self.max_journal_bytes,
            replicas: self.replicas,
            wakeups,
        };
        Ok(store(conn, self.key_prefix, limits))
    }
}

impl From<Client> for RedisStoreBuilder {
    /// A builder over an existing client (its URL, credentials and TLS settings).
    fn from(client: Client) -> Self {
        Self::with_source(Source::Client(Box::new(Ok(client))))
    }
}

impl From<ConnectionManager> for RedisStoreBuilder {
    /// A builder over an existing, already configured connection manager; the builder's
    /// timeouts do not apply to it.
    fn from(manager: ConnectionManager) -> Self {
        Self::with_source(Source::Manager(manager))
    }
}

/// A cluster client over `nodes`, with the store's timeouts.
///
/// A command that meets a node down (a primary killed, not yet replaced by its replica)
/// is retried with the slot map refreshed, a few times, quickly, and the whole of one
/// command — retries, reconnections and redirections included — never takes longer than
/// one connection timeout plus two response timeouts: a store call fails in bounded time
/// rather than waiting out a failover.
fn cluster_client(
    nodes: Result<Vec<ConnectionInfo>, RedisError>,
    connection: Duration,
    response: Duration,
) -> Result<redis::cluster::ClusterClient, RedisStoreError> {
    let nodes = nodes.map_err(RedisStoreError::InvalidSettings)?;
    ClusterClientBuilder::new(nodes)
        .connection_timeout(connection)
        .response_timeout(response)
        .overall_response_timeout(Some(connection + response * 2))
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
        .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
        .build()
        .map_err(RedisStoreError::InvalidSettings)
}

/// Retries of one command on a cluster (redirections are not retries), and the bounds of
/// the wait before each, in ms: a failover's new primary is found within a few hundred ms
/// of the cluster electing it.
const CLUSTER_RETRIES: u32 = 8;
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 20;
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 500;

fn manager_config(connection: Duration, response: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connection))
        .set_response_timeout(Some(response))
        .set_number_of_retries(RECONNECT_RETRIES)
        .set_max_delay(connection)
}

/// The sizes a store refuses to store past.
struct Limits {
    max_result_size: usize,
    max_journal_bytes: usize,
    replicas: Option<crate::Replicas>,
    wakeups: Arc<Wakeups>,
}

fn store(conn: Connection, key_prefix: String, limits: Limits) -> RedisStore {
    RedisStore {
        conn,
        key_prefix: Arc::from(key_prefix),
        max_result_size: limits.max_result_size,
        max_journal_bytes: limits.max_journal_bytes,
        replicas: limits.replicas,
        wakeups: limits.wakeups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's own limit for one string value (and, by default, one argument).
    const REDIS_MAX_VALUE: usize = 512 * 1024 * 1024;

    /// The largest record that can hold a result of the default limit is exactly as long
    /// as Redis allows a value to be.
    #[test]
    fn the_default_result_limit_leaves_room_for_the_largest_record_around_it() {
        assert_eq!(
            DEFAULT_MAX_RESULT_SIZE + crate::record::MAX_OVERHEAD,
            REDIS_MAX_VALUE
        );
    }
}
