//! The record's layout in Redis: one string per key, in a compact, versioned encoding.
//!
//! ```text
//! offset  length  content
//! 0       1       schema version, one ASCII digit ('1' = SCHEMA_VERSION 1)
//! 1       1       status: 'r' running, 'c' completed, 'f' failed
//! 2       32      the owner's fencing token, 32 lowercase hex digits
//! 34      4       fingerprint length, 4 lowercase hex digits; 'ffff' = no fingerprint
//! 38      n       the fingerprint (UTF-8), n = that length (at most 65534 bytes)
//! 38 + n  1       '-' no result (nothing follows) or '+' the result follows
//! 39 + n  ...     the result bytes, to the end of the string
//! ```
//!
//! Every field before the fingerprint sits at a fixed offset, so the fenced scripts check
//! version, status and token at once, comparing the first 34 bytes with the
//! [`running_prefix`] the caller sends, and `start` can write a whole running record with
//! one native `SET`.
//!
//! The key's own expiry is the lease (running) or the TTL (finished); no expiry means
//! "keep until deleted".

use orchestrix::store::{FencingToken, Record, RecordStatus, SCHEMA_VERSION, StoreError};

/// Offset of the fingerprint length.
const FP_LEN_AT: usize = 34;
/// Offset of the fingerprint.
const FP_AT: usize = 38;
/// The fingerprint length meaning "no fingerprint".
const NO_FINGERPRINT: &[u8; 4] = b"ffff";
/// The longest fingerprint the layout holds.
pub(crate) const MAX_FINGERPRINT_LEN: usize = 0xfffe;
/// The most bytes a record holds besides its result: the header, the longest fingerprint
/// and the result flag.
pub(crate) const MAX_OVERHEAD: usize = FP_AT + MAX_FINGERPRINT_LEN + 1;
/// The result flag: no result follows.
pub(crate) const NO_RESULT: u8 = b'-';
/// The result flag: the result follows.
pub(crate) const HAS_RESULT: u8 = b'+';

/// Why a value under a key is not a record this store can read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UndecodableRecord {
    #[error("the key holds a Redis {0}, not a record string")]
    WrongType(String),
    #[error("the record is empty")]
    Empty,
    #[error("the record's schema version byte {0:#04x} is not a digit")]
    BadVersion(u8),
    #[error("the record is truncated: {0} bytes")]
    Truncated(usize),
    #[error("the record's status byte {0:#04x} is not 'r', 'c' or 'f'")]
    BadStatus(u8),
    #[error("the record's fingerprint length {0:?} is not 4 lowercase hex digits")]
    BadFingerprintLength(String),
    #[error("the record's fingerprint is not UTF-8")]
    FingerprintNotUtf8,
    #[error("the record's result flag {0:#04x} is not '-' or '+'")]
    BadResultFlag(u8),
    #[error("the record has {0} bytes after its '-' (no result) flag")]
    TrailingBytes(usize),
}

impl From<UndecodableRecord> for StoreError {
    fn from(err: UndecodableRecord) -> Self {
        StoreError::decode(err)
    }
}

/// The status's one-byte code.
pub(crate) fn status_code(status: RecordStatus) -> u8 {
    match status {
        RecordStatus::Running => b'r',
        RecordStatus::Completed => b'c',
        // `RecordStatus` is non-exhaustive; only these three exist today.
        _ => b'f',
    }
}

/// The encoded record.
///
/// # Errors
/// [`StoreError::Encode`] for a fingerprint longer than [`MAX_FINGERPRINT_LEN`] bytes.
pub(crate) fn encode(
    status: RecordStatus,
    token: FencingToken,
    fingerprint: Option<&str>,
    result: Option<&[u8]>,
) -> Result<Vec<u8>, StoreError> {
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
    let mut out = Vec::with_capacity(FP_AT + fp.len() + 1 + result.map_or(0, <[u8]>::len));
    out.push(version_byte());
    out.push(status_code(status));
    out.extend_from_slice(&hex::<32>(token.as_u128()));
    match fingerprint {
        // At most MAX_FINGERPRINT_LEN (checked above), so 4 digits hold it.
        Some(fp) => out.extend_from_slice(&hex::<4>(fp.len() as u128)),
        None => out.extend_from_slice(NO_FINGERPRINT),
    }
    out.extend_from_slice(fp.as_bytes());
    match result {
        Some(result) => {
            out.push(HAS_RESULT);
            out.extend_from_slice(result);
        }
        None => out.push(NO_RESULT),
    }
    Ok(out)
}

