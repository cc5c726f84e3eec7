//! What a durable run writes to its journal, and what a resumed run makes of it.
//!
//! The store keeps opaque bytes: the journal's input, then entries in append order. This
//! module gives them their meaning. Every integer is little-endian; `str` is a `u32` byte
//! length and UTF-8 bytes.
//!
//! ```text
//! input:  "OJ" 0x01  version:str  ttl:(0 | 1 ns:u64)  lease_ns:u64  cache_result:u8  input JSON (to the end)
//! entry:  kind:u8  position:u32  name:str  ...
//!   's' started      (an at-most-once step is about to run)
//!   'c' completed    attempts:u32  ns:u64  state:u32 { key:str  value:(u32 length + JSON) }*
//!   'x' compensated  (its compensation succeeded)
//!   'f' failed       error:(u32 length + FlowError as JSON)   (position and name of the step
//!                    that failed the run, or u32::MAX and "" when no step did)
//! ```
//!
//! A step is identified by its position in the flow and its name: an entry whose position
//! holds another step in this build's flow (the code changed between crash and resume) is
//! a [`JournalError::Mismatch`], and nothing runs.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::result::FlowError;

/// The journal input's magic bytes and format version.
const INPUT_MAGIC: &[u8; 3] = b"OJ\x01";

const STARTED: u8 = b's';
const COMPLETED: u8 = b'c';
const COMPENSATED: u8 = b'x';
const FAILED: u8 = b'f';

/// The position a `failed` entry gives when no step failed the run (its output did).
const NO_STEP: u32 = u32::MAX;

/// Why a journal cannot be resumed by this build's flow.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JournalError {
    #[error(
        "journal entry for position {position} names step {found:?}, the flow has {expected:?} there"
    )]
    Mismatch {
        position: usize,
        expected: Option<String>,
        found: String,
    },
    #[error("the journal is malformed: {0}")]
    Malformed(&'static str),
}

/// The run settings a resumed run keeps, stored with the input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub(crate) version: String,
    pub(crate) ttl: Option<Duration>,
    pub(crate) lease: Duration,
    pub(crate) cache_result: bool,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Lengths beyond u32 are refused by every store long before; they saturate, which the
    // reader then refuses as malformed.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

/// The journal's input: the settings, then the input's JSON.
pub(crate) fn encode_input(settings: &Settings, input_json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + settings.version.len() + input_json.len());
    out.extend_from_slice(INPUT_MAGIC);
    put_str(&mut out, &settings.version);
    match settings.ttl {
        Some(ttl) => {
            out.push(1);
            out.extend_from_slice(&nanos(ttl).to_le_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&nanos(settings.lease).to_le_bytes());
    out.push(u8::from(settings.cache_result));
    out.extend_from_slice(input_json);
    out
}

/// The settings and the input's JSON from a journal's input.
pub(crate) fn decode_input(bytes: &[u8]) -> Result<(Settings, &[u8]), JournalError> {
    let mut r = Reader(bytes);
    if r.take(INPUT_MAGIC.len())? != INPUT_MAGIC {
        return Err(JournalError::Malformed(
            "not a journal input of this format",
        ));
    }
    let version = r.str()?.to_owned();
    let ttl = match r.u8()? {
        0 => None,
        1 => Some(Duration::from_nanos(r.u64()?)),
        _ => return Err(JournalError::Malformed("bad ttl flag")),
    };
    let lease = Duration::from_nanos(r.u64()?);
    let cache_result = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(JournalError::Malformed("bad cache_result flag")),
    };
    let settings = Settings {
        version,
        ttl,
        lease,
        cache_result,
    };
    Ok((settings, r.0))
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    Started {
        position: usize,
        name: String,
    },
    Completed {
        position: usize,
        name: String,
        attempts: u32,
        duration: Duration,
        state: Vec<(String, Value)>,
    },
    Compensated {
        position: usize,
        name: String,
    },
    Failed {
        position: Option<usize>,
        name: String,
        error: FlowError,
    },
}

