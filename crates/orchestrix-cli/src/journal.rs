//! What a durable run's journal says, as far as an operator needs it: the flow version it
//! ran under, and each entry's kind, step position and step name.
//!
//! Stores keep journals as opaque bytes; their meaning is the engine's (its private
//! `durable::entry` module, format 1). This reads only the heads it documents, and shows
//! anything else as undecodable rather than guessing:
//!
//! ```text
//! input:  "OJ" 0x01  version:str  …
//! entry:  kind:u8 ('s' started, 'c' completed, 'x' compensated, 'f' failed)  position:u32  name:str  …
//! str:    a u32 byte length, then UTF-8; integers little-endian; position u32::MAX: no step
//! ```
//!
//! The CLI's tests run real durable flows and check the names read here, so a change of the
//! engine's format fails them rather than showing wrong steps.

use orchestrix::store::Journal;
use serde::Serialize;

/// The journal input's magic bytes and format version, as the engine writes them.
const INPUT_MAGIC: &[u8; 3] = b"OJ\x01";

/// A journal, summed up.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Bytes of the journal's input (the run's settings and input).
    pub input_bytes: usize,
    /// The flow's version the run started under, if the input is in a format this build
    /// reads (`None` for the default, empty version too).
    pub flow_version: Option<String>,
    pub entries: Vec<Entry>,
}

/// One journal entry, summed up.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// `started`, `completed`, `compensated`, `failed`; `undecodable` for an entry of a
    /// format this build does not read.
    pub kind: &'static str,
    /// The step's position in the flow (`None`: no step, such as a failure of the output).
    pub position: Option<u32>,
    /// The step's name.
    pub step: Option<String>,
    pub bytes: usize,
}

/// `journal`, summed up.
pub fn summarize(journal: &Journal) -> Summary {
    let flow_version = journal
        .input
        .strip_prefix(INPUT_MAGIC)
        .and_then(|rest| Reader(rest).str())
        .filter(|version| !version.is_empty())
        .map(str::to_owned);
    Summary {
        input_bytes: journal.input.len(),
        flow_version,
        entries: journal.entries.iter().map(|e| entry(e)).collect(),
    }
}

fn entry(bytes: &[u8]) -> Entry {
    let mut reader = Reader(bytes);
    let head = (|| {
        let kind = match reader.u8()? {
            b's' => "started",
            b'c' => "completed",
            b'x' => "compensated",
            b'f' => "failed",
            _ => return None,
        };
        let position = reader.u32()?;
        let name = reader.str()?.to_owned();
        Some((kind, (position != u32::MAX).then_some(position), name))
    })();
    match head {
        Some((kind, position, step)) => Entry {
            kind,
            position,
            step: Some(step),
            bytes: bytes.len(),
        },
        None => Entry {
            kind: "undecodable",
            position: None,
            step: None,
            bytes: bytes.len(),
        },
    }
}

/// Reads little-endian integers and length-prefixed strings off the front.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        std::str::from_utf8(self.take(len)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(kind: u8, position: u32, name: &str) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&position.to_le_bytes());
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"rest of the entry");
        out
    }

    #[test]
    fn entry_heads_are_read_and_the_rest_is_counted() {
        let mut input = INPUT_MAGIC.to_vec();
        input.extend_from_slice(&2u32.to_le_bytes());
        input.extend_from_slice(b"v2 and settings");
        let journal = Journal {
            input,
            entries: vec![
                head(b'c', 0, "reserve"),
                head(b's', 1, "charge"),
                head(b'f', u32::MAX, ""),
                b"??".to_vec(),
            ],
        };
        let summary = summarize(&journal);
        assert_eq!(summary.flow_version.as_deref(), Some("v2"));
        let read: Vec<_> = summary
            .entries
            .iter()
            .map(|e| (e.kind, e.position, e.step.as_deref()))
            .collect();
        assert_eq!(
            read,
            vec![
                ("completed", Some(0), Some("reserve")),
                ("started", Some(1), Some("charge")),
                ("failed", None, Some("")),
                ("undecodable", None, None),
            ]
        );
    }

    #[test]
    fn an_input_of_another_format_has_no_version() {
        let journal = Journal {
            input: b"{}".to_vec(),
            entries: vec![],
        };
        assert_eq!(summarize(&journal).flow_version, None);
    }
}
