//! The stored form of a finished run: how a [`FlowResult`] is written to the idempotency
//! store and read back as a replay.
//!
//! Kept apart from the public result types: the store only ever sees these bytes, and a
//! replay only ever reads them.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::result::{CompensationFailure, FlowError, FlowResult, Status, StepResult};
use crate::step::panic_message;

/// The stored form of a finished run, as [`FlowResult::to_stored`] writes it (version 3):
/// a compact binary envelope, so a replay reads it back with a few bounds checks instead of
/// a parse. Every integer is little-endian; `str` is a `u32` byte length and UTF-8 bytes;
/// `opt` is a byte `0` (absent) or `1` followed by the value.
///
/// The output's flag has a third value, `2`: the run had an output, but it was not kept
/// (it could not be encoded, or would not read back as `O`, see [`FlowResult::to_stored`]).
/// A replay of such a record is a typed "result not stored", never a decode error.
///
/// ```text
/// 0x03  status  ns:u64  steps:u32  { name:str status attempts:u32 ns:u64 error:opt<str> restored:u8 }*
///       error:opt<u32 length + FlowError as JSON>  compensation_failures:u32 { step:str message:str }*
///       output:( 0 | 1 <O as JSON, to the end> | 2 )
/// ```
///
/// The output stays JSON (any `O: Serialize` fits, and a changed output type is a decode
/// error, not silent garbage). Version 1, written by earlier builds, was a JSON object; it
/// is still read (its first byte is `{`).
const STORED_VERSION: u8 = 3;

/// Version 2: version 3 without the steps' `restored` flag (written before durable flows).
const WITHOUT_RESTORED: u8 = 2;

/// The JSON object of version 1.
const LEGACY_JSON: u8 = b'{';

/// The output's flag: no output, the output follows, or the output was not kept.
const NO_OUTPUT: u8 = 0;
const OUTPUT: u8 = 1;
const OUTPUT_NOT_KEPT: u8 = 2;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn status_code(status: Status) -> u8 {
    match status {
        Status::Pending => b'p',
        Status::Running => b'r',
        Status::Completed => b'c',
        Status::Failed => b'f',
        Status::Cancelled => b'x',
    }
}

fn status_of(code: u8) -> Option<Status> {
    Some(match code {
        b'p' => Status::Pending,
        b'r' => Status::Running,
        b'c' => Status::Completed,
        b'f' => Status::Failed,
        b'x' => Status::Cancelled,
        _ => return None,
    })
}

/// Appends the pieces of the stored form.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A length or count, as a `u32`.
    fn len(&mut self, v: usize) {
        // Lengths and counts beyond u32 cannot occur in a result a store would accept; they
        // saturate, which the reader then refuses as malformed rather than misreading.
        self.u32(u32::try_from(v).unwrap_or(u32::MAX));
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
            None => self.u8(0),
        }
    }
}

/// Reads the pieces of the stored form; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoredError> {
        if self.0.len() < n {
            return Err(StoredError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoredError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, StoredError> {
        Ok(self.array::<1>()?[0])
    }

    #[inline]
    fn len(&mut self) -> Result<usize, StoredError> {
        let n = u32::from_le_bytes(self.array()?);
        // Every counted item takes at least one byte: a count larger than what is left is
        // garbage, refused before anything is allocated for it.
        let n = usize::try_from(n).map_err(|_| StoredError::Truncated)?;
        if n > self.0.len() {
            return Err(StoredError::Truncated);
        }
        Ok(n)
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, StoredError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    #[inline]
    fn u64(&mut self) -> Result<u64, StoredError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    #[inline]
    fn status(&mut self) -> Result<Status, StoredError> {
        let code = self.u8()?;
        status_of(code).ok_or(StoredError::Status(code))
    }

    #[inline]
    fn flag(&mut self) -> Result<bool, StoredError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(StoredError::Flag(other)),
        }
    }

    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], StoredError> {
        let n = self.len()?;
        self.take(n)
    }

    #[inline]
    fn str(&mut self) -> Result<&'a str, StoredError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| StoredError::Utf8)
    }

    #[inline]
    fn opt_str(&mut self) -> Result<Option<&'a str>, StoredError> {
        Ok(if self.flag()? {
            Some(self.str()?)
        } else {
            None
        })
    }
}

