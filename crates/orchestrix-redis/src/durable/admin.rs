//! What the record admin (`crate::admin`) needs of durable records: their release, and
//! their decoding with the layout's own functions.

use std::sync::LazyLock;

use orchestrix::store::{IdempotencyStore as _, Journal, Record, Released, StoreError};
use redis::{Script, Value};

use super::index::Hint;
use super::layout;
use crate::RedisStore;
use crate::record::UndecodableRecord;

/// The release script: the layout's functions, then `admin_release.lua`.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../lua/durable_layout.lua"),
        include_str!("../lua/admin_release.lua")
    ))
});

/// A durable record's fixed header: how many bytes of the value a partial read must hold
/// to find the fingerprint's length and the tail's offset.
pub(crate) const HEAD_LEN: usize = layout::HEAD_LEN;

/// Where a durable record's fingerprint ends, from its header (`None`: the field is not
/// one this version writes; decoding the header says why).
pub(crate) fn fingerprint_end(head: &[u8]) -> Option<usize> {
    match head.get(72..76)? {
        b"ffff" => Some(HEAD_LEN),
        digits => Some(HEAD_LEN + hex(digits)?),
    }
}

/// Where a finished durable record's tail begins, from its header (`None` for a running
/// one, or a field this version does not write).
pub(crate) fn tail_at(head: &[u8]) -> Option<usize> {
    hex(head.get(64..72)?)
}

fn hex(digits: &[u8]) -> Option<usize> {
    std::str::from_utf8(digits)
        .ok()
        .filter(|d| d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .and_then(|d| usize::from_str_radix(d, 16).ok())
}

/// A whole durable record: the record, its journal, and its lease deadline (ms on Redis's
/// clock).
///
/// # Errors
/// As the layout's decoding: [`StoreError::Decode`] for anything this version does not
/// write, [`StoreError::UnsupportedVersion`] for another version digit.
pub(crate) fn decode(key: &str, value: &[u8]) -> Result<(Record, Journal, u64), StoreError> {
    let (record, journal) = layout::decode(key, value)?;
    let deadline = layout::head(value)?.lease_deadline_ms;
    Ok((record, journal, deadline))
}

/// A durable record read in part: its header and fingerprint (`head_and_fingerprint`, to
/// [`fingerprint_end`]), and a finished one's tail flag (`+`: a result follows, `-`: none).
/// The record (a result's bytes left out: `Some(empty)` stands for a result) and its lease
/// deadline.
///
/// # Errors
/// As for [`decode`].
pub(crate) fn decode_partial(
    key: &str,
    head_and_fingerprint: &[u8],
    tail_flag: Option<u8>,
) -> Result<(Record, u64), StoreError> {
    let flag = tail_flag.map(|flag| [flag]);
    let record = layout::decode_shown(key, head_and_fingerprint, flag.as_ref().map(|f| &f[..]))?;
    let deadline = layout::head(head_and_fingerprint)?.lease_deadline_ms;
    Ok((record, deadline))
}

impl RedisStore {
    /// [`RecordAdmin::release`](orchestrix::store::RecordAdmin::release): one script on
    /// the record's key; for a durable record whose lease it lapsed, a second round trip
    /// makes its lease index entry due, so that `abandoned` lists it at once.
    pub(crate) async fn release_as_admin(&self, key: &str) -> Result<Released, StoreError> {
        let script = &*RELEASE;
        let cmd = self.evalsha(script, key, 0, 0)?;
        let reply = self
            .durable_query(script, cmd, None)
            .await
            .map_err(StoreError::backend)?;
        let released = match reply {
            Value::Int(0) => Released::Absent,
            Value::Int(1) => Released::Deleted,
            Value::Int(2) => Released::LeaseLapsed,
            Value::Int(-1) => return Err(self.undecodable(key).await),
            Value::Array(items) => match items.as_slice() {
                // The script read the status letter only: the record is decoded before it is
                // reported as finished.
                [Value::BulkString(tag), Value::BulkString(_)] if tag == b"finished" => {
                    match self.get(key).await? {
                        Some(record) => Released::NotRunning(record.status),
                        None => Released::Absent,
                    }
                }
                [Value::BulkString(tag), Value::BulkString(kind)] if tag == b"wrongtype" => {
                    let kind = String::from_utf8_lossy(kind).into_owned();
                    return Err(UndecodableRecord::WrongType(kind).into());
                }
                _ => return Err(unexpected(&items)),
            },
            other => return Err(unexpected(&other)),
        };
        if released == Released::LeaseLapsed {
            let mut conn = self.conn.clone();
            self.lease_hint(key, Hint::DueNow)
                .exec_async(&mut conn)
                .await
                .map_err(StoreError::backend)?;
        }
        Ok(released)
    }

    /// Why the value under `key` is not a record, in the store's own words: what `get`
    /// answers for it.
    async fn undecodable(&self, key: &str) -> StoreError {
        match self.get(key).await {
            Err(err) => err,
            Ok(_) => StoreError::decode("the record changed while it was released; try again"),
        }
    }
}

fn unexpected(reply: &impl std::fmt::Debug) -> StoreError {
    StoreError::backend_msg(format!(
        "unexpected reply from the release script: {reply:?}"
    ))
}
