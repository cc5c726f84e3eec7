//! A durable run's journal, described for people: what an operator tool shows.

use super::entry::{Entry, decode_input};
use crate::store::{Journal, JournalDescription, JournalEntryInfo, JournalEntryKind};

/// Describes `journal`. Never fails: what does not decode is said to be undecodable.
pub(crate) fn describe(journal: &Journal) -> JournalDescription {
    let (flow_version, input_readable) = match decode_input(&journal.input) {
        Ok((settings, _)) => (Some(settings.version).filter(|v| !v.is_empty()), true),
        Err(_) => (None, false),
    };
    JournalDescription {
        input_bytes: journal.input.len(),
        input_readable,
        flow_version,
        entries: journal.entries.iter().map(|bytes| entry(bytes)).collect(),
    }
}

fn entry(bytes: &[u8]) -> JournalEntryInfo {
    let mut info = JournalEntryInfo {
        kind: JournalEntryKind::Undecodable,
        position: None,
        step: None,
        attempts: None,
        duration: None,
        state_keys: Vec::new(),
        error: None,
        bytes: bytes.len(),
    };
    let Ok(decoded) = Entry::decode(bytes) else {
        return info;
    };
    let at = |position: usize| u32::try_from(position).ok();
    match decoded {
        Entry::Started { position, name } => {
            info.kind = JournalEntryKind::Started;
            info.position = at(position);
            info.step = Some(name);
        }
        Entry::Compensated { position, name } => {
            info.kind = JournalEntryKind::Compensated;
            info.position = at(position);
            info.step = Some(name);
        }
        Entry::Completed {
            position,
            name,
            attempts,
            duration,
            state,
        } => {
            info.kind = JournalEntryKind::Completed;
            info.position = at(position);
            info.step = Some(name);
            info.attempts = Some(attempts);
            info.duration = Some(duration);
            info.state_keys = state.into_iter().map(|(key, _)| key).collect();
        }
        Entry::Failed {
            position,
            name,
            error,
        } => {
            info.kind = JournalEntryKind::Failed;
            info.position = position.and_then(at);
            info.step = Some(name).filter(|n| !n.is_empty());
            info.error = Some(error.to_string());
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::FlowError;
    use crate::durable::entry::{Settings, encode_input};

    #[test]
    fn every_entry_kind_is_described_and_garbage_is_undecodable() {
        let settings = Settings {
            version: "v2".into(),
            ttl: None,
            lease: Duration::from_secs(30),
            cache_result: true,
        };
        let journal = Journal {
            input: encode_input(&settings, b"{\"order\":1}"),
            entries: vec![
                Entry::Started {
                    position: 0,
                    name: "charge".into(),
                }
                .encode(),
                Entry::Completed {
                    position: 0,
                    name: "charge".into(),
                    attempts: 2,
                    duration: Duration::from_millis(5),
                    state: vec![("charge_id".into(), serde_json::json!("ch_1"))],
                }
                .encode(),
                Entry::Failed {
                    position: Some(1),
                    name: "ship".into(),
                    error: FlowError::Cancelled,
                }
                .encode(),
                b"garbage".to_vec(),
            ],
        };
        let described = journal.describe();
        assert_eq!(described.flow_version.as_deref(), Some("v2"));
        assert!(described.input_readable);
        let kinds: Vec<_> = described.entries.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                JournalEntryKind::Started,
                JournalEntryKind::Completed,
                JournalEntryKind::Failed,
                JournalEntryKind::Undecodable
            ]
        );
        let completed = &described.entries[1];
        assert_eq!(completed.position, Some(0));
        assert_eq!(completed.step.as_deref(), Some("charge"));
        assert_eq!(completed.attempts, Some(2));
        assert_eq!(completed.state_keys, ["charge_id"]);
        assert_eq!(described.entries[2].position, Some(1));
        assert!(described.entries[2].error.is_some());
        assert_eq!(described.entries[3].bytes, 7);

        let unreadable = Journal {
            input: b"not a journal".to_vec(),
            entries: Vec::new(),
        }
        .describe();
        assert!(!unreadable.input_readable);
        assert_eq!(unreadable.flow_version, None);
    }
}
