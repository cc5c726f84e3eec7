//! The duplicate storm: P processes × C concurrent callers, every caller running every one
//! of K keys through `Flow::run`, all starting at the same instant. The side effect
//! appends the key to an [`ExecutionLog`]; the invariant is that the log ends with exactly
//! K lines, one per key.
//!
//! The callers race for fresh keys ([`Race::Fresh`], this module's scenario) or, set up by
//! [`crate::takeover`], for keys whose records must be taken over: left running by an
//! owner that died ([`Race::ExpiredLease`]) or failed ([`Race::FailedRecord`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use orchestrix::idempotency::IdempotencyError;
use orchestrix::store::{IdempotencyStore, StoreError};
use orchestrix::{Context, Flow, KeyScope, RunError, RunOptions, Status};
use serde::{Deserialize, Serialize};

use crate::args::Args;
use crate::arrivals::Arrivals;
use crate::counter::{ExecutionLog, LogFile};
use crate::section::{Section, Table, per_sec};
use crate::stores::{Backend, Namespace, StoreKind};

/// The bound on one `Flow::run`: past it the call counts as hung.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long children get to connect before the storm starts.
pub const START_DELAY: Duration = Duration::from_millis(1500);
/// The bound on a whole storm process.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(300);
/// The line a child prints with its tally.
const RESULT_TAG: &str = "STORM-RESULT ";
/// How long an executing step of a failed-record race waits for the other callers.
const ARRIVALS_WAIT: Duration = Duration::from_secs(10);

/// What the callers of a storm race for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Race {
    /// Keys nobody holds.
    Fresh,
    /// Keys left running by an owner that died, raced once its lease has lapsed.
    ExpiredLease,
    /// Keys whose first run failed, raced with `cache_result(false)`.
    FailedRecord,
}

impl Race {
    pub const ALL: [Self; 3] = [Self::Fresh, Self::ExpiredLease, Self::FailedRecord];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::ExpiredLease => "expired",
            Self::FailedRecord => "failed",
        }
    }

    fn parse(name: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|race| race.name() == name)
            .with_context(|| format!("unknown race {name:?}: fresh, expired, failed or all"))
    }

    /// `all`, one name, or a comma-separated list.
    pub fn parse_list(names: &str) -> anyhow::Result<Vec<Self>> {
        if names == "all" {
            return Ok(Self::ALL.to_vec());
        }
        names.split(',').map(Self::parse).collect()
    }
}

/// How the callers of one storm run their keys.
#[derive(Debug, Clone)]
pub struct RaceSetup {
    pub race: Race,
    /// The lease of each run (the expired-lease race: the dead owner's too).
    pub lease: Duration,
    /// The failed-record race: where callers note that their run of a key returned, so
    /// that the one executing it holds its step until every other caller has been
    /// answered (with `cache_result(false)` the winner frees the key when it ends, and a
    /// caller arriving after that would rightly run it again). See [`Arrivals`].
    pub arrivals: Option<PathBuf>,
    /// Callers in all processes together.
    pub all_callers: u64,
}

impl RaceSetup {
    pub fn fresh() -> Self {
        Self {
            race: Race::Fresh,
            lease: orchestrix::idempotency::DEFAULT_LEASE,
            arrivals: None,
            all_callers: 0,
        }
    }

    /// The options of every run of key `i` in this race (the dead owner's and the first
    /// failing run's too).
    pub fn options(&self, i: u64) -> RunOptions {
        let key = key_name(i);
        let ttl = Duration::from_secs(3600);
        match self.race {
            Race::Fresh => RunOptions::key(key).ttl(ttl),
            Race::ExpiredLease => RunOptions::key(key)
                .scope(KeyScope::Global)
                .lease(self.lease)
                .ttl(ttl),
            Race::FailedRecord => RunOptions::key(key)
                .scope(KeyScope::Global)
                .lease(self.lease)
                .cache_result(false)
                .ttl(ttl),
        }
    }

    fn arrivals(&self) -> Option<Arrivals> {
        let dir = self.arrivals.as_ref()?;
        Some(Arrivals::new(dir, self.all_callers.saturating_sub(1)))
    }

    /// The child's command line for this setup.
    fn child_args(&self) -> Vec<String> {
        let mut args = vec![
            "--race".to_owned(),
            self.race.name().to_owned(),
            "--lease-ms".to_owned(),
            self.lease.as_millis().to_string(),
            "--all-callers".to_owned(),
            self.all_callers.to_string(),
        ];
        if let Some(dir) = &self.arrivals {
            args.push("--arrivals".to_owned());
            args.push(dir.display().to_string());
        }
        args
    }

