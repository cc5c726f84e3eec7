//! The record admin of [`RedisStore`]: [`RecordAdmin`] over `SCAN`, pipelined reads and one
//! script.
//!
//! | call | Redis work | round trips |
//! | --- | --- | --- |
//! | `inspect` | `TIME`, `GET`, `PTTL`, pipelined | one |
//! | `list` | `SCAN <cursor> MATCH <prefix>* COUNT <what the page lacks>`; for the keys it returns, `TIME` and each key's `GETRANGE 0 1023`, `STRLEN` and `PTTL`, pipelined; for the few records whose header or tail lies further, their exact `GETRANGE`s, pipelined | two or three per `SCAN`, at most [`SCANS_PER_PAGE`] `SCAN`s per page |
//! | `release` | one script on the key (`admin_release.lua`); a durable record whose lease it lapsed also has its lease index entry made due | one, two for a durable record |
//!
//! The cursor is `SCAN`'s, so a listing has `SCAN`'s guarantees: every record present
//! for the whole listing is listed at least once, one that moves while the table is
//! rehashed may be listed twice, and nothing is ever loaded whole: a listed record's
//! result is measured (`STRLEN`), never read. A page ends with its last `SCAN` batch
//! whole (`SCAN` cannot stop inside one): each `SCAN` asks for no more keys than the page
//! lacks, so a page holds at most a few more records than asked, from one hash bucket. A
//! page may also hold fewer, or none, with a next cursor, when its `SCAN`s met few
//! matching keys: only the end of the listing has no next cursor.
//!
//! The key prefix is escaped for `MATCH` (`*`, `?`, `[`, `]`, `\`), so it matches as
//! given. Keys that hold a NUL byte are no record's (the engine refuses control characters
//! in keys): they are stores' own, such as the lease index of durable records under
//! `<prefix>\0durable-leases`, and never listed. Everything read is decoded
//! with the store's own decoding (`record::decode`, and the durable layout's), so garbage
//! is a typed error or an undecodable row, and another Redis type under a key is
//! undecodable too. Leases and expiries are measured on Redis's clock (`TIME`, `PTTL`).
//!
//! Cluster: `SCAN` walks one node, so on a Redis Cluster a listing scans each primary in
//! turn, in the order of the slots they serve (read with `CLUSTER SLOTS` on each page).
//! Its cursor is then `<slot>:<SCAN cursor>`: a primary is named by the first slot it
//! serves, so the listing follows the slot's new primary after a failover (whose data, and
//! so `SCAN`'s guarantees, are the same); keys whose slots migrate while a listing runs may
//! be missed or listed twice. The reads of the keys found go each to its key's node.

use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    Lease, ListRequest, Listed, Page, RecordAdmin, RecordInfo, RecordStatus, Released,
    SCHEMA_VERSION, StatusFilter, StoreError,
};
use redis::{Pipeline, Value};

use crate::durable::admin as durable;
use crate::record::{self, UndecodableRecord};
use crate::{RedisStore, native_error};

/// The most `SCAN` calls one page makes: a page over keys the prefix rarely matches ends
/// there, with a cursor to go on from.
pub(crate) const SCANS_PER_PAGE: usize = 32;

/// How much of each value a listing reads first: a plain record's header, fingerprint and
/// result flag, or a durable record's header and fingerprint, unless the fingerprint is
/// unusually long (a SHA-256 fingerprint takes 64 bytes).
const FIRST_READ: usize = 1024;

/// Where a plain record's fingerprint length sits, and where its fingerprint begins.
const PLAIN_FP_LEN_AT: usize = 34;
const PLAIN_FP_AT: usize = 38;

/// What one listing read found under a key.
struct Probe {
    key: String,
    /// The value's first bytes (or all of it), or the error reading it.
    head: Result<Vec<u8>, redis::RedisError>,
    /// The value's length.
    len: usize,
    /// Milliseconds to the key's expiry; -1: none; -2: the key is gone.
    pttl: i64,
    /// A second read, where the first did not hold what decoding needs.
    more: Option<More>,
}

/// What a second read fetches: the value's first bytes to where decoding needs them (a
/// long fingerprint), and a finished durable record's tail flag beyond the first read.
#[derive(Debug, Clone, Copy, Default)]
struct More {
    prefix: Option<usize>,
    flag: Option<usize>,
}

