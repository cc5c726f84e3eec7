//! The Lua scripts, for the operations no native command can do in one step, and the shape
//! of their replies.
//!
//! `get`, `delete` and the common `start` are native commands (see the crate docs). The
//! fenced writes (`complete`, `fail`, `renew`, `release`) and a `start` that re-runs
//! failures must read, decide and write atomically, so each is one script called with
//! `EVALSHA` (the `redis` crate reloads a script the server lost and retries, answering
//! `NOSCRIPT`). Every script touches exactly one key, which keeps each operation inside one
//! hash slot.

use std::sync::LazyLock;

use orchestrix::store::StoreError;
use redis::{Script, Value};

use crate::record::UndecodableRecord;

/// The scripts, hashed once per process.
pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::new);

pub(crate) struct Scripts {
    pub(crate) start_rerun: Script,
    pub(crate) finish: Script,
    pub(crate) renew: Script,
    pub(crate) release: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            start_rerun: Script::new(include_str!("lua/start_rerun.lua")),
            finish: Script::new(concat!(
                include_str!("lua/fence.lua"),
                include_str!("lua/finish.lua")
            )),
            renew: Script::new(concat!(
                include_str!("lua/fence.lua"),
                include_str!("lua/renew.lua")
            )),
            release: Script::new(concat!(
                include_str!("lua/fence.lua"),
                include_str!("lua/release.lua")
            )),
        }
    }
}

/// What a script answered. Every reply is an array whose first element names its kind.
#[derive(Debug)]
pub(crate) enum Reply {
    /// `start` acquired the key.
    Acquired,
    /// The encoded value under the key, for a `start` that did not acquire.
    Record(Vec<u8>),
    /// An owner's write was applied.
    Ok,
    /// An owner's write was refused: the token is not the running record's.
    Stale,
    /// The key holds another Redis type (named here), written by something else.
    WrongType(String),
    /// The running record carries the caller's token but the rest of it is malformed: it
    /// was not written by this store, so nothing was written.
    Garbled,
}

impl Reply {
    pub(crate) fn parse(value: Value) -> Result<Self, StoreError> {
        let Value::Array(items) = value else {
            return Err(unexpected(&value));
        };
        let mut items = items.into_iter();
        let tag = match items.next() {
            Some(Value::BulkString(tag)) => tag,
            other => return Err(unexpected(&other)),
        };
        match (tag.as_slice(), items.next()) {
            (b"acquired", None) => Ok(Self::Acquired),
            (b"ok", None) => Ok(Self::Ok),
            (b"stale", None) => Ok(Self::Stale),
            (b"garbled", None) => Ok(Self::Garbled),
            (b"record", Some(Value::BulkString(value))) => Ok(Self::Record(value)),
            (b"wrongtype", Some(Value::BulkString(kind))) => {
                Ok(Self::WrongType(String::from_utf8_lossy(&kind).into_owned()))
            }
            (_, rest) => Err(unexpected(&(String::from_utf8_lossy(&tag), rest))),
        }
    }

    /// The error for a reply that the operation at hand never expects.
    pub(crate) fn into_error(self) -> StoreError {
        match self {
            Self::WrongType(kind) => UndecodableRecord::WrongType(kind).into(),
            Self::Garbled => StoreError::decode("the running record under the key is malformed"),
            other => unexpected(&other),
        }
    }
}

/// A reply our own scripts cannot produce: the server is not running these scripts
/// (or not Redis at all). Reported as a backend failure, not as a bad record.
fn unexpected(what: &impl std::fmt::Debug) -> StoreError {
    StoreError::backend_msg(format_args!(
        "unexpected reply from a Redis script: {what:?}"
    ))
}

#[cfg(test)]
mod tests {
    use orchestrix::store::SCHEMA_VERSION;

    /// The scripts check the version digit of `record.rs` literally.
    #[test]
    fn the_scripts_check_this_builds_schema_version() {
        assert_eq!(SCHEMA_VERSION, 1, "update the '1' in the Lua scripts");
        assert!(include_str!("lua/fence.lua").contains("~= '1r'"));
        assert!(include_str!("lua/finish.lua").contains("'1' .. ARGV[2]"));
        assert!(include_str!("lua/start_rerun.lua").contains("~= '1f'"));
    }
}