impl Entry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        let head = |out: &mut Vec<u8>, kind: u8, position: Option<usize>, name: &str| {
            out.push(kind);
            let position = position.map_or(NO_STEP, |p| u32::try_from(p).unwrap_or(NO_STEP));
            out.extend_from_slice(&position.to_le_bytes());
            put_str(out, name);
        };
        match self {
            Self::Started { position, name } => head(&mut out, STARTED, Some(*position), name),
            Self::Compensated { position, name } => {
                head(&mut out, COMPENSATED, Some(*position), name);
            }
            Self::Completed {
                position,
                name,
                attempts,
                duration,
                state,
            } => {
                head(&mut out, COMPLETED, Some(*position), name);
                out.extend_from_slice(&attempts.to_le_bytes());
                out.extend_from_slice(&nanos(*duration).to_le_bytes());
                put_len(&mut out, state.len());
                for (key, value) in state {
                    put_str(&mut out, key);
                    // A `Value` always has a JSON form.
                    let json = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
                    put_len(&mut out, json.len());
                    out.extend_from_slice(&json);
                }
            }
            Self::Failed {
                position,
                name,
                error,
            } => {
                head(&mut out, FAILED, *position, name);
                // `FlowError` holds strings, numbers and flags: its JSON cannot fail.
                let json = serde_json::to_vec(error).unwrap_or_default();
                put_len(&mut out, json.len());
                out.extend_from_slice(&json);
            }
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, JournalError> {
        let mut r = Reader(bytes);
        let kind = r.u8()?;
        let raw_position = r.u32()?;
        let position = usize::try_from(raw_position)
            .map_err(|_| JournalError::Malformed("position out of range"))?;
        let name = r.str()?.to_owned();
        let entry = match kind {
            STARTED => Self::Started { position, name },
            COMPENSATED => Self::Compensated { position, name },
            COMPLETED => {
                let attempts = r.u32()?;
                let duration = Duration::from_nanos(r.u64()?);
                let count = r.len()?;
                let mut state = Vec::with_capacity(count);
                for _ in 0..count {
                    let key = r.str()?.to_owned();
                    let json = r.bytes()?;
                    let value = serde_json::from_slice(json)
                        .map_err(|_| JournalError::Malformed("a state value is not JSON"))?;
                    state.push((key, value));
                }
                Self::Completed {
                    position,
                    name,
                    attempts,
                    duration,
                    state,
                }
            }
            FAILED => {
                let json = r.bytes()?;
                let error = serde_json::from_slice(json)
                    .map_err(|_| JournalError::Malformed("a failure is not a flow error"))?;
                Self::Failed {
                    position: (raw_position != NO_STEP).then_some(position),
                    name,
                    error,
                }
            }
            _ => return Err(JournalError::Malformed("unknown entry kind")),
        };
        if !r.0.is_empty() {
            return Err(JournalError::Malformed("trailing bytes after an entry"));
        }
        Ok(entry)
    }

    fn step(&self) -> (Option<usize>, &str) {
        match self {
            Self::Started { position, name }
            | Self::Compensated { position, name }
            | Self::Completed { position, name, .. } => (Some(*position), name),
            Self::Failed { position, name, .. } => (*position, name),
        }
    }
}

/// A step restored from the journal: it completed in an earlier run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Restored {
    pub(crate) attempts: u32,
    pub(crate) duration: Duration,
}

/// What a resumed run makes of its journal: which steps it skips, in which order they
/// completed (their compensations run in reverse), which at-most-once steps were
/// interrupted, the state to restore, and whether the run was already failing.
#[derive(Debug, Default)]
pub(crate) struct Resume {
    /// Per position: the step completed and was not compensated since.
    pub(crate) restored: Vec<Option<Restored>>,
    /// Restored positions, in the order they completed.
    pub(crate) order: Vec<usize>,
    /// Per position: a started mark without a completion after it.
    pub(crate) interrupted: Vec<bool>,
    /// Per position: the step's compensation already ran (a failing run was compensating).
    pub(crate) compensated: Vec<bool>,
    /// The state the completed steps wrote, in order.
    pub(crate) state: Vec<(String, Value)>,
    /// The run had failed: the resumed run finishes its compensation and fails the same way.
    pub(crate) failed: Option<(Option<usize>, FlowError)>,
}

