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
//!
//! Each finish comes in two forms: with the result, the one round trip of every normal
//! finish, and without it, for a result over the store's limit and for the fallback after
//! Redis refused the result (`OOM`, a protocol error or a dropped connection on an argument
//! over `proto-max-bulk-len`). The form without the result is flagged `allow-oom`: it
//! replaces the running record by one of exactly the same length, so it never grows
//! Redis's memory, and it must get through while Redis is still out of memory from the
//! refused write's arguments. Both forms recognise a finish of the caller's already
//! applied (`finished.lua`), so a retry after a lost reply, or the fallback after a write
//! that was applied after all, answers what happened instead of `StaleToken`.

use std::sync::LazyLock;

use orchestrix::store::StoreError;
use redis::{Script, Value};

use crate::record::UndecodableRecord;

/// The scripts, hashed once per process.
pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::new);

pub(crate) struct Scripts {
    pub(crate) start_rerun: Script,
    pub(crate) complete: Finish,
    pub(crate) fail: Finish,
    pub(crate) renew: Script,
    pub(crate) release: Script,
}

/// The two forms of one final status's finish.
pub(crate) struct Finish {
    /// ARGV: the running prefix, '+' .. the result, the TTL (ms, optional).
    pub(crate) with_result: Script,
    /// ARGV: the running prefix, the TTL (ms, optional). Flagged `allow-oom`.
    pub(crate) without_result: Script,
}

// The final status is part of each finish script rather than an argument, which would cost
// Redis one more Lua string per call.

/// The text of a finish script: `$shebang` the line flagging it (or nothing), `$status` the
/// final status as a literal ('c' or 'f'), `$args` the line naming its arguments.
macro_rules! finish_text {
    ($shebang:literal, $status:literal, $args:literal) => {
        concat!(
            $shebang,
            "local status = '",
            $status,
            "'\n",
            $args,
            include_str!("lua/finished.lua"),
            include_str!("lua/fence.lua"),
            include_str!("lua/finish.lua")
        )
    };
}

const COMPLETE: &str = finish_text!("", "c", "local tail, ttl = ARGV[2], ARGV[3]\n");
const COMPLETE_WITHOUT_RESULT: &str = finish_text!(
    // Flags a finish without the result: it may run while Redis is out of memory.
    "#!lua flags=allow-oom\n",
    "c",
    "local tail, ttl = '-', ARGV[2]\n"
);
const FAIL: &str = finish_text!("", "f", "local tail, ttl = ARGV[2], ARGV[3]\n");
const FAIL_WITHOUT_RESULT: &str = finish_text!(
    "#!lua flags=allow-oom\n",
    "f",
    "local tail, ttl = '-', ARGV[2]\n"
);

impl Scripts {
    fn new() -> Self {
        Self {
            start_rerun: Script::new(include_str!("lua/start_rerun.lua")),
            complete: Finish {
                with_result: Script::new(COMPLETE),
                without_result: Script::new(COMPLETE_WITHOUT_RESULT),
            },
            fail: Finish {
                with_result: Script::new(FAIL),
                without_result: Script::new(FAIL_WITHOUT_RESULT),
            },
            renew: Script::new(concat!(
                include_str!("lua/stale.lua"),
                include_str!("lua/fence.lua"),
                include_str!("lua/renew.lua")
            )),
            release: Script::new(concat!(
                include_str!("lua/stale.lua"),
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
    /// A finish found the record already finished by the caller, with this status, exactly
    /// as this write would make it: an earlier attempt was applied.
    AlreadyFinished,
    /// A finish carrying a result found the record already finished by the caller, with
    /// this status, without a result: nothing was written.
    AlreadyFinishedWithoutResult,
    /// A finish without a result found the record already finished by the caller, with this
    /// status, with a result: an earlier write of the result was applied.
    AlreadyFinishedWithResult,
}

impl Reply {
    pub(crate) fn parse(value: Value) -> Result<Self, StoreError> {
        let items = match value {
            Value::Int(1) => return Ok(Self::Ok),
            Value::Int(0) => return Ok(Self::Stale),
            Value::Int(-1) => return Ok(Self::Garbled),
            Value::Int(2) => return Ok(Self::AlreadyFinished),
            Value::Int(3) => return Ok(Self::AlreadyFinishedWithoutResult),
            Value::Int(4) => return Ok(Self::AlreadyFinishedWithResult),
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
        assert!(include_str!("lua/start_rerun.lua").contains("~= '1f'"));
    }

    #[test]
    fn integer_replies_are_the_fenced_outcomes() {
        assert!(matches!(Reply::parse(Value::Int(1)), Ok(Reply::Ok)));
        assert!(matches!(Reply::parse(Value::Int(0)), Ok(Reply::Stale)));
        assert!(matches!(Reply::parse(Value::Int(-1)), Ok(Reply::Garbled)));
        assert!(matches!(
            Reply::parse(Value::Int(2)),
            Ok(Reply::AlreadyFinished)
        ));
        assert!(matches!(
            Reply::parse(Value::Int(3)),
            Ok(Reply::AlreadyFinishedWithoutResult)
        ));
        assert!(matches!(
            Reply::parse(Value::Int(4)),
            Ok(Reply::AlreadyFinishedWithResult)
        ));
    }

    /// A shebang counts only on a script's first line.
    #[test]
    fn only_the_finishes_without_result_may_run_out_of_memory() {
        for text in [COMPLETE_WITHOUT_RESULT, FAIL_WITHOUT_RESULT] {
            assert!(text.starts_with("#!lua flags=allow-oom\n"));
            assert_eq!(text.matches("#!").count(), 1);
        }
        for text in [COMPLETE, FAIL] {
            assert!(!text.contains("#!"));
        }
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
            Value::Int(5),
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