/// How a running record owned by `token` starts: version, status `r` and the token. The
/// fenced scripts compare it with the first bytes of the stored value, so one comparison
/// checks all three.
pub(crate) fn running_prefix(token: FencingToken) -> [u8; FP_LEN_AT] {
    let mut prefix = [0; FP_LEN_AT];
    prefix[0] = version_byte();
    prefix[1] = status_code(RecordStatus::Running);
    prefix[2..].copy_from_slice(&hex::<32>(token.as_u128()));
    prefix
}

/// The low `N` hex digits of `value`, lowercase and zero-padded as `{:0N$x}` writes them,
/// on the stack rather than in a new `String`.
fn hex<const N: usize>(value: u128) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    const { assert!(N <= 32, "a u128 has 32 hex digits") };
    std::array::from_fn(|i| DIGITS[((value >> (4 * (N - 1 - i))) & 0xf) as usize])
}

/// This build's schema version as its one-digit code.
fn version_byte() -> u8 {
    // SCHEMA_VERSION is 1; the layout reserves one digit for it.
    b'0' + (SCHEMA_VERSION % 10) as u8
}

/// The record under `key` from its encoded value.
///
/// # Errors
/// [`StoreError::UnsupportedVersion`] for another schema version digit (checked first, so a
/// newer layout is reported as such); [`StoreError::Decode`] for anything else malformed.
pub(crate) fn decode(key: &str, value: &[u8]) -> Result<Record, StoreError> {
    let &version = value.first().ok_or(UndecodableRecord::Empty)?;
    if !version.is_ascii_digit() {
        return Err(UndecodableRecord::BadVersion(version).into());
    }
    Record::check_version(u32::from(version - b'0'))?;
    if value.len() < FP_AT + 1 {
        return Err(UndecodableRecord::Truncated(value.len()).into());
    }
    let status = match value[1] {
        b'r' => RecordStatus::Running,
        b'c' => RecordStatus::Completed,
        b'f' => RecordStatus::Failed,
        other => return Err(UndecodableRecord::BadStatus(other).into()),
    };
    let token = std::str::from_utf8(&value[2..FP_LEN_AT])
        .map_err(|_| StoreError::decode("fencing token is not ASCII"))?
        .parse::<FencingToken>()?;
    let fp_len = &value[FP_LEN_AT..FP_AT];
    let (fingerprint, rest) = if fp_len == NO_FINGERPRINT {
        (None, &value[FP_AT..])
    } else {
        let len = hex_len(fp_len)?;
        let rest = &value[FP_AT..];
        if rest.len() < len + 1 {
            return Err(UndecodableRecord::Truncated(value.len()).into());
        }
        let (fp, rest) = rest.split_at(len);
        let fp = std::str::from_utf8(fp).map_err(|_| UndecodableRecord::FingerprintNotUtf8)?;
        (Some(fp.to_owned()), rest)
    };
    let result = match rest.split_first() {
        Some((&HAS_RESULT, result)) => Some(result.to_vec()),
        Some((&NO_RESULT, [])) => None,
        Some((&NO_RESULT, trailing)) => {
            return Err(UndecodableRecord::TrailingBytes(trailing.len()).into());
        }
        Some((&flag, _)) => return Err(UndecodableRecord::BadResultFlag(flag).into()),
        None => return Err(UndecodableRecord::Truncated(value.len()).into()),
    };
    Ok(Record {
        key: key.to_owned(),
        status,
        token,
        fingerprint,
        result,
    })
}

