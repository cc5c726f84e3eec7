//! A Redis [`IdempotencyStore`] for Orchestrix: share idempotency keys across every
//! process and machine that talks to the same Redis.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use orchestrix::store::IdempotencyStore;
//! use orchestrix_redis::RedisStore;
//!
//! let store = RedisStore::builder("redis://:secret@127.0.0.1:6379")
//!     .key_prefix("billing:")
//!     .connect()
//!     .await?;
//! // Hand it to flows as their store; one store (and one connection) serves them all.
//! let store: Arc<dyn IdempotencyStore> = Arc::new(store);
//!
//! // A Redis Cluster: a few seed nodes, the same options.
//! let cluster = RedisStore::cluster(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
//!     .key_prefix("billing:")
//!     .connect()
//!     .await?;
//! # let _ = (store, cluster); Ok(()) }
//! ```
//!
//! # Why it is built this way
//!
//! * **One round trip per operation, native where possible.** Redis runs a Lua script
//!   several times slower than a native command (even a lean fenced script costs the
//!   server 3–6 µs per `EVALSHA`, a simple command ~1 µs), and under load Redis's CPU is
//!   the limit. So the operations that make up almost all traffic are native: `get` is one
//!   `GET`, `delete` one `DEL`, and `start` (unless it re-runs failures) one
//!   `SET key <running record> NX PX <lease> GET`, which writes the running record only
//!   if the key is free and otherwise answers the value holding it (Redis ≥ 7.0). A fresh
//!   idempotent run costs two commands (`start`, `complete`) and a replay one native `SET`.
//! * **Scripts only for fenced writes and re-runs of failures.** `complete`, `fail`,
//!   `renew`, `release` and a `start` that may take over a failed record must read, decide
//!   and write atomically: each is one Lua script, called with `EVALSHA` (reloaded
//!   automatically if the server answers `NOSCRIPT`). The fenced scripts are written for
//!   Redis's CPU: one comparison fences, integer replies, every argument written once
//!   into the command, no per-call allocation for the token.
//! * **Redis's clock decides expiry.** A running record's key expires after its lease and a
//!   finished record's after its TTL (`PX`; no TTL is a `SET` without expiry). Redis removes
//!   expired records itself, so [`cleanup`](IdempotencyStore::cleanup) has nothing to do,
//!   and no client's clock skew can free a key early or keep it late.
//! * **Fencing in the server.** `complete`, `fail`, `renew` and `release` are applied only
//!   when the running record's token is the caller's; otherwise nothing is written and the
//!   caller gets [`StoreError::StaleToken`].
//! * **One server or a Redis Cluster.** [`RedisStore::cluster`] connects to a cluster
//!   through its seed nodes (the `redis` crate's `cluster-async` client, which follows
//!   `MOVED`/`ASK` and failovers). A record is one string under one key (`prefix` + key),
//!   in a compact, versioned encoding (version, status and token at fixed offsets, then the
//!   fingerprint and the result), and every command or script touches only that key, so it
//!   always lives in a single hash slot. Replication is asynchronous: a failover can lose
//!   the last acquires and finishes; [`wait_for_replicas`](RedisStoreBuilder::wait_for_replicas)
//!   narrows that window (the README states what each deployment can lose).
//! * **Waiters are woken, not polling.** The finish and release scripts `SPUBLISH` on the
//!   key's channel; a store's waiters share one subscription connection, with a slow safety
//!   poll ([`safety_poll_interval`](RedisStoreBuilder::safety_poll_interval)) so that a lost
//!   notification never loses a waiter.
//! * **Garbage is an error, never free.** A value written under the key by something else —
//!   another Redis type, a string that is not a well-formed record — is
//!   [`StoreError::Decode`]; a record of another schema version is
//!   [`StoreError::UnsupportedVersion`]. `start` never overwrites such a value (one
//!   exception: a re-run without a fingerprint takes over a failed record whose stored
//!   fingerprint is not UTF-8, which the script cannot check; it is replaced by a
//!   well-formed record, never read). A fenced write that finds a foreign *string* under
//!   the key answers [`StoreError::StaleToken`] and writes nothing; `complete` or `fail`
//!   of a running record that carries the caller's token but is otherwise not what this
//!   store writes is [`StoreError::Decode`], and writes nothing either.
//! * **A refused result still finishes the record.** A result over
//!   [`max_result_size`](RedisStoreBuilder::max_result_size) is not sent: the record is
//!   finished without it and `finish` answers [`StoreError::TooLarge`]. A result Redis
//!   refuses — `OOM` under `maxmemory` with `noeviction`, or an argument over
//!   `proto-max-bulk-len` (a protocol error, or a connection Redis resets while the
//!   argument is still arriving) — is followed by a second, fenced write that finishes the
//!   record without it, and `finish` answers [`StoreError::ResultRefused`]: either way the
//!   operation never runs again. That second write may run out of memory (it replaces the
//!   running record by one of the same length), and is repeated on the new connection when
//!   Redis closed the old one. Only a Redis that refuses it too (unreachable, read-only, or
//!   refusing every write with `MISCONF` because it cannot persist) leaves the record
//!   running until its lease lapses, with [`StoreError::Backend`]. A dropped connection or
//!   a timeout counts as a refusal only when the result is over 1 MiB, the smallest
//!   `proto-max-bulk-len` Redis accepts; on a smaller one it is a backend failure the
//!   caller may retry.
//! * **A finish may be retried.** `complete` or `fail` that finds the record already
//!   finished by the same token, with the same status and the same result (an earlier
//!   attempt was applied, and its reply lost), answers `Ok`; with the same status but no
//!   result stored, it answers `ResultRefused` and stores nothing (a finished record is
//!   never rewritten). A different status or result is `StaleToken`. `release` is not
//!   recognised that way: once the key is deleted nothing shows who deleted it, so a
//!   `release` retried after its reply was lost answers `StaleToken` (the key is free).
//! * **Durable records keep their journal under the same key.** For durable flows the
//!   store is a [`JournalStore`]: the lease deadline lives inside the value (compared
//!   with Redis's `TIME`) and the key's expiry is the retention, so an abandoned run keeps
//!   its journal; uppercase status letters keep the plain start and scripts from ever
//!   taking one for theirs; the journal comes last, so an append is one fenced `APPEND`
//!   whatever its length. [`abandoned`](JournalStore::abandoned) reads a sorted set of
//!   lease hints kept beside the records (pipelined with each durable operation) and
//!   verifies every candidate against its record. The README has the layout and costs.
//! * **Fail closed, in bounded time.** Connections time out (1 s to connect, 2 s per reply
//!   by default) and reconnect in the background; while Redis is unreachable every
//!   operation is [`StoreError::Backend`], so no run executes without an acquired record.
//!
//! The record layout is described in the crate's README.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod builder;
mod connection;
mod durable;
mod record;
mod scripts;
mod wakeups;

