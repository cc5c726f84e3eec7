//! Durable records: the [`JournalStore`] of the Redis store.
//!
//! A durable run's record is the plain record's string with its lease deadline, retention
//! and journal inside ([`layout`]), under the same single key, so every operation stays
//! in one hash slot. Each operation is one Lua script on that key, sent in one round trip
//! with the command that keeps the lease index in step ([`index`]):
//!
//! | operation | Redis work |
//! | --- | --- |
//! | `start_durable` | `GETRANGE` of the header; a fresh record is one `SET`, a takeover one `SETRANGE` of token and lease (the journal is read once, to return it) |
//! | `append` | `GETRANGE` of the header, `STRLEN`, `APPEND`: never a copy of the journal |
//! | `renew`, `suspend` | `GETRANGE` of the header, `SETRANGE` of the deadline, `PEXPIRE` |
//! | `finish` | `GETRANGE`, `STRLEN`, `SETRANGE` of the status, `APPEND` of the result |
//! | `release` | `GETRANGE`, `DEL` |
//! | `redrive` | `GET`, `SET` of the record without its failure (a copy; redrives are rare) |
//! | `read_journal` | one native `GET` |
//! | `abandoned` | see [`index`] |
//!
//! The base operations reach durable records too. `get` and the native `start` read them
//! (an abandoned record reads as running, and is never overwritten); `finish`, `renew` and
//! `release` tell a durable run's token by its lowest bit ([`layout`]) and send the durable
//! script in their one round trip.

pub(crate) mod admin;
mod index;
mod layout;
mod scripts;

use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, FinalStatus, Journal, JournalStore, Redrive,
    StoreError,
};
use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind, Value};

use crate::{
    FinishedEarlierWithoutResult, NotFinished, RedisStore, U64_DIGITS, WITHOUT_RESULT_ATTEMPTS,
    connection_lost, millis, native_error, push_joined, record, refused_result,
};
use index::Hint;
pub(crate) use layout::{REDIS_MAX_VALUE, is_durable_value, plain_token};
use scripts::{Reply, SCRIPTS};

/// The largest a durable record may grow to unless
/// [`RedisStoreBuilder::max_journal_bytes`](crate::RedisStoreBuilder::max_journal_bytes)
/// sets another: 64 MiB.
pub const DEFAULT_MAX_JOURNAL_BYTES: usize = 64 * 1024 * 1024;

/// How often a durable script is sent when Redis answers that it does not know it.
const NOSCRIPT_ATTEMPTS: u32 = 3;

