//! The Lua scripts, for the operations no native command can do in one step, and the shape
//! of their replies.
//!
//! `get`, `delete` and the common `start` are native commands (see the crate docs). The
//! fenced writes (`complete`, `fail`, `renew`, `release`) and a `start` that re-runs
//! failures must read, decide and write atomically, so each is one script called with
//! `EVALSHA` (reloaded and retried when the server answers `NOSCRIPT`). Every script touches
//! exactly one key, which keeps each operation inside one hash slot.
//!
//! The fenced scripts run on every finished run, so they are written for Redis's CPU: one
//! comparison fences (`fence.lua`), as few Lua string operations as the checks allow, and
//! integer replies on every common path.

use std::sync::LazyLock;

use orchestrix::store::StoreError;
use redis::{Script, Value};

use crate::record::UndecodableRecord;

/// The scripts, hashed once per process.
pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::new);

pub(crate) struct Scripts {
    pub(crate) start_rerun: Script,
    pub(crate) complete: Script,
    pub(crate) fail: Script,
    pub(crate) renew: Script,
    pub(crate) release: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            start_rerun: Script::new(concat!(
                include_str!("lua/durable_layout.lua"),
                include_str!("lua/failed.lua"),
                include_str!("lua/start_rerun.lua")
            )),
            // The final status is part of the script rather than an argument, which would
            // cost Redis one more Lua string per call.
            complete: Script::new(concat!(
                include_str!("lua/fence.lua"),
                "local status = 'c'\n",
                include_str!("lua/finish.lua")
            )),
            fail: Script::new(concat!(
                include_str!("lua/fence.lua"),
                "local status = 'f'\n",
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

/// What a script answered: an integer for the fenced writes' common outcomes (see
/// `fence.lua`), otherwise an array whose first element names its kind.
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
        let items = match value {
            Value::Int(1) => return Ok(Self::Ok),
            Value::Int(0) => return Ok(Self::Stale),
            Value::Int(-1) => return Ok(Self::Garbled),
            Value::Array(items) => items,
            other => return Err(unexpected(&other)),
        };
        let mut items = items.into_iter();
        let tag = match items.next() {
            Some(Value::BulkString(tag)) => tag,
            other => return Err(unexpected(&other)),
        };
        match (tag.as_slice(), items.next()) {
            (b"acquired", None) => Ok(Self::Acquired),
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

    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    /// The scripts check the version digit of `record.rs` literally (the fence compares
    /// with a prefix the client builds from it, see `record::running_prefix`).
    #[test]
    fn the_scripts_check_this_builds_schema_version() {
        assert_eq!(SCHEMA_VERSION, 1, "update the '1' in the Lua scripts");
        assert!(include_str!("lua/finish.lua").contains("'1' .. status"));
        assert!(include_str!("lua/failed.lua").contains("~= '1f'"));
    }

    #[test]
    fn integer_replies_are_the_fenced_outcomes() {
        assert!(matches!(Reply::parse(Value::Int(1)), Ok(Reply::Ok)));
        assert!(matches!(Reply::parse(Value::Int(0)), Ok(Reply::Stale)));
        assert!(matches!(Reply::parse(Value::Int(-1)), Ok(Reply::Garbled)));
    }

    #[test]
    fn tagged_replies_are_parsed() {
        assert!(matches!(
            Reply::parse(Value::Array(vec![bulk("acquired")])),
            Ok(Reply::Acquired)
        ));
        assert!(matches!(
            Reply::parse(Value::Array(vec![bulk("record"), bulk("1c…")])),
            Ok(Reply::Record(value)) if value == "1c…".as_bytes()
        ));
        assert!(matches!(
            Reply::parse(Value::Array(vec![bulk("wrongtype"), bulk("hash")])),
            Ok(Reply::WrongType(kind)) if kind == "hash"
        ));
    }

    #[test]
    fn any_other_reply_is_a_backend_error() {
        let replies = [
            Value::Int(2),
            Value::Nil,
            Value::Okay,
            bulk("ok"),
            Value::Array(vec![]),
            Value::Array(vec![bulk("ok")]),
            Value::Array(vec![bulk("record")]),
            Value::Array(vec![bulk("acquired"), bulk("extra")]),
        ];
        for reply in replies {
            let parsed = Reply::parse(reply.clone());
            assert!(
                matches!(parsed, Err(StoreError::Backend(_))),
                "{reply:?}: {parsed:?}"
            );
        }
    }

    #[test]
    fn garbled_and_wrongtype_replies_are_decode_errors() {
        assert!(matches!(Reply::Garbled.into_error(), StoreError::Decode(_)));
        assert!(matches!(
            Reply::WrongType("list".to_owned()).into_error(),
            StoreError::Decode(_)
        ));
    }
}
