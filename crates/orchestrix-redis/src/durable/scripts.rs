//! The durable records' Lua scripts, and the shape of their replies.
//!
//! Every durable operation is one script on the record's key (one hash slot), sent in the
//! same round trip as the index command that goes with it (see [`index`](super::index)).
//! The owner's writes share one fence (`durable_fence.lua`): the header's first 34 bytes
//! are the caller's `1R` and token, and its lease deadline is ahead of Redis's `TIME`.
//! `append`, the one durable write per step, reads nothing but that header.
//!
//! Each finish comes in two forms, as the plain finishes do: with the result, and without
//! it, flagged `allow-oom`, for a result over the store's limit and for the fallback after
//! Redis refused the result. Both recognise a finish of the caller's already applied
//! (`durable_finished.lua`), so a retry after a lost reply answers what happened.

use std::sync::LazyLock;

use orchestrix::store::StoreError;
use redis::{Script, Value};

use crate::record::UndecodableRecord;

/// The scripts, hashed once per process.
pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::new);

pub(crate) struct Scripts {
    pub(crate) start: Script,
    pub(crate) append: Script,
    pub(crate) renew: Script,
    pub(crate) suspend: Script,
    pub(crate) release: Script,
    pub(crate) complete: Finish,
    pub(crate) fail: Finish,
    pub(crate) redrive: Script,
    pub(crate) index: Script,
}

/// The two forms of one final status's durable finish.
pub(crate) struct Finish {
    /// ARGV: the running prefix, '+' .. the result, the TTL (ms, optional).
    pub(crate) with_result: Script,
    /// ARGV: the running prefix, the TTL (ms, optional). Flagged `allow-oom`.
    pub(crate) without_result: Script,
}

/// A script that decides on a whole header or journal: the layout's functions first.
macro_rules! with_layout {
    ($($part:expr),* $(,)?) => {
        concat!(include_str!("../lua/durable_layout.lua"), $($part),*)
    };
}

/// An owner's write other than a finish: anything but its record is stale, then the fence.
macro_rules! fenced {
    ($($part:expr),* $(,)?) => {
        concat!(
            include_str!("../lua/durable_stale.lua"),
            include_str!("../lua/durable_fence.lua"),
            $($part),*
        )
    };
}

/// The text of a durable finish: `$shebang` the line flagging it (or nothing), `$status`
/// the final status as a literal ('C' or 'F'), `$args` the line naming its arguments.
macro_rules! finish_text {
    ($shebang:literal, $status:literal, $args:literal) => {
        concat!(
            $shebang,
            include_str!("../lua/durable_layout.lua"),
            "local status = '",
            $status,
            "'\n",
            $args,
            include_str!("../lua/durable_finished.lua"),
            include_str!("../lua/durable_fence.lua"),
            include_str!("../lua/durable_finish.lua")
        )
    };
}

const COMPLETE: &str = finish_text!("", "C", "local tail, ttl = ARGV[2], ARGV[3]\n");
const FAIL: &str = finish_text!("", "F", "local tail, ttl = ARGV[2], ARGV[3]\n");
// A finish without the result may run while Redis is out of memory: it appends one byte.
const COMPLETE_WITHOUT_RESULT: &str = finish_text!(
    "#!lua flags=allow-oom\n",
    "C",
    "local tail, ttl = '-', ARGV[2]\n"
);
const FAIL_WITHOUT_RESULT: &str = finish_text!(
    "#!lua flags=allow-oom\n",
    "F",
    "local tail, ttl = '-', ARGV[2]\n"
);

