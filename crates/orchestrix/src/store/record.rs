//! The stored record and its small value types.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use super::StoreError;

/// The record schema version this build writes and reads. Backends store it with every
/// record and refuse (with [`StoreError::UnsupportedVersion`]) any other.
pub const SCHEMA_VERSION: u32 = 1;

/// Proof of ownership of a running record, issued by every acquire.
///
/// 128 bits: the acquiring machine's clock in nanoseconds in the high half (so tokens are
/// roughly ordered by acquire time, which helps when reading logs) and 64 random bits in the
/// low half (so two acquires never share a token, even across processes and after a record
/// was deleted and recreated). Written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FencingToken(u128);

impl FencingToken {
    /// A new, unique token.
    pub fn generate() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self((u128::from(nanos) << 64) | u128::from(fastrand::u64(..)))
    }

    /// The token from its raw value.
    pub const fn from_u128(raw: u128) -> Self {
        Self(raw)
    }

    /// The raw value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FencingToken({self})")
    }
}

impl FromStr for FencingToken {
    type Err = StoreError;

    /// Parses the 32-hex-digit form written by `Display`.
    fn from_str(s: &str) -> Result<Self, StoreError> {
        // `from_str_radix` alone would also take a leading `+`: only the exact form that
        // `Display` writes is a token.
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(StoreError::decode(format!(
                "fencing token must be 32 hex digits, got {s:?}"
            )));
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|e| StoreError::decode(format!("fencing token {s:?}: {e}")))
    }
}

/// The state of a stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordStatus {
    /// An owner is executing the operation under a lease.
    Running,
    /// The operation completed; the record holds its result.
    Completed,
    /// The operation failed; the record holds the failure.
    Failed,
}

impl RecordStatus {
    /// The stable name backends store: `running`, `completed` or `failed`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for RecordStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RecordStatus {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s {
            "running" => Ok(Self::Running),
            "completed" => Ok(Self::Completed),
            "failed" => Ok(Self::Failed),
            other => Err(StoreError::decode(format!(
                "unknown record status {other:?}"
            ))),
        }
    }
}

/// One idempotency record, as a store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The full key.
    pub key: String,
    /// Where the operation stands.
    pub status: RecordStatus,
    /// The token of the owner that acquired the record.
    pub token: FencingToken,
    /// Fingerprint of the input that acquired the record, if fingerprinting is on.
    pub fingerprint: Option<String>,
    /// The encoded result of a finished record. `None` while running, and for a finished
    /// record whose result was too large to store.
    pub result: Option<Vec<u8>>,
}

/// A record seen in place, without copying it out of the store: what
/// [`IdempotencyStore::start_seen`](super::IdempotencyStore::start_seen) shows its visitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    /// The full key.
    pub key: &'a str,
    /// Where the operation stands.
    pub status: RecordStatus,
    /// The token of the owner that acquired the record.
    pub token: FencingToken,
    /// Fingerprint of the input that acquired the record, if fingerprinting is on.
    pub fingerprint: Option<&'a str>,
    /// The encoded result of a finished record, if stored.
    pub result: Option<&'a [u8]>,
}

impl RecordView<'_> {
    /// The record, copied out.
    pub fn to_record(&self) -> Record {
        Record {
            key: self.key.to_owned(),
            status: self.status,
            token: self.token,
            fingerprint: self.fingerprint.map(str::to_owned),
            result: self.result.map(<[u8]>::to_vec),
        }
    }
}

impl Record {
    /// The record, seen in place.
    pub fn view(&self) -> RecordView<'_> {
        RecordView {
            key: &self.key,
            status: self.status,
            token: self.token,
            fingerprint: self.fingerprint.as_deref(),
            result: self.result.as_deref(),
        }
    }

    /// A freshly acquired, running record.
    pub fn running(key: &str, token: FencingToken, fingerprint: Option<&str>) -> Self {
        Self {
            key: key.to_owned(),
            status: RecordStatus::Running,
            token,
            fingerprint: fingerprint.map(str::to_owned),
            result: None,
        }
    }

    /// Checks a stored schema version, for backends decoding a record.
    ///
    /// # Errors
    /// [`StoreError::UnsupportedVersion`] for any version but [`SCHEMA_VERSION`].
    pub fn check_version(found: u32) -> Result<(), StoreError> {
        if found == SCHEMA_VERSION {
            Ok(())
        } else {
            Err(StoreError::UnsupportedVersion { found })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_token_round_trips_through_its_text_form() {
        let t = FencingToken::generate();
        assert_eq!(t.to_string().parse::<FencingToken>().ok(), Some(t));
    }

    #[test]
    fn fencing_tokens_are_unique() {
        let a = FencingToken::generate();
        let b = FencingToken::generate();
        assert_ne!(a, b);
    }

    #[test]
    fn malformed_fencing_token_is_a_decode_error() {
        assert!(matches!(
            "xyz".parse::<FencingToken>(),
            Err(StoreError::Decode(_))
        ));
        let bad = "g".repeat(32);
        assert!(matches!(
            bad.parse::<FencingToken>(),
            Err(StoreError::Decode(_))
        ));
    }

    #[test]
    fn unknown_status_is_a_decode_error() {
        assert!(matches!(
            "done".parse::<RecordStatus>(),
            Err(StoreError::Decode(_))
        ));
        assert_eq!(
            "failed".parse::<RecordStatus>().ok(),
            Some(RecordStatus::Failed)
        );
    }

    #[test]
    fn other_schema_versions_are_refused() {
        assert!(Record::check_version(SCHEMA_VERSION).is_ok());
        assert!(matches!(
            Record::check_version(2),
            Err(StoreError::UnsupportedVersion { found: 2 })
        ));
    }
}
