//! The record layout (see the crate documentation): how a [`Record`] is laid out as a
//! DynamoDB item, and back.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use orchestrix::store::{FencingToken, Record, RecordStatus, StoreError};

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
/// The exact expiry attribute (epoch milliseconds).
pub(crate) const EXPIRES_AT_MS: &str = "expires_at_ms";

/// The attributes whose names are fixed; the configurable key and TTL attributes must not
/// reuse them.
pub(crate) const FIXED_ATTRIBUTES: [&str; 6] =
    [VERSION, STATUS, TOKEN, FINGERPRINT, RESULT, EXPIRES_AT_MS];

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

/// A decoded item: the record and when it stops being live.
#[derive(Debug)]
pub(crate) struct StoredRecord {
    pub(crate) record: Record,
    pub(crate) expires_at_ms: Option<u64>,
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
    Ok(StoredRecord {
        record: Record {
            key: key.to_owned(),
            status,
            token,
            fingerprint,
            result,
        },
        expires_at_ms,
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

    #[test]
    fn another_schema_version_is_refused_before_anything_else() {
        let i = item(&[(VERSION, number(7))]);
        assert!(matches!(
            decode(&i, "key"),
            Err(StoreError::UnsupportedVersion { found: 7 })
        ));
    }
}