impl Scripts {
    fn new() -> Self {
        Self {
            start: Script::new(with_layout!(
                include_str!("../lua/failed.lua"),
                include_str!("../lua/durable_start.lua"),
            )),
            append: Script::new(fenced!(include_str!("../lua/durable_append.lua"))),
            renew: Script::new(fenced!(include_str!("../lua/durable_renew.lua"))),
            suspend: Script::new(fenced!(include_str!("../lua/durable_suspend.lua"))),
            release: Script::new(fenced!(include_str!("../lua/durable_release.lua"))),
            // The final status is a literal, as in the plain finish scripts.
            complete: Finish {
                with_result: Script::new(COMPLETE),
                without_result: Script::new(COMPLETE_WITHOUT_RESULT),
            },
            fail: Finish {
                with_result: Script::new(FAIL),
                without_result: Script::new(FAIL_WITHOUT_RESULT),
            },
            redrive: Script::new(with_layout!(include_str!("../lua/durable_redrive.lua"))),
            index: Script::new(include_str!("../lua/durable_index.lua")),
        }
    }
}

/// What a durable script answered.
#[derive(Debug)]
pub(crate) enum Reply {
    /// An owner's write was applied.
    Ok,
    /// An owner's write was refused: not the caller's running record, or its lease lapsed.
    Stale,
    /// The key holds a *plain* running record carrying the caller's token: a token issued
    /// by an earlier version of this crate. The plain script must be sent instead.
    Plain,
    /// The caller's running record has a header this version does not write.
    Garbled,
    /// A finish found the record already finished by the caller, with this status, exactly
    /// as this write would make it: an earlier attempt was applied.
    AlreadyFinished,
    /// A finish without a result found the record already finished by the caller, with
    /// this status, with a result: an earlier write of the result was applied.
    AlreadyFinishedWithResult,
    /// A finish carrying a result found the record already finished by the caller, with
    /// this status, without a result: nothing was written.
    AlreadyFinishedWithoutResult,
    /// `start_durable` acquired the key with a fresh journal.
    Acquired,
    /// `start_durable` took an abandoned run over: the record as it was.
    Resumed(Vec<u8>),
    /// `redrive` re-opened a failure: the record as it was.
    Redriven(Vec<u8>),
    /// A durable record holds the key: its header and fingerprint, and the tail of a
    /// finished one.
    Durable {
        head: Vec<u8>,
        tail: Option<Vec<u8>>,
    },
    /// Any other value holds the key (a plain record, or one this version cannot read).
    Record(Vec<u8>),
    /// `redrive` found no record.
    Absent,
    /// The write would take the record past its limit; the number is what the script
    /// measured (the size it would have reached, or the room there was).
    TooLarge(usize),
    /// The key holds another Redis type (named here).
    WrongType(String),
}

impl Reply {
    pub(crate) fn parse(value: Value) -> Result<Self, StoreError> {
        let items = match value {
            Value::Int(1) => return Ok(Self::Ok),
            Value::Int(0) => return Ok(Self::Stale),
            Value::Int(2) => return Ok(Self::Plain),
            Value::Int(-1) => return Ok(Self::Garbled),
            Value::Int(3) => return Ok(Self::AlreadyFinished),
            Value::Int(4) => return Ok(Self::AlreadyFinishedWithResult),
            Value::Int(5) => return Ok(Self::AlreadyFinishedWithoutResult),
            Value::Array(items) => items,
            other => return Err(unexpected(&other)),
        };
        let mut items = items.into_iter();
        let tag = match items.next() {
            Some(Value::BulkString(tag)) => tag,
            other => return Err(unexpected(&other)),
        };
        let parsed = match (tag.as_slice(), items.next(), items.next()) {
            (b"acquired", None, None) => Self::Acquired,
            (b"absent", None, None) => Self::Absent,
            (b"resumed", Some(Value::BulkString(value)), None) => Self::Resumed(value),
            (b"redriven", Some(Value::BulkString(value)), None) => Self::Redriven(value),
            (b"record", Some(Value::BulkString(value)), None) => Self::Record(value),
            (b"durable", Some(Value::BulkString(head)), tail) => Self::Durable {
                head,
                tail: match tail {
                    None => None,
                    Some(Value::BulkString(tail)) => Some(tail),
                    Some(other) => return Err(unexpected(&other)),
                },
            },
            (b"toolarge", Some(Value::Int(n)), None) => {
                Self::TooLarge(usize::try_from(n).unwrap_or(0))
            }
            (b"wrongtype", Some(Value::BulkString(kind)), None) => {
                Self::WrongType(String::from_utf8_lossy(&kind).into_owned())
            }
            (_, rest, _) => return Err(unexpected(&(String::from_utf8_lossy(&tag), rest))),
        };
        match items.next() {
            None => Ok(parsed),
            Some(extra) => Err(unexpected(&extra)),
        }
    }

