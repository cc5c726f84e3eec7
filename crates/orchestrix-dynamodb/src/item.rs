//! The record layout (see the crate documentation): how a [`Record`] is laid out as a
//! DynamoDB item, and back, and which layout a fencing token's record has.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use orchestrix::store::{FencingToken, Journal, Record, RecordStatus, StoreError};

/// The schema version attribute.
pub(crate) const VERSION: &str = "version";
/// The status attribute.
pub(crate) const STATUS: &str = "status";
/// The fencing-token attribute.
pub(crate) const TOKEN: &str = "token";
/// The fingerprint attribute.
pub(crate) const FINGERPRINT: &str = "fingerprint";
/// The result attribute.
pub(crate) const RESULT: &str = "result";
/// The exact expiry attribute (epoch milliseconds): the lease end of a plain running
/// record, the retention end of a durable one, the TTL end of a finished one.
pub(crate) const EXPIRES_AT_MS: &str = "expires_at_ms";

/// Durable records: the run's journaled input (`B`). Its presence makes a record durable.
pub(crate) const INPUT: &str = "input";
/// Durable records: the journal's entries, oldest first (`L` of `B`).
pub(crate) const JOURNAL: &str = "journal";
/// Durable records: the journal's size in bytes, input and entries (`N`), which the
/// append's condition holds to the store's journal limit.
pub(crate) const JOURNAL_BYTES: &str = "journal_bytes";
/// Running durable records: when the owner's lease ends (`N`, epoch milliseconds).
pub(crate) const LEASE_UNTIL_MS: &str = "lease_until_ms";
/// Running durable records: how long the record is kept once its lease lapsed (`N`,
/// milliseconds), from which a renewal computes the retention end in the same request.
pub(crate) const RETAIN_MS: &str = "retain_ms";
/// The same retention in whole seconds, rounded up (`N`), for the TTL attribute.
pub(crate) const RETAIN_SECS: &str = "retain_secs";
/// Running durable records: the ids of the appends applied (`NS`), so that an append the
/// SDK retries after its response was lost is recognised instead of applied twice.
pub(crate) const APPEND_IDS: &str = "append_ids";

/// The attributes only a durable record has (besides [`INPUT`]).
const DURABLE_ONLY: [&str; 6] = [
    JOURNAL,
    JOURNAL_BYTES,
    LEASE_UNTIL_MS,
    RETAIN_MS,
    RETAIN_SECS,
    APPEND_IDS,
];

/// The attributes whose names are fixed; the configurable key and TTL attributes must not
/// reuse them.
pub(crate) const FIXED_ATTRIBUTES: [&str; 13] = [
    VERSION,
    STATUS,
    TOKEN,
    FINGERPRINT,
    RESULT,
    EXPIRES_AT_MS,
    INPUT,
    JOURNAL,
    JOURNAL_BYTES,
    LEASE_UNTIL_MS,
    RETAIN_MS,
    RETAIN_SECS,
    APPEND_IDS,
];

/// The retention a durable run kept "until deleted" (`retain: None`) is stored with:
/// 1,000 years. A renewal computes the record's expiry from the stored retention, and an
/// update expression cannot compute "no expiry", so "until deleted" is an expiry no
/// record reaches; every build (older ones included) reads it as live.
pub(crate) const RETAIN_UNTIL_DELETED: Duration = Duration::from_secs(1_000 * 365 * 86_400);

/// The lease end a suspended durable run is given: the epoch. Its lease has lapsed on
/// every clock at once (no owner is left to protect with the skew allowance), and a
/// suspend retried after its response was lost recognises its own write by its token and
/// this instant.
pub(crate) const SUSPENDED_AT_MS: u64 = 0;

/// What an append adds to the item besides its entry, at most: the list element's byte
/// and its id in [`APPEND_IDS`] (a number of up to 20 digits).
pub(crate) const APPEND_OVERHEAD: usize = 1 + 11;

/// DynamoDB's item size limit: attribute names plus values.
pub(crate) const MAX_ITEM_BYTES: usize = 400 * 1024;

/// The lease end a release writes: the epoch. A released record is a running record whose
/// lease ended long ago, which every build (older ones included) reads as absent and
/// `start` takes over, and which no lapsed lease can be mistaken for: so a release retried
/// after its response was lost recognises its own tombstone by its token and this instant.
pub(crate) const RELEASED_AT_MS: u64 = 0;