use std::fmt;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, JournalStore, Record, RecordAdmin, RecordStatus,
    StartOutcome, StartRequest, StoreError, Wait,
};
use redis::{
    Cmd, ErrorKind, IntoConnectionInfo, RedisError, RedisWrite, Script, ServerErrorKind, Value,
};

pub use builder::{
    DEFAULT_KEY_PREFIX, DEFAULT_MAX_RESULT_SIZE, RedisStoreBuilder, RedisStoreError,
};
pub use durable::DEFAULT_MAX_JOURNAL_BYTES;
/// The `redis` crate this store is built on, so a [`redis::Client`] or
/// [`redis::aio::ConnectionManager`] handed to [`RedisStoreBuilder`] has the matching version.
pub use redis;
pub use wakeups::{DEFAULT_SAFETY_POLL, SUBSCRIBER_NAME};

use scripts::{Reply, SCRIPTS};

/// Longest expiry handed to Redis: about a century. Longer durations are clamped, since
/// Redis rejects expiry times that overflow its clock (and would do so after the script
/// has already written).
const MAX_EXPIRY_MS: u128 = 100 * 365 * 24 * 60 * 60 * 1000;

/// The most digits a `u64` argument (an expiry in milliseconds) takes, for sizing commands.
const U64_DIGITS: usize = 20;

/// An [`IdempotencyStore`] in Redis ≥ 7.0 (standalone, or any server speaking its protocol
/// with Lua scripting and `SET ... NX GET`, such as Valkey).
///
/// Cheap to clone: clones share one multiplexed, self-reconnecting connection. See the
/// [crate documentation](crate) for the guarantees.
#[derive(Clone)]
pub struct RedisStore {
    conn: connection::Connection,
    key_prefix: Arc<str>,
    max_result_size: usize,
    /// The largest a durable record may grow to.
    max_journal_bytes: usize,
    /// `WAIT` for this many replicas after acquires and finishes, if set.
    replicas: Option<Replicas>,
    /// Waiters woken by pub/sub, shared by the store's clones.
    wakeups: Arc<wakeups::Wakeups>,
}

