//! The one connection a store sends everything through: a standalone server's
//! self-reconnecting [`ConnectionManager`], or a Redis Cluster's [`ClusterConnection`].
//!
//! Both are multiplexed and cheap to clone, and both implement [`ConnectionLike`], so every
//! command, script and pipeline of the store is written once. Where a cluster differs:
//!
//! * A command is routed by its key (an `EVALSHA` by its one key), and the cluster client
//!   follows `MOVED` and `ASK` redirections and refreshes its slot map by itself.
//! * A pipeline that is not a transaction may span hash slots (a durable record and the
//!   lease index; a listing's reads of many keys): on a cluster its commands are sent one
//!   by one, concurrently, each to its key's node, and their replies put back in order, so
//!   it still costs one round trip of wall time. A command's error reply stays in its place,
//!   as in a pipeline; only a failure to reach a node fails the whole.
//! * `SCRIPT LOAD` goes to every primary (the cluster client routes it so), so a `NOSCRIPT`
//!   after a failover is mended on the new primary as on a standalone server.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, ServerError, Value};

/// See the [module documentation](self).
#[derive(Clone)]
pub(crate) enum Connection {
    /// One server (or a proxy in front of many).
    Standalone(ConnectionManager),
    /// A Redis Cluster, reached through its seed nodes.
    Cluster(ClusterConnection),
}

impl Connection {
    /// Whether this is a cluster connection.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Sends `cmd` to the primary that holds `slot`: the standalone server, or on a
    /// cluster the primary serving that slot now.
    pub(crate) async fn query_on_slot(
        &mut self,
        cmd: &Cmd,
        slot: u16,
    ) -> Result<Value, RedisError> {
        match self {
            Self::Standalone(conn) => cmd.query_async(conn).await,
            Self::Cluster(conn) => {
                let route = redis::cluster_routing::Route::new(slot, SlotAddr::Master);
                conn.route_command(
                    cmd.clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await
            }
        }
    }
}

impl Connection {
    /// `WAIT replicas timeout_ms` on the primary that holds `key` (the standalone server, or
    /// on a cluster the key's primary: the client would send a bare `WAIT` to every
    /// primary): how many replicas acknowledged every write sent before it over this
    /// connection to that server.
    pub(crate) async fn wait_for_replicas(
        &mut self,
        key: &[u8],
        replicas: u32,
        timeout_ms: u64,
    ) -> Result<u64, RedisError> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout_ms);
        let value = match self {
            Self::Standalone(conn) => cmd.query_async(conn).await?,
            Self::Cluster(conn) => {
                let route = redis::cluster_routing::Route::with_key(key, SlotAddr::Master);
                conn.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await?
            }
        };
        Ok(redis::from_redis_value(value)?)
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            // A transaction must stay one request (the server refuses it across slots).
            Self::Cluster(conn) => {
                if pipeline.is_transaction() {
                    conn.req_packed_commands(pipeline, offset, count)
                } else {
                    Box::pin(spread(conn.clone(), pipeline, offset, count))
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A pipeline's commands sent concurrently, each routed by its own key; their replies in
/// order, each error reply in its command's place.
async fn spread(
    conn: ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> Result<Vec<Value>, RedisError> {
    let sends = pipeline.cmd_iter().map(|cmd| {
        let mut conn = conn.clone();
        async move {
            match conn.req_packed_command(cmd).await {
                Ok(value) => Ok(value),
                Err(err) => ServerError::try_from(err).map(Value::ServerError),
            }
        }
    });
    let replies = futures_util::future::try_join_all(sends).await?;
    Ok(replies.into_iter().skip(offset).take(count).collect())
}