/// What a second read found.
#[derive(Debug, Default)]
struct Found {
    prefix: Option<Vec<u8>>,
    flag: Option<u8>,
}

/// A duration from a count of milliseconds that may be negative (none then).
fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The key's expiry from its `PTTL`: `None` for a key without one.
fn expires_in(pttl: i64) -> Option<Duration> {
    (pttl >= 0).then(|| millis(pttl))
}

/// A durable running record's lease, from its deadline and Redis's clock.
fn durable_lease(deadline_ms: u64, now_ms: u64) -> Lease {
    if deadline_ms > now_ms {
        Lease::Held {
            left: Duration::from_millis(deadline_ms - now_ms),
        }
    } else {
        Lease::Lapsed {
            ago: Duration::from_millis(now_ms - deadline_ms),
        }
    }
}

/// The parts of [`RecordInfo`] every record has, from its decoded `record`.
fn info_of(record: orchestrix::store::Record, durable: bool, pttl: i64) -> RecordInfo {
    RecordInfo {
        result_bytes: record.result.as_ref().map(|r| r.len() as u64),
        key: record.key,
        status: record.status,
        token: record.token,
        fingerprint: record.fingerprint,
        schema_version: SCHEMA_VERSION,
        durable,
        lease: None,
        expires_in: expires_in(pttl),
        journal: None,
    }
}

/// A plain running record's lease is its key's expiry.
fn plain_lease(pttl: i64) -> Result<Lease, StoreError> {
    if pttl < 0 {
        return Err(StoreError::decode(
            "a running record whose key has no expiry",
        ));
    }
    Ok(Lease::Held { left: millis(pttl) })
}

/// A whole value under `key`, decoded: what `inspect` shows.
fn decode_whole(key: &str, value: &[u8], pttl: i64, now_ms: u64) -> Result<RecordInfo, StoreError> {
    if crate::durable::is_durable_value(value) {
        let (record, journal, deadline) = durable::decode(key, value)?;
        let running = record.status == RecordStatus::Running;
        let mut info = info_of(record, true, pttl);
        info.lease = running.then(|| durable_lease(deadline, now_ms));
        info.journal = Some(journal);
        return Ok(info);
    }
    let record = record::decode(key, value)?;
    let running = record.status == RecordStatus::Running;
    let mut info = info_of(record, false, pttl);
    if running {
        info.lease = Some(plain_lease(pttl)?);
    }
    Ok(info)
}

/// The glob pattern that matches exactly the keys starting with `prefix`.
fn match_pattern(prefix: &[u8]) -> Vec<u8> {
    let mut pattern = Vec::with_capacity(prefix.len() + 1);
    for &b in prefix {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            pattern.push(b'\\');
        }
        pattern.push(b);
    }
    pattern.push(b'*');
    pattern
}

/// Redis's `TIME` in ms.
fn time_ms(value: Value) -> Result<u64, StoreError> {
    let (secs, micros): (u64, u64) =
        redis::from_redis_value(value).map_err(|e| StoreError::backend_msg(e.to_string()))?;
    Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
}

impl Probe {
    /// What decoding needs beyond the first read, if anything.
    fn needs(&self) -> Option<More> {
        let head = self.head.as_ref().ok()?;
        if head.len() >= self.len {
            return None; // The whole value.
        }
        let more = if crate::durable::is_durable_value(head) {
            let end = durable::fingerprint_end(head)?;
            let tail = durable::tail_at(head);
            More {
                prefix: (head.len() < end).then_some(end),
                flag: tail.filter(|&at| at >= head.len()),
            }
        } else {
            let end = plain_flag_end(head)?;
            More {
                prefix: (head.len() < end).then_some(end),
                flag: None,
            }
        };
        (more.prefix.is_some() || more.flag.is_some()).then_some(more)
    }

