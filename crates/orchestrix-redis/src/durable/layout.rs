//! A durable record's layout: the plain record's string, with the lease inside the value and
//! the journal at the end.
//!
//! ```text
//! offset  length  content
//! 0       1       schema version, one ASCII digit ('1'), as for plain records
//! 1       1       status: 'R' running, 'C' completed, 'F' failed (durable)
//! 2       32      the owner's fencing token, 32 lowercase hex digits (always odd, see below)
//! 34      15      lease deadline: ms since the Unix epoch on Redis's clock, 15 decimal digits
//! 49      15      retention in ms, 15 decimal digits; 15 '-': kept until deleted
//! 64      8       finished: offset of the tail, 8 lowercase hex digits; running: '--------'
//! 72      4       fingerprint length, 4 lowercase hex digits; 'ffff' = no fingerprint
//! 76      n       the fingerprint (UTF-8)
//! 76 + n  8 + m   the input: its length m as 8 lowercase hex digits, then its bytes
//! ...     8 + k   each journal entry, oldest first: its length k as 8 hex digits, then its bytes
//! (tail)          finished only: '+' and the result to the end of the string, or a lone '-'
//! ```
//!
//! Why this shape:
//!
//! * **Distinct status letters.** Plain records use lowercase `r`/`c`/`f`, so the native
//!   `SET NX GET` start never overwrites a durable record, and the plain fenced scripts
//!   (which compare the first 34 bytes with `1r` and the caller's token) never mistake one
//!   for theirs. `get` reads both.
//! * **The lease is in the value.** A plain running record's key expiry *is* its lease;
//!   a durable record must outlive its lease (with its journal), so its deadline is a field
//!   the scripts compare with Redis's `TIME`, and the key's expiry is the retention: lease
//!   plus retention while running, the TTL once finished. Deadlines are fixed-width digits,
//!   so the scripts compare them as strings.
//! * **Fixed header, journal last.** Version, status, token and deadline sit at fixed
//!   offsets, so an append is fenced by one `GETRANGE` of the header and applied with one
//!   `APPEND`: its cost does not grow with the journal. A takeover rewrites token, lease and
//!   retention in place (one `SETRANGE`), and a finish rewrites the status and appends the
//!   result after the last entry, recording where that tail begins so that a replay reads
//!   the header and the result without the journal.
//! * **Durable tokens are odd, plain ones even.** [`IdempotencyStore::finish`], `renew`
//!   and `release` get only a key and a token, and must reach a durable record in one round
//!   trip; the token's lowest bit tells them which script to send.
//!
//! [`IdempotencyStore::finish`]: orchestrix::store::IdempotencyStore::finish

use std::time::Duration;

use orchestrix::store::{FencingToken, Journal, Record, RecordStatus, SCHEMA_VERSION, StoreError};

use crate::{millis, record};

/// Length of the fixed header (up to and including the fingerprint length).
pub(crate) const HEAD_LEN: usize = 76;
const TOKEN_AT: usize = 2;
const DEADLINE_AT: usize = 34;
const RETAIN_AT: usize = 49;
const TAIL_AT: usize = 64;
const FP_LEN_AT: usize = 72;
/// The retention field of a record kept until deleted.
const NO_RETAIN: &[u8; 15] = b"---------------";
/// The tail field of a running record.
const NO_TAIL: &[u8; 8] = b"--------";
const NO_FINGERPRINT: &[u8; 4] = b"ffff";
/// The longest fingerprint the layout holds.
const MAX_FINGERPRINT_LEN: usize = 0xfffe;
/// The length of a journal item's length field.
pub(crate) const ITEM_LEN_DIGITS: usize = 8;
/// Redis's limit for one string value (`proto-max-bulk-len`, 512 MiB by default).
pub(crate) const REDIS_MAX_VALUE: usize = 512 * 1024 * 1024;