impl Resume {
    /// The resume plan of `entries` for a flow whose steps are `names`. A redrive ignores
    /// the failure (and the failing step's started mark): the failed step runs again.
    pub(crate) fn plan(
        entries: &[Vec<u8>],
        names: &[Arc<str>],
        redrive: bool,
    ) -> Result<Self, JournalError> {
        let n = names.len();
        let mut plan = Self {
            restored: vec![None; n],
            interrupted: vec![false; n],
            compensated: vec![false; n],
            ..Self::default()
        };
        let entries: Vec<Entry> = entries
            .iter()
            .map(|e| Entry::decode(e))
            .collect::<Result<_, _>>()?;
        for entry in &entries {
            if let (Some(position), found) = entry.step() {
                match names.get(position) {
                    Some(expected) if **expected == *found => {}
                    expected => {
                        return Err(JournalError::Mismatch {
                            position,
                            expected: expected.map(|e| e.to_string()),
                            found: found.to_owned(),
                        });
                    }
                }
            }
        }
        for entry in entries {
            match entry {
                Entry::Started { position, .. } => {
                    if plan.restored[position].is_none() {
                        plan.interrupted[position] = true;
                    }
                }
                Entry::Completed {
                    position,
                    attempts,
                    duration,
                    state,
                    ..
                } => {
                    plan.interrupted[position] = false;
                    plan.compensated[position] = false;
                    plan.restored[position] = Some(Restored { attempts, duration });
                    plan.order.retain(|&p| p != position);
                    plan.order.push(position);
                    plan.state.extend(state);
                }
                Entry::Compensated { position, .. } => {
                    plan.restored[position] = None;
                    plan.order.retain(|&p| p != position);
                    plan.compensated[position] = true;
                }
                Entry::Failed {
                    position, error, ..
                } => {
                    // A transient failure was given up to be retried: like a redrive, the
                    // failed step runs again.
                    if redrive || error.is_transient() {
                        if let Some(p) = position {
                            plan.interrupted[p] = false;
                        }
                    } else {
                        plan.failed = Some((position, error));
                    }
                }
            }
        }
        if redrive {
            // A redriven run starts its compensations afresh: what was compensated runs
            // again (it was undone), and nothing is left marked as compensated.
            plan.compensated = vec![false; n];
        }
        Ok(plan)
    }

    pub(crate) fn is_restored(&self, position: usize) -> bool {
        self.restored.get(position).is_some_and(Option::is_some)
    }

    pub(crate) fn is_interrupted(&self, position: usize) -> bool {
        self.interrupted.get(position).copied().unwrap_or(false)
    }

    pub(crate) fn was_compensated(&self, position: usize) -> bool {
        self.compensated.get(position).copied().unwrap_or(false)
    }
}