/// [`RedisStoreBuilder::wait_for_replicas`]'s setting.
#[derive(Debug, Clone, Copy)]
struct Replicas {
    replicas: u32,
    timeout: Duration,
}

/// A write the primary applied that fewer replicas than asked confirmed in time.
#[derive(Debug, thiserror::Error)]
#[error("the write reached {acked} of the {asked} replicas asked for within {timeout:?}")]
struct NotReplicated {
    acked: u64,
    asked: u32,
    timeout: Duration,
}

impl RedisStore {
    /// A builder for a store at `url` (`redis://[:password@]host[:port][/db]`, or
    /// `rediss://` with this crate's `tls` feature), or any other
    /// [`IntoConnectionInfo`].
    pub fn builder(url: impl IntoConnectionInfo) -> RedisStoreBuilder {
        RedisStoreBuilder::new(url)
    }

    /// A builder for a store on a Redis Cluster, reached through `nodes` (a few of its
    /// nodes' URLs, `redis://host:port`; the client learns the rest of the cluster from
    /// them). The builder's options are the same as for one server.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), orchestrix_redis::RedisStoreError> {
    /// use orchestrix_redis::RedisStore;
    ///
    /// let store = RedisStore::cluster(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
    ///     .key_prefix("billing:")
    ///     .connect()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn cluster<T: IntoConnectionInfo>(nodes: impl IntoIterator<Item = T>) -> RedisStoreBuilder {
        RedisStoreBuilder::cluster(nodes)
    }

    /// The prefix every key is stored under.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// A command: `head`, the Redis key of `key`, then room for `args` more arguments of
    /// `arg_bytes` bytes in all. Every argument is copied once, straight into the command's
    /// buffer (a `redis::ScriptInvocation` would first copy each into a `Vec` of its own,
    /// and the key would be a `String` of its own).
    fn command(
        &self,
        head: &[&str],
        key: &str,
        args: usize,
        arg_bytes: usize,
    ) -> Result<Cmd, StoreError> {
        let head_bytes: usize = head.iter().map(|arg| arg.len()).sum();
        let key_bytes = self.key_prefix.len() + key.len();
        let mut cmd = Cmd::with_capacity(head.len() + 1 + args, head_bytes + key_bytes + arg_bytes);
        for arg in head {
            cmd.arg(*arg);
        }
        push_joined(&mut cmd, &[self.key_prefix.as_bytes(), key.as_bytes()])?;
        Ok(cmd)
    }

    /// `EVALSHA` of `script` on `key` (every script takes exactly that one key); see
    /// [`command`](Self::command).
    fn evalsha(
        &self,
        script: &Script,
        key: &str,
        args: usize,
        arg_bytes: usize,
    ) -> Result<Cmd, StoreError> {
        self.command(&["EVALSHA", script.get_hash(), "1"], key, args, arg_bytes)
    }

    /// Runs an [`evalsha`](Self::evalsha) command of `script`. A server that lost its
    /// scripts (restart, failover, `SCRIPT FLUSH`) answers `NOSCRIPT`: the script is loaded
    /// and the command sent once more, as `redis::ScriptInvocation::invoke_async` does.
    async fn eval(&self, script: &Script, cmd: &Cmd) -> Result<Reply, StoreError> {
        Reply::parse(self.query(script, cmd).await.map_err(StoreError::backend)?)
    }

    /// [`eval`](Self::eval), answering Redis's error as it is.
    async fn query(&self, script: &Script, cmd: &Cmd) -> Result<Value, RedisError> {
        let mut conn = self.conn.clone();
        match cmd.query_async::<Value>(&mut conn).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script.load_async(&mut conn).await?;
                cmd.query_async(&mut conn).await
            }
            value => value,
        }
    }

    /// Finishes the owned record without its result, because `cause` (the result is over
    /// the store's limit, or Redis refused it), and answers `cause` once it is finished.
    ///
    /// The script is the `allow-oom` form, so it gets through while Redis is still out of
    /// memory from the refused write. A connection Redis closed after refusing the result
    /// is reopened by the connection manager on the next command, so an attempt that finds
    /// the connection lost is repeated (a finish recognises its own earlier write, so a
    /// repeat is safe).
    async fn finish_without_result(
        &self,
        script: &Script,
        key: &str,
        token: FencingToken,
        ttl: Option<Duration>,
        cause: StoreError,
    ) -> Result<(), StoreError> {
        let fence = record::running_prefix(token);
        let mut cmd = self.evalsha(script, key, 2, fence.len() + U64_DIGITS)?;
        cmd.arg(&fence[..]);
        if let Some(ttl) = ttl {
            cmd.arg(millis(ttl));
        }
        let mut attempt = 1;
        let value = loop {
            match self.query(script, &cmd).await {
                Ok(value) => break value,
                Err(err) if attempt < WITHOUT_RESULT_ATTEMPTS && connection_lost(&err) => {
                    attempt += 1;
                }
                Err(err) => {
                    return Err(StoreError::backend(NotFinished { cause, source: err }));
                }
            }
        };
        match Reply::parse(value)? {
            Reply::Ok | Reply::AlreadyFinished => Err(cause),
            // The refused write was applied after all (its reply was what got lost).
            Reply::AlreadyFinishedWithResult => Ok(()),
            reply => Err(fenced_error(reply)),
        }
    }

    /// For a waiter: `None` when `key`'s record is no longer running (or cannot be read),
    /// else the time its lease has left (`GETRANGE` of the status byte and `PTTL`, one
    /// round trip).
    async fn lease_left(&self, key: &str) -> Option<Duration> {
        let redis_key = [self.key_prefix.as_bytes(), key.as_bytes()].concat();
        let mut pipe = redis::pipe();
        pipe.cmd("GETRANGE").arg(&redis_key).arg(1).arg(1);
        pipe.cmd("PTTL").arg(&redis_key);
        let mut conn = self.conn.clone();
        let (status, pttl): (Vec<u8>, i64) = pipe.query_async(&mut conn).await.ok()?;
        // 'r' a plain running record, 'R' a durable one (whose lease is inside the value,
        // and whose key lives for its retention: the safety poll bounds that wait).
        match (status.first(), u64::try_from(pttl)) {
            (Some(b'r' | b'R'), Ok(ms)) => Some(Duration::from_millis(ms)),
            (Some(b'r' | b'R'), Err(_)) => Some(Duration::MAX),
            _ => None,
        }
    }

    /// With [`wait_for_replicas`](RedisStoreBuilder::wait_for_replicas): `WAIT` for the
    /// replicas of `key`'s primary to hold what was just written to it.
    async fn await_replicas(&self, key: &str) -> Result<(), StoreError> {
        let Some(Replicas { replicas, timeout }) = self.replicas else {
            return Ok(());
        };
        let redis_key = [self.key_prefix.as_bytes(), key.as_bytes()].concat();
        let mut conn = self.conn.clone();
        let acked = conn
            .wait_for_replicas(&redis_key, replicas, millis(timeout))
            .await
            .map_err(StoreError::backend)?;
        if acked < u64::from(replicas) {
            return Err(StoreError::backend(NotReplicated {
                acked,
                asked: replicas,
                timeout,
            }));
        }
        Ok(())
    }

    /// [`finish`](IdempotencyStore::finish) without the replicas' confirmation: one fenced
    /// script that finishes the record with its result, one per final status, so the
    /// status is a literal in the script rather than an argument. A result over the store's
    /// limit, or one Redis refuses, is replaced by a finish without it.
    async fn finish_record(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        if let Some(finished) = self.finish_durable(key, token, status, result, ttl).await {
            return finished;
        }
        let scripts = match status {
            FinalStatus::Completed => &SCRIPTS.complete,
            FinalStatus::Failed => &SCRIPTS.fail,
        };
        let size = result.len();
        if size > self.max_result_size {
            let too_large = StoreError::TooLarge {
                size,
                limit: self.max_result_size,
            };
            let script = &scripts.without_result;
            return self
                .finish_without_result(script, key, token, ttl, too_large)
                .await;
        }
        let script = &scripts.with_result;
        let fence = record::running_prefix(token);
        // The finished record's tail: the result behind its flag.
        let tail = 1 + size;
        let mut cmd = self.evalsha(script, key, 3, fence.len() + tail + U64_DIGITS)?;
        cmd.arg(&fence[..]);
        push_joined(&mut cmd, &[&[record::HAS_RESULT], result])?;
        if let Some(ttl) = ttl {
            cmd.arg(millis(ttl));
        }
        let reply = match self.query(script, &cmd).await {
            Ok(value) => Reply::parse(value)?,
            Err(err) if refused_result(&err, tail) => {
                let refused = StoreError::ResultRefused {
                    size,
                    source: Box::new(err),
                };
                let script = &scripts.without_result;
                return self
                    .finish_without_result(script, key, token, ttl, refused)
                    .await;
            }
            Err(err) => return Err(StoreError::backend(err)),
        };
        match reply {
            Reply::Ok | Reply::AlreadyFinished => Ok(()),
            Reply::AlreadyFinishedWithoutResult => Err(StoreError::ResultRefused {
                size,
                source: Box::new(FinishedEarlierWithoutResult),
            }),
            reply => Err(fenced_error(reply)),
        }
    }

    /// `renew` (with the new lease) and `release` (without): one fenced script.
    async fn fenced(
        &self,
        script: &Script,
        key: &str,
        token: FencingToken,
        lease: Option<Duration>,
    ) -> Result<(), StoreError> {
        let fence = record::running_prefix(token);
        let mut cmd = self.evalsha(script, key, 2, fence.len() + U64_DIGITS)?;
        cmd.arg(&fence[..]);
        if let Some(lease) = lease {
            cmd.arg(millis(lease));
        }
        match self.eval(script, &cmd).await? {
            Reply::Ok => Ok(()),
            reply => Err(fenced_error(reply)),
        }
    }
}

