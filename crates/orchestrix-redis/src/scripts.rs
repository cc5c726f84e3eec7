//! The Lua scripts, one per store operation, and the shape of their replies.
//!
//! Each script reads, decides and writes inside Redis, so every operation is one `EVALSHA`
//! (the `redis` crate reloads a script the server lost and retries, answering `NOSCRIPT`).
//! Every script touches exactly one key, which keeps each operation inside one hash slot.

use std::sync::LazyLock;

use orchestrix::store::StoreError;
use redis::{Script, Value};

use crate::record::{Fields, UndecodableRecord};

/// The scripts, hashed once per process.
pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::new);

pub(crate) struct Scripts {
    pub(crate) read: Script,
    pub(crate) start: Script,
    pub(crate) finish: Script,
    pub(crate) renew: Script,
    pub(crate) release: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            read: Script::new(include_str!("lua/read.lua")),
            start: Script::new(include_str!("lua/start.lua")),
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
    /// The record's hash fields, for `get` and for a `start` that did not acquire.
    Record(Fields),
    /// No record under the key.
    Absent,
    /// An owner's write was applied.
    Ok,
    /// An owner's write was refused: the token is not the running record's.
    Stale,
    /// The key holds another Redis type (named here), written by something else.
    WrongType(String),
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
            (b"absent", None) => Ok(Self::Absent),
            (b"ok", None) => Ok(Self::Ok),
            (b"stale", None) => Ok(Self::Stale),
            (b"record", Some(Value::Array(flat))) => fields(flat).map(Self::Record),
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
            other => unexpected(&other),
        }
    }
}

/// HGETALL's flat `field, value, field, value, ...` list as pairs.
fn fields(flat: Vec<Value>) -> Result<Fields, StoreError> {
    let mut pairs = Vec::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let Some(name) = flat.next() {
        match (name, flat.next()) {
            (Value::BulkString(name), Some(Value::BulkString(value))) => pairs.push((name, value)),
            other => return Err(unexpected(&other)),
        }
    }
    Ok(pairs)
}

/// A reply our own scripts cannot produce: the server is not running these scripts
/// (or not Redis at all). Reported as a backend failure, not as a bad record.
fn unexpected(what: &impl std::fmt::Debug) -> StoreError {
    StoreError::backend_msg(format_args!(
        "unexpected reply from a Redis script: {what:?}"
    ))
}
