//! `orchestrix inspect KEY`: everything the store holds about one record.

use std::process::ExitCode;

use anyhow::Context as _;
use orchestrix::store::RecordInfo;

use super::{Store, no_record};
use crate::cli::InspectArgs;
use crate::journal;
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
        let summary = journal::summarize(journal);
        let version = summary
            .flow_version
            .as_deref()
            .map_or_else(String::new, |v| format!(", flow version {v:?}"));
        out.push_str(&format!(
            "{:<15} input {} bytes{version}, {} entries\n",
            "journal",
            summary.input_bytes,
            summary.entries.len()
        ));
        for (i, entry) in summary.entries.iter().enumerate() {
            let step = match (&entry.step, entry.position) {
                (Some(name), Some(position)) => format!("step {position} {name:?}"),
                (Some(_), None) => "the flow (no step)".to_owned(),
                _ => String::new(),
            };
            out.push_str(&format!(
                "  #{i:<3} {:<12} {step} ({} bytes)\n",
                entry.kind, entry.bytes
            ));
        }
    }
    out
}