/// Why a run's output was left out of its stored form. The rest of the outcome is stored,
/// so the operation never runs again; a replay gets "result not stored".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputNotKept {
    /// The output's `Serialize` implementation failed.
    #[error("the output could not be encoded as JSON: {0}")]
    Encode(#[source] serde_json::Error),
    /// The output encodes, but the JSON does not decode back as the output type (for
    /// example a `NaN`, which JSON writes as `null`), so a replay could never read it.
    #[error("the output's JSON does not read back as the output type: {0}")]
    DoesNotReadBack(#[source] serde_json::Error),
    /// The output's `Serialize` or `Deserialize` implementation panicked.
    #[error("encoding the output panicked: {0}")]
    Panicked(String),
}

/// A result encoded for the store, and why its output was left out, if it was.
pub(crate) struct Stored {
    pub(crate) bytes: Vec<u8>,
    pub(crate) output_not_kept: Option<OutputNotKept>,
}

impl<O: Serialize + DeserializeOwned> FlowResult<O> {
    /// Encodes the result for the idempotency store. The output is kept only if it encodes
    /// and its JSON reads back as an `O`: what is stored is always replayable. Otherwise the
    /// outcome is stored without it, and the reason is returned beside the bytes.
    pub(crate) fn to_stored(&self) -> Stored {
        let names: usize = self.steps.iter().map(|s| s.name.len() + 26).sum();
        let mut w = Writer(Vec::with_capacity(32 + names));
        w.u8(STORED_VERSION);
        w.u8(status_code(self.status));
        w.u64(nanos(self.duration));
        w.len(self.steps.len());
        for step in &self.steps {
            w.str(&step.name);
            w.u8(status_code(step.status));
            w.u32(step.attempts);
            w.u64(nanos(step.duration));
            w.opt_str(step.error.as_deref());
            w.u8(u8::from(step.restored));
        }
        // `FlowError` holds strings, numbers and flags only: its JSON cannot fail. Were it
        // to, the error is stored as absent rather than the outcome being lost.
        match self.error.as_ref().map(serde_json::to_vec) {
            Some(Ok(json)) => {
                w.u8(1);
                w.len(json.len());
                w.0.extend_from_slice(&json);
            }
            Some(Err(_)) | None => w.u8(0),
        }
        w.len(self.compensation_failures.len());
        for failure in &self.compensation_failures {
            w.str(&failure.step);
            w.str(&failure.message);
        }
        let output_not_kept = match &self.output {
            None => {
                w.u8(NO_OUTPUT);
                None
            }
            Some(output) => {
                let at = w.0.len();
                w.u8(OUTPUT);
                let kept = write_checked(&mut w.0, output);
                if kept.is_err() {
                    w.0.truncate(at);
                    w.u8(OUTPUT_NOT_KEPT);
                }
                kept.err()
            }
        };
        Stored {
            bytes: w.0,
            output_not_kept,
        }
    }
}

/// Appends `output` as JSON and checks that it reads back as an `O`. The user's own
/// `Serialize` and `Deserialize` run here, after the steps: a panic in either is caught,
/// never unwound through the run that owns the key.
fn write_checked<O: Serialize + DeserializeOwned>(
    out: &mut Vec<u8>,
    output: &O,
) -> Result<(), OutputNotKept> {
    let start = out.len();
    let checked = catch_unwind(AssertUnwindSafe(|| {
        serde_json::to_writer(&mut *out, output).map_err(OutputNotKept::Encode)?;
        let json = out.get(start..).unwrap_or_default();
        serde_json::from_slice::<O>(json)
            .map(drop)
            .map_err(OutputNotKept::DoesNotReadBack)
    }));
    checked.unwrap_or_else(|payload| Err(OutputNotKept::Panicked(panic_message(&*payload))))
}

/// Why a stored result could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoredError {
    #[error("the run finished, but its output was not kept")]
    OutputNotKept,
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("stored result has payload version {0}, this build reads 1 to {STORED_VERSION}")]
    Version(u8),
    #[error("stored result is truncated or has an impossible length")]
    Truncated,
    #[error("stored result has an unknown status code {0:#04x}")]
    Status(u8),
    #[error("stored result has an invalid presence flag {0:#04x}")]
    Flag(u8),
    #[error("stored result has a name or message that is not UTF-8")]
    Utf8,
}