    /// The record this probe read, decoded with the store's own decoding.
    fn decode(&self, found: Found, now_ms: u64) -> Result<RecordInfo, StoreError> {
        let head = match (&self.head, found.prefix) {
            (Err(err), _) => return Err(native_error(err.clone())),
            (Ok(_), Some(longer)) => longer,
            (Ok(head), None) => head.clone(),
        };
        let flag = found.flag;
        if head.len() >= self.len {
            // A listing shows no journal (inspect does).
            let mut info = decode_whole(&self.key, &head, self.pttl, now_ms)?;
            info.journal = None;
            return Ok(info);
        }
        if crate::durable::is_durable_value(&head) {
            return self.decode_durable_part(&head, flag, now_ms);
        }
        // A plain record read through its result flag: the same record with an empty result
        // decodes as the store decodes it, and the result's size is what follows the flag.
        let Some(end) = plain_flag_end(&head) else {
            // Malformed before its fingerprint: the store's decoding says how.
            record::decode(&self.key, &head)?;
            return Err(UndecodableRecord::Truncated(self.len).into());
        };
        let shown = head
            .get(..end)
            .ok_or(UndecodableRecord::Truncated(self.len))?;
        let record = record::decode(&self.key, shown)?;
        let running = record.status == RecordStatus::Running;
        let result_len = self.len - end;
        let has_result = record.result.is_some();
        if !has_result {
            return Err(UndecodableRecord::TrailingBytes(result_len).into());
        }
        let mut info = info_of(record, false, self.pttl);
        info.result_bytes = Some(result_len as u64);
        if running {
            info.lease = Some(plain_lease(self.pttl)?);
        }
        Ok(info)
    }

    fn decode_durable_part(
        &self,
        head: &[u8],
        flag: Option<u8>,
        now_ms: u64,
    ) -> Result<RecordInfo, StoreError> {
        let end = durable::fingerprint_end(head).ok_or(UndecodableRecord::Truncated(self.len))?;
        let shown = head
            .get(..end)
            .ok_or(UndecodableRecord::Truncated(self.len))?;
        let tail = durable::tail_at(head);
        // A finished record's flag: in the first read, or read on its own.
        let flag = flag.or_else(|| tail.and_then(|at| head.get(at).copied()));
        let (record, deadline) = durable::decode_partial(&self.key, shown, flag)?;
        let running = record.status == RecordStatus::Running;
        let mut info = info_of(record, true, self.pttl);
        if info.result_bytes.is_some() {
            let at = tail.unwrap_or(self.len);
            info.result_bytes = Some(self.len.saturating_sub(at + 1) as u64);
        }
        info.lease = running.then(|| durable_lease(deadline, now_ms));
        Ok(info)
    }
}

/// Where a plain record's result flag ends (`None`: its fingerprint length is malformed,
/// which decoding reports).
fn plain_flag_end(head: &[u8]) -> Option<usize> {
    let fp_len = head.get(PLAIN_FP_LEN_AT..PLAIN_FP_AT)?;
    let fp = if fp_len == b"ffff" {
        0
    } else {
        usize::from_str_radix(std::str::from_utf8(fp_len).ok()?, 16).ok()?
    };
    Some(PLAIN_FP_AT + fp + 1)
}

impl RedisStore {
    /// The store's key of `key`.
    fn redis_key(&self, key: &str) -> Vec<u8> {
        [self.key_prefix.as_bytes(), key.as_bytes()].concat()
    }

    /// One `SCAN` from `at`: the next cursor on the same node and the record keys it
    /// returned (the store's prefix taken off; its own keys left out).
    async fn scan(
        &self,
        at: ScanAt,
        pattern: &[u8],
        count: usize,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at.cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        let mut conn = self.conn.clone();
        let reply = match at.shard {
            Some(slot) => conn.query_on_slot(&cmd, slot).await,
            None => cmd.query_async(&mut conn).await,
        };
        let (next, keys): (u64, Vec<Vec<u8>>) = reply
            .and_then(|v| redis::from_redis_value(v).map_err(Into::into))
            .map_err(StoreError::backend)?;
        let prefix = self.key_prefix.as_bytes();
        let keys = keys
            .into_iter()
            .filter_map(|key| {
                let key = key.strip_prefix(prefix)?;
                // No record's key holds a NUL byte (the engine refuses control characters):
                // such keys are stores' own, such as the lease index of durable records.
                (!key.contains(&0)).then(|| String::from_utf8_lossy(key).into_owned())
            })
            .collect();
        Ok((next, keys))
    }

