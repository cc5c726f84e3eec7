//! `orchestrix abandoned`: the durable runs a recovery would resume (running, lease lapsed).

use std::process::ExitCode;

use orchestrix::idempotency::scoped_key;
use serde_json::json;

use super::Store;
use crate::cli::AbandonedArgs;

pub(super) async fn run(store: &Store, args: AbandonedArgs) -> anyhow::Result<ExitCode> {
    let Some(journal) = store.store.journal_store() else {
        eprintln!("this store keeps no journals: no durable run can be abandoned on it");
        if args.json {
            println!("{}", json!({ "keys": [], "next": null }));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let prefix = args
        .flow
        .as_deref()
        .map_or_else(String::new, |flow| scoped_key(flow, ""));
    let limit = args.limit as usize;
    let keys = store
        .bounded(journal.abandoned(&prefix, args.after.as_deref(), limit))
        .await?;
    // Keys come in ascending order: a full page may have more after its last key.
    let next = (keys.len() == limit)
        .then(|| keys.last().cloned())
        .flatten();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "keys": keys, "next": next }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    for key in &keys {
        println!("{key}");
    }
    match next {
        Some(next) => println!("next page: --after {next}"),
        None if keys.is_empty() => eprintln!("no abandoned runs"),
        None => {}
    }
    Ok(ExitCode::SUCCESS)
}