/// Whether Redis answered that it does not know the script (restart, failover,
/// `SCRIPT FLUSH`).
fn is_noscript(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// The record under `key` when it is a durable one.
pub(crate) fn decode_record(
    key: &str,
    value: &[u8],
) -> Result<orchestrix::store::Record, StoreError> {
    layout::decode(key, value).map(|(record, _)| record)
}

impl RedisStore {
    /// Runs `cmd` (an `EVALSHA` of `script`), with `index` in the same round trip when
    /// given. A server that lost its scripts answers `NOSCRIPT`: the script is loaded and
    /// the round trip sent again (its index command is idempotent), a few times, since
    /// scripts flushed again between the load and the resend answer `NOSCRIPT` once more.
    async fn durable_eval(
        &self,
        script: &Script,
        cmd: Cmd,
        index: Option<Cmd>,
    ) -> Result<Reply, StoreError> {
        let value = self.durable_query(script, cmd, index).await;
        Reply::parse(value.map_err(StoreError::backend)?)
    }

    /// [`durable_eval`](Self::durable_eval), answering Redis's error as it is.
    async fn durable_query(
        &self,
        script: &Script,
        cmd: Cmd,
        index: Option<Cmd>,
    ) -> Result<Value, RedisError> {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        if let Some(index) = index {
            pipe.add_command(index);
        }
        // The index is a hint (see `index`): its command's failure never fails the record's
        // operation, which has been applied.
        pipe.ignore_errors();
        let mut conn = self.conn.clone();
        let send = async |conn: &mut crate::connection::Connection| {
            let replies: Vec<Value> = pipe.query_async(conn).await?;
            replies
                .into_iter()
                .next()
                .unwrap_or(Value::Nil)
                .extract_error()
        };
        let mut attempt = 1;
        loop {
            match send(&mut conn).await {
                Err(err) if is_noscript(&err) && attempt < NOSCRIPT_ATTEMPTS => {
                    script.load_async(&mut conn).await?;
                    attempt += 1;
                }
                value => return value,
            }
        }
    }

    /// An owner's write: `script` fenced on `token`, with `args` after the fence.
    fn fenced_cmd(
        &self,
        script: &Script,
        key: &str,
        token: FencingToken,
        args: usize,
        arg_bytes: usize,
    ) -> Result<Cmd, StoreError> {
        let fence = layout::running_prefix(token);
        let mut cmd = self.evalsha(script, key, 1 + args, fence.len() + arg_bytes)?;
        cmd.arg(&fence[..]);
        Ok(cmd)
    }

    /// After a stale owner's `finish` or `release`, whose pipelined `ZREM` may have removed
    /// the entry of the run that took the key over: the entry is made due, so the next
    /// `abandoned` verifies it. Best effort, on an error path: the new owner's next renewal
    /// adds the entry back anyway.
    async fn restore_lease_entry(&self, key: &str) {
        let mut conn = self.conn.clone();
        let _ = self
            .lease_hint(key, Hint::DueNow)
            .exec_async(&mut conn)
            .await;
    }

    /// `finish` of a durable run's record, or `None` when `token` is a plain run's (or the
    /// key holds a plain record that carries it): the caller sends the plain script.
    ///
    /// As for plain records, a result over the store's limit, or one Redis refuses, is
    /// replaced by a finish without it, so the run never runs again; and a finish that
    /// finds its own earlier write applied answers as that write did.
    pub(crate) async fn finish_durable(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Option<Result<(), StoreError>> {
        if !layout::is_durable(token) {
            return None;
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
            return self
                .finish_durable_without_result(scripts, key, token, ttl, too_large)
                .await;
        }
        let script = &scripts.with_result;
        // The finished record's tail: the result behind its flag.
        let tail = 1 + size;
        let cmd = async {
            let mut cmd = self.fenced_cmd(script, key, token, 2, tail + U64_DIGITS)?;
            push_joined(&mut cmd, &[&[record::HAS_RESULT], result])?;
            if let Some(ttl) = ttl {
                cmd.arg(millis(ttl));
            }
            Ok::<_, StoreError>(cmd)
        };
        let cmd = match cmd.await {
            Ok(cmd) => cmd,
            Err(err) => return Some(Err(err)),
        };
        let reply = match self
            .durable_query(script, cmd, Some(self.lease_done(key)))
            .await
        {
            Ok(value) => Reply::parse(value),
            Err(err) if refused_result(&err, tail) => {
                let refused = StoreError::ResultRefused {
                    size,
                    source: Box::new(err),
                };
                return self
                    .finish_durable_without_result(scripts, key, token, ttl, refused)
                    .await;
            }
            Err(err) => Err(StoreError::backend(err)),
        };
        Some(match reply {
            Ok(Reply::Ok | Reply::AlreadyFinished) => Ok(()),
            Ok(Reply::TooLarge(room)) => Err(StoreError::TooLarge { size, limit: room }),
            Ok(Reply::AlreadyFinishedWithoutResult) => Err(StoreError::ResultRefused {
                size,
                source: Box::new(FinishedEarlierWithoutResult),
            }),
            Ok(Reply::Plain) => return None,
            Ok(Reply::Stale) => {
                self.restore_lease_entry(key).await;
                Err(StoreError::StaleToken)
            }
            Ok(reply) => Err(reply.into_error()),
            Err(err) => Err(err),
        })
    }

    /// Finishes the owned durable record without its result, because `cause` (the result
    /// is over the store's limit, or Redis refused it), and answers `cause` once it is
    /// finished; `None` as for [`finish_durable`](Self::finish_durable).
    ///
    /// As the plain store's fallback: an `allow-oom` script (it appends one byte), repeated
    /// when it finds the connection lost (Redis closes it after refusing an argument over
    /// its length limit; a finish recognises its own earlier write, so a repeat is safe).
    async fn finish_durable_without_result(
        &self,
        scripts: &scripts::Finish,
        key: &str,
        token: FencingToken,
        ttl: Option<Duration>,
        cause: StoreError,
    ) -> Option<Result<(), StoreError>> {
        let script = &scripts.without_result;
        let mut attempt = 1;
        let value = loop {
            let cmd = self
                .fenced_cmd(script, key, token, 1, U64_DIGITS)
                .map(|mut cmd| {
                    if let Some(ttl) = ttl {
                        cmd.arg(millis(ttl));
                    }
                    cmd
                });
            let cmd = match cmd {
                Ok(cmd) => cmd,
                Err(err) => return Some(Err(err)),
            };
            match self
                .durable_query(script, cmd, Some(self.lease_done(key)))
                .await
            {
                Ok(value) => break value,
                Err(err) if attempt < WITHOUT_RESULT_ATTEMPTS && connection_lost(&err) => {
                    attempt += 1;
                }
                Err(err) => {
                    let not_finished = NotFinished { cause, source: err };
                    return Some(Err(StoreError::backend(not_finished)));
                }
            }
        };
        Some(match Reply::parse(value) {
            Ok(Reply::Ok | Reply::AlreadyFinished | Reply::TooLarge(_)) => Err(cause),
            // The refused write was applied after all (its reply was what got lost).
            Ok(Reply::AlreadyFinishedWithResult) => Ok(()),
            Ok(Reply::Plain) => return None,
            Ok(Reply::Stale) => {
                self.restore_lease_entry(key).await;
                Err(StoreError::StaleToken)
            }
            Ok(reply) => Err(reply.into_error()),
            Err(err) => Err(err),
        })
    }

    /// `renew` of a durable run's record, or `None` as for
    /// [`finish_durable`](Self::finish_durable).
    pub(crate) async fn renew_durable(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Option<Result<(), StoreError>> {
        if !layout::is_durable(token) {
            return None;
        }
        let script = &SCRIPTS.renew;
        let renewed = async {
            let mut cmd = self.fenced_cmd(script, key, token, 1, U64_DIGITS)?;
            cmd.arg(millis(lease));
            let hint = self.lease_hint(key, Hint::Raise(lease));
            self.durable_eval(script, cmd, Some(hint)).await
        };
        Some(match renewed.await {
            Ok(Reply::Ok) => Ok(()),
            Ok(Reply::Plain) => return None,
            Ok(reply) => Err(reply.into_error()),
            Err(err) => Err(err),
        })
    }

    /// `release` of a durable run's record, or `None` as for
    /// [`finish_durable`](Self::finish_durable).
    pub(crate) async fn release_durable(
        &self,
        key: &str,
        token: FencingToken,
    ) -> Option<Result<(), StoreError>> {
        if !layout::is_durable(token) {
            return None;
        }
        let script = &SCRIPTS.release;
        let released = async {
            let cmd = self.fenced_cmd(script, key, token, 0, 0)?;
            self.durable_eval(script, cmd, Some(self.lease_done(key)))
                .await
        };
        Some(match released.await {
            Ok(Reply::Ok) => Ok(()),
            Ok(Reply::Plain) => return None,
            Ok(Reply::Stale) => {
                self.restore_lease_entry(key).await;
                Err(StoreError::StaleToken)
            }
            Ok(reply) => Err(reply.into_error()),
            Err(err) => Err(err),
        })
    }

    /// `delete`: the record, and its lease entry if it was a durable run's, in one round
    /// trip.
    pub(crate) async fn delete_with_lease_entry(&self, key: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(self.command(&["DEL"], key, 0, 0)?)
            .add_command(self.lease_done(key))
            .ignore_errors();
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(StoreError::backend)?;
        let deleted = replies.into_iter().next().unwrap_or(Value::Nil);
        deleted
            .extract_error()
            .map(drop)
            .map_err(StoreError::backend)
    }

    /// What `read_journal`, `start_durable` and `redrive` show of a value that holds the
    /// key: a durable record without its journal, or any other record.
    fn shown(key: &str, reply: Reply) -> Result<orchestrix::store::Record, StoreError> {
        match reply {
            Reply::Durable { head, tail } => layout::decode_shown(key, &head, tail.as_deref()),
            Reply::Record(value) => record::decode(key, &value),
            other => Err(other.into_error()),
        }
    }
}

#[async_trait]
impl JournalStore for RedisStore {
    async fn start_durable(
        &self,
        req: DurableStart<'_>,
    ) -> Result<DurableStartOutcome, StoreError> {
        let body = layout::body(req.fingerprint, req.input)?;
        let size = layout::fresh_len(&body);
        if size > self.max_journal_bytes {
            return Err(StoreError::TooLarge {
                size,
                limit: self.max_journal_bytes,
            });
        }
        let token = layout::durable_token();
        let retain = layout::retention_field(req.retain);
        let script = &SCRIPTS.start;
        let mut cmd = self.fenced_cmd(
            script,
            req.key,
            token,
            4,
            U64_DIGITS + retain.len() + body.len() + 1,
        )?;
        cmd.arg(millis(req.lease))
            .arg(&retain[..])
            .arg(body)
            .arg(if req.rerun_failed { "1" } else { "0" });
        let hint = self.lease_hint(req.key, Hint::Lower(req.lease));
        match self.durable_eval(script, cmd, Some(hint)).await? {
            Reply::Acquired => Ok(DurableStartOutcome::Acquired {
                token,
                resumed: None,
            }),
            Reply::Resumed(value) => {
                let (_, journal) = layout::decode(req.key, &value)?;
                Ok(DurableStartOutcome::Acquired {
                    token,
                    resumed: Some(journal),
                })
            }
            reply => Self::shown(req.key, reply).map(DurableStartOutcome::Existing),
        }
    }

    async fn append(&self, key: &str, token: FencingToken, entry: &[u8]) -> Result<(), StoreError> {
        // A plain run's token owns no journal.
        if !layout::is_durable(token) {
            return Err(StoreError::StaleToken);
        }
        let limit = self.max_journal_bytes;
        let framed = layout::ITEM_LEN_DIGITS + entry.len();
        if layout::HEAD_LEN + framed > limit {
            // Larger than the limit on its own: refused without a round trip.
            return Err(StoreError::TooLarge {
                size: layout::HEAD_LEN + framed,
                limit,
            });
        }
        let script = &SCRIPTS.append;
        let mut cmd = self.fenced_cmd(script, key, token, 2, framed + U64_DIGITS)?;
        push_joined(&mut cmd, &[&layout::item_len(entry.len())?, entry])?;
        cmd.arg(limit);
        match self.durable_eval(script, cmd, None).await? {
            Reply::Ok => Ok(()),
            Reply::TooLarge(size) => Err(StoreError::TooLarge { size, limit }),
            // A plain record carrying the caller's token has no journal to append to.
            Reply::Plain => Err(StoreError::StaleToken),
            reply => Err(reply.into_error()),
        }
    }

    async fn suspend(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        if !layout::is_durable(token) {
            return Err(StoreError::StaleToken);
        }
        let script = &SCRIPTS.suspend;
        let cmd = self.fenced_cmd(script, key, token, 0, 0)?;
        let hint = self.lease_hint(key, Hint::DueNow);
        match self.durable_eval(script, cmd, Some(hint)).await? {
            Reply::Ok => Ok(()),
            Reply::Plain => Err(StoreError::StaleToken),
            reply => Err(reply.into_error()),
        }
    }

    async fn redrive(
        &self,
        key: &str,
        lease: Duration,
        retain: Option<Duration>,
    ) -> Result<Redrive, StoreError> {
        let token = layout::durable_token();
        let retain = layout::retention_field(retain);
        let script = &SCRIPTS.redrive;
        let mut cmd = self.fenced_cmd(script, key, token, 2, U64_DIGITS + retain.len())?;
        cmd.arg(millis(lease)).arg(&retain[..]);
        let hint = self.lease_hint(key, Hint::Lower(lease));
        match self.durable_eval(script, cmd, Some(hint)).await? {
            Reply::Redriven(value) => {
                let (_, journal) = layout::decode(key, &value)?;
                Ok(Redrive::Acquired { token, journal })
            }
            Reply::Absent => Ok(Redrive::Absent),
            reply => Self::shown(key, reply).map(Redrive::NotFailed),
        }
    }

    async fn read_journal(&self, key: &str) -> Result<Option<Journal>, StoreError> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = self
            .command(&["GET"], key, 0, 0)?
            .query_async(&mut conn)
            .await
            .map_err(native_error)?;
        let Some(value) = value else {
            return Ok(None);
        };
        if is_durable_value(&value) {
            return layout::decode(key, &value).map(|(_, journal)| Some(journal));
        }
        // A plain record keeps no journal; anything else is reported as undecodable.
        record::decode(key, &value).map(|_| None)
    }

    async fn abandoned(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.abandoned_keys(prefix, after, limit).await
    }
}