impl fmt::Debug for RedisStore {
    // The connection's own Debug would print its connection info, password included.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.key_prefix)
            .field("max_result_size", &self.max_result_size)
            .field("max_journal_bytes", &self.max_journal_bytes)
            .finish_non_exhaustive()
    }
}

/// The error of a native command: `WRONGTYPE` (the key holds a hash, a list, ... written by
/// something else) is an undecodable record, anything else a backend failure.
fn native_error(err: redis::RedisError) -> StoreError {
    if err.code() == Some("WRONGTYPE") {
        record::UndecodableRecord::WrongType("value of another type than string".to_owned()).into()
    } else {
        StoreError::backend(err)
    }
}

/// Appends `parts` to `cmd` as one argument, copying each once.
fn push_joined(cmd: &mut Cmd, parts: &[&[u8]]) -> Result<(), StoreError> {
    let mut arg = cmd.writer_for_next_arg();
    // Writing to the command's buffer cannot fail; should it, the command is dropped with
    // this error rather than sent with a truncated argument.
    parts
        .iter()
        .try_for_each(|part| arg.write_all(part))
        .map_err(|err| StoreError::Encode(err.into()))
}

/// How often [`RedisStore::finish_without_result`] is sent when it finds the connection
/// lost: Redis closes the connection after refusing an argument over its length limit, and
/// the first command after that learns it; the next goes over a new connection.
const WITHOUT_RESULT_ATTEMPTS: u32 = 3;