/// Milliseconds since the Unix epoch on this machine's clock (0 for a clock set before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A number attribute.
pub(crate) fn number(n: impl ToString) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

/// Which record a fencing token was issued for: a plain one or a durable one, in the
/// token's lowest bit (its random half keeps 63 random bits).
///
/// DynamoDB's update expressions cannot branch on what the item holds, and the owner's
/// writes differ by layout: renewing a plain record moves its expiry; renewing a durable
/// one moves its lease and computes its retention end from the stored retention. The token
/// says which, so each of the owner's writes is still one request. A token this store did
/// not issue (a stale or made-up one) owns no record, and either request answers
/// `StaleToken`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// A record of a plain run: its lease is its expiry.
    Plain,
    /// A durable run's record: lease, retention and journal.
    Durable,
}

impl Layout {
    /// A fresh token for a record of this layout.
    pub(crate) fn issue(self) -> FencingToken {
        let random = FencingToken::generate().as_u128() & !1;
        FencingToken::from_u128(random | u128::from(self == Self::Durable))
    }

    /// The layout of the record `token` was issued for.
    pub(crate) fn of(token: FencingToken) -> Self {
        if token.as_u128() & 1 == 1 {
            Self::Durable
        } else {
            Self::Plain
        }
    }
}

/// A number that identifies one append among a record's appends: the random half of a
/// fresh token.
pub(crate) fn append_id() -> u64 {
    let random = FencingToken::generate().as_u128() & u128::from(u64::MAX);
    u64::try_from(random).unwrap_or_default()
}

/// The smallest size DynamoDB can count for a finished item under `key` without its
/// result and fingerprint (every number counted as one byte), so that a result larger
/// than `MAX_ITEM_BYTES` minus this can never fit.
pub(crate) fn finished_item_overhead(
    key_attribute: &str,
    key: &str,
    ttl_attribute: &str,
    status: RecordStatus,
) -> usize {
    const NUMBER_AT_LEAST: usize = 1;
    const TOKEN_DIGITS: usize = 32;
    key_attribute.len()
        + key.len()
        + VERSION.len()
        + NUMBER_AT_LEAST
        + STATUS.len()
        + status.as_str().len()
        + TOKEN.len()
        + TOKEN_DIGITS
        + RESULT.len()
        + EXPIRES_AT_MS.len()
        + NUMBER_AT_LEAST
        + ttl_attribute.len()
        + NUMBER_AT_LEAST
}

/// The size DynamoDB counts for `item` against [`MAX_ITEM_BYTES`]: each attribute's name
/// and value, in UTF-8 bytes for strings, raw bytes for binaries, one byte per two
/// significant digits plus one for numbers, as DynamoDB documents it ("Item sizes and
/// formats"). Lists, maps and sets, which no record holds, are counted the same way.
pub(crate) fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

fn value_size(value: &AttributeValue) -> usize {
    /// What a list or map costs besides its elements, and each element.
    const CONTAINER: usize = 3;
    const ELEMENT: usize = 1;
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => number_size(n),
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Ss(set) => set.iter().map(String::len).sum(),
        AttributeValue::Ns(set) => set.iter().map(|n| number_size(n)).sum(),
        AttributeValue::Bs(set) => set.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::L(list) => {
            CONTAINER + list.iter().map(|v| ELEMENT + value_size(v)).sum::<usize>()
        }
        AttributeValue::M(map) => {
            let entries: usize = map
                .iter()
                .map(|(k, v)| ELEMENT + k.len() + value_size(v))
                .sum();
            CONTAINER + entries
        }
        // BOOL, NULL, and any kind a newer SDK adds.
        _ => 1,
    }
}

/// A number's size: one byte per two significant digits (leading and trailing zeros do
/// not count), plus one.
fn number_size(n: &str) -> usize {
    let digits: Vec<u8> = n.bytes().filter(u8::is_ascii_digit).collect();
    let first = digits.iter().position(|&d| d != b'0');
    let last = digits.iter().rposition(|&d| d != b'0');
    let significant = match (first, last) {
        (Some(first), Some(last)) => last - first + 1,
        _ => 0,
    };
    significant.div_ceil(2) + 1 + usize::from(n.starts_with('-'))
}