impl<O: DeserializeOwned> FlowResult<O> {
    /// Decodes a result written by [`to_stored`](Self::to_stored), as a replay of `flow`,
    /// whose steps are `step_names` (their names are shared with the replay when they match).
    pub(crate) fn from_stored(
        flow: &Arc<str>,
        step_names: &[Arc<str>],
        bytes: &[u8],
    ) -> Result<Self, StoredError> {
        let version = match bytes.first() {
            Some(&v @ (STORED_VERSION | WITHOUT_RESTORED)) => v,
            Some(&LEGACY_JSON) => return Self::from_legacy_json(flow, bytes),
            Some(&other) => return Err(StoredError::Version(other)),
            None => return Err(StoredError::Truncated),
        };
        let mut r = Reader(&bytes[1..]);
        let status = r.status()?;
        let duration = Duration::from_nanos(r.u64()?);
        let count = r.len()?;
        let mut steps = Vec::with_capacity(count);
        for i in 0..count {
            // A name equal to the flow's own is shared, and needs no UTF-8 check.
            let name = r.bytes()?;
            let name = match step_names.get(i) {
                Some(known) if known.as_bytes() == name => Arc::clone(known),
                _ => Arc::from(std::str::from_utf8(name).map_err(|_| StoredError::Utf8)?),
            };
            steps.push(StepResult {
                name,
                status: r.status()?,
                attempts: r.u32()?,
                duration: Duration::from_nanos(r.u64()?),
                error: r.opt_str()?.map(str::to_owned),
                restored: version == STORED_VERSION && r.flag()?,
            });
        }
        let error = if r.flag()? {
            let n = r.len()?;
            Some(serde_json::from_slice(r.take(n)?)?)
        } else {
            None
        };
        let failures = r.len()?;
        let mut compensation_failures = Vec::with_capacity(failures);
        for _ in 0..failures {
            compensation_failures.push(CompensationFailure {
                step: r.str()?.to_owned(),
                message: r.str()?.to_owned(),
            });
        }
        let output = match r.u8()? {
            OUTPUT => Some(serde_json::from_slice(r.0)?),
            NO_OUTPUT if r.0.is_empty() => None,
            OUTPUT_NOT_KEPT if r.0.is_empty() => return Err(StoredError::OutputNotKept),
            NO_OUTPUT | OUTPUT_NOT_KEPT => return Err(StoredError::Truncated),
            other => return Err(StoredError::Flag(other)),
        };
        Ok(Self {
            flow: Arc::clone(flow),
            status,
            duration,
            steps,
            output,
            error,
            compensation_failures,
            replayed: true,
        })
    }

