//! `orchestrix inspect KEY`: everything the store holds about one record.

use std::process::ExitCode;

use anyhow::Context as _;
use orchestrix::store::{JournalEntryKind, RecordInfo};

use super::{Store, no_record};
use crate::cli::InspectArgs;
use crate::render::{self, RecordJson};

pub(super) async fn run(store: &Store, args: InspectArgs) -> anyhow::Result<ExitCode> {
    let key = args.key.stored();
    let info = store
        .bounded(store.admin()?.inspect(&key))
        .await
        .with_context(|| format!("record under {key:?}"))?;
    let Some(info) = info else {
        return Ok(no_record(&key));
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&RecordJson::of(&info))?);
    } else {
        print!("{}", table(&info));
    }
    Ok(ExitCode::SUCCESS)
}

/// The record as a two-column table, the journal's entries after it.
pub(super) fn table(info: &RecordInfo) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("key", info.key.clone()),
        ("status", info.status.to_string()),
        ("owner token", info.token.to_string()),
    ];
    if let Some(lease) = info.lease {
        rows.push(("lease", render::lease(lease)));
    }
    rows.push((
        "expires",
        match info.expires_in {
            Some(left) => format!(
                "in {} (at {} by this machine's clock)",
                render::duration(left),
                render::instant_after(left)
            ),
            None => "never (kept until deleted)".to_owned(),
        },
    ));
    rows.push((
        "fingerprint",
        info.fingerprint
            .clone()
            .unwrap_or_else(|| "none".to_owned()),
    ));
    rows.push((
        "result",
        match info.result_bytes {
            Some(bytes) => format!("{bytes} bytes"),
            None if info.status == orchestrix::store::RecordStatus::Running => {
                "none yet".to_owned()
            }
            None => "not stored (too large or refused)".to_owned(),
        },
    ));
    rows.push(("schema version", info.schema_version.to_string()));
    rows.push((
        "durable",
        if info.durable { "yes" } else { "no" }.to_owned(),
    ));
    let mut out = String::new();
    for (name, value) in rows {
        out.push_str(&format!("{name:<15} {value}\n"));
    }
    if let Some(journal) = &info.journal {
        let described = journal.describe();
        let version = described
            .flow_version
            .as_deref()
            .map_or_else(String::new, |v| format!(", flow version {v:?}"));
        let unreadable = if described.input_readable {
            ""
        } else {
            " (not in a format this build reads)"
        };
        out.push_str(&format!(
            "{:<15} input {} bytes{unreadable}{version}, {} entries\n",
            "journal",
            described.input_bytes,
            described.entries.len()
        ));
        for (i, entry) in described.entries.iter().enumerate() {
            let step = match (&entry.step, entry.position) {
                (Some(name), Some(position)) => format!("step {position} {name:?}"),
                (_, None) if entry.kind == JournalEntryKind::Failed => {
                    "the flow (no step)".to_owned()
                }
                _ => String::new(),
            };
            let mut details = vec![format!("{} bytes", entry.bytes)];
            if let Some(attempts) = entry.attempts {
                details.push(format!("{attempts} attempts"));
            }
            if !entry.state_keys.is_empty() {
                details.push(format!("wrote {}", entry.state_keys.join(", ")));
            }
            if let Some(error) = &entry.error {
                details.push(error.clone());
            }
            out.push_str(&format!(
                "  #{i:<3} {:<12} {step} ({})\n",
                entry.kind,
                details.join("; ")
            ));
        }
    }
    out
}