/// The smallest `proto-max-bulk-len` Redis accepts (1 MiB): no argument up to this length
/// is ever refused for its length.
const MIN_PROTO_MAX_BULK_LEN: usize = 1024 * 1024;

/// Whether Redis refused a finish for the size of its result or for memory, rather than
/// failing to answer, so the record must be finished without the result. `longest_arg` is
/// the length of the command's longest argument (the result behind its flag).
///
/// What Redis does (observed on 7.0): out of memory under `noeviction`, the script's write
/// fails with an `OOM` error reply. An argument over `proto-max-bulk-len` is answered with
/// `ERR Protocol error: invalid bulk length` and the connection closed; or, when the
/// argument is much longer than the limit, the connection is reset while it is still being
/// sent and the client sees only a dropped connection. Such a lost connection (or a reply
/// that timed out) on an argument no longer than the smallest limit Redis accepts is never
/// a refusal: it is left to the caller as a backend failure.
fn refused_result(err: &RedisError, longest_arg: usize) -> bool {
    match err.code() {
        Some("OOM") => true,
        Some("ERR") => err
            .detail()
            .is_some_and(|detail| detail.starts_with("Protocol error")),
        Some(_) => false,
        None => longest_arg > MIN_PROTO_MAX_BULK_LEN && (connection_lost(err) || err.is_timeout()),
    }
}

/// The connection broke under the command: it may or may not have been applied.
fn connection_lost(err: &RedisError) -> bool {
    err.is_connection_dropped() || err.is_io_error()
}

