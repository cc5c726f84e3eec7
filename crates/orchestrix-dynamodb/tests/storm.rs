//! A duplicate storm from several OS processes: 500 keys, callers spread over 4 processes
//! (this test binary, re-run as children), all racing for every key at once, against one
//! table. Each key's operation must execute exactly once.
//!
//! The machinery, and the execution counter independent of DynamoDB, is
//! `orchestrix_conformance::storm`; this file only builds the store, on this binary's
//! table.
//!
//! `ORCHESTRIX_STORM_CALLERS` sets the callers per key in total. The default is the full
//! 20 (five per process). moto spends about 6 ms of CPU on each conditional write, so the
//! ~10,500 requests take about a minute; `ORCHESTRIX_STORM_CALLERS=8` is a quicker check.

mod common;

use std::sync::Arc;

use orchestrix_conformance::storm::{StormChild, StormPlan, run_storm};

const CALLERS_VAR: &str = "ORCHESTRIX_STORM_CALLERS";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_from_several_processes_executes_each_key_once() {
    let _table_exists = common::store().await;
    let plan = StormPlan {
        callers_per_key: std::env::var(CALLERS_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(StormPlan::STANDARD.callers_per_key),
        ..StormPlan::STANDARD
    };
    let env = [(common::TABLE_ENV, common::shared_table().to_owned())];
    run_storm(&plan, "storm_child", &env).await;
}

/// One storm process; does nothing unless started by the storm test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of duplicate_storm_from_several_processes_executes_each_key_once"]
async fn storm_child() {
    let Some(child) = StormChild::from_env() else {
        return;
    };
    child.run(Arc::new(common::store().await)).await;
}
