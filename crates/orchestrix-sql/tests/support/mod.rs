//! Shared by the PostgreSQL and SQLite test binaries: the multi-process duplicate storm and
//! running this test binary as a child process.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use orchestrix::store::IdempotencyStore;
use orchestrix::{Context, Flow, RunOptions, StepError};

/// Distinct keys every storm caller goes through.
pub const STORM_KEYS: usize = 500;
/// OS processes in a storm.
pub const STORM_PROCESSES: usize = 4;
/// Concurrent callers per process: 4 × 5 = 20 callers per key.
pub const STORM_CALLERS_PER_PROCESS: usize = 5;

const PREFIX_VAR: &str = "ORX_STORM_PREFIX";
const COUNTER_VAR: &str = "ORX_STORM_COUNTER";
const START_AT_VAR: &str = "ORX_STORM_START_AT_MS";

/// A short random suffix for table names and key prefixes.
pub fn random_suffix() -> String {
    format!("{:012x}", fastrand::u64(..) >> 16)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs this test binary's `test` (an `#[ignore]`d child test) in a new process with `env`
/// and returns once it passed; panics with the child's output otherwise.
pub async fn run_child(test: &str, env: &[(&str, String)]) {
    let exe = std::env::current_exe().expect("current test binary");
    let mut command = tokio::process::Command::new(exe);
    command
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().await.expect("spawn child test process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child {test} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}

/// Parent side of the storm: starts [`STORM_PROCESSES`] children running `child_test` at
/// the same instant, waits for all, and returns the keys executed, one entry per
/// execution (from the append-only counter file).
pub async fn storm(child_test: &str, backend_env: &[(&str, String)], dir: &Path) -> Vec<String> {
    let counter = dir.join("executions.log");
    std::fs::File::create(&counter).expect("create counter file");
    let mut env = backend_env.to_vec();
    env.push((PREFIX_VAR, format!("storm:{}", random_suffix())));
    env.push((COUNTER_VAR, counter.display().to_string()));
    // Every child connects first, then all start together, so callers really collide.
    env.push((START_AT_VAR, (unix_millis() + 1500).to_string()));
    let children = (0..STORM_PROCESSES).map(|_| run_child(child_test, &env));
    futures_util::future::join_all(children).await;
    std::fs::read_to_string(&counter)
        .expect("read counter file")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether this process is a storm child (the parent set the environment).
pub fn is_storm_child() -> bool {
    std::env::var_os(PREFIX_VAR).is_some()
}

/// Child side of the storm: one flow whose only step appends its key to the counter file
/// (one `O_APPEND` write per execution); [`STORM_CALLERS_PER_PROCESS`] concurrent callers
/// each run it for all keys, in the same order, through the engine.
pub async fn storm_callers(store: Arc<dyn IdempotencyStore>) {
    let prefix = std::env::var(PREFIX_VAR).expect("storm prefix");
    let counter = std::env::var(COUNTER_VAR).expect("storm counter file");
    let start_at: u64 = std::env::var(START_AT_VAR)
        .expect("storm start time")
        .parse()
        .expect("storm start time is a number");
    let key_prefix = prefix.clone();
    let flow = Flow::<u32, ()>::builder("storm")
        .store(store)
        .step("effect", move |ctx: Context<u32>| {
            let line = format!("{key_prefix}:{}\n", ctx.input());
            let counter = counter.clone();
            async move {
                let mut log = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&counter)
                    .expect("open counter file");
                log.write_all(line.as_bytes()).expect("count execution");
                Ok::<_, StepError>(())
            }
        })
        .build()
        .expect("storm flow");
    tokio::time::sleep(Duration::from_millis(
        start_at.saturating_sub(unix_millis()),
    ))
    .await;
    let callers = (0..STORM_CALLERS_PER_PROCESS).map(|_| {
        let flow = flow.clone();
        let prefix = prefix.clone();
        tokio::spawn(async move {
            for i in 0..STORM_KEYS as u32 {
                let options = RunOptions::key(format!("{prefix}:{i}"));
                if let Err(e) = flow.run(i, options).await {
                    panic!("run {i} failed during the storm: {e}");
                }
            }
        })
    });
    let handles: Vec<_> = callers.collect();
    for handle in handles {
        handle.await.expect("storm caller panicked");
    }
}

/// Asserts the storm executed every key exactly once.
pub fn assert_each_key_executed_once(executions: &[String]) {
    let distinct: HashSet<&String> = executions.iter().collect();
    assert_eq!(distinct.len(), STORM_KEYS, "every key must have executed");
    assert_eq!(
        executions.len(),
        STORM_KEYS,
        "{} executions for {STORM_KEYS} keys: some key ran more than once",
        executions.len()
    );
}
