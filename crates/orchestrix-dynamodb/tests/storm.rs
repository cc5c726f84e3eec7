//! A duplicate storm from several OS processes: 500 keys, callers spread over 4 processes
//! (this test binary, re-run as children), all racing for every key at once, against one
//! table. Each key's operation must execute exactly once.
//!
//! Every caller runs a real flow (`Flow::run` with an idempotency key) whose one step is
//! the side effect: it counts its execution in a file opened with `O_APPEND`, one `write`
//! per execution, independently of the store.
//!
//! `ORCHESTRIX_STORM_CALLERS` sets the callers per key in total. The default is the full
//! 20 (five per process). moto spends about 6 ms of CPU on each conditional write, so the
//! ~10,500 requests take about a minute; `ORCHESTRIX_STORM_CALLERS=8` is a quicker check.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use orchestrix::{Context, Flow, RunOptions, Status, StepError};

const KEYS: usize = 500;
const PROCESSES: usize = 4;
const DEFAULT_CALLERS: usize = 20;
const CHILD_TEST: &str = "storm_child";
const CALLERS_VAR: &str = "ORCHESTRIX_STORM_CALLERS";
const PREFIX_VAR: &str = "ORCHESTRIX_STORM_PREFIX";
const COUNTER_VAR: &str = "ORCHESTRIX_STORM_COUNTER";
const START_AT_VAR: &str = "ORCHESTRIX_STORM_START_AT_MS";
/// Finished storm records do not outlive the run by long.
const KEEP: Duration = Duration::from_secs(600);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn callers_per_key() -> usize {
    std::env::var(CALLERS_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CALLERS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_from_several_processes_executes_each_key_once() {
    let _table_exists = common::store().await;
    let callers = callers_per_key();
    let prefix = orchestrix_conformance::unique_key("storm");
    let counter = std::env::temp_dir().join(format!("orchestrix-storm-{:016x}", fastrand::u64(..)));
    // Every child waits for the same instant, so the processes really race.
    let start_at = unix_ms() + 1_500;
    let exe = std::env::current_exe().unwrap();
    let began = Instant::now();
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| {
            // The first processes take one caller more when they do not divide evenly.
            let mine = callers / PROCESSES + usize::from(i < callers % PROCESSES);
            Command::new(&exe)
                .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
                .env(common::TABLE_ENV, common::shared_table())
                .env(CALLERS_VAR, mine.to_string())
                .env(PREFIX_VAR, &prefix)
                .env(COUNTER_VAR, &counter)
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
            "a storm process failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elapsed = began.elapsed();

    let log = std::fs::read_to_string(&counter).unwrap_or_default();
    let _ = std::fs::remove_file(&counter);
    let mut executions: HashMap<&str, usize> = HashMap::new();
    for key in log.lines() {
        *executions.entry(key).or_default() += 1;
    }
    assert_eq!(executions.len(), KEYS, "every key must have executed");
    let repeated: Vec<_> = executions.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "keys executed more than once: {repeated:?}"
    );
    eprintln!("storm: {KEYS} keys x {callers} callers over {PROCESSES} processes in {elapsed:.1?}");
}

/// One storm process; does nothing unless started by the storm test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of duplicate_storm_from_several_processes_executes_each_key_once"]
async fn storm_child() {
    let Ok(prefix) = std::env::var(PREFIX_VAR) else {
        return;
    };
    let counter = std::env::var(COUNTER_VAR).unwrap();
    let start_at: u64 = std::env::var(START_AT_VAR).unwrap().parse().unwrap();
    let store = common::store().await;
    tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(unix_ms()))).await;

    let flow = Flow::<usize>::builder("storm")
        .store(Arc::new(store))
        .step("effect", move |ctx: Context<usize>| {
            let counter = counter.clone();
            async move {
                let mut file = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&counter)
                    .map_err(StepError::new)?;
                file.write_all(format!("{}\n", ctx.input()).as_bytes())
                    .map_err(StepError::new)?;
                Ok(())
            }
        })
        .build()
        .unwrap();
    let callers: Vec<_> = (0..callers_per_key())
        .map(|_| {
            let (flow, prefix) = (flow.clone(), prefix.clone());
            tokio::spawn(async move {
                for i in 0..KEYS {
                    let options = RunOptions::key(format!("{prefix}:{i}")).ttl(KEEP);
                    let result = flow.run(i, options).await.unwrap();
                    match (result.status, result.replayed) {
                        (Status::Completed, _) | (Status::Running, _) => {}
                        other => panic!("unexpected outcome {other:?}"),
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
}