/// Why a value under a key is not a durable record this store can read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UndecodableDurable {
    #[error("the durable record is truncated: {0} bytes")]
    Truncated(usize),
    #[error("the durable record's {field} field {found:?} is malformed")]
    BadField { field: &'static str, found: String },
    #[error("the durable record's fingerprint is not UTF-8")]
    FingerprintNotUtf8,
    #[error("the durable record's journal is malformed at byte {0}")]
    BadJournal(usize),
    #[error("the durable record's tail {0:#04x} is not '+' or a lone '-'")]
    BadTail(u8),
    #[error("a finished durable record was shown without its tail, or a running one with one")]
    ShownTail,
}

impl From<UndecodableDurable> for StoreError {
    fn from(err: UndecodableDurable) -> Self {
        StoreError::decode(err)
    }
}

/// A token for a durable run: odd (see the module docs).
pub(crate) fn durable_token() -> FencingToken {
    FencingToken::from_u128(FencingToken::generate().as_u128() | 1)
}

/// A token for a plain run: even.
pub(crate) fn plain_token() -> FencingToken {
    FencingToken::from_u128(FencingToken::generate().as_u128() & !1)
}

/// Whether `token` was issued for a durable run.
pub(crate) fn is_durable(token: FencingToken) -> bool {
    token.as_u128() & 1 == 1
}

/// How a running durable record owned by `token` starts: version, `R`, the token.
pub(crate) fn running_prefix(token: FencingToken) -> [u8; DEADLINE_AT] {
    let mut prefix = record::running_prefix(token);
    prefix[1] = b'R';
    prefix
}

/// The retention field: `retain` in ms, or "kept until deleted".
pub(crate) fn retention_field(retain: Option<Duration>) -> [u8; 15] {
    match retain {
        None => *NO_RETAIN,
        Some(retain) => digits(millis(retain)),
    }
}

/// A fresh record's body, after the header's fixed fields: the fingerprint's length and
/// bytes, then the input as the journal's first item.
///
/// # Errors
/// [`StoreError::Encode`] for a fingerprint over 65,534 bytes; [`StoreError::TooLarge`]
/// for an input no item can frame (4 GiB; the journal limit is far below).
pub(crate) fn body(fingerprint: Option<&str>, input: &[u8]) -> Result<Vec<u8>, StoreError> {
    let fp = fingerprint.unwrap_or("");
    if fp.len() > MAX_FINGERPRINT_LEN {
        return Err(StoreError::Encode(
            format!(
                "fingerprint of {} bytes exceeds the Redis store's limit of {MAX_FINGERPRINT_LEN}",
                fp.len()
            )
            .into(),
        ));
    }
    let mut body = Vec::with_capacity(4 + fp.len() + ITEM_LEN_DIGITS + input.len());
    match fingerprint {
        Some(fp) => body.extend_from_slice(format!("{:04x}", fp.len()).as_bytes()),
        None => body.extend_from_slice(NO_FINGERPRINT),
    }
    body.extend_from_slice(fp.as_bytes());
    body.extend_from_slice(&item_len(input.len())?);
    body.extend_from_slice(input);
    Ok(body)
}

/// The length of a fresh record with `body` (see [`body`]) after its fixed fields.
pub(crate) fn fresh_len(body: &[u8]) -> usize {
    FP_LEN_AT + body.len()
}

/// The length field that frames an item of `len` bytes.
///
/// # Errors
/// [`StoreError::TooLarge`] past what 8 hex digits hold.
pub(crate) fn item_len(len: usize) -> Result<[u8; ITEM_LEN_DIGITS], StoreError> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let framed = u32::try_from(len).map_err(|_| StoreError::TooLarge {
        size: len,
        limit: u32::MAX as usize,
    })?;
    Ok(std::array::from_fn(|i| {
        DIGITS[((framed >> (4 * (ITEM_LEN_DIGITS - 1 - i))) & 0xf) as usize]
    }))
}

/// `n` as 15 zero-padded decimal digits (a century of ms takes 13).
fn digits(n: u64) -> [u8; 15] {
    let mut field = [0; 15];
    field.copy_from_slice(format!("{:015}", n.min(999_999_999_999_999)).as_bytes());
    field
}

fn version_byte() -> u8 {
    b'0' + (SCHEMA_VERSION % 10) as u8
}