/// A finish whose result Redis refused, and whose fallback without the result failed too:
/// the record stays running until its lease lapses.
#[derive(Debug, thiserror::Error)]
#[error(
    "{cause}; finishing the record without it failed too, so it stays running until its lease lapses"
)]
struct NotFinished {
    cause: StoreError,
    #[source]
    source: RedisError,
}

/// A finish with a result found the record already finished by the same owner, with the
/// same status, without a result: an earlier attempt of the same finish fell back to that.
#[derive(Debug, thiserror::Error)]
#[error("an earlier attempt of this finish stored the record without its result")]
struct FinishedEarlierWithoutResult;

/// The error of a fenced write that was not applied.
fn fenced_error(reply: Reply) -> StoreError {
    match reply {
        Reply::Stale => StoreError::StaleToken,
        other => other.into_error(),
    }
}

/// A duration as whole milliseconds for `PX` / `PEXPIRE`: rounded up, so a sub-millisecond lease
/// never becomes 0 (which would delete the key at once), and clamped to [`MAX_EXPIRY_MS`].
fn millis(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000).clamp(1, MAX_EXPIRY_MS);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = self
            .command(&["GET"], key, 0, 0)?
            .query_async(&mut conn)
            .await
            .map_err(native_error)?;
        value.map(|value| record::decode(key, &value)).transpose()
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        // Even: a plain run's token (a durable run's is odd, see `durable`).
        let token = durable::plain_token();
        let running = record::encode(RecordStatus::Running, token, req.fingerprint, None)?;
        let existing = if req.rerun_failed {
            let script = &SCRIPTS.start_rerun;
            let fingerprint = req.fingerprint.unwrap_or("");
            let mut cmd = self.evalsha(
                script,
                req.key,
                3,
                running.len() + U64_DIGITS + fingerprint.len(),
            )?;
            cmd.arg(&running[..]).arg(millis(req.lease));
            if let Some(fingerprint) = req.fingerprint {
                cmd.arg(fingerprint);
            }
            match self.eval(script, &cmd).await? {
                Reply::Acquired => None,
                Reply::Record(value) => Some(value),
                reply => return Err(reply.into_error()),
            }
        } else {
            // Redis >= 7.0: NX with GET sets only an absent key and answers the value that
            // holds it (nil when it set), in one native command.
            let mut conn = self.conn.clone();
            self.command(&["SET"], req.key, 5, running.len() + 8 + U64_DIGITS)?
                .arg(&running[..])
                .arg("NX")
                .arg("PX")
                .arg(millis(req.lease))
                .arg("GET")
                .query_async(&mut conn)
                .await
                .map_err(native_error)?
        };
        match existing {
            None => {
                if let Err(err) = self.await_replicas(req.key).await {
                    // Not confirmed: give the key back rather than run on a record a
                    // failover could lose (best effort; the lease lapses otherwise).
                    let _ = self.fenced(&SCRIPTS.release, req.key, token, None).await;
                    return Err(err);
                }
                Ok(StartOutcome::Acquired(token))
            }
            Some(value) => record::decode(req.key, &value).map(StartOutcome::Existing),
        }
    }

    // The record's finish, then (if asked for) the replicas' confirmation of it.
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.finish_record(key, token, status, result, ttl).await?;
        self.await_replicas(key).await
    }

    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        if let Some(renewed) = self.renew_durable(key, token, lease).await {
            return renewed;
        }
        self.fenced(&SCRIPTS.renew, key, token, Some(lease)).await
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        if let Some(released) = self.release_durable(key, token).await {
            return released;
        }
        self.fenced(&SCRIPTS.release, key, token, None).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.delete_with_lease_entry(key).await
    }

    /// Woken by the finish or release of the record (sharded pub/sub, one subscription
    /// connection per store), with a slow safety poll: see the crate's README.
    async fn wait_for_change(&self, key: &str, wait: Wait) -> Result<(), StoreError> {
        let channel = [self.key_prefix.as_bytes(), key.as_bytes()].concat();
        self.wakeups
            .wait(channel, wait.max(), || self.lease_left(key))
            .await;
        Ok(())
    }

    fn journal_store(&self) -> Option<&dyn JournalStore> {
        Some(self)
    }

    fn admin(&self) -> Option<&dyn RecordAdmin> {
        Some(self)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_millis_round_up_and_never_reach_zero() {
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_micros(1_500)), 2);
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
    }

    #[test]
    fn absurd_expiries_are_clamped_to_a_century() {
        assert_eq!(millis(Duration::MAX), 3_153_600_000_000);
    }
}
