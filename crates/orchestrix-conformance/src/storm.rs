//! The multi-process duplicate storm: many OS processes race many callers for the same
//! keys through [`Flow::run`], and each key's step must execute exactly once.
//!
//! In-process checks cannot show that a store is safe across machines: a bug hidden by a
//! shared connection pool, a process-local lock or cache would pass them. So the storm
//! re-runs the current test binary as several children. A backend's test file holds two
//! tests: the storm itself, and an `#[ignore]`d child test that builds the backend's store
//! and hands it to [`StormChild::run`]:
//!
//! ```ignore
//! use orchestrix_conformance::storm::{StormChild, StormPlan, run_storm};
//!
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn duplicate_storm_from_several_processes_executes_each_key_once() {
//!     let table = make_table().await;
//!     run_storm(&StormPlan::STANDARD, "storm_child", &[("MY_TABLE", table)]).await;
//! }
//!
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! #[ignore = "a child process of the storm test"]
//! async fn storm_child() {
//!     let Some(child) = StormChild::from_env() else { return };
//!     let store = store_on(&std::env::var("MY_TABLE").unwrap()).await;
//!     child.run(std::sync::Arc::new(store)).await;
//! }
//! ```
//!
//! Guarantees of the check: every child connects first, then all start at one shared
//! instant, so callers really collide; every caller goes through every key in the same
//! order; each execution is counted by an [`ExecutionLog`] (a file, independent of the
//! store under test); the storm fails when any key executed zero times or more than once,
//! when a run fails or reports an outcome other than completed or running, when a child
//! fails (its captured output is in the message), or when it outlives the plan's timeout
//! (it is killed). Keys carry a fresh run id, so storms may share a store with other tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use orchestrix::store::IdempotencyStore;
use orchestrix::{Flow, RunOptions, Status, StepError};

const RUN_VAR: &str = "ORCHESTRIX_STORM_RUN";
const KEYS_VAR: &str = "ORCHESTRIX_STORM_KEYS";
const CALLERS_VAR: &str = "ORCHESTRIX_STORM_PROCESS_CALLERS";
const LOG_VAR: &str = "ORCHESTRIX_STORM_LOG";
const START_AT_VAR: &str = "ORCHESTRIX_STORM_START_AT_MS";
/// Time for every child to start and connect before the shared start instant.
const START_DELAY: Duration = Duration::from_millis(1_500);
/// Finished storm records do not outlive the run by long.
const KEEP: Duration = Duration::from_secs(600);

/// How big a storm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StormPlan {
    /// Distinct keys every caller runs the flow for.
    pub keys: usize,
    /// Child processes.
    pub processes: usize,
    /// Concurrent callers per key, in total: split over the processes, the first ones
    /// taking one more when they do not divide evenly.
    pub callers_per_key: usize,
    /// How long each child may take, start delay included, before it is killed.
    pub timeout: Duration,
}

impl StormPlan {
    /// 500 keys, 20 callers per key over 4 processes (5 each), 5 minutes at most.
    pub const STANDARD: Self = Self {
        keys: 500,
        processes: 4,
        callers_per_key: 20,
        timeout: Duration::from_secs(300),
    };

    fn callers_of(&self, process: usize) -> usize {
        let (each, rest) = (
            self.callers_per_key / self.processes,
            self.callers_per_key % self.processes,
        );
        each + usize::from(process < rest)
    }
}

/// Runs a storm: spawns `plan.processes` children of this test binary, each running only
/// the `#[ignore]`d test `child_test` (which must call [`StormChild::run`]) with `env`
/// added to its environment, waits for them, and asserts every key executed exactly once.
/// The execution log lives in the temp dir; a storm whose children fail leaves it there.
///
/// # Panics
/// When a child fails or times out (with its captured output), or when a key executed
/// other than once (listing those keys).
pub async fn run_storm(plan: &StormPlan, child_test: &str, env: &[(&str, String)]) {
    let run = format!("storm-{:016x}", fastrand::u64(..));
    let log_path = std::env::temp_dir().join(format!("orchestrix-{run}.log"));
    let log = ExecutionLog::create(&log_path)
        .unwrap_or_else(|e| panic!("cannot create the storm's execution log: {e}"));
    let start_at = unix_ms() + START_DELAY.as_millis() as u64;
    let began = Instant::now();
    let children = (0..plan.processes).map(|process| {
        let mut env = env.to_vec();
        env.extend([
            (RUN_VAR, run.clone()),
            (KEYS_VAR, plan.keys.to_string()),
            (CALLERS_VAR, plan.callers_of(process).to_string()),
            (LOG_VAR, log_path.display().to_string()),
            (START_AT_VAR, start_at.to_string()),
        ]);
        async move { run_child(child_test, &env, plan.timeout).await }
    });
    let reports = futures_util::future::join_all(children).await;
    eprintln!(
        "storm: {} keys x {} callers over {} processes in {:.1?}\n{}",
        plan.keys,
        plan.callers_per_key,
        plan.processes,
        began.elapsed(),
        reports.concat().trim_end()
    );
    let counts = log
        .counts()
        .unwrap_or_else(|e| panic!("cannot read the storm's execution log: {e}"));
    let _ = std::fs::remove_file(&log_path);
    assert_each_key_executed_once(&counts, (0..plan.keys).map(|i| format!("{run}:{i}")));
}