/// A fingerprint length: exactly 4 lowercase hex digits, `ffff` excluded by the caller.
fn hex_len(digits: &[u8]) -> Result<usize, UndecodableRecord> {
    let bad = || UndecodableRecord::BadFingerprintLength(String::from_utf8_lossy(digits).into());
    digits.iter().try_fold(0usize, |len, &d| {
        let digit = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return Err(bad()),
        };
        Ok(len * 16 + usize::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn token() -> FencingToken {
        TOKEN.parse().unwrap()
    }

    fn is_decode(result: Result<Record, StoreError>) -> bool {
        matches!(result, Err(StoreError::Decode(_)))
    }

    #[test]
    fn every_shape_of_record_round_trips() {
        let statuses = [
            RecordStatus::Running,
            RecordStatus::Completed,
            RecordStatus::Failed,
        ];
        let fingerprints = [None, Some(""), Some("fp"), Some("ünïcode")];
        let results: [Option<&[u8]>; 4] = [None, Some(b""), Some(b"ok"), Some(&[0, 255, b'-', 0])];
        for status in statuses {
            for fingerprint in fingerprints {
                for result in results {
                    let encoded = encode(status, token(), fingerprint, result).unwrap();
                    let record = decode("k", &encoded).unwrap();
                    assert_eq!(
                        record,
                        Record {
                            key: "k".to_owned(),
                            status,
                            token: token(),
                            fingerprint: fingerprint.map(str::to_owned),
                            result: result.map(<[u8]>::to_vec),
                        }
                    );
                }
            }
        }
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let encoded = encode(RecordStatus::Completed, token(), Some("fp"), Some(b"ok")).unwrap();
        assert_eq!(encoded, format!("1c{TOKEN}0002fp+ok").into_bytes());
        let encoded = encode(RecordStatus::Running, token(), None, None).unwrap();
        assert_eq!(encoded, format!("1r{TOKEN}ffff-").into_bytes());
    }

    #[test]
    fn hex_digits_are_those_display_writes() {
        for raw in [
            0,
            1,
            0xabc,
            u128::MAX,
            0x0123_4567_89ab_cdef_0000_0000_ffff_0001,
        ] {
            let token = FencingToken::from_u128(raw);
            assert_eq!(hex::<32>(raw), token.to_string().as_bytes());
        }
        assert_eq!(&hex::<4>(0), b"0000");
        assert_eq!(&hex::<4>(0xfffe), b"fffe");
    }

    #[test]
    fn a_running_record_starts_with_its_running_prefix() {
        let prefix = running_prefix(token());
        assert_eq!(prefix, format!("1r{TOKEN}").as_bytes());
        for fingerprint in [None, Some("fp")] {
            let encoded = encode(RecordStatus::Running, token(), fingerprint, None).unwrap();
            assert!(encoded.starts_with(&prefix));
        }
    }

    #[test]
    fn the_longest_fingerprint_fits_and_a_longer_one_is_an_encode_error() {
        let longest = "x".repeat(MAX_FINGERPRINT_LEN);
        let encoded = encode(RecordStatus::Running, token(), Some(&longest), None).unwrap();
        assert_eq!(
            decode("k", &encoded).unwrap().fingerprint.as_deref(),
            Some(longest.as_str())
        );
        let longer = "x".repeat(MAX_FINGERPRINT_LEN + 1);
        assert!(matches!(
            encode(RecordStatus::Running, token(), Some(&longer), None),
            Err(StoreError::Encode(_))
        ));
    }

    #[test]
    fn max_overhead_is_what_the_longest_fingerprint_and_no_result_take() {
        let longest = "x".repeat(MAX_FINGERPRINT_LEN);
        let encoded = encode(RecordStatus::Completed, token(), Some(&longest), Some(b"")).unwrap();
        assert_eq!(encoded.len(), MAX_OVERHEAD);
    }

    #[test]
    fn every_truncation_of_a_record_is_a_decode_error() {
        let encoded = encode(RecordStatus::Failed, token(), Some("fp"), None).unwrap();
        for len in 0..encoded.len() {
            assert!(is_decode(decode("k", &encoded[..len])), "prefix of {len}");
        }
    }

    #[test]
    fn another_version_digit_is_unsupported() {
        let value = format!("9c{TOKEN}ffff-");
        assert!(matches!(
            decode("k", value.as_bytes()),
            Err(StoreError::UnsupportedVersion { found: 9 })
        ));
        // Checked first: a newer layout need not look like this one at all.
        assert!(matches!(
            decode("k", b"2"),
            Err(StoreError::UnsupportedVersion { found: 2 })
        ));
    }

    #[test]
    fn malformed_fields_are_decode_errors() {
        let cases = [
            format!("xc{TOKEN}ffff-"),
            format!("1x{TOKEN}ffff-"),
            format!("1c{}ffff-", TOKEN.to_uppercase()),
            format!("1c{}ffff-", &TOKEN[..31]),
            format!("1c{TOKEN}fffe-"),
            format!("1c{TOKEN}00A1x-"),
            format!("1c{TOKEN}+001-"),
            format!("1c{TOKEN}0003ab-"),
            format!("1c{TOKEN}ffff"),
            format!("1c{TOKEN}ffff*"),
            format!("1c{TOKEN}ffff-x"),
            format!("1c{TOKEN}0002fp"),
            "not a record".to_owned(),
        ];
        for case in cases {
            assert!(is_decode(decode("k", case.as_bytes())), "{case:?}");
        }
        let mut bad_fp = format!("1c{TOKEN}0002").into_bytes();
        bad_fp.extend_from_slice(&[0xff, 0xfe, b'-']);
        assert!(is_decode(decode("k", &bad_fp)));
        let mut bad_token = b"1c".to_vec();
        bad_token.extend_from_slice(&[0xc3; 32]);
        bad_token.extend_from_slice(b"ffff-");
        assert!(is_decode(decode("k", &bad_token)));
    }
}
