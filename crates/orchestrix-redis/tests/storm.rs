//! A duplicate storm from several OS processes: 500 keys, 20 concurrent callers spread over
//! 4 processes (this test binary, re-run as children), all racing for every key at once.
//! Each key's operation must execute exactly once.
//!
//! The machinery, and the execution counter independent of Redis, is
//! `orchestrix_conformance::storm`; this file only builds the store, under a key prefix
//! of its own.

mod common;

use std::sync::Arc;

use orchestrix_conformance::storm::{StormChild, StormPlan, run_storm};

const PREFIX_VAR: &str = "ORCHESTRIX_STORM_PREFIX";

#[tokio::test]
async fn duplicate_storm_from_several_processes_executes_each_key_once() {
    let prefix = common::unique_prefix("storm");
    run_storm(&StormPlan::STANDARD, "storm_child", &[(PREFIX_VAR, prefix)]).await;
}

/// One storm process; does nothing unless started by the storm test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of duplicate_storm_from_several_processes_executes_each_key_once"]
async fn storm_child() {
    let Some(child) = StormChild::from_env() else {
        return;
    };
    let prefix = std::env::var(PREFIX_VAR).expect("the storm sets the key prefix");
    child
        .run(Arc::new(common::store_with_prefix(&prefix).await))
        .await;
}