    /// Version 1: a JSON object, steps as arrays, durations in whole nanoseconds.
    fn from_legacy_json(flow: &Arc<str>, bytes: &[u8]) -> Result<Self, StoredError> {
        /// A step: name, status, attempts, duration in ns, error.
        type LegacyStep = (String, Status, u32, u64, Option<String>);
        #[derive(Deserialize)]
        struct Legacy<O> {
            v: u8,
            status: Status,
            ns: u64,
            steps: Vec<LegacyStep>,
            #[serde(default = "none")]
            output: Option<O>,
            #[serde(default)]
            error: Option<FlowError>,
            #[serde(default)]
            compensation_failures: Vec<CompensationFailure>,
        }
        fn none<O>() -> Option<O> {
            None
        }
        let stored: Legacy<O> = serde_json::from_slice(bytes)?;
        if stored.v != 1 {
            return Err(StoredError::Version(stored.v));
        }
        Ok(Self {
            flow: Arc::clone(flow),
            status: stored.status,
            duration: Duration::from_nanos(stored.ns),
            steps: stored
                .steps
                .into_iter()
                .map(|(name, status, attempts, ns, error)| StepResult {
                    name: Arc::from(name),
                    status,
                    attempts,
                    duration: Duration::from_nanos(ns),
                    error,
                    restored: false,
                })
                .collect(),
            output: stored.output,
            error: stored.error,
            compensation_failures: stored.compensation_failures,
            replayed: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FlowResult<Vec<u32>> {
        FlowResult {
            flow: Arc::from("f"),
            status: Status::Failed,
            duration: Duration::from_nanos(1_234_567),
            steps: vec![
                StepResult {
                    name: Arc::from("a \"quoted\" step"),
                    status: Status::Cancelled,
                    attempts: 2,
                    duration: Duration::from_micros(5),
                    error: None,
                    restored: true,
                },
                StepResult {
                    name: Arc::from("b"),
                    status: Status::Failed,
                    attempts: 3,
                    duration: Duration::from_millis(7),
                    error: Some("boom".into()),
                    restored: false,
                },
            ],
            output: Some(vec![1, 2]),
            error: Some(FlowError::Step {
                step: "b".into(),
                attempts: 3,
                message: "boom".into(),
                transient: false,
                source: None,
            }),
            compensation_failures: vec![CompensationFailure {
                step: "a".into(),
                message: "refund failed".into(),
            }],
            replayed: false,
        }
    }

    #[test]
    fn stored_results_round_trip_as_replays() {
        let original = sample();
        let bytes = original.to_stored().bytes;
        let back = FlowResult::<Vec<u32>>::from_stored(&original.flow, &[], &bytes).ok();
        let expected = FlowResult {
            replayed: true,
            ..original
        };
        assert_eq!(back, Some(expected));
    }

    #[test]
    fn stored_results_without_output_replay_without_output() {
        let none = FlowResult {
            output: None,
            ..sample()
        };
        let bytes = none.to_stored().bytes;
        let back = FlowResult::<Vec<u32>>::from_stored(&Arc::from("f"), &[], &bytes).ok();
        assert_eq!(back.map(|r| r.output), Some(None));
    }

    #[test]
    fn an_output_that_does_not_read_back_is_left_out_and_its_replay_says_so() {
        let nan = FlowResult {
            output: Some(f64::NAN),
            ..FlowResult::without_steps(&Arc::from("f"), Status::Completed, &[], None)
        };
        let stored = nan.to_stored();
        assert!(matches!(
            stored.output_not_kept,
            Some(OutputNotKept::DoesNotReadBack(_))
        ));
        let replay = FlowResult::<f64>::from_stored(&Arc::from("f"), &[], &stored.bytes);
        assert!(
            matches!(replay, Err(StoredError::OutputNotKept)),
            "{replay:?}"
        );
    }

    #[test]
    fn a_panicking_output_serializer_is_caught_and_the_output_left_out() {
        #[derive(Debug, Deserialize)]
        struct Bomb;
        impl Serialize for Bomb {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                panic!("serializer bug")
            }
        }
        let result = FlowResult {
            output: Some(Bomb),
            ..FlowResult::without_steps(&Arc::from("f"), Status::Completed, &[], None)
        };
        let stored = result.to_stored();
        assert!(
            matches!(&stored.output_not_kept, Some(OutputNotKept::Panicked(m)) if m.contains("serializer bug"))
        );
        let replay = FlowResult::<()>::from_stored(&Arc::from("f"), &[], &stored.bytes);
        assert!(matches!(replay, Err(StoredError::OutputNotKept)));
    }

    #[test]
    fn a_stored_result_of_another_payload_version_is_refused() {
        let mut bytes = sample().to_stored().bytes;
        bytes[0] = 4;
        let decoded = FlowResult::<Vec<u32>>::from_stored(&Arc::from("f"), &[], &bytes);
        assert!(matches!(decoded, Err(StoredError::Version(4))));
        let legacy = br#"{"v":2,"status":"completed","ns":0,"steps":[]}"#;
        let decoded = FlowResult::<()>::from_stored(&Arc::from("f"), &[], legacy);
        assert!(matches!(decoded, Err(StoredError::Version(2))));
    }

    #[test]
    fn a_stored_result_of_another_output_type_is_a_decode_error() {
        let bytes = sample().to_stored().bytes;
        let decoded = FlowResult::<String>::from_stored(&Arc::from("f"), &[], &bytes);
        assert!(matches!(decoded, Err(StoredError::Json(_))));
    }

    #[test]
    fn results_stored_by_version_2_are_still_replayed() {
        // Version 2 (the previous build): no `restored` flag after each step.
        let mut v2 = vec![2, b'c'];
        v2.extend_from_slice(&1500u64.to_le_bytes());
        v2.extend_from_slice(&1u32.to_le_bytes());
        v2.extend_from_slice(&1u32.to_le_bytes());
        v2.push(b'a');
        v2.push(b'c');
        v2.extend_from_slice(&2u32.to_le_bytes());
        v2.extend_from_slice(&700u64.to_le_bytes());
        v2.push(0);
        v2.push(0);
        v2.extend_from_slice(&0u32.to_le_bytes());
        v2.push(1);
        v2.extend_from_slice(b"[7]");
        let back = FlowResult::<Vec<u32>>::from_stored(&Arc::from("f"), &[], &v2).ok();
        let back = back.map(|r| (r.status, r.steps[0].attempts, r.steps[0].restored, r.output));
        assert_eq!(back, Some((Status::Completed, 2, false, Some(vec![7]))));
    }

    #[test]
    fn results_stored_by_version_1_are_still_replayed() {
        let v1 = br#"{"v":1,"status":"completed","ns":1500,"steps":[["a","completed",1,700,null],["b","failed",2,800,"x"]],"output":[7]}"#;
        let back = FlowResult::<Vec<u32>>::from_stored(&Arc::from("f"), &[], v1).ok();
        let back = back.map(|r| {
            let steps: Vec<_> = r
                .steps
                .iter()
                .map(|s| (s.name.to_string(), s.status, s.attempts, s.error.clone()))
                .collect();
            (r.status, r.duration, steps, r.output, r.replayed)
        });
        assert_eq!(
            back,
            Some((
                Status::Completed,
                Duration::from_nanos(1500),
                vec![
                    ("a".to_owned(), Status::Completed, 1, None),
                    ("b".to_owned(), Status::Failed, 2, Some("x".to_owned())),
                ],
                Some(vec![7]),
                true
            ))
        );
    }

    #[test]
    fn replays_share_the_flows_step_names() {
        let original = sample();
        let names: Vec<Arc<str>> = original.steps.iter().map(|s| Arc::clone(&s.name)).collect();
        let bytes = original.to_stored().bytes;
        let back = FlowResult::<Vec<u32>>::from_stored(&original.flow, &names, &bytes).ok();
        let shared = back.is_some_and(|r| {
            r.steps
                .iter()
                .zip(&names)
                .all(|(s, n)| Arc::ptr_eq(&s.name, n))
        });
        assert!(shared);
    }

    #[test]
    fn every_truncation_or_extension_of_a_stored_result_is_an_error() {
        let bytes = sample().to_stored().bytes;
        for end in 0..bytes.len() {
            let decoded = FlowResult::<Vec<u32>>::from_stored(&Arc::from("f"), &[], &bytes[..end]);
            assert!(decoded.is_err(), "a prefix of {end} bytes decoded");
        }
        let without_output = FlowResult {
            output: None,
            ..sample()
        }
        .to_stored()
        .bytes;
        let mut longer = without_output.clone();
        longer.push(0);
        assert!(FlowResult::<Vec<u32>>::from_stored(&Arc::from("f"), &[], &longer).is_err());
        assert!(FlowResult::<Vec<u32>>::from_stored(&Arc::from("f"), &[], &without_output).is_ok());
    }
}