/// A durable record's header, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) status: RecordStatus,
    pub(crate) token: FencingToken,
    /// Until when the owner holds it, in ms on Redis's clock.
    pub(crate) lease_deadline_ms: u64,
    /// Where a finished record's tail begins.
    tail_at: Option<usize>,
    fingerprint_len: Option<usize>,
}

impl Head {
    /// Where the fingerprint ends (and the journal begins).
    fn fingerprint_end(&self) -> usize {
        HEAD_LEN + self.fingerprint_len.unwrap_or(0)
    }
}

/// Whether `value` starts like a durable record of this schema version (its status letter
/// is uppercase), so that [`decode`] rather than the plain decoding reads it.
pub(crate) fn is_durable_value(value: &[u8]) -> bool {
    matches!(value, [b'1', b'R' | b'C' | b'F', ..])
}

/// The header at the start of `value` (which may go on past it).
///
/// # Errors
/// [`StoreError::UnsupportedVersion`] for another version digit, [`StoreError::Decode`] for
/// anything else this version does not write.
pub(crate) fn head(value: &[u8]) -> Result<Head, StoreError> {
    let &version = value.first().ok_or(UndecodableDurable::Truncated(0))?;
    if version.is_ascii_digit() {
        Record::check_version(u32::from(version - b'0'))?;
    }
    let head = value
        .get(..HEAD_LEN)
        .ok_or(UndecodableDurable::Truncated(value.len()))?;
    let field = |at: usize, len: usize| &head[at..at + len];
    let bad = |field: &'static str, found: &[u8]| UndecodableDurable::BadField {
        field,
        found: String::from_utf8_lossy(found).into_owned(),
    };
    if version != version_byte() {
        return Err(bad("version", &head[..1]).into());
    }
    let status = match head[1] {
        b'R' => RecordStatus::Running,
        b'C' => RecordStatus::Completed,
        b'F' => RecordStatus::Failed,
        _ => return Err(bad("status", &head[1..2]).into()),
    };
    let token = std::str::from_utf8(field(TOKEN_AT, 32))
        .map_err(|_| bad("token", field(TOKEN_AT, 32)))?
        .parse::<FencingToken>()?;
    let deadline = field(DEADLINE_AT, 15);
    let lease_deadline_ms = decimal(deadline).ok_or_else(|| bad("lease deadline", deadline))?;
    let retain = field(RETAIN_AT, 15);
    if retain != NO_RETAIN && decimal(retain).is_none() {
        return Err(bad("retention", retain).into());
    }
    let tail = field(TAIL_AT, 8);
    let tail_at = match status {
        RecordStatus::Running if tail == NO_TAIL => None,
        RecordStatus::Running => return Err(bad("tail offset", tail).into()),
        _ => Some(hex(tail).ok_or_else(|| bad("tail offset", tail))?),
    };
    let fp_len = field(FP_LEN_AT, 4);
    let fingerprint_len = if fp_len == NO_FINGERPRINT {
        None
    } else {
        Some(hex(fp_len).ok_or_else(|| bad("fingerprint length", fp_len))?)
    };
    Ok(Head {
        status,
        token,
        lease_deadline_ms,
        tail_at,
        fingerprint_len,
    })
}

/// The whole durable record `value` under `key`, and its journal.
///
/// # Errors
/// As for [`head`], and [`StoreError::Decode`] for a fingerprint, journal or tail that is
/// not framed as this version writes them.
pub(crate) fn decode(key: &str, value: &[u8]) -> Result<(Record, Journal), StoreError> {
    let head = head(value)?;
    let fingerprint = fingerprint(&head, value)?;
    let journal_end = head.tail_at.unwrap_or(value.len());
    let mut items = Items {
        value: value
            .get(..journal_end)
            .ok_or(UndecodableDurable::Truncated(value.len()))?,
        at: head.fingerprint_end(),
    };
    let input = items
        .next()
        .ok_or(UndecodableDurable::BadJournal(items.at))??
        .to_vec();
    let entries = items
        .map(|item| item.map(<[u8]>::to_vec))
        .collect::<Result<Vec<_>, _>>()?;
    let result = match head.tail_at {
        None => None,
        Some(at) => tail(&value[at..])?,
    };
    let record = Record {
        key: key.to_owned(),
        status: head.status,
        token: head.token,
        fingerprint,
        result,
    };
    Ok((record, Journal { input, entries }))
}