/// The room a result has in `finished`, the item of a record finished without its result:
/// the item limit less the item's own size and the result attribute's name.
pub(crate) fn room_for_result(finished: &HashMap<String, AttributeValue>) -> usize {
    MAX_ITEM_BYTES.saturating_sub(item_size(finished) + RESULT.len())
}

/// How many bytes the journal in `item` may grow to: the journal as it is, plus the room
/// the item has left for one more entry (its own size counted as DynamoDB documents it).
/// What a refused append quotes as the limit it met.
pub(crate) fn journal_room(item: &HashMap<String, AttributeValue>, journal_bytes: u64) -> usize {
    let journal = usize::try_from(journal_bytes).unwrap_or(usize::MAX);
    MAX_ITEM_BYTES
        .saturating_sub(item_size(item) + APPEND_OVERHEAD)
        .saturating_add(journal)
}

/// A decoded item: the record and when it stops being live.
#[derive(Debug)]
pub(crate) struct StoredRecord {
    pub(crate) record: Record,
    pub(crate) expires_at_ms: Option<u64>,
    /// What a durable record has besides; `None` for a plain record.
    pub(crate) durable: Option<Durable>,
}

/// The durable part of a decoded record (the journal itself is read by [`journal`]).
#[derive(Debug)]
pub(crate) struct Durable {
    /// The owner's lease end; `Some` exactly while running.
    pub(crate) lease_until_ms: Option<u64>,
    /// The journal's size, input and entries.
    pub(crate) journal_bytes: u64,
    /// The ids of the appends applied since the record last finished.
    append_ids: Vec<u64>,
}

impl Durable {
    /// Whether the append with `id` was applied to this record.
    pub(crate) fn has_appended(&self, id: u64) -> bool {
        self.append_ids.contains(&id)
    }
}

impl StoredRecord {
    /// Whether the record is still live: it has no expiry, or its expiry is after
    /// `cutoff_ms` (now minus the skew allowance), the same test the conditions make.
    pub(crate) fn is_live(&self, cutoff_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|at| at > cutoff_ms)
    }

    /// Whether this is the tombstone a release by `token` leaves (see [`RELEASED_AT_MS`]).
    pub(crate) fn is_released_by(&self, token: FencingToken) -> bool {
        self.record.token == token
            && self.record.status == RecordStatus::Running
            && self.expires_at_ms == Some(RELEASED_AT_MS)
    }

    /// The running durable record's lease end; `None` for any other record.
    fn lease_until_ms(&self) -> Option<u64> {
        match (&self.durable, self.record.status) {
            (Some(durable), RecordStatus::Running) => durable.lease_until_ms,
            _ => None,
        }
    }

    /// Whether `token` owns this durable record: running, its token, lease alive at
    /// `cutoff_ms` (the same test as the owner's conditions).
    pub(crate) fn is_durable_owned_by(&self, token: FencingToken, cutoff_ms: u64) -> bool {
        self.record.token == token && self.lease_until_ms().is_some_and(|l| l > cutoff_ms)
    }

    /// Whether this is a durable run whose owner is gone: live, running, lease lapsed at
    /// `cutoff_ms`.
    pub(crate) fn is_abandoned(&self, cutoff_ms: u64) -> bool {
        self.is_live(cutoff_ms) && self.lease_until_ms().is_some_and(|l| l <= cutoff_ms)
    }

    /// Whether this is the durable run `token` suspended (see [`SUSPENDED_AT_MS`]).
    pub(crate) fn is_suspended_by(&self, token: FencingToken) -> bool {
        self.record.token == token && self.lease_until_ms() == Some(SUSPENDED_AT_MS)
    }
}

