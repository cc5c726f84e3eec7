//! Storms over records that must be taken over, not fresh keys: the duplicate storm's
//! P processes × C callers × K keys, after every key was
//!
//! * **left running by an owner that died** ([`Race::ExpiredLease`]): a process runs all K
//!   keys with a short lease, is checked to still hold them after 1.5 leases (its heartbeat
//!   renewed them), and is killed with SIGKILL mid-step (the memory store: its runs'
//!   futures are dropped). The callers start together once the lease has lapsed.
//! * **failed** ([`Race::FailedRecord`]): a first run of every key fails and its failure is
//!   stored; the callers race with `cache_result(false)`, which takes a failed record over.
//!
//! The side effect appends to the same `O_APPEND` file as the storm's: the preparation's
//! executions as `dead <key>` / `failed <key>`, the takeovers as `<key>`. The invariant is
//! one takeover execution per key. A lease that never lapses (a renewal written far too
//! long) leaves keys untaken; a takeover that is not atomic runs a key twice.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use orchestrix::store::{IdempotencyStore, RecordStatus};
use orchestrix::{Context, Flow, FlowResult, RunError, Status, StepError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::args::Args;
use crate::counter::{ExecutionLog, LogFile};
use crate::section::{Section, Table, per_sec};
use crate::stores::{Backend, Namespace, StoreKind};
use crate::storm::{
    RUN_TIMEOUT, Race, RaceSetup, START_DELAY, StormSize, Tally, key_name, race_in_processes,
    run_callers, unix_ms,
};

/// How long the dead owner's step would run if it were not killed.
const DEAD_OWNER_STEP: Duration = Duration::from_secs(300);
/// Bound on the dead owner's acquiring every key, and on a preparation's runs.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// Past the lease (and the store's clock allowance), how long the callers wait more.
const LAPSE_MARGIN: Duration = Duration::from_millis(300);
/// The line the dead owner prints once its step runs for every key.
const HOLDING_TAG: &str = "HOLDING ";
/// How many preparation runs or checks are in flight at once.
const PREPARE_CONCURRENCY: usize = 16;

/// The execution log's line of a preparation's execution of key `i`.
fn prepared_line(race: Race, i: u64) -> String {
    format!("{} {}", prepared_tag(race), key_name(i))
}

fn prepared_tag(race: Race) -> &'static str {
    match race {
        Race::ExpiredLease => "dead",
        _ => "failed",
    }
}

/// What a preparation left behind, for the callers and the checks.
struct Prepared {
    /// When the callers start (Unix ms).
    start_at_ms: u64,
    /// What went wrong before the race (a lease that lapsed while its owner lived, a first
    /// run that did not fail): violations.
    problems: Vec<String>,
}

/// What one store's race observed.
struct Observed {
    tally: Tally,
    lines: Vec<String>,
    problems: Vec<String>,
}