    /// The error for a reply the operation at hand never expects.
    pub(crate) fn into_error(self) -> StoreError {
        match self {
            Self::Stale => StoreError::StaleToken,
            Self::WrongType(kind) => UndecodableRecord::WrongType(kind).into(),
            Self::Garbled => {
                StoreError::decode("the durable running record under the key is malformed")
            }
            other => unexpected(&other),
        }
    }
}

/// A reply our own scripts cannot produce: the server is not running these scripts.
fn unexpected(what: &impl std::fmt::Debug) -> StoreError {
    StoreError::backend_msg(format_args!(
        "unexpected reply from a durable Redis script: {what:?}"
    ))
}

#[cfg(test)]
mod tests {
    use orchestrix::store::SCHEMA_VERSION;

    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn the_scripts_check_this_builds_schema_version() {
        assert_eq!(
            SCHEMA_VERSION, 1,
            "update the '1' in the durable Lua scripts"
        );
        assert!(include_str!("../lua/durable_layout.lua").contains("~= '1' then return nil"));
    }

    #[test]
    fn integer_replies_are_the_fenced_outcomes() {
        assert!(matches!(Reply::parse(Value::Int(1)), Ok(Reply::Ok)));
        assert!(matches!(Reply::parse(Value::Int(0)), Ok(Reply::Stale)));
        assert!(matches!(Reply::parse(Value::Int(2)), Ok(Reply::Plain)));
        assert!(matches!(Reply::parse(Value::Int(-1)), Ok(Reply::Garbled)));
        assert!(matches!(
            Reply::parse(Value::Int(3)),
            Ok(Reply::AlreadyFinished)
        ));
        assert!(matches!(
            Reply::parse(Value::Int(4)),
            Ok(Reply::AlreadyFinishedWithResult)
        ));
        assert!(matches!(
            Reply::parse(Value::Int(5)),
            Ok(Reply::AlreadyFinishedWithoutResult)
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
            assert!(text.contains("local tail, ttl = ARGV[2], ARGV[3]\n"));
        }
    }

    #[test]
    fn tagged_replies_are_parsed() {
        let parse = |items: Vec<Value>| Reply::parse(Value::Array(items));
        assert!(matches!(parse(vec![bulk("acquired")]), Ok(Reply::Acquired)));
        assert!(matches!(parse(vec![bulk("absent")]), Ok(Reply::Absent)));
        assert!(matches!(
            parse(vec![bulk("resumed"), bulk("v")]),
            Ok(Reply::Resumed(v)) if v == b"v"
        ));
        assert!(matches!(
            parse(vec![bulk("durable"), bulk("h")]),
            Ok(Reply::Durable { head, tail: None }) if head == b"h"
        ));
        assert!(matches!(
            parse(vec![bulk("durable"), bulk("h"), bulk("+r")]),
            Ok(Reply::Durable { tail: Some(t), .. }) if t == b"+r"
        ));
        assert!(matches!(
            parse(vec![bulk("toolarge"), Value::Int(7)]),
            Ok(Reply::TooLarge(7))
        ));
    }

    #[test]
    fn any_other_reply_is_a_backend_error() {
        let replies = [
            Value::Int(6),
            Value::Nil,
            Value::Okay,
            Value::Array(vec![]),
            Value::Array(vec![bulk("resumed")]),
            Value::Array(vec![bulk("acquired"), bulk("extra")]),
            Value::Array(vec![bulk("durable"), bulk("h"), bulk("t"), bulk("x")]),
            Value::Array(vec![bulk("toolarge"), bulk("7")]),
        ];
        for reply in replies {
            let parsed = Reply::parse(reply.clone());
            assert!(
                matches!(parsed, Err(StoreError::Backend(_))),
                "{reply:?}: {parsed:?}"
            );
        }
    }
}