/// Runs this test binary's `#[ignore]`d test `test` in a child process with `env` added,
/// and returns the child's stderr once the test passed.
///
/// # Panics
/// When the child cannot start, fails, does not run exactly that one test, or takes
/// longer than `timeout` (it is killed then), with its captured output.
pub async fn run_child(test: &str, env: &[(&str, String)], timeout: Duration) -> String {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot find the current test binary: {e}"));
    let mut command = tokio::process::Command::new(exe);
    command
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().map(|(name, value)| (name, value)))
        .kill_on_drop(true);
    let output = match tokio::time::timeout(timeout, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run child test {test}: {e}"),
        Err(_) => panic!("child test {test} did not finish within {timeout:?}; killed it"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // "1 passed": a renamed child test must not pass by running nothing.
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child test {test} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stderr.into_owned()
}

/// The child side of a storm, configured by the parent through the environment.
#[derive(Debug)]
pub struct StormChild {
    run: String,
    keys: usize,
    callers: usize,
    start_at_ms: u64,
    log: PathBuf,
}

impl StormChild {
    /// The storm this process is a child of; `None` when it was not started by
    /// [`run_storm`] (say, by `cargo test -- --ignored`).
    ///
    /// # Panics
    /// When the parent's environment is incomplete.
    pub fn from_env() -> Option<Self> {
        let run = std::env::var(RUN_VAR).ok()?;
        let number = |name: &str| -> u64 {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} must be set to a number by the storm"))
        };
        Some(Self {
            run,
            keys: number(KEYS_VAR) as usize,
            callers: number(CALLERS_VAR) as usize,
            start_at_ms: number(START_AT_VAR),
            log: std::env::var_os(LOG_VAR)
                .unwrap_or_else(|| panic!("{LOG_VAR} must be set by the storm"))
                .into(),
        })
    }

    /// How many concurrent callers this process runs (to size a connection pool by).
    pub fn callers(&self) -> usize {
        self.callers
    }

    /// Builds a one-step flow on `store` whose step records its execution, waits for the
    /// storm's start instant, then runs this process's callers concurrently, each through
    /// every key in order, and reports to stderr.
    ///
    /// # Panics
    /// When a run fails or ends other than completed (run or replayed) or running
    /// (another caller owns the key).
    pub async fn run(self, store: Arc<dyn IdempotencyStore>) {
        let log = ExecutionLog::open(&self.log)
            .map(Arc::new)
            .unwrap_or_else(|e| panic!("cannot open the storm's execution log: {e}"));
        let run = Arc::<str>::from(self.run);
        let key_of = move |i: usize| format!("{run}:{i}");
        let record_key = key_of.clone();
        let flow = Flow::<usize>::builder("storm")
            .store(store)
            .step("effect", move |ctx| {
                let (log, key) = (log.clone(), record_key(*ctx.input()));
                async move { log.record(&key).map_err(StepError::new) }
            })
            .build()
            .unwrap_or_else(|e| panic!("the storm flow must build: {e}"));

        let slack_ms = self.start_at_ms as i64 - unix_ms() as i64;
        tokio::time::sleep(Duration::from_millis(slack_ms.max(0) as u64)).await;
        let callers: Vec<_> = (0..self.callers)
            .map(|_| {
                let (flow, key_of, keys) = (flow.clone(), key_of.clone(), self.keys);
                tokio::spawn(async move {
                    let mut executed = 0;
                    for i in 0..keys {
                        let options = RunOptions::key(key_of(i)).ttl(KEEP);
                        match flow.run(i, options).await {
                            Ok(r) if r.status == Status::Completed && !r.replayed => executed += 1,
                            Ok(r) if matches!(r.status, Status::Completed | Status::Running) => {}
                            other => panic!("unexpected outcome for {}: {other:?}", key_of(i)),
                        }
                    }
                    executed
                })
            })
            .collect();
        let mut executed = Vec::new();
        for caller in callers {
            executed.push(
                caller
                    .await
                    .unwrap_or_else(|e| panic!("a caller failed: {e}")),
            );
        }
        eprintln!(
            "storm process {}: ready {slack_ms} ms before the start; executions per caller {executed:?}",
            std::process::id()
        );
    }
}