    fn from_child_args(args: &Args) -> anyhow::Result<Self> {
        Ok(Self {
            race: Race::parse(args.get("race").unwrap_or("fresh"))?,
            lease: args.millis("lease-ms", orchestrix::idempotency::DEFAULT_LEASE)?,
            arrivals: args.get("arrivals").map(PathBuf::from),
            all_callers: args.number("all-callers", 0)?,
        })
    }
}

/// The store key (and the execution log's line) of key `i`.
pub fn key_name(i: u64) -> String {
    format!("storm-{i}")
}

#[derive(Debug, Clone, Copy)]
pub struct StormSize {
    pub processes: u64,
    pub callers: u64,
    pub keys: u64,
}

impl StormSize {
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        Ok(Self {
            processes: args.count("processes", 4)?,
            callers: args.count("callers", 5)?,
            keys: args.count("keys", 500)?,
        })
    }
}

/// What a set of callers saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    pub runs: u64,
    /// Completed, not replayed: this caller executed the steps.
    pub executed: u64,
    pub replayed: u64,
    /// Another caller held the key (`Status::Running`).
    pub running: u64,
    /// Any other status (the flow failed or was cancelled).
    pub other_status: u64,
    /// `Err` results, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Runs that did not end within [`RUN_TIMEOUT`].
    pub timeouts: u64,
    /// Caller tasks that panicked.
    pub panics: u64,
    /// Returned runs that could not be noted in the arrivals directory.
    #[serde(default)]
    pub arrivals_unrecorded: u64,
    pub elapsed_ms: u64,
}

impl Tally {
    pub fn add(&mut self, other: &Self) {
        self.runs += other.runs;
        self.executed += other.executed;
        self.replayed += other.replayed;
        self.running += other.running;
        self.other_status += other.other_status;
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_insert(0) += n;
        }
        self.timeouts += other.timeouts;
        self.panics += other.panics;
        self.arrivals_unrecorded += other.arrivals_unrecorded;
        self.elapsed_ms = self.elapsed_ms.max(other.elapsed_ms);
    }

    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".to_owned();
        }
        self.errors
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Counts one run's outcome.
    pub fn count<O>(
        &mut self,
        outcome: Result<
            Result<orchestrix::FlowResult<O>, RunError<O>>,
            tokio::time::error::Elapsed,
        >,
    ) {
        self.runs += 1;
        match outcome {
            Err(_) => self.timeouts += 1,
            Ok(Ok(result)) => match (result.status, result.replayed) {
                (Status::Completed, false) => self.executed += 1,
                (Status::Completed, true) => self.replayed += 1,
                (Status::Running, _) => self.running += 1,
                _ => self.other_status += 1,
            },
            Ok(Err(e)) => *self.errors.entry(error_kind(&e)).or_insert(0) += 1,
        }
    }
}

/// A short, stable name for a run error, for tallies.
pub fn error_kind<O>(error: &RunError<O>) -> String {
    match error {
        RunError::Idempotency(IdempotencyError::Store(e)) => {
            format!("not started: {}", store_error_kind(e))
        }
        RunError::Idempotency(e) => format!("not started: {}", idempotency_error_kind(e)),
        RunError::NotPersisted { source, .. } => {
            format!("ran, not persisted: {}", store_error_kind(source))
        }
        _ => "other run error".to_owned(),
    }
}

pub fn store_error_kind(error: &StoreError) -> &'static str {
    match error {
        StoreError::StaleToken => "stale token",
        StoreError::Encode(_) => "encode",
        StoreError::Decode(_) => "decode",
        StoreError::UnsupportedVersion { .. } => "unsupported version",
        StoreError::TooLarge { .. } => "too large",
        StoreError::ResultRefused { .. } => "result refused",
        StoreError::Backend(_) => "backend",
        _ => "other store error",
    }
}