/// Why an item is not a record.
#[derive(Debug, thiserror::Error)]
enum AttributeError {
    #[error("attribute {0:?} is missing")]
    Missing(String),
    #[error("attribute {name:?} is not of type {expected}")]
    WrongType {
        name: String,
        expected: &'static str,
    },
    #[error("attribute {name:?} is not a valid number: {value:?}")]
    BadNumber { name: String, value: String },
    #[error("running record has no lease expiry ({EXPIRES_AT_MS:?})")]
    RunningWithoutLease,
    #[error("attribute {0:?} of a durable record is on a record without {INPUT:?}")]
    DurableWithoutInput(&'static str),
    #[error("journal entry {0} is not of type B")]
    EntryNotBinary(usize),
}

/// Decodes an item read back from the table whose partition key is `key_attribute`.
///
/// The schema version is checked first: an item of another version may have another
/// layout, so nothing else of it is trusted.
pub(crate) fn decode(
    item: &HashMap<String, AttributeValue>,
    key_attribute: &str,
) -> Result<StoredRecord, StoreError> {
    let version = number_attr(item, VERSION)?.ok_or_else(|| missing(VERSION))?;
    let version = u32::try_from(version).unwrap_or(u32::MAX);
    Record::check_version(version)?;
    let key = string_attr(item, key_attribute)?.ok_or_else(|| missing(key_attribute))?;
    let status: RecordStatus = string_attr(item, STATUS)?
        .ok_or_else(|| missing(STATUS))?
        .parse()?;
    let token = string_attr(item, TOKEN)?
        .ok_or_else(|| missing(TOKEN))?
        .parse()?;
    let fingerprint = string_attr(item, FINGERPRINT)?.map(str::to_owned);
    let result = match item.get(RESULT) {
        None => None,
        Some(AttributeValue::B(blob)) => Some(blob.as_ref().to_vec()),
        Some(_) => return Err(wrong_type(RESULT, "B")),
    };
    let expires_at_ms = number_attr(item, EXPIRES_AT_MS)?;
    if status == RecordStatus::Running && expires_at_ms.is_none() {
        return Err(StoreError::decode(AttributeError::RunningWithoutLease));
    }
    let durable = decode_durable(item, status)?;
    Ok(StoredRecord {
        record: Record {
            key: key.to_owned(),
            status,
            token,
            fingerprint,
            result,
        },
        expires_at_ms,
        durable,
    })
}

/// The durable part of an item: `None` for a plain record (one without [`INPUT`] and every
/// other durable attribute). A running durable record has its lease and retention.
fn decode_durable(
    item: &HashMap<String, AttributeValue>,
    status: RecordStatus,
) -> Result<Option<Durable>, StoreError> {
    match item.get(INPUT) {
        None => {
            return match DURABLE_ONLY
                .into_iter()
                .find(|name| item.contains_key(*name))
            {
                Some(name) => Err(StoreError::decode(AttributeError::DurableWithoutInput(
                    name,
                ))),
                None => Ok(None),
            };
        }
        Some(AttributeValue::B(_)) => {}
        Some(_) => return Err(wrong_type(INPUT, "B")),
    }
    match item.get(JOURNAL) {
        Some(AttributeValue::L(_)) => {}
        Some(_) => return Err(wrong_type(JOURNAL, "L")),
        None => return Err(missing(JOURNAL)),
    }
    let journal_bytes = number_attr(item, JOURNAL_BYTES)?.ok_or_else(|| missing(JOURNAL_BYTES))?;
    let append_ids = match item.get(APPEND_IDS) {
        None => Vec::new(),
        Some(AttributeValue::Ns(ids)) => ids
            .iter()
            .map(|id| {
                id.parse().map_err(|_| {
                    StoreError::decode(AttributeError::BadNumber {
                        name: APPEND_IDS.to_owned(),
                        value: id.clone(),
                    })
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(wrong_type(APPEND_IDS, "NS")),
    };
    let lease_until_ms = if status == RecordStatus::Running {
        for name in [RETAIN_MS, RETAIN_SECS] {
            number_attr(item, name)?.ok_or_else(|| missing(name))?;
        }
        Some(number_attr(item, LEASE_UNTIL_MS)?.ok_or_else(|| missing(LEASE_UNTIL_MS))?)
    } else {
        None
    };
    Ok(Some(Durable {
        lease_until_ms,
        journal_bytes,
        append_ids,
    }))
}

/// The journal of a durable record's item, borrowed: its input and its entries.
///
/// # Errors
/// [`StoreError::Decode`] when the item has no journal, or one of the wrong types.
pub(crate) fn journal_parts(
    item: &HashMap<String, AttributeValue>,
) -> Result<(&[u8], Vec<&[u8]>), StoreError> {
    let input = match item.get(INPUT) {
        Some(AttributeValue::B(input)) => input.as_ref(),
        Some(_) => return Err(wrong_type(INPUT, "B")),
        None => return Err(missing(INPUT)),
    };
    let entries = match item.get(JOURNAL) {
        Some(AttributeValue::L(entries)) => entries,
        Some(_) => return Err(wrong_type(JOURNAL, "L")),
        None => return Err(missing(JOURNAL)),
    };
    let entries = entries
        .iter()
        .enumerate()
        .map(|(at, entry)| match entry {
            AttributeValue::B(entry) => Ok(entry.as_ref()),
            _ => Err(StoreError::decode(AttributeError::EntryNotBinary(at))),
        })
        .collect::<Result<_, _>>()?;
    Ok((input, entries))
}

/// The journal of a durable record's item, copied out.
///
/// # Errors
/// As for [`journal_parts`].
pub(crate) fn journal(item: &HashMap<String, AttributeValue>) -> Result<Journal, StoreError> {
    let (input, entries) = journal_parts(item)?;
    Ok(Journal {
        input: input.to_vec(),
        entries: entries.into_iter().map(<[u8]>::to_vec).collect(),
    })
}

fn string_attr<'a>(
    item: &'a HashMap<String, AttributeValue>,
    name: &str,
) -> Result<Option<&'a str>, StoreError> {
    match item.get(name) {
        None => Ok(None),
        Some(AttributeValue::S(s)) => Ok(Some(s)),
        Some(_) => Err(wrong_type(name, "S")),
    }
}

fn number_attr(
    item: &HashMap<String, AttributeValue>,
    name: &str,
) -> Result<Option<u64>, StoreError> {
    match item.get(name) {
        None => Ok(None),
        Some(AttributeValue::N(n)) => n.parse().map(Some).map_err(|_| {
            StoreError::decode(AttributeError::BadNumber {
                name: name.to_owned(),
                value: n.clone(),
            })
        }),
        Some(_) => Err(wrong_type(name, "N")),
    }
}

fn missing(name: &str) -> StoreError {
    StoreError::decode(AttributeError::Missing(name.to_owned()))
}

fn wrong_type(name: &str, expected: &'static str) -> StoreError {
    StoreError::decode(AttributeError::WrongType {
        name: name.to_owned(),
        expected,
    })
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodb::primitives::Blob;
    use orchestrix::store::FencingToken;

    use super::*;

    fn item(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.to_owned())
    }

    fn complete_item() -> HashMap<String, AttributeValue> {
        item(&[
            ("key", s("k")),
            (VERSION, number(1)),
            (STATUS, s("completed")),
            (TOKEN, s(&FencingToken::generate().to_string())),
            (RESULT, AttributeValue::B(Blob::new(vec![0, 1, 2]))),
        ])
    }

    #[test]
    fn a_finished_record_without_expiry_decodes_and_is_live() {
        let stored = decode(&complete_item(), "key").ok();
        let stored = stored.unwrap_or_else(|| panic!("must decode"));
        assert_eq!(stored.record.result, Some(vec![0, 1, 2]));
        assert!(stored.is_live(u64::MAX));
    }

    #[test]
    fn missing_and_malformed_attributes_are_decode_errors() {
        for broken in [
            {
                let mut i = complete_item();
                i.remove(TOKEN);
                i
            },
            {
                let mut i = complete_item();
                i.insert(STATUS.to_owned(), number(3));
                i
            },
            {
                let mut i = complete_item();
                i.insert(EXPIRES_AT_MS.to_owned(), AttributeValue::N("soon".into()));
                i
            },
            {
                let mut i = complete_item();
                i.insert(STATUS.to_owned(), s("running"));
                i
            },
        ] {
            assert!(matches!(decode(&broken, "key"), Err(StoreError::Decode(_))));
        }
    }

    #[test]
    fn numbers_count_one_byte_per_two_significant_digits_plus_one() {
        assert_eq!(number_size("0"), 1);
        assert_eq!(number_size("1"), 2);
        assert_eq!(number_size("12"), 2);
        assert_eq!(number_size("123"), 3);
        assert_eq!(number_size("1700000000123"), 8);
        assert_eq!(number_size("1700000000000"), 2);
        assert_eq!(number_size("1000"), 2);
        assert_eq!(number_size("0.0015"), 2);
        assert_eq!(number_size("-12"), 3);
    }

    #[test]
    fn an_item_counts_names_and_values() {
        let i = item(&[
            ("key", s("k")),
            (VERSION, number(1)),
            (RESULT, AttributeValue::B(Blob::new(vec![0; 10]))),
        ]);
        assert_eq!(item_size(&i), (3 + 1) + (7 + 2) + (6 + 10));
    }

    #[test]
    fn the_room_for_a_result_is_what_the_item_leaves() {
        let i = item(&[("key", s("k")), (FINGERPRINT, s(&"f".repeat(1000)))]);
        assert_eq!(
            room_for_result(&i),
            MAX_ITEM_BYTES - (3 + 1) - (11 + 1000) - RESULT.len()
        );
    }

    fn running_durable_item() -> HashMap<String, AttributeValue> {
        item(&[
            ("key", s("k")),
            (VERSION, number(1)),
            (STATUS, s("running")),
            (TOKEN, s(&Layout::Durable.issue().to_string())),
            (EXPIRES_AT_MS, number(5_000)),
            (LEASE_UNTIL_MS, number(2_000)),
            (RETAIN_MS, number(3_000)),
            (RETAIN_SECS, number(3)),
            (INPUT, AttributeValue::B(Blob::new(&b"in"[..]))),
            (
                JOURNAL,
                AttributeValue::L(vec![AttributeValue::B(Blob::new(&b"e"[..]))]),
            ),
            (JOURNAL_BYTES, number(3)),
            (APPEND_IDS, AttributeValue::Ns(vec!["42".into()])),
        ])
    }

    #[test]
    fn a_token_says_which_layout_its_record_has() {
        for _ in 0..64 {
            assert_eq!(Layout::of(Layout::Plain.issue()), Layout::Plain);
            assert_eq!(Layout::of(Layout::Durable.issue()), Layout::Durable);
        }
    }

    #[test]
    fn a_durable_record_is_abandoned_between_its_lease_and_its_retention() {
        let stored = decode(&running_durable_item(), "key").ok();
        let stored = stored.unwrap_or_else(|| panic!("must decode"));
        assert!(!stored.is_abandoned(1_999));
        assert!(stored.is_durable_owned_by(stored.record.token, 1_999));
        assert!(stored.is_abandoned(2_000));
        assert!(!stored.is_durable_owned_by(stored.record.token, 2_000));
        assert!(stored.is_abandoned(4_999));
        assert!(!stored.is_abandoned(5_000), "past its retention it is gone");
        assert!(stored.durable.is_some_and(|d| d.has_appended(42)));
        let journal = journal(&running_durable_item()).ok();
        assert_eq!(
            journal,
            Some(Journal {
                input: b"in".to_vec(),
                entries: vec![b"e".to_vec()],
            })
        );
    }

    #[test]
    fn a_durable_record_missing_a_part_is_a_decode_error() {
        for name in [
            JOURNAL,
            JOURNAL_BYTES,
            LEASE_UNTIL_MS,
            RETAIN_MS,
            RETAIN_SECS,
        ] {
            let mut broken = running_durable_item();
            broken.remove(name);
            assert!(
                matches!(decode(&broken, "key"), Err(StoreError::Decode(_))),
                "{name}"
            );
        }
        let mut stray = running_durable_item();
        stray.remove(INPUT);
        assert!(matches!(decode(&stray, "key"), Err(StoreError::Decode(_))));
        let mut bad_entry = running_durable_item();
        bad_entry.insert(JOURNAL.to_owned(), AttributeValue::L(vec![s("text")]));
        assert!(decode(&bad_entry, "key").is_ok());
        assert!(matches!(journal(&bad_entry), Err(StoreError::Decode(_))));
    }

    #[test]
    fn a_finished_durable_record_needs_no_lease() {
        let mut finished = running_durable_item();
        finished.insert(STATUS.to_owned(), s("completed"));
        for gone in [LEASE_UNTIL_MS, RETAIN_MS, RETAIN_SECS, APPEND_IDS] {
            finished.remove(gone);
        }
        let stored = decode(&finished, "key").ok();
        let stored = stored.unwrap_or_else(|| panic!("must decode"));
        assert!(!stored.is_abandoned(3_000));
        assert!(stored.durable.is_some());
    }

    #[test]
    fn another_schema_version_is_refused_before_anything_else() {
        let i = item(&[(VERSION, number(7))]);
        assert!(matches!(
            decode(&i, "key"),
            Err(StoreError::UnsupportedVersion { found: 7 })
        ));
    }
}