    /// Redis's clock, and a first read of every key, in one round trip.
    async fn probe(&self, keys: Vec<String>) -> Result<(u64, Vec<Probe>), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for key in &keys {
            let redis_key = self.redis_key(key);
            pipe.cmd("GETRANGE")
                .arg(&redis_key)
                .arg(0)
                .arg(FIRST_READ - 1);
            pipe.cmd("STRLEN").arg(&redis_key);
            pipe.cmd("PTTL").arg(&redis_key);
        }
        let mut replies = self.query_pipe(&pipe).await?.into_iter();
        let now = time_ms(replies.next().unwrap_or(Value::Nil))?;
        let mut probes = Vec::with_capacity(keys.len());
        for key in keys {
            let head = replies.next().unwrap_or(Value::Nil).extract_error();
            let len = replies.next().unwrap_or(Value::Nil).extract_error();
            let pttl = replies.next().unwrap_or(Value::Nil).extract_error();
            let head = head.and_then(|v| redis::from_redis_value::<Vec<u8>>(v).map_err(Into::into));
            // STRLEN and PTTL answer for any type; GETRANGE's error (another type) is kept.
            let len: usize = len
                .ok()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or(0);
            let pttl: i64 = pttl
                .ok()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or(-2);
            let mut probe = Probe {
                key,
                head,
                len,
                pttl,
                more: None,
            };
            probe.more = probe.needs();
            probes.push(probe);
        }
        Ok((now, probes))
    }

    /// The second reads some probes need, in one round trip (none when no probe does).
    async fn read_more(&self, probes: &[Probe]) -> Result<Vec<Found>, StoreError> {
        if probes.iter().all(|p| p.more.is_none()) {
            return Ok(probes.iter().map(|_| Found::default()).collect());
        }
        let mut pipe = redis::pipe();
        for probe in probes {
            let more = probe.more.unwrap_or_default();
            let redis_key = self.redis_key(&probe.key);
            if let Some(end) = more.prefix {
                pipe.cmd("GETRANGE")
                    .arg(&redis_key)
                    .arg(0)
                    .arg(end.saturating_sub(1));
            }
            if let Some(at) = more.flag {
                pipe.cmd("GETRANGE").arg(&redis_key).arg(at).arg(at);
            }
        }
        let mut replies = self.query_pipe(&pipe).await?.into_iter();
        let mut read = || -> Option<Vec<u8>> {
            let value = replies.next()?.extract_error().ok()?;
            redis::from_redis_value(value).ok()
        };
        Ok(probes
            .iter()
            .map(|probe| {
                let more = probe.more.unwrap_or_default();
                let prefix = more.prefix.and_then(|_| read());
                let flag = more
                    .flag
                    .and_then(|_| read())
                    .and_then(|f| f.first().copied());
                Found { prefix, flag }
            })
            .collect())
    }

    /// On a cluster, the first slot of each primary, in order; on one server, nothing.
    async fn shards(&self) -> Result<Vec<u16>, StoreError> {
        if !self.conn.is_cluster() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        // Each entry: [first slot, last slot, [ip, port, node id, ...], replicas...].
        let ranges: Vec<Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .map_err(StoreError::backend)?;
        let mut firsts = std::collections::BTreeMap::<Vec<u8>, u16>::new();
        for range in ranges {
            let Value::Array(range) = range else { continue };
            let (Some(first), Some(Value::Array(primary))) = (range.first(), range.get(2)) else {
                continue;
            };
            let Ok(first) = redis::from_redis_value_ref::<u16>(first) else {
                continue;
            };
            // The node id names the primary; before 4.0 Redis sent only address and port.
            let id = primary
                .get(2)
                .or(primary.get(1))
                .and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok())
                .unwrap_or_default();
            let slot = firsts.entry(id).or_insert(first);
            *slot = (*slot).min(first);
        }
        let mut shards: Vec<u16> = firsts.into_values().collect();
        shards.sort_unstable();
        Ok(shards)
    }

    /// A pipeline whose commands may each fail on their own (another type under a key).
    async fn query_pipe(&self, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        let mut pipe = pipe.clone();
        pipe.ignore_errors();
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn)
            .await
            .map_err(StoreError::backend)
    }
}

