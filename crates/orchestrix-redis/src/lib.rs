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
//! # let _ = store; Ok(()) }
//! ```
//!
//! # Why it is built this way
//!
//! * **One round trip per operation, native where possible.** Redis runs a Lua script an
//!   order of magnitude slower than a native command (an `EVALSHA` costs the server
//!   ~15–25 µs, a simple command ~1 µs), and under load Redis's CPU is the limit. So the
//!   operations that make up almost all traffic are native: `get` is one `GET`, `delete`
//!   one `DEL`, and `start` (unless it re-runs failures) one
//!   `SET key <running record> NX PX <lease> GET`, which writes the running record only
//!   if the key is free and otherwise answers the value holding it (Redis ≥ 7.0). A fresh
//!   idempotent run costs two commands (`start`, `complete`) and a replay one native `SET`.
//! * **Scripts only for fenced writes and re-runs of failures.** `complete`, `fail`,
//!   `renew`, `release` and a `start` that may take over a failed record must read, decide
//!   and write atomically: each is one Lua script, called with `EVALSHA` (reloaded
//!   automatically if the server answers `NOSCRIPT`).
//! * **Redis's clock decides expiry.** A running record's key expires after its lease and a
//!   finished record's after its TTL (`PX`; no TTL is a `SET` without expiry). Redis removes
//!   expired records itself, so [`cleanup`](IdempotencyStore::cleanup) has nothing to do,
//!   and no client's clock skew can free a key early or keep it late.
//! * **Fencing in the server.** `complete`, `fail`, `renew` and `release` are applied only
//!   when the running record's token is the caller's; otherwise nothing is written and the
//!   caller gets [`StoreError::StaleToken`].
//! * **Cluster-safe keys.** A record is one string under one key (`prefix` + key), in a
//!   compact, versioned encoding (version, status and token at fixed offsets, then the
//!   fingerprint and the result), and every command or script touches only that key, so it
//!   always lives in a single hash slot.
//! * **Garbage is an error, never free.** A value written under the key by something else —
//!   another Redis type, a string that is not a well-formed record — is
//!   [`StoreError::Decode`]; a record of another schema version is
//!   [`StoreError::UnsupportedVersion`]. `start` never overwrites such a value (one
//!   exception: a re-run without a fingerprint takes over a failed record whose stored
//!   fingerprint is not UTF-8, which the script cannot check; it is replaced by a
//!   well-formed record, never read). A fenced write that finds a foreign *string* under
//!   the key answers [`StoreError::StaleToken`] and writes nothing.
//! * **Fail closed, in bounded time.** Connections time out (1 s to connect, 2 s per reply
//!   by default) and reconnect in the background; while Redis is unreachable every
//!   operation is [`StoreError::Backend`], so no run executes without an acquired record.
//!
//! The record layout is described in the crate's README.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod builder;
mod record;
mod scripts;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    FencingToken, IdempotencyStore, Record, RecordStatus, StartOutcome, StartRequest, StoreError,
};
use redis::aio::ConnectionManager;
use redis::{IntoConnectionInfo, Script, ScriptInvocation, Value};

pub use builder::{
    DEFAULT_KEY_PREFIX, DEFAULT_MAX_RESULT_SIZE, RedisStoreBuilder, RedisStoreError,
};
/// The `redis` crate this store is built on, so a [`redis::Client`] or
/// [`redis::aio::ConnectionManager`] handed to [`RedisStoreBuilder`] has the matching version.
pub use redis;

use scripts::{Reply, SCRIPTS};

/// Longest expiry handed to Redis: about a century. Longer durations are clamped, since
/// Redis rejects expiry times that overflow its clock (and would do so after the script
/// has already written).
const MAX_EXPIRY_MS: u128 = 100 * 365 * 24 * 60 * 60 * 1000;

/// An [`IdempotencyStore`] in Redis ≥ 7.0 (standalone, or any server speaking its protocol
/// with Lua scripting and `SET ... NX GET`, such as Valkey).
///
/// Cheap to clone: clones share one multiplexed, self-reconnecting connection. See the
/// [crate documentation](crate) for the guarantees.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    key_prefix: Arc<str>,
    max_result_size: usize,
}

impl RedisStore {
    /// A builder for a store at `url` (`redis://[:password@]host[:port][/db]`, or
    /// `rediss://` with this crate's `tls` feature), or any other
    /// [`IntoConnectionInfo`].
    pub fn builder(url: impl IntoConnectionInfo) -> RedisStoreBuilder {
        RedisStoreBuilder::new(url)
    }

    /// The prefix every key is stored under.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    fn redis_key(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.key_prefix.len() + key.len());
        full.push_str(&self.key_prefix);
        full.push_str(key);
        full
    }

    async fn call(&self, invocation: &ScriptInvocation<'_>) -> Result<Reply, StoreError> {
        let mut conn = self.conn.clone();
        let value: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(StoreError::backend)?;
        Reply::parse(value)
    }

    /// `complete` and `fail`: one fenced script that finishes the record.
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: RecordStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let fits = result.len() <= self.max_result_size;
        let mut invocation = SCRIPTS.finish.prepare_invoke();
        invocation
            .key(self.redis_key(key))
            .arg(token.to_string())
            .arg(&[record::status_code(status)][..])
            .arg(ttl.map_or(0, millis));
        if fits {
            invocation.arg(result);
        }
        match self.call(&invocation).await? {
            Reply::Ok if fits => Ok(()),
            Reply::Ok => Err(StoreError::TooLarge {
                size: result.len(),
                limit: self.max_result_size,
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
        let mut invocation = script.prepare_invoke();
        invocation.key(self.redis_key(key)).arg(token.to_string());
        if let Some(lease) = lease {
            invocation.arg(millis(lease));
        }
        match self.call(&invocation).await? {
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
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.redis_key(key))
            .query_async(&mut conn)
            .await
            .map_err(native_error)?;
        value.map(|value| record::decode(key, &value)).transpose()
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        let token = FencingToken::generate();
        let running = record::encode(RecordStatus::Running, token, req.fingerprint, None)?;
        let existing = if req.rerun_failed {
            let mut invocation = SCRIPTS.start_rerun.prepare_invoke();
            invocation
                .key(self.redis_key(req.key))
                .arg(running)
                .arg(millis(req.lease));
            if let Some(fingerprint) = req.fingerprint {
                invocation.arg(fingerprint);
            }
            match self.call(&invocation).await? {
                Reply::Acquired => None,
                Reply::Record(value) => Some(value),
                reply => return Err(reply.into_error()),
            }
        } else {
            // Redis >= 7.0: NX with GET sets only an absent key and answers the value that
            // holds it (nil when it set), in one native command.
            let mut conn = self.conn.clone();
            redis::cmd("SET")
                .arg(self.redis_key(req.key))
                .arg(running)
                .arg("NX")
                .arg("PX")
                .arg(millis(req.lease))
                .arg("GET")
                .query_async(&mut conn)
                .await
                .map_err(native_error)?
        };
        match existing {
            None => Ok(StartOutcome::Acquired(token)),
            Some(value) => record::decode(req.key, &value).map(StartOutcome::Existing),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.finish(key, token, RecordStatus::Completed, result, ttl)
            .await
    }

    async fn fail(
        &self,
        key: &str,
        token: FencingToken,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.finish(key, token, RecordStatus::Failed, result, ttl)
            .await
    }

    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.fenced(&SCRIPTS.renew, key, token, Some(lease)).await
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.fenced(&SCRIPTS.release, key, token, None).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(self.redis_key(key))
            .exec_async(&mut conn)
            .await
            .map_err(StoreError::backend)
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
