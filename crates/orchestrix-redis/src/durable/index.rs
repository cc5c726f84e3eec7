//! The index of durable leases, so that [`abandoned`](orchestrix::store::JournalStore::abandoned)
//! reads the runs whose lease lapsed rather than every record.
//!
//! One sorted set per store, under `<prefix>\0durable-leases` (a key no record has: keys
//! given to the store by the engine never hold control characters). Its members are the
//! durable records' keys, its scores **hints** of their lease deadlines in ms. A hint is
//! never trusted: `abandoned` verifies every candidate against its record on Redis's clock.
//!
//! The record scripts cannot write the index themselves and stay cluster-safe (the index is
//! another key, in another hash slot), so each durable operation sends its index command in
//! the same pipeline, in the same round trip, unconditionally:
//!
//! | operation | index command |
//! | --- | --- |
//! | `start_durable`, `redrive` | `ZADD LT <now + lease> key`: added, or lowered, never raised |
//! | `renew` (durable) | `ZADD GT <now + lease> key`: follows the renewed lease |
//! | `suspend` | `ZADD LT 0 key`: due at once |
//! | `finish`, `release` (durable), `delete` | `ZREM key` |
//!
//! Because the commands run whatever the script decided, an entry may be early (a takeover
//! keeps the abandoned run's old score), late (at most one lease: a stale renewal's hint),
//! or left over (a start that found a finished record re-adds its key; a run deleted or
//! expired while running). Each is harmless: early or left-over entries are verified and
//! corrected (rescored to the record's deadline, or removed) by the next `abandoned` call
//! that reads them, with a compare-and-set on the score so that a correction never undoes a
//! newer write. The one write that could hide a live run, a stale owner's `finish` or
//! `release` removing the entry of the run that took over, is followed by a `ZADD LT 0` when
//! the script answers stale, and the new owner's next renewal adds it back anyway.
//!
//! Cost: `abandoned` reads the entries due by now (abandoned runs, and entries waiting to be
//! corrected), verifies candidates in key order with one pipelined `GETRANGE` of each
//! record's 76-byte header until the page is full, and sends one script with the
//! corrections: two round trips, three when something is corrected, never a scan of the
//! records. Cluster: the index is one key, so in a cluster its commands go to the node that
//! holds its slot, and every durable run touches that node once per start, renewal and
//! finish.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use orchestrix::store::{RecordStatus, StoreError};
use redis::{Cmd, Value};

use super::scripts::SCRIPTS;
use super::{NOSCRIPT_ATTEMPTS, is_noscript, layout};
use crate::{RedisStore, millis, push_joined};

/// What follows the store's key prefix in the index's key.
const INDEX_SUFFIX: &[u8] = b"\0durable-leases";

/// How many candidates one verification round trip reads at most.
const MAX_BATCH: usize = 512;

/// How an index command moves an entry's score.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Hint {
    /// Added, or lowered (never raised) to the lease deadline from now.
    Lower(Duration),
    /// Added, or raised (never lowered) to the lease deadline from now.
    Raise(Duration),
    /// Added, or lowered to 0: due at once.
    DueNow,
}

impl RedisStore {
    /// The index's key.
    fn index_key(&self) -> Vec<u8> {
        [self.key_prefix.as_bytes(), INDEX_SUFFIX].concat()
    }

    /// The `ZADD` that records `hint` for `key`.
    pub(crate) fn lease_hint(&self, key: &str, hint: Hint) -> Cmd {
        let (flag, score) = match hint {
            Hint::Lower(lease) => ("LT", client_now_ms().saturating_add(millis(lease))),
            Hint::Raise(lease) => ("GT", client_now_ms().saturating_add(millis(lease))),
            Hint::DueNow => ("LT", 0),
        };
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(self.index_key()).arg(flag).arg(score).arg(key);
        cmd
    }

    /// The `ZREM` of `key`'s entry, for a durable record that is gone or finished.
    pub(crate) fn lease_done(&self, key: &str) -> Cmd {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(self.index_key()).arg(key);
        cmd
    }

    /// [`abandoned`](orchestrix::store::JournalStore::abandoned): see the module docs.
    pub(crate) async fn abandoned_keys(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let due: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
            .arg(self.index_key())
            .arg("-inf")
            .arg(client_now_ms())
            .arg("BYSCORE")
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(StoreError::backend)?;
        let mut candidates: Vec<(String, f64)> = due
            .into_iter()
            .filter_map(|(member, score)| Some((String::from_utf8(member).ok()?, score)))
            .filter(|(key, _)| key.starts_with(prefix) && after.is_none_or(|a| key.as_str() > a))
            .collect();
        candidates.sort_unstable_by(|a, b| a.0.cmp(&b.0));

        let mut found = Vec::new();
        let mut corrections = Vec::new();
        for batch in candidates.chunks(limit.clamp(16, MAX_BATCH)) {
            let (now, heads) = self.read_heads(batch.iter().map(|(key, _)| key)).await?;
            for ((key, score), head) in batch.iter().zip(heads) {
                match Verdict::of(head, now) {
                    Verdict::Abandoned => found.push(key.clone()),
                    Verdict::Live { deadline } => corrections.push((key, *score, Some(deadline))),
                    Verdict::Gone => corrections.push((key, *score, None)),
                }
                if found.len() == limit {
                    break;
                }
            }
            if found.len() == limit {
                break;
            }
        }
        if !corrections.is_empty() {
            self.correct(&corrections).await?;
        }
        Ok(found)
    }