/// The record shown by a script that held the key with a durable record: its header and
/// fingerprint, and for a finished record its tail, without the journal between them.
///
/// # Errors
/// As for [`decode`].
pub(crate) fn decode_shown(
    key: &str,
    head_and_fingerprint: &[u8],
    shown_tail: Option<&[u8]>,
) -> Result<Record, StoreError> {
    let head = head(head_and_fingerprint)?;
    if head_and_fingerprint.len() != head.fingerprint_end() {
        return Err(UndecodableDurable::Truncated(head_and_fingerprint.len()).into());
    }
    let fingerprint = fingerprint(&head, head_and_fingerprint)?;
    let result = match (head.tail_at, shown_tail) {
        (None, None) => None,
        (Some(_), Some(shown)) => tail(shown)?,
        _ => return Err(UndecodableDurable::ShownTail.into()),
    };
    Ok(Record {
        key: key.to_owned(),
        status: head.status,
        token: head.token,
        fingerprint,
        result,
    })
}

fn fingerprint(head: &Head, value: &[u8]) -> Result<Option<String>, StoreError> {
    let Some(len) = head.fingerprint_len else {
        return Ok(None);
    };
    let bytes = value
        .get(HEAD_LEN..HEAD_LEN + len)
        .ok_or(UndecodableDurable::Truncated(value.len()))?;
    let fp = std::str::from_utf8(bytes).map_err(|_| UndecodableDurable::FingerprintNotUtf8)?;
    Ok(Some(fp.to_owned()))
}

/// A finished record's result, from its tail.
fn tail(tail: &[u8]) -> Result<Option<Vec<u8>>, UndecodableDurable> {
    match tail.split_first() {
        Some((b'+', result)) => Ok(Some(result.to_vec())),
        Some((b'-', [])) => Ok(None),
        Some((&flag, _)) => Err(UndecodableDurable::BadTail(flag)),
        None => Err(UndecodableDurable::Truncated(0)),
    }
}

/// The journal's items (the input, then each entry), each framed by its length.
struct Items<'a> {
    value: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Items<'a> {
    type Item = Result<&'a [u8], UndecodableDurable>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at == self.value.len() {
            return None;
        }
        let item = self
            .value
            .get(self.at..self.at + ITEM_LEN_DIGITS)
            .and_then(hex)
            .and_then(|len| {
                let start = self.at + ITEM_LEN_DIGITS;
                self.value.get(start..start + len)
            });
        match item {
            Some(item) => {
                self.at += ITEM_LEN_DIGITS + item.len();
                Some(Ok(item))
            }
            None => {
                let at = self.at;
                // Stop after the first error.
                self.at = self.value.len();
                Some(Err(UndecodableDurable::BadJournal(at)))
            }
        }
    }
}

/// Lowercase hex digits, exactly as written (no sign, no capitals).
fn hex(digits: &[u8]) -> Option<usize> {
    digits.iter().try_fold(0usize, |n, &d| {
        let digit = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        n.checked_mul(16)?.checked_add(usize::from(digit))
    })
}