#[async_trait]
impl RecordAdmin for RedisStore {
    async fn inspect(&self, key: &str) -> Result<Option<RecordInfo>, StoreError> {
        let redis_key = self.redis_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        pipe.cmd("GET").arg(&redis_key);
        pipe.cmd("PTTL").arg(&redis_key);
        let mut replies = self.query_pipe(&pipe).await?.into_iter();
        let now = time_ms(replies.next().unwrap_or(Value::Nil))?;
        let value = replies
            .next()
            .unwrap_or(Value::Nil)
            .extract_error()
            .map_err(native_error)?;
        let pttl: i64 = replies
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or(-2);
        let value: Option<Vec<u8>> =
            redis::from_redis_value(value).map_err(|e| StoreError::backend_msg(e.to_string()))?;
        value
            .map(|value| decode_whole(key, &value, pttl, now))
            .transpose()
    }

    async fn list(&self, req: ListRequest<'_>) -> Result<Page, StoreError> {
        let page_size = req.page_size();
        let shards = self.shards().await?;
        let not_ours = |cursor: &str| {
            StoreError::backend_msg(format!("{cursor:?} is not a Redis SCAN cursor"))
        };
        let mut at = match req.cursor {
            None => ScanAt {
                shard: shards.first().copied(),
                cursor: 0,
            },
            Some(cursor) => {
                ScanAt::parse(cursor, !shards.is_empty()).ok_or_else(|| not_ours(cursor))?
            }
        };
        let pattern = match_pattern(&self.redis_key(req.prefix));
        let mut records = Vec::new();
        let mut done = false;
        for _ in 0..SCANS_PER_PAGE {
            let lacking = page_size.saturating_sub(records.len()).max(1);
            let (next, keys) = self.scan(at, &pattern, lacking).await?;
            at.cursor = next;
            if next == 0 {
                // This node is walked through: on to the next primary, if any.
                match at.shard.and_then(|slot| shards.iter().find(|&&s| s > slot)) {
                    Some(&slot) => at.shard = Some(slot),
                    None => done = true,
                }
            }
            if !keys.is_empty() {
                let (now, probes) = self.probe(keys).await?;
                let more = self.read_more(&probes).await?;
                for (probe, more) in probes.into_iter().zip(more) {
                    if probe.pttl == -2 {
                        continue; // Gone since the SCAN: expired or deleted.
                    }
                    match probe.decode(more, now) {
                        Ok(info) if req.filter.matches(&info) => {
                            records.push(Listed::Record(info));
                        }
                        Ok(_) => {}
                        Err(error) if req.filter == StatusFilter::Any => {
                            records.push(Listed::Undecodable {
                                key: probe.key,
                                error,
                            });
                        }
                        Err(_) => {}
                    }
                }
            }
            if done || records.len() >= page_size {
                break;
            }
        }
        let next = (!done).then(|| at.to_string());
        Ok(Page { records, next })
    }

    async fn release(&self, key: &str) -> Result<Released, StoreError> {
        self.release_as_admin(key).await
    }
}

/// Where a listing goes on: `SCAN`'s cursor, and on a cluster the primary it walks, named
/// by the first slot it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScanAt {
    shard: Option<u16>,
    cursor: u64,
}

impl ScanAt {
    /// A cursor this store gave: `<cursor>` on one server, `<slot>:<cursor>` on a cluster.
    fn parse(text: &str, cluster: bool) -> Option<Self> {
        if cluster {
            let (slot, cursor) = text.split_once(':')?;
            Some(Self {
                shard: Some(slot.parse().ok()?),
                cursor: cursor.parse().ok()?,
            })
        } else {
            Some(Self {
                shard: None,
                cursor: text.parse().ok()?,
            })
        }
    }
}

impl std::fmt::Display for ScanAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.shard {
            Some(slot) => write!(f, "{slot}:{}", self.cursor),
            None => write!(f, "{}", self.cursor),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_patterns_escape_glob_characters() {
        assert_eq!(
            match_pattern(b"orx:a*b?[c]\\"),
            b"orx:a\\*b\\?\\[c\\]\\\\*".to_vec()
        );
        assert_eq!(match_pattern(b""), b"*".to_vec());
    }

    #[test]
    fn scan_cursors_round_trip_and_name_the_node_on_a_cluster() {
        for (text, cluster) in [("0", false), ("1234", false), ("5461:77", true)] {
            let at = ScanAt::parse(text, cluster).expect("a cursor the store gave");
            assert_eq!(at.to_string(), text);
        }
        assert_eq!(ScanAt::parse("5461:77", false), None);
        assert_eq!(ScanAt::parse("77", true), None);
    }
}