    /// Redis's clock (ms), and the first bytes of each record under `keys`, in one round
    /// trip.
    async fn read_heads<'k>(
        &self,
        keys: impl ExactSizeIterator<Item = &'k String>,
    ) -> Result<(u64, Vec<Value>), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for key in keys {
            let mut cmd = self.command(&["GETRANGE"], key, 2, 4)?;
            cmd.arg(0).arg(layout::HEAD_LEN - 1);
            pipe.add_command(cmd);
        }
        pipe.ignore_errors();
        let mut conn = self.conn.clone();
        let mut replies: Vec<Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(StoreError::backend)?;
        let time = if replies.is_empty() {
            Value::Nil
        } else {
            replies.remove(0)
        };
        Ok((redis_time_ms(time)?, replies))
    }

    /// Applies `corrections` (key, the score read, the new score or removal) to the
    /// index, each only if its score is still the one read.
    async fn correct(&self, corrections: &[(&String, f64, Option<u64>)]) -> Result<(), StoreError> {
        let script = &SCRIPTS.index;
        let index = self.index_key();
        let mut cmd = Cmd::with_capacity(3 + 1 + 3 * corrections.len(), 0);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(1);
        push_joined(&mut cmd, &[&index])?;
        for (key, score, new) in corrections {
            cmd.arg(key.as_str()).arg(score.to_string());
            match new {
                Some(deadline) => cmd.arg(*deadline),
                None => cmd.arg(""),
            };
        }
        let mut conn = self.conn.clone();
        let mut attempt = 1;
        loop {
            match cmd.query_async::<Value>(&mut conn).await {
                Err(err) if is_noscript(&err) && attempt < NOSCRIPT_ATTEMPTS => {
                    script
                        .load_async(&mut conn)
                        .await
                        .map_err(StoreError::backend)?;
                    attempt += 1;
                }
                fixed => return fixed.map(drop).map_err(StoreError::backend),
            }
        }
    }
}

/// What a candidate's record says.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Running, its lease lapsed: listed.
    Abandoned,
    /// Running under a live lease: the entry is rescored to its deadline.
    Live { deadline: u64 },
    /// Finished, absent, or not a durable record: the entry is removed.
    Gone,
}

impl Verdict {
    /// The verdict on a record whose header read `head`, at `now` on Redis's clock.
    fn of(head: Value, now: u64) -> Self {
        let Ok(Value::BulkString(head)) = head.extract_error() else {
            return Self::Gone;
        };
        match layout::head(&head) {
            Ok(head) if head.status == RecordStatus::Running => {
                if head.lease_deadline_ms <= now {
                    Self::Abandoned
                } else {
                    Self::Live {
                        deadline: head.lease_deadline_ms,
                    }
                }
            }
            _ => Self::Gone,
        }
    }
}

/// This machine's clock in ms since the Unix epoch: only ever a hint (see the module docs).
fn client_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Redis's `TIME` reply in ms.
fn redis_time_ms(time: Value) -> Result<u64, StoreError> {
    let parts: Option<(u64, u64)> = match time {
        Value::Array(parts) => match parts.as_slice() {
            [Value::BulkString(secs), Value::BulkString(micros)] => std::str::from_utf8(secs)
                .ok()
                .and_then(|s| s.parse().ok())
                .zip(
                    std::str::from_utf8(micros)
                        .ok()
                        .and_then(|s| s.parse().ok()),
                ),
            _ => None,
        },
        _ => None,
    };
    let (secs, micros) =
        parts.ok_or_else(|| StoreError::backend_msg("unexpected reply to TIME"))?;
    Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn verdicts_follow_the_record_on_redis_clock() {
        let (no_retain, no_tail) = ("-".repeat(15), "-".repeat(8));
        let running = format!("1R{TOKEN}000000000001000{no_retain}{no_tail}ffff");
        assert_eq!(Verdict::of(bulk(&running), 1000), Verdict::Abandoned);
        assert_eq!(
            Verdict::of(bulk(&running), 999),
            Verdict::Live { deadline: 1000 }
        );
        let finished = format!("1C{TOKEN}000000000001000{no_retain}00000058ffff");
        assert_eq!(Verdict::of(bulk(&finished), 5000), Verdict::Gone);
        assert_eq!(Verdict::of(bulk(""), 5000), Verdict::Gone);
        assert_eq!(Verdict::of(bulk("1r plain"), 5000), Verdict::Gone);
        assert_eq!(Verdict::of(Value::Nil, 5000), Verdict::Gone);
    }

    #[test]
    fn redis_time_is_read_in_ms() {
        let time = Value::Array(vec![bulk("1700000000"), bulk("123456")]);
        assert_eq!(redis_time_ms(time).ok(), Some(1_700_000_000_123));
        assert!(redis_time_ms(Value::Nil).is_err());
    }
}