pub async fn main(
    kinds: &[StoreKind],
    race: Race,
    size_of: &dyn Fn(StoreKind) -> StormSize,
    lease: Duration,
) -> anyhow::Result<Section> {
    let mut section = match race {
        Race::ExpiredLease => expired_lease_section(lease),
        Race::FailedRecord => failed_record_section(),
        Race::Fresh => bail!("the fresh-key storm is `storm::main`"),
    };
    let mut table = Table::new([
        "store",
        "P × C × K",
        "lease",
        match race {
            Race::ExpiredLease => "left running by the dead owner (file)",
            _ => "failed first runs (file)",
        },
        "runs",
        "takeovers executed (file)",
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
        let connections = u32::try_from(size.callers + 2).unwrap_or(u32::MAX);
        let scenario = format!("takeover_{}", race.name());
        let (namespace, backend) = match Namespace::create(kind, &scenario, connections).await {
            Ok(opened) => opened,
            Err(e) => {
                section.note(format!("{}: skipped — {e:#}", kind.name()));
                continue;
            }
        };
        let setup = RaceSetup {
            race,
            lease,
            arrivals: None,
            all_callers: size.processes * size.callers,
        };
        let outcome = race_once(kind, &namespace, &backend, &size, setup).await;
        if let Some(problem) = namespace.remove(&backend).await {
            section.note(problem);
        }
        let observed = match outcome {
            Ok(observed) => observed,
            Err(e) => {
                section.violation(format!("{}: the race did not complete: {e:#}", kind.name()));
                continue;
            }
        };
        let (prepared, takeovers, broken) = check(race, &size, &observed);
        let tally = &observed.tally;
        let secs = tally.elapsed_ms as f64 / 1000.0;
        table.row([
            kind.name().to_owned(),
            format!("{} × {} × {}", size.processes, size.callers, size.keys),
            format!("{lease:?}"),
            prepared.to_string(),
            tally.runs.to_string(),
            takeovers.values().sum::<u64>().to_string(),
            takeovers.len().to_string(),
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
    }
    section.tables.push(table);
    if kinds.contains(&StoreKind::Memory) {
        section.note(match race {
            Race::ExpiredLease => {
                "memory: one process (the store lives in the process's memory); its dead \
                 owner's runs are futures dropped mid-step, which the engine documents as \
                 behaving like a crash."
            }
            _ => "memory: one process (the store lives in the process's memory).",
        });
    }
    if race == Race::ExpiredLease && kinds.contains(&StoreKind::Dynamodb) {
        section.note(
            "dynamodb: the callers start only after the lease plus the store's clock-skew \
             allowance (1 s), since DynamoDB has no server clock.",
        );
    }
    Ok(section)
}

fn expired_lease_section(lease: Duration) -> Section {
    let mut section = Section::new("Storm: takeover of expired leases");
    section.about(format!(
        "The duplicate storm's P processes × C concurrent callers × K keys, but every key is \
         first held by an owner that dies: a process runs all K keys through `Flow::run` \
         with a lease of {lease:?}; its step appends `dead <key>` to the `O_APPEND` file and \
         sleeps. 1.5 leases later every key is checked to still be running (its heartbeat \
         renewed the lease), and the process is killed with SIGKILL. Once the lease has \
         lapsed, all callers start at the same instant and race to take the keys over; \
         each takeover appends `<key>`. **Invariant: the file holds exactly one takeover \
         execution per key** (and one `dead` line per key), every call returns within \
         {RUN_TIMEOUT:?}, no caller panics. A renewal that wrote the lease far too long \
         leaves keys untaken; a takeover that is not atomic runs a key twice."
    ));
    section
}

fn failed_record_section() -> Section {
    let mut section = Section::new("Storm: takeover of failed records");
    section.about(format!(
        "The duplicate storm's P processes × C concurrent callers × K keys, but every key's \
         first run fails (its step appends `failed <key>` to the `O_APPEND` file and \
         returns an error; the failure is stored). Then all callers start at the same \
         instant and race with `cache_result(false)`, which takes a failed record over; \
         each takeover appends `<key>`. With `cache_result(false)` the winner frees the key \
         when it ends, and a caller arriving after that would be right to run the key \
         again, so the winning step holds until every other caller's run of the key has \
         returned (each notes it in a file per key; a wait longer than 10 s is reported). \
         **Invariant: the file holds exactly one takeover execution per key** (and one \
         `failed` line per key), every call returns within {RUN_TIMEOUT:?}, no caller \
         panics."
    ));
    section
}

/// Prepares the keys, races for them, and reads the file.
async fn race_once(
    kind: StoreKind,
    namespace: &Namespace,
    backend: &Backend,
    size: &StormSize,
    mut setup: RaceSetup,
) -> anyhow::Result<Observed> {
    let log_file = LogFile::new()?;
    let arrivals = tempfile::Builder::new()
        .prefix("orchestrix-bench-arrivals-")
        .tempdir()?;
    let prepared = match setup.race {
        Race::ExpiredLease => {
            leave_leases_to_lapse(kind, namespace, backend, &log_file.path, size.keys, &setup)
                .await?
        }
        Race::FailedRecord => {
            setup.arrivals = Some(arrivals.path().to_owned());
            fail_first_runs(kind, backend, &log_file.path, size.keys, &setup).await?
        }
        Race::Fresh => bail!("nothing to take over in a fresh-key storm"),
    };
    let tally = if kind == StoreKind::Memory {
        let log = ExecutionLog::open(&log_file.path)?;
        let store = backend.store();
        run_callers(
            store,
            log,
            size.callers,
            size.keys,
            prepared.start_at_ms,
            &setup,
        )
        .await?
    } else {
        let start_at_ms = prepared.start_at_ms;
        race_in_processes(kind, namespace, &log_file.path, size, start_at_ms, &setup).await?
    };
    Ok(Observed {
        tally,
        lines: log_file.lines()?,
        problems: prepared.problems,
    })
}

/// The counts and the broken invariants: (preparation lines, takeover executions per
/// key, problems).
fn check(
    race: Race,
    size: &StormSize,
    observed: &Observed,
) -> (u64, BTreeMap<String, u64>, Vec<String>) {
    let mut broken = observed.problems.clone();
    let tag = format!("{} ", prepared_tag(race));
    let mut prepared: BTreeMap<&str, u64> = BTreeMap::new();
    let mut takeovers: BTreeMap<String, u64> = BTreeMap::new();
    let mut waits_ran_out = Vec::new();
    for line in &observed.lines {
        if let Some(key) = line.strip_prefix(&tag) {
            *prepared.entry(key).or_insert(0) += 1;
        } else if let Some(key) = line.strip_prefix("arrivals-timeout ") {
            waits_ran_out.push(key.to_owned());
        } else {
            *takeovers.entry(line.clone()).or_insert(0) += 1;
        }
    }
    let prepared_lines: u64 = prepared.values().sum();
    if prepared_lines != size.keys || prepared.len() as u64 != size.keys {
        broken.push(format!(
            "the preparation executed {prepared_lines} times over {} keys, expected once per \
             key ({})",
            prepared.len(),
            size.keys
        ));
    }
    let executed: u64 = takeovers.values().sum();
    let twice: Vec<String> = takeovers
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| format!("{k}×{n}"))
        .collect();
    if executed != size.keys || takeovers.len() as u64 != size.keys {
        let untaken = size.keys.saturating_sub(takeovers.len() as u64);
        broken.push(format!(
            "{executed} takeover executions of {} distinct keys, expected exactly {} \
             (repeated: {}; keys nobody took over: {untaken})",
            takeovers.len(),
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
    let tally = &observed.tally;
    if tally.executed != executed {
        broken.push(format!(
            "callers report {} executions, the file {executed}",
            tally.executed
        ));
    }
    if !waits_ran_out.is_empty() {
        broken.push(format!(
            "{} executing steps gave up waiting for the other callers (the count above cannot \
             be judged for them), e.g. {}",
            waits_ran_out.len(),
            waits_ran_out[0]
        ));
    }
    if tally.arrivals_unrecorded > 0 {
        broken.push(format!(
            "{} returned runs could not be noted for the waiting steps",
            tally.arrivals_unrecorded
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
    let expected_runs = size.processes * size.callers * size.keys;
    if tally.runs != expected_runs {
        broken.push(format!(
            "{} runs recorded, {expected_runs} expected (a process failed)",
            tally.runs
        ));
    }
    (prepared_lines, takeovers, broken)
}

/// An owner that holds every key, alive, until it is killed.
enum DeadOwner {
    /// This binary, `child storm-dead-owner`.
    Process(Child),
    /// The memory store's: runs in this process, whose futures are dropped.
    Tasks(Vec<JoinHandle<()>>),
}

impl DeadOwner {
    /// SIGKILL, or the futures dropped: no settle, no release, the heartbeats stop.
    async fn kill(self) -> anyhow::Result<()> {
        match self {
            Self::Process(mut child) => child.kill().await.context("killing the dead owner"),
            Self::Tasks(tasks) => {
                for task in &tasks {
                    task.abort();
                }
                for task in tasks {
                    let _ = task.await;
                }
                Ok(())
            }
        }
    }
}

/// The expired-lease preparation: an owner acquires every key, is checked to hold them
/// past one lease, and dies. Returns when the callers may start.
async fn leave_leases_to_lapse(
    kind: StoreKind,
    namespace: &Namespace,
    backend: &Backend,
    log: &Path,
    keys: u64,
    setup: &RaceSetup,
) -> anyhow::Result<Prepared> {
    let owner = if kind == StoreKind::Memory {
        let log = ExecutionLog::open(log)?;
        DeadOwner::Tasks(hold_every_key(backend.store(), log, keys, setup).await?)
    } else {
        DeadOwner::Process(spawn_dead_owner(kind, namespace, log, keys, setup).await?)
    };
    tokio::time::sleep(setup.lease * 3 / 2).await;
    let mut problems = Vec::new();
    let lapsed = keys_not_running(&*backend.store(), keys).await;
    if !lapsed.is_empty() {
        problems.push(format!(
            "1.5 leases after acquiring, {} of {keys} keys were no longer held by their live \
             owner (its heartbeat did not renew them), e.g. {}",
            lapsed.len(),
            lapsed[0]
        ));
    }
    owner.kill().await?;
    let lapse = setup.lease + kind.lapse_allowance() + LAPSE_MARGIN;
    let mut start_at_ms = unix_ms() + millis(lapse);
    if kind != StoreKind::Memory {
        start_at_ms = start_at_ms.max(unix_ms() + millis(START_DELAY));
    }
    Ok(Prepared {
        start_at_ms,
        problems,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Starts the dead owner's process and waits until its step runs for every key.
async fn spawn_dead_owner(
    kind: StoreKind,
    namespace: &Namespace,
    log: &Path,
    keys: u64,
    setup: &RaceSetup,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating this binary to spawn the dead owner")?;
    let mut child = tokio::process::Command::new(exe)
        .args([
            "child",
            "storm-dead-owner",
            "--store",
            kind.name(),
            "--ns",
            &namespace.name,
        ])
        .arg("--log")
        .arg(log)
        .args(["--keys", &keys.to_string()])
        .args(["--lease-ms", &setup.lease.as_millis().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning the dead owner")?;
    let stdout = child.stdout.take().context("the dead owner's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let holding = tokio::time::timeout(PREPARE_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with(HOLDING_TAG) {
                return Ok(true);
            }
        }
        anyhow::Ok(false)
    })
    .await;
    match holding {
        Ok(Ok(true)) => Ok(child),
        Ok(Ok(false) | Err(_)) | Err(_) => {
            let _ = child.kill().await;
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ =
                    tokio::time::timeout(PREPARE_TIMEOUT, err.read_to_string(&mut stderr)).await;
            }
            bail!(
                "the dead owner did not acquire all {keys} keys within {PREPARE_TIMEOUT:?}: {}",
                stderr.trim()
            )
        }
    }
}

/// The dead owner's side (`child storm-dead-owner`): run every key, say so, and wait to be
/// killed.
pub async fn dead_owner_child(args: &Args) -> anyhow::Result<()> {
    let kind = StoreKind::parse(args.required("store")?)?;
    let keys = args.count("keys", 500)?;
    let setup = RaceSetup {
        race: Race::ExpiredLease,
        lease: args.millis("lease-ms", Duration::from_secs(1))?,
        arrivals: None,
        all_callers: 1,
    };
    let log = ExecutionLog::open(Path::new(args.required("log")?))?;
    let backend = Backend::open(kind, args.required("ns")?, 16).await?;
    let _runs = hold_every_key(backend.store(), log, keys, &setup).await?;
    println!("{HOLDING_TAG}{keys}");
    tokio::time::sleep(DEAD_OWNER_STEP).await;
    bail!("the dead owner was not killed within {DEAD_OWNER_STEP:?}")
}

/// Runs every key with a step that records `dead <key>` and then sleeps; returns once the
/// step runs for every key (the runs go on in the returned tasks).
async fn hold_every_key(
    store: Arc<dyn IdempotencyStore>,
    log: ExecutionLog,
    keys: u64,
    setup: &RaceSetup,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    // `None`: a step started; `Some`: a run ended, which it must not before it is killed.
    let (events, mut heard) = mpsc::unbounded_channel::<Option<String>>();
    let step_events = events.clone();
    let flow = Flow::<u64>::builder("storm")
        .store(store)
        .step("effect", move |ctx: Context<u64>| {
            let (log, events) = (log.clone(), step_events.clone());
            async move {
                log.record(&prepared_line(Race::ExpiredLease, *ctx.input()))?;
                let _ = events.send(None);
                tokio::time::sleep(DEAD_OWNER_STEP).await;
                Ok::<_, StepError>(())
            }
        })
        .build()?;
    let tasks: Vec<_> = (0..keys)
        .map(|i| {
            let (flow, events, options) = (flow.clone(), events.clone(), setup.options(i));
            tokio::spawn(async move {
                let outcome = flow.run(i, options).await;
                let _ = events.send(Some(format!("{}: {}", key_name(i), describe(&outcome))));
            })
        })
        .collect();
    drop(events);
    let all_started = async {
        let mut started = 0;
        while started < keys {
            match heard.recv().await {
                Some(None) => started += 1,
                Some(Some(ended)) => bail!("the dead owner's run of {ended} ended early"),
                None => bail!("the dead owner's runs stopped"),
            }
        }
        Ok(())
    };
    let outcome = tokio::time::timeout(PREPARE_TIMEOUT, all_started)
        .await
        .unwrap_or_else(|_| bail!("not every key was acquired within {PREPARE_TIMEOUT:?}"));
    if let Err(e) = outcome {
        for task in &tasks {
            task.abort();
        }
        return Err(e);
    }
    Ok(tasks)
}

/// How a preparation run ended, in words.
fn describe(outcome: &Result<FlowResult<()>, RunError<()>>) -> String {
    match outcome {
        Ok(result) => format!("{:?} (replayed: {})", result.status, result.replayed),
        Err(e) => e.to_string(),
    }
}

/// The keys whose record is not running (or cannot be read), in words.
async fn keys_not_running(store: &dyn IdempotencyStore, keys: u64) -> Vec<String> {
    futures_util::stream::iter(0..keys)
        .map(|i| async move {
            let key = key_name(i);
            match store.get(&key).await {
                Ok(Some(record)) if record.status == RecordStatus::Running => None,
                Ok(Some(record)) => Some(format!("{key} is {}", record.status)),
                Ok(None) => Some(format!("{key} has no record")),
                Err(e) => Some(format!("{key} could not be read: {e}")),
            }
        })
        .buffer_unordered(PREPARE_CONCURRENCY)
        .filter_map(|problem| async move { problem })
        .collect()
        .await
}

/// The failed-record preparation: a first run of every key fails, and its failure is
/// stored. Returns when the callers may start.
async fn fail_first_runs(
    kind: StoreKind,
    backend: &Backend,
    log: &Path,
    keys: u64,
    setup: &RaceSetup,
) -> anyhow::Result<Prepared> {
    let log = ExecutionLog::open(log)?;
    let flow = Flow::<u64>::builder("storm")
        .store(backend.store())
        .step("effect", move |ctx: Context<u64>| {
            let log = log.clone();
            async move {
                log.record(&prepared_line(Race::FailedRecord, *ctx.input()))?;
                Err::<(), _>(StepError::msg("the first run fails"))
            }
        })
        .build()?;
    let failures: Vec<String> = futures_util::stream::iter(0..keys)
        .map(|i| {
            // The failure is kept: only the race asks to re-run failures.
            let (flow, options) = (flow.clone(), setup.options(i).cache_result(true));
            async move {
                let outcome =
                    match tokio::time::timeout(PREPARE_TIMEOUT, flow.run(i, options)).await {
                        Ok(outcome) => outcome,
                        Err(_) => return Some(format!("{}: the first run hung", key_name(i))),
                    };
                match &outcome {
                    Ok(result) if result.status == Status::Failed && !result.replayed => None,
                    other => Some(format!(
                        "{}: the first run did not fail and store its failure: {}",
                        key_name(i),
                        describe(other)
                    )),
                }
            }
        })
        .buffer_unordered(PREPARE_CONCURRENCY)
        .filter_map(|problem| async move { problem })
        .collect()
        .await;
    let mut problems = Vec::new();
    if let Some(example) = failures.first() {
        problems.push(format!(
            "{} of {keys} first runs did not go as planned, e.g. {example}",
            failures.len()
        ));
    }
    let mut start_at_ms = unix_ms();
    if kind != StoreKind::Memory {
        start_at_ms += millis(START_DELAY);
    }
    Ok(Prepared {
        start_at_ms,
        problems,
    })
}