/// Decimal digits, exactly as written.
fn decimal(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn token() -> FencingToken {
        TOKEN.parse().unwrap()
    }

    /// A record as the scripts write it: `status`, the tail offset field, fingerprint
    /// field and fingerprint, then `rest` (input, entries, tail).
    fn value(status: char, tail_at: &str, fp: &str, rest: &str) -> Vec<u8> {
        format!("1{status}{TOKEN}000000000001000000000000005000{tail_at}{fp}{rest}").into_bytes()
    }

    fn is_decode<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::Decode(_)))
    }

    #[test]
    fn a_running_record_decodes_with_its_journal() {
        let v = value('R', "--------", "0002fp", "00000002in00000001a00000000");
        let (record, journal) = decode("k", &v).unwrap();
        assert_eq!(record.status, RecordStatus::Running);
        assert_eq!(record.token, token());
        assert_eq!(record.fingerprint.as_deref(), Some("fp"));
        assert_eq!(record.result, None);
        assert_eq!(journal.input, b"in");
        assert_eq!(journal.entries, vec![b"a".to_vec(), Vec::new()]);
        let head = head(&v).unwrap();
        assert_eq!(head.lease_deadline_ms, 1000);
    }

    #[test]
    fn a_finished_record_decodes_with_its_journal_and_result() {
        // Header 76 + "0002fp" ... the tail begins after the last entry.
        let rest = "00000002in00000001a";
        let tail_at = 76 + 2 + rest.len();
        let v = value(
            'C',
            &format!("{tail_at:08x}"),
            "0002fp",
            &format!("{rest}+ok"),
        );
        let (record, journal) = decode("k", &v).unwrap();
        assert_eq!(record.status, RecordStatus::Completed);
        assert_eq!(record.result.as_deref(), Some(&b"ok"[..]));
        assert_eq!(journal.entries, vec![b"a".to_vec()]);
        let shown = decode_shown("k", &v[..tail_at - rest.len()], Some(b"+ok")).unwrap();
        assert_eq!(shown, record);

        let v = value(
            'F',
            &format!("{tail_at:08x}"),
            "0002fp",
            &format!("{rest}-"),
        );
        let (record, _) = decode("k", &v).unwrap();
        assert_eq!((record.status, record.result), (RecordStatus::Failed, None));
    }

    #[test]
    fn the_body_and_prefix_are_the_documented_fields() {
        assert_eq!(body(Some("fp"), b"in").unwrap(), b"0002fp00000002in");
        assert_eq!(body(None, b"").unwrap(), b"ffff00000000");
        assert_eq!(&item_len(0x1234).unwrap(), b"00001234");
        assert_eq!(
            &running_prefix(token())[..],
            format!("1R{TOKEN}").as_bytes()
        );
        assert_eq!(&retention_field(None), b"---------------");
        assert_eq!(
            &retention_field(Some(Duration::from_secs(60))),
            b"000000000060000"
        );
        let longer = "x".repeat(MAX_FINGERPRINT_LEN + 1);
        assert!(matches!(
            body(Some(&longer), b""),
            Err(StoreError::Encode(_))
        ));
    }

    #[test]
    fn tokens_tell_durable_runs_from_plain_ones() {
        for _ in 0..64 {
            assert!(is_durable(durable_token()));
            assert!(!is_durable(plain_token()));
        }
    }

    #[test]
    fn every_truncation_of_a_durable_record_is_a_decode_error() {
        let v = value('R', "--------", "0002fp", "00000002in00000003abc");
        for len in 1..v.len() {
            // Cutting between items leaves a shorter, well-formed journal.
            let cut = &v[..len];
            if len == HEAD_LEN + 2 + 10 {
                continue;
            }
            assert!(is_decode(decode("k", cut)), "prefix of {len}");
        }
    }

    #[test]
    fn malformed_fields_are_decode_errors_and_other_versions_unsupported() {
        let good = String::from_utf8(value('R', "--------", "ffff", "00000000")).unwrap();
        assert!(decode("k", good.as_bytes()).is_ok());
        let cases = [
            (1, "X"),         // status
            (2, "G"),         // token
            (34, "x"),        // lease deadline
            (49, "+"),        // retention
            (64, "0"),        // tail offset on a running record
            (72, "fffe"),     // fingerprint length past the value
            (76, "0000000x"), // input length
        ];
        for (at, bad) in cases {
            let mut v = good.clone().into_bytes();
            v[at..at + bad.len()].copy_from_slice(bad.as_bytes());
            assert!(is_decode(decode("k", &v)), "{at}: {bad}");
        }
        let finished_without_tail = value('C', "00000054", "ffff", "00000000");
        assert!(is_decode(decode("k", &finished_without_tail)));
        let running_with_tail = value('R', "--------", "ffff", "00000000+ok");
        assert!(is_decode(decode("k", &running_with_tail)));
        let bad_tail = value('C', "00000054", "ffff", "00000000*");
        assert!(is_decode(decode("k", &bad_tail)));
        let mut newer = good.into_bytes();
        newer[0] = b'2';
        assert!(matches!(
            decode("k", &newer),
            Err(StoreError::UnsupportedVersion { found: 2 })
        ));
    }
}
