//! A duplicate storm from several OS processes: 500 keys, 20 concurrent callers spread over
//! 4 processes (this test binary, re-run as children), all racing for every key at once.
//! Each key's operation must execute exactly once.
//!
//! Every caller runs a real flow (`Flow::run` with an idempotency key) whose one step is the
//! side effect: it counts its execution in Redis (`HINCRBY` on a separate hash),
//! independently of the store.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use orchestrix::{Context, Flow, RunOptions, Status, StepError};
use orchestrix_redis::redis::AsyncCommands;

const KEYS: usize = 500;
const PROCESSES: usize = 4;
const CALLERS_PER_PROCESS: usize = 5;
const CHILD_TEST: &str = "storm_child";
const PREFIX_VAR: &str = "ORCHESTRIX_STORM_PREFIX";
const START_AT_VAR: &str = "ORCHESTRIX_STORM_START_AT_MS";
/// Finished storm records and the counter do not outlive the run by long.
const KEEP: Duration = Duration::from_secs(600);

fn counter_key(prefix: &str) -> String {
    format!("{prefix}executions")
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[tokio::test]
async fn duplicate_storm_from_several_processes_executes_each_key_once() {
    let prefix = common::unique_prefix("storm");
    // Every child waits for the same instant, so the processes really race.
    let start_at = unix_ms() + 1_500;
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    CHILD_TEST,
                    "--ignored",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(PREFIX_VAR, &prefix)
                .env(START_AT_VAR, start_at.to_string())
                // Captured, so the children's own test summaries stay out of this run's.
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "a storm process failed: {output:?}"
        );
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
    }

    let mut raw = common::raw().await;
    let counts: HashMap<String, u64> = raw.hgetall(counter_key(&prefix)).await.unwrap();
    let _: () = raw.del(counter_key(&prefix)).await.unwrap();
    assert_eq!(counts.len(), KEYS, "every key must have executed");
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "keys executed more than once: {repeated:?}"
    );
    assert_eq!(counts.values().sum::<u64>(), KEYS as u64);
}

/// One storm process; does nothing unless started by the storm test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of duplicate_storm_from_several_processes_executes_each_key_once"]
async fn storm_child() {
    let Ok(prefix) = std::env::var(PREFIX_VAR) else {
        return;
    };
    let start_at: u128 = std::env::var(START_AT_VAR).unwrap().parse().unwrap();
    let store = common::store_with_prefix(&prefix).await;
    let counter = common::raw().await;
    let slack_ms = u64::try_from(start_at.saturating_sub(unix_ms())).unwrap();
    tokio::time::sleep(Duration::from_millis(slack_ms)).await;

    let key_of_counter = counter_key(&prefix);
    let flow = Flow::<usize>::builder("storm")
        .store(Arc::new(store))
        .step("effect", move |ctx: Context<usize>| {
            let (mut counter, counter_key) = (counter.clone(), key_of_counter.clone());
            async move {
                let key = format!("storm:{}", ctx.input());
                let _: u64 = counter
                    .hincr(&counter_key, &key, 1)
                    .await
                    .map_err(StepError::new)?;
                Ok(())
            }
        })
        .build()
        .unwrap();
    let callers: Vec<_> = (0..CALLERS_PER_PROCESS)
        .map(|_| {
            let flow = flow.clone();
            tokio::spawn(async move {
                let mut executed = 0;
                for i in 0..KEYS {
                    let options = RunOptions::key(format!("storm:{i}")).ttl(KEEP);
                    let result = flow.run(i, options).await.unwrap();
                    match (result.status, result.replayed) {
                        (Status::Completed, false) => executed += 1,
                        (Status::Completed, true) | (Status::Running, _) => {}
                        other => panic!("unexpected outcome {other:?}"),
                    }
                }
                executed
            })
        })
        .collect();
    let mut acquired = Vec::new();
    for caller in callers {
        acquired.push(caller.await.unwrap());
    }
    eprintln!(
        "storm process {}: ready {slack_ms} ms early; keys acquired per caller {acquired:?}",
        std::process::id()
    );
}