/// An execution counter independent of any store: a file opened with `O_APPEND`, one
/// line per execution written with a single `write`, so concurrent writers from any
/// number of processes never interleave or lose a line. Keys must not contain newlines.
#[derive(Debug)]
pub struct ExecutionLog {
    path: PathBuf,
    file: File,
}

impl ExecutionLog {
    /// Creates (or empties) the log at `path`.
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn create(path: &Path) -> io::Result<Self> {
        File::create(path)?;
        Self::open(path)
    }

    /// Opens an existing log for appending, as the children do.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().append(true).open(path)?;
        let path = path.to_owned();
        Ok(Self { path, file })
    }

    /// Records one execution of `key`.
    ///
    /// # Errors
    /// When the write fails or is short (then the line may be torn, and the count fails).
    pub fn record(&self, key: &str) -> io::Result<()> {
        let line = format!("{key}\n");
        match (&self.file).write(line.as_bytes())? {
            n if n == line.len() => Ok(()),
            n => Err(io::Error::other(format!(
                "short write: {n} of {}",
                line.len()
            ))),
        }
    }

    /// How often each key was recorded, by every process.
    ///
    /// # Errors
    /// When the file cannot be read.
    pub fn counts(&self) -> io::Result<BTreeMap<String, usize>> {
        let mut counts = BTreeMap::new();
        for key in std::fs::read_to_string(&self.path)?.lines() {
            *counts.entry(key.to_owned()).or_default() += 1;
        }
        Ok(counts)
    }
}

/// Asserts `counts` (from [`ExecutionLog::counts`]) holds each of `expected` exactly
/// once and nothing else.
///
/// # Panics
/// Listing (the first 20 of) the keys that executed zero times, and those that executed
/// more than once or were not expected.
pub fn assert_each_key_executed_once(
    counts: &BTreeMap<String, usize>,
    expected: impl IntoIterator<Item = String>,
) {
    let expected: BTreeSet<String> = expected.into_iter().collect();
    let missing: Vec<_> = expected
        .difference(&counts.keys().cloned().collect())
        .cloned()
        .collect();
    let wrong: Vec<_> = counts
        .iter()
        .filter(|&(key, &n)| n != 1 || !expected.contains(key))
        .collect();
    assert!(
        missing.is_empty() && wrong.is_empty(),
        "each key must execute exactly once; never executed ({}): {:?}; executed more than once \
         or unexpected ({}, key and executions): {:?}",
        missing.len(),
        &missing[..missing.len().min(20)],
        wrong.len(),
        &wrong[..wrong.len().min(20)],
    );
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_split_over_processes_first_ones_taking_the_rest() {
        let plan = StormPlan {
            callers_per_key: 10,
            ..StormPlan::STANDARD
        };
        let split: Vec<_> = (0..plan.processes).map(|p| plan.callers_of(p)).collect();
        assert_eq!(split, [3, 3, 2, 2]);
    }

    #[test]
    fn log_counts_every_record_from_every_writer() {
        let path = std::env::temp_dir().join(format!("orchestrix-log-{:016x}", fastrand::u64(..)));
        let log = ExecutionLog::create(&path).expect("create");
        let child = ExecutionLog::open(&path).expect("open");
        for key in ["a", "b", "b"] {
            child.record(key).expect("record");
        }
        drop(child);
        let counts = log.counts().expect("counts");
        assert_eq!(counts, BTreeMap::from([("a".into(), 1), ("b".into(), 2)]));
        std::fs::remove_file(&path).expect("remove");
    }

    #[test]
    #[should_panic(
        expected = r#"never executed (1): ["c"]; executed more than once or unexpected (2, key and executions): [("b", 2), ("x", 1)]"#
    )]
    fn offenders_are_listed() {
        let counts = BTreeMap::from([("a".into(), 1), ("b".into(), 2), ("x".into(), 1)]);
        assert_each_key_executed_once(&counts, ["a", "b", "c"].map(String::from));
    }
}