fn idempotency_error_kind(error: &IdempotencyError) -> &'static str {
    match error {
        IdempotencyError::InvalidKey(_) => "invalid key",
        IdempotencyError::InvalidOption(_) => "invalid option",
        IdempotencyError::KeyReused { .. } => "key reused",
        IdempotencyError::AlreadyRunning { .. } => "already running",
        IdempotencyError::WaitTimedOut { .. } => "wait timed out",
        IdempotencyError::ResultNotStored { .. } => "result not stored",
        IdempotencyError::Fingerprint(_) => "fingerprint",
        _ => "other",
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The storm flow: one step, the side effect, which records the key in `log`. With
/// `arrivals`, the step then holds until every other caller's run of the key returned or
/// executes it too (a wait past [`ARRIVALS_WAIT`] is recorded as `arrivals-timeout
/// <key>`).
fn storm_flow(
    store: Arc<dyn IdempotencyStore>,
    log: ExecutionLog,
    arrivals: Option<Arrivals>,
) -> anyhow::Result<Flow<u64>> {
    Ok(Flow::<u64>::builder("storm")
        .store(store)
        .step("effect", move |ctx: Context<u64>| {
            let (log, arrivals) = (log.clone(), arrivals.clone());
            async move {
                let key = key_name(*ctx.input());
                log.record(&key)?;
                if let Some(arrivals) = arrivals {
                    arrivals.executing(&key)?;
                    if !arrivals.wait_for_others(&key, ARRIVALS_WAIT).await {
                        log.record(&format!("arrivals-timeout {key}"))?;
                    }
                }
                Ok(())
            }
        })
        .build()?)
}

/// Runs `callers` concurrent callers over every key, starting at `start_at_ms` (Unix ms).
pub async fn run_callers(
    store: Arc<dyn IdempotencyStore>,
    log: ExecutionLog,
    callers: u64,
    keys: u64,
    start_at_ms: u64,
    setup: &RaceSetup,
) -> anyhow::Result<Tally> {
    let arrivals = setup.arrivals();
    let flow = storm_flow(store, log, arrivals.clone())?;
    tokio::time::sleep(Duration::from_millis(start_at_ms.saturating_sub(unix_ms()))).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (flow, setup, arrivals) = (flow.clone(), setup.clone(), arrivals.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                for i in 0..keys {
                    let outcome =
                        tokio::time::timeout(RUN_TIMEOUT, flow.run(i, setup.options(i))).await;
                    tally.count(outcome);
                    if let Some(arrivals) = &arrivals
                        && arrivals.arrive(&key_name(i)).is_err()
                    {
                        tally.arrivals_unrecorded += 1;
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok(tally) => total.add(&tally),
            Err(_) => total.panics += 1,
        }
    }
    total.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(total)
}

/// The child side: open the namespace, run the callers, print the tally.
pub async fn child(args: &Args) -> anyhow::Result<()> {
    let kind = StoreKind::parse(args.required("store")?)?;
    let callers = args.count("callers", 5)?;
    let keys = args.count("keys", 500)?;
    let start_at_ms: u64 = args.number("start-at-ms", 0)?;
    let log = ExecutionLog::open(Path::new(args.required("log")?))?;
    let setup = RaceSetup::from_child_args(args)?;
    let connections = u32::try_from(callers + 2).unwrap_or(u32::MAX);
    let backend = Backend::open(kind, args.required("ns")?, connections).await?;
    let tally = run_callers(backend.store(), log, callers, keys, start_at_ms, &setup).await?;
    println!("{RESULT_TAG}{}", serde_json::to_string(&tally)?);
    Ok(())
}

/// Runs the storm against each store and checks the invariant.
pub async fn main(
    kinds: &[StoreKind],
    size_of: &dyn Fn(StoreKind) -> StormSize,
) -> anyhow::Result<Section> {
    let mut section = Section::new("Duplicate storm");
    section.about(format!(
        "P processes × C concurrent callers each run **every one** of K keys through `Flow::run` \
         (one step: the side effect), all starting at the same instant, so every key is raced \
         by P × C callers. Each execution of the side effect appends the key to a file opened \
         with `O_APPEND` (one `write` per execution, shared by all processes), independently of \
         the store. **Invariant: the file holds exactly K lines, one per key** (no key twice, \
         none missing); every call returns within {RUN_TIMEOUT:?}; no caller panics."
    ));
    let mut table = Table::new([
        "store",
        "P × C × K",
        "runs",
        "executed (file)",
        "distinct keys",
        "replayed",
        "running",
        "errors",
        "wall s",
        "runs/s",
        "invariant",
    ]);
    for &kind in kinds {
        let size = size_of(kind);
        let size = if kind == StoreKind::Memory {
            StormSize {
                processes: 1,
                ..size
            }
        } else {
            size
        };
        let callers = size.callers;
        let connections = u32::try_from(callers + 2).unwrap_or(u32::MAX);
        let (namespace, backend) = match Namespace::create(kind, "storm", connections).await {
            Ok(opened) => opened,
            Err(e) => {
                section.note(format!("{}: skipped — {e:#}", kind.name()));
                continue;
            }
        };
        let outcome = storm_once(kind, &namespace, &backend, &size).await;
        if let Some(problem) = namespace.remove(&backend).await {
            section.note(problem);
        }
        let (tally, counts) = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                section.violation(format!(
                    "{}: the storm did not complete: {e:#}",
                    kind.name()
                ));
                continue;
            }
        };
        let lines: u64 = counts.values().sum();
        let twice: Vec<_> = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| format!("{k}×{n}"))
            .collect();
        let mut broken = Vec::new();
        if lines != size.keys || counts.len() as u64 != size.keys || !twice.is_empty() {
            broken.push(format!(
                "{} executions of {} distinct keys, expected exactly {} (repeated: {})",
                lines,
                counts.len(),
                size.keys,
                if twice.is_empty() {
                    "none".to_owned()
                } else {
                    twice
                        .iter()
                        .take(10)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
        if tally.executed != lines {
            broken.push(format!(
                "callers report {} executions, the file {lines}",
                tally.executed
            ));
        }
        if tally.timeouts > 0 {
            broken.push(format!(
                "{} calls did not return within {RUN_TIMEOUT:?} (hang)",
                tally.timeouts
            ));
        }
        if tally.panics > 0 {
            broken.push(format!("{} caller tasks panicked", tally.panics));
        }
        if tally.runs != size.processes * size.callers * size.keys {
            broken.push(format!(
                "{} runs recorded, {} expected (a process failed)",
                tally.runs,
                size.processes * size.callers * size.keys
            ));
        }
        let secs = tally.elapsed_ms as f64 / 1000.0;
        table.row([
            kind.name().to_owned(),
            format!("{} × {} × {}", size.processes, size.callers, size.keys),
            tally.runs.to_string(),
            lines.to_string(),
            counts.len().to_string(),
            tally.replayed.to_string(),
            tally.running.to_string(),
            tally.errors_text(),
            format!("{secs:.2}"),
            per_sec(tally.runs, secs),
            if broken.is_empty() {
                "held".to_owned()
            } else {
                "**BROKEN**".to_owned()
            },
        ]);
        for problem in broken {
            section.violation(format!("{}: {problem}", kind.name()));
        }
        if kind == StoreKind::Memory {
            section.note(
                "memory: one process only (the store lives in the process's memory; other \
                 processes would each have their own)",
            );
        }
    }
    section.tables.push(table);
    section.note(
        "`running`: the caller found the key held by another caller and returned at once \
         (`OnRunning::ReturnRunning`, the default); `replayed`: it got the stored result.",
    );
    Ok(section)
}

async fn storm_once(
    kind: StoreKind,
    namespace: &Namespace,
    backend: &Backend,
    size: &StormSize,
) -> anyhow::Result<(Tally, BTreeMap<String, u64>)> {
    let log_file = LogFile::new()?;
    let setup = RaceSetup::fresh();
    let start_at_ms = unix_ms() + u64::try_from(START_DELAY.as_millis()).unwrap_or(0);
    let tally = if kind == StoreKind::Memory {
        let log = ExecutionLog::open(&log_file.path)?;
        run_callers(
            backend.store(),
            log,
            size.callers,
            size.keys,
            unix_ms(),
            &setup,
        )
        .await?
    } else {
        race_in_processes(kind, namespace, &log_file.path, size, start_at_ms, &setup).await?
    };
    Ok((tally, log_file.counts()?))
}

/// Spawns `size.processes` storm processes (this binary, `child storm`) on the
/// namespace, all starting their callers at `start_at_ms`, and adds up their tallies.
pub async fn race_in_processes(
    kind: StoreKind,
    namespace: &Namespace,
    log: &Path,
    size: &StormSize,
    start_at_ms: u64,
    setup: &RaceSetup,
) -> anyhow::Result<Tally> {
    let exe = std::env::current_exe().context("locating this binary to spawn storm processes")?;
    let children = (0..size.processes).map(|_| {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args([
                "child",
                "storm",
                "--store",
                kind.name(),
                "--ns",
                &namespace.name,
            ])
            .arg("--log")
            .arg(log)
            .args([
                "--callers",
                &size.callers.to_string(),
                "--keys",
                &size.keys.to_string(),
            ])
            .args(["--start-at-ms", &start_at_ms.to_string()])
            .args(setup.child_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        async move {
            let child = command.spawn().context("spawning a storm process")?;
            let output = tokio::time::timeout(PROCESS_TIMEOUT, child.wait_with_output())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("a storm process ran longer than {PROCESS_TIMEOUT:?}")
                })??;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let Some(json) = stdout.lines().find_map(|l| l.strip_prefix(RESULT_TAG)) else {
                anyhow::bail!(
                    "a storm process failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            };
            Ok::<Tally, anyhow::Error>(serde_json::from_str(json)?)
        }
    });
    let mut total = Tally::default();
    for tally in futures_util::future::join_all(children).await {
        total.add(&tally?);
    }
    Ok(total)
}