/// Bounds-checked reads, as in the stored result envelope.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], JournalError> {
        if self.0.len() < n {
            return Err(JournalError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, JournalError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, JournalError> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, JournalError> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn len(&mut self) -> Result<usize, JournalError> {
        let n = usize::try_from(self.u32()?).map_err(|_| JournalError::Malformed("length"))?;
        if n > self.0.len() {
            return Err(JournalError::Malformed("a length runs past the end"));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], JournalError> {
        let n = self.len()?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, JournalError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| JournalError::Malformed("not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<Arc<str>> {
        list.iter().map(|n| Arc::from(*n)).collect()
    }

    fn completed(position: usize, name: &str) -> Vec<u8> {
        Entry::Completed {
            position,
            name: name.into(),
            attempts: 2,
            duration: Duration::from_millis(5),
            state: vec![(format!("{name}-key"), Value::from(position))],
        }
        .encode()
    }

    #[test]
    fn entries_round_trip() {
        let entries = [
            Entry::Started {
                position: 3,
                name: "ship".into(),
            },
            Entry::Completed {
                position: 0,
                name: "charge \"card\"".into(),
                attempts: 3,
                duration: Duration::from_nanos(123),
                state: vec![("charge_id".into(), Value::from("ch_1"))],
            },
            Entry::Compensated {
                position: 0,
                name: "charge".into(),
            },
            Entry::Failed {
                position: None,
                name: String::new(),
                error: FlowError::Output {
                    message: "x".into(),
                },
            },
        ];
        for entry in entries {
            assert_eq!(Entry::decode(&entry.encode()).ok(), Some(entry));
        }
    }

    #[test]
    fn every_truncation_of_an_entry_is_malformed() {
        let bytes = completed(1, "b");
        for end in 0..bytes.len() {
            assert!(
                Entry::decode(&bytes[..end]).is_err(),
                "prefix of {end} decoded"
            );
        }
    }

    #[test]
    fn input_round_trips_with_its_settings() {
        let settings = Settings {
            version: "v2".into(),
            ttl: Some(Duration::from_secs(60)),
            lease: Duration::from_secs(30),
            cache_result: false,
        };
        let bytes = encode_input(&settings, br#"{"a":1}"#);
        let (back, json) = decode_input(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, settings);
        assert_eq!(json, br#"{"a":1}"#);
        assert!(decode_input(b"garbage").is_err());
    }

    #[test]
    fn a_plan_skips_completed_steps_and_keeps_their_order_and_state() {
        let flow = names(&["a", "b", "c"]);
        let entries = [completed(1, "b"), completed(0, "a")];
        let plan = Resume::plan(&entries, &flow, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plan.order, [1, 0]);
        assert!(plan.is_restored(0) && plan.is_restored(1) && !plan.is_restored(2));
        assert_eq!(plan.state.len(), 2);
        assert!(plan.failed.is_none());
    }

    #[test]
    fn a_journal_of_another_plan_is_a_mismatch() {
        let flow = names(&["a", "x"]);
        let plan = Resume::plan(&[completed(1, "b")], &flow, false);
        assert!(matches!(
            plan,
            Err(JournalError::Mismatch { position: 1, expected: Some(ref e), ref found })
                if e == "x" && found == "b"
        ));
        let beyond = Resume::plan(&[completed(5, "b")], &flow, false);
        assert!(matches!(
            beyond,
            Err(JournalError::Mismatch { expected: None, .. })
        ));
    }

    #[test]
    fn a_started_mark_without_completion_is_an_interruption() {
        let flow = names(&["a", "b"]);
        let started = Entry::Started {
            position: 1,
            name: "b".into(),
        }
        .encode();
        let plan = Resume::plan(&[completed(0, "a"), started.clone()], &flow, false);
        assert!(plan.is_ok_and(|p| p.is_interrupted(1)));
        let plan = Resume::plan(&[started, completed(1, "b")], &flow, false);
        assert!(plan.is_ok_and(|p| !p.is_interrupted(1) && p.is_restored(1)));
    }

    #[test]
    fn a_compensated_step_is_not_restored_and_a_failure_is_kept_unless_redriven() {
        let flow = names(&["a", "b"]);
        let failed = Entry::Failed {
            position: Some(1),
            name: "b".into(),
            error: FlowError::Cancelled,
        }
        .encode();
        let compensated = Entry::Compensated {
            position: 0,
            name: "a".into(),
        }
        .encode();
        let entries = [completed(0, "a"), failed, compensated];
        let resumed = Resume::plan(&entries, &flow, false).unwrap_or_else(|e| panic!("{e}"));
        assert!(!resumed.is_restored(0) && resumed.was_compensated(0));
        assert!(resumed.failed.is_some());
        let redriven = Resume::plan(&entries, &flow, true).unwrap_or_else(|e| panic!("{e}"));
        assert!(redriven.failed.is_none() && !redriven.was_compensated(0));
    }
}
