//! The record's layout in Redis: one hash per key.
//!
//! | field    | value                                              |
//! | -------- | -------------------------------------------------- |
//! | `v`      | schema version ([`SCHEMA_VERSION`])                |
//! | `status` | `running`, `completed` or `failed`                 |
//! | `token`  | the owner's fencing token, 32 hex digits           |
//! | `fp`     | input fingerprint (absent when fingerprinting off) |
//! | `result` | result bytes (absent while running, or too large)  |
//!
//! The key's own expiry is the lease (running) or the TTL (finished); no expiry means
//! "keep until deleted".
//!
//! [`SCHEMA_VERSION`]: orchestrix::store::SCHEMA_VERSION

use orchestrix::store::{FencingToken, Record, RecordStatus, StoreError};

/// A hash's fields, as read by `HGETALL`.
pub(crate) type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Why a value under a key is not a record this store can read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UndecodableRecord {
    #[error("the key holds a Redis {0}, not a record hash")]
    WrongType(String),
    #[error("the record has no `{0}` field")]
    Missing(&'static str),
    #[error("the record's `{0}` field is not UTF-8")]
    NotUtf8(&'static str),
    #[error("the record's schema version {0:?} is not a number")]
    BadVersion(String),
}

impl From<UndecodableRecord> for StoreError {
    fn from(err: UndecodableRecord) -> Self {
        StoreError::decode(err)
    }
}

/// The record under `key` from its hash fields.
///
/// # Errors
/// [`StoreError::UnsupportedVersion`] for another schema version (checked first, so a newer
/// layout is reported as such); [`StoreError::Decode`] for anything missing or malformed.
pub(crate) fn decode(key: &str, fields: Fields) -> Result<Record, StoreError> {
    let (mut version, mut status, mut token, mut fingerprint, mut result) =
        (None, None, None, None, None);
    for (name, value) in fields {
        match name.as_slice() {
            b"v" => version = Some(value),
            b"status" => status = Some(value),
            b"token" => token = Some(value),
            b"fp" => fingerprint = Some(value),
            b"result" => result = Some(value),
            _ => {}
        }
    }
    let version = text("v", version)?;
    let version = version
        .parse()
        .map_err(|_| UndecodableRecord::BadVersion(version))?;
    Record::check_version(version)?;
    Ok(Record {
        key: key.to_owned(),
        status: text("status", status)?.parse::<RecordStatus>()?,
        token: text("token", token)?.parse::<FencingToken>()?,
        fingerprint: fingerprint.map(|fp| utf8("fp", fp)).transpose()?,
        result,
    })
}

fn text(field: &'static str, value: Option<Vec<u8>>) -> Result<String, UndecodableRecord> {
    utf8(field, value.ok_or(UndecodableRecord::Missing(field))?)
}

fn utf8(field: &'static str, value: Vec<u8>) -> Result<String, UndecodableRecord> {
    String::from_utf8(value).map_err(|_| UndecodableRecord::NotUtf8(field))
}
