//! `orchestrix list [PREFIX]`: the records under a prefix, a page at a time.

use std::process::ExitCode;

use orchestrix::idempotency::scoped_key;
use std::time::Instant;

use orchestrix::store::{ListRequest, Listed, Page, StatusFilter};
use serde_json::json;

use super::Store;
use crate::cli::ListArgs;
use crate::render::{self, RecordJson};

pub(super) async fn run(store: &Store, args: ListArgs) -> anyhow::Result<ExitCode> {
    let prefix = match &args.flow {
        Some(flow) => scoped_key(flow, &args.starts_with),
        None => args.starts_with.clone(),
    };
    let filter = if args.running {
        StatusFilter::Running
    } else if args.completed {
        StatusFilter::Completed
    } else if args.failed {
        StatusFilter::Failed
    } else if args.expired_lease {
        StatusFilter::ExpiredLease
    } else {
        StatusFilter::Any
    };
    let page = fill_page(store, &prefix, filter, &args).await?;
    if args.json {
        let records: Vec<_> = page
            .records
            .iter()
            .map(|listed| match listed {
                Listed::Record(info) => json!(RecordJson::of(info)),
                Listed::Undecodable { key, error } => {
                    json!({ "key": key, "undecodable": error.to_string() })
                }
                other => json!({ "key": other.key() }),
            })
            .collect();
        let page = json!({ "records": records, "next": page.next });
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 6]> = page
        .records
        .iter()
        .map(|listed| match listed {
            Listed::Record(info) => [
                info.key.clone(),
                info.status.to_string(),
                render::lease_cell(info.lease),
                render::expires_cell(info.expires_in),
                render::result_cell(info.result_bytes),
                if info.durable { "yes" } else { "no" }.to_owned(),
            ],
            Listed::Undecodable { key, error } => [
                key.clone(),
                "UNDECODABLE".to_owned(),
                error.to_string(),
                String::new(),
                String::new(),
                String::new(),
            ],
            other => [
                other.key().to_owned(),
                "?".to_owned(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
        })
        .collect();
    print!("{}", table(&rows));
    match &page.next {
        Some(next) => println!("next page: --cursor {next}"),
        None if rows.is_empty() => println!("no records"),
        None => println!("end of the listing"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Up to `--limit` records from `--cursor` on. A store that bounds the work of one page (a
/// Redis `SCAN`, a DynamoDB `Scan`) may answer a short page with a cursor: it is asked
/// again from there until the page is full or the listing ends, for at most `--timeout`;
/// past that the records found so far are shown, with the cursor to go on from.
async fn fill_page(
    store: &Store,
    prefix: &str,
    filter: StatusFilter,
    args: &ListArgs,
) -> anyhow::Result<Page> {
    let limit = args.limit as usize;
    let started = Instant::now();
    let mut records = Vec::new();
    let mut cursor = args.cursor.clone();
    loop {
        let request = ListRequest::new(prefix)
            .filter(filter)
            .limit(limit - records.len())
            .cursor(cursor.as_deref());
        let page = store.bounded(store.admin()?.list(request)).await?;
        records.extend(page.records);
        cursor = page.next;
        if cursor.is_none() || records.len() >= limit || started.elapsed() >= store.answer {
            return Ok(Page {
                records,
                next: cursor,
            });
        }
    }
}

/// Rows under a header, in aligned columns (an undecodable row's error runs on).
fn table(rows: &[[String; 6]]) -> String {
    const HEADER: [&str; 6] = ["KEY", "STATUS", "LEASE", "EXPIRES IN", "RESULT", "DURABLE"];
    if rows.is_empty() {
        return String::new();
    }
    let mut widths = HEADER.map(str::len);
    for row in rows {
        if row[1] == "UNDECODABLE" {
            widths[0] = widths[0].max(row[0].len());
            continue;
        }
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        line.trim_end().to_owned() + "\n"
    };
    let mut out = line(HEADER);
    for row in rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}
