//! The duplicate storm: P processes × C concurrent callers, every caller running every one
//! of K keys through `Flow::run`, all starting at the same instant. The side effect
//! appends the key to an [`ExecutionLog`]; the invariant is that the log ends with exactly
//! K lines, one per key.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use orchestrix::idempotency::IdempotencyError;
use orchestrix::store::{IdempotencyStore, StoreError};
use orchestrix::{Context, Flow, RunError, RunOptions, Status};
use serde::{Deserialize, Serialize};

use crate::args::Args;
use crate::counter::{ExecutionLog, LogFile};
use crate::section::{Section, Table, per_sec};
use crate::stores::{Backend, Namespace, StoreKind};

/// The bound on one `Flow::run`: past it the call counts as hung.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long children get to connect before the storm starts.
const START_DELAY: Duration = Duration::from_millis(1500);
/// The bound on a whole storm process.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(300);
/// The line a child prints with its tally.
const RESULT_TAG: &str = "STORM-RESULT ";

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

/// The storm flow: one step, the side effect, which records the key in `log`.
fn storm_flow(store: Arc<dyn IdempotencyStore>, log: ExecutionLog) -> anyhow::Result<Flow<u64>> {
    Ok(Flow::<u64>::builder("storm")
        .store(store)
        .step("effect", move |ctx: Context<u64>| {
            let log = log.clone();
            async move {
                log.record(&format!("storm-{}", ctx.input()))?;
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
) -> anyhow::Result<Tally> {
    let flow = storm_flow(store, log)?;
    tokio::time::sleep(Duration::from_millis(start_at_ms.saturating_sub(unix_ms()))).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let flow = flow.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                for i in 0..keys {
                    let options =
                        RunOptions::key(format!("storm-{i}")).ttl(Duration::from_secs(3600));
                    tally.count(tokio::time::timeout(RUN_TIMEOUT, flow.run(i, options)).await);
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
    let connections = u32::try_from(callers + 2).unwrap_or(u32::MAX);
    let backend = Backend::open(kind, args.required("ns")?, connections).await?;
    let tally = run_callers(backend.store(), log, callers, keys, start_at_ms).await?;
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
    let start_at_ms = unix_ms() + u64::try_from(START_DELAY.as_millis()).unwrap_or(0);
    let tally = if kind == StoreKind::Memory {
        let log = ExecutionLog::open(&log_file.path)?;
        run_callers(backend.store(), log, size.callers, size.keys, unix_ms()).await?
    } else {
        let exe =
            std::env::current_exe().context("locating this binary to spawn storm processes")?;
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
                .arg(&log_file.path)
                .args([
                    "--callers",
                    &size.callers.to_string(),
                    "--keys",
                    &size.keys.to_string(),
                ])
                .args(["--start-at-ms", &start_at_ms.to_string()])
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
        total
    };
    Ok((tally, log_file.counts()?))
}
