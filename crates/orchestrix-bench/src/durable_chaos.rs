//! Random kills of durable runs: the crash proof's flow, with random pauses before and
//! after every step's effect, is killed with SIGKILL at a random instant — first the owner
//! process, then the process that took its runs over — and a third process finishes them
//! (retrying every key, or `Flow::recover`, by turns). Where the parked kills of
//! [`crate::durable_crash`] hit each point exactly once, these land anywhere: between an
//! effect and its checkpoint, inside a journal write on the wire, inside a takeover, in
//! the middle of a compensation.
//!
//! The journals and the step files are read after each kill. Invariant, per key: a step
//! whose checkpoint a kill found stored never runs again (its line count stays where it
//! was), and likewise a compensation whose entry was stored; every other step runs at most
//! once more per kill that caught it in flight; `charge` (at most once) never more than
//! once; a run whose journal ever showed `charge` started but unfinished fails with
//! `StepInterrupted(charge)` and compensates every step that completed, every other run
//! completes with its uncrashed output; each step keeps one step key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orchestrix::idempotency::OnRunning;
use orchestrix::store::{IdempotencyStore, RecordStatus};
use orchestrix::{CancellationToken, FlowError, Status};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::args::Args;
use crate::durable_crash::{
    CHARGE, COMPENSATED, COMPLETED, Effects, Lines, Logs, OUTCOME_TAG, Outcome, RECOVER_EVERY,
    RESUME_TIMEOUT, RESUMER_TIMEOUT, STARTED, STEPS, crash_flow, entry_head, options, scoped,
    stderr_text,
};
use crate::section::Table;
use crate::stores::{Backend, Namespace, StoreKind};

/// The flow of the random kills (a scope of its own), and of their uncrashed runs.
const FLOW: &str = "durable-crash-chaos";
const BASELINE_FLOW: &str = "durable-crash-chaos-baseline";
/// Each step pauses up to this long before and after its effect.
const JITTER: Duration = Duration::from_millis(8);
/// What a stage process prints once its runs are started.
const STARTED_TAG: &str = "STARTED";

fn key_of(round: u64, i: u64) -> String {
    format!("c{round}-{i}")
}

fn input_of(i: u64) -> u64 {
    1000 + i
}

/// Runs every key at once (waiting for keys another owner holds), returning the outcomes
/// of the runs that ended. With `crash`, the runs still going when it fires are forgotten
/// (the in-process model of SIGKILL).
async fn run_all(
    store: Arc<dyn IdempotencyStore>,
    logs: &Logs,
    round: u64,
    keys: u64,
    lease: Duration,
    role: &'static str,
    crash: Option<CancellationToken>,
) -> anyhow::Result<Vec<Outcome>> {
    let flow = crash_flow(store, &Effects::plain(logs, FLOW, role, Some(JITTER)))?;
    let tasks: Vec<_> = (0..keys)
        .map(|i| {
            let (flow, crash) = (flow.clone(), crash.clone());
            let opts = options(&key_of(round, i), lease).on_running(OnRunning::Wait {
                timeout: RESUME_TIMEOUT,
            });
            tokio::spawn(async move {
                let mut run = Box::pin(flow.run(input_of(i), opts));
                let Some(crash) = crash else {
                    return Some(Outcome::of(input_of(i), &run.await));
                };
                tokio::select! {
                    result = &mut run => Some(Outcome::of(input_of(i), &result)),
                    () = crash.cancelled() => {
                        std::mem::forget(run);
                        None
                    }
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        if let Some(outcome) = task.await.context("a run task panicked")? {
            outcomes.push(outcome);
        }
    }
    Ok(outcomes)
}

/// The last stage: recover the abandoned runs (when `recover`) until no key is running,
/// then call every key (a replay for each finished run) for its outcome.
async fn finish_all(
    store: Arc<dyn IdempotencyStore>,
    logs: &Logs,
    round: u64,
    keys: u64,
    lease: Duration,
    recover: bool,
) -> anyhow::Result<Vec<Outcome>> {
    if recover {
        let flow = crash_flow(
            Arc::clone(&store),
            &Effects::plain(logs, FLOW, "recover", Some(JITTER)),
        )?;
        let deadline = Instant::now() + RESUME_TIMEOUT;
        loop {
            flow.recover().await?;
            let mut running = 0;
            for i in 0..keys {
                let record = store.get(&scoped(FLOW, &key_of(round, i))).await?;
                running += usize::from(record.is_some_and(|r| r.status == RecordStatus::Running));
            }
            if running == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{running} runs were still running {RESUME_TIMEOUT:?} into recovery");
            }
            tokio::time::sleep(RECOVER_EVERY).await;
        }
    }
    run_all(store, logs, round, keys, lease, "final", None).await
}

/// The child side of a stage: `owner` and `resume` run every key until killed; `retry`
/// and `recover` finish them and print the outcomes.
pub async fn child(args: &Args, stage: &str) -> anyhow::Result<()> {
    let kind = StoreKind::parse(args.required("store")?)?;
    let lease = args.millis("lease-ms", Duration::from_secs(1))?;
    let round: u64 = args.number("round", 0)?;
    let keys = args.count("keys", 1)?;
    let logs = Logs::open(Path::new(args.required("dir")?))?;
    let backend = Backend::open(kind, args.required("ns")?, 8).await?;
    println!("{STARTED_TAG}");
    let outcomes = match stage {
        "owner" | "resume" => {
            let role = if stage == "owner" { "owner" } else { "resumer" };
            run_all(backend.store(), &logs, round, keys, lease, role, None).await?
        }
        "retry" | "recover" => {
            finish_all(
                backend.store(),
                &logs,
                round,
                keys,
                lease,
                stage == "recover",
            )
            .await?
        }
        other => bail!("unknown chaos stage {other:?}"),
    };
    for outcome in outcomes {
        println!("{OUTCOME_TAG}{}", serde_json::to_string(&outcome)?);
    }
    Ok(())
}

/// What one kill left in a key's journal.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    completed: HashSet<usize>,
    /// Started marks without a completion after them.
    open: HashSet<usize>,
    compensated: HashSet<usize>,
}

async fn snapshot(
    store: &Arc<dyn IdempotencyStore>,
    round: u64,
    keys: u64,
) -> anyhow::Result<Vec<Snapshot>> {
    let journal = store
        .journal_store()
        .context("the store keeps no journals")?;
    let mut snapshots = Vec::new();
    for i in 0..keys {
        let mut snap = Snapshot::default();
        if let Some(j) = journal
            .read_journal(&scoped(FLOW, &key_of(round, i)))
            .await?
        {
            for entry in &j.entries {
                let Some((kind, name)) = entry_head(entry) else {
                    bail!("key {i}: an entry this scenario cannot read");
                };
                let Some(step) = STEPS.iter().position(|s| *s == name) else {
                    continue;
                };
                match kind {
                    COMPLETED => {
                        snap.completed.insert(step);
                        snap.open.remove(&step);
                        snap.compensated.remove(&step);
                    }
                    STARTED => {
                        snap.open.insert(step);
                    }
                    b'x' => {
                        snap.compensated.insert(step);
                    }
                    _ => {}
                }
            }
        }
        snapshots.push(snap);
    }
    Ok(snapshots)
}

fn read_lines(dir: &Path, keys: u64) -> anyhow::Result<Vec<Lines>> {
    (0..keys)
        .map(|i| Lines::read(dir, FLOW, input_of(i)))
        .collect()
}

/// One random-kill round's facts about a key.
struct KeyRound<'a> {
    /// The journal after each kill.
    snapshots: [&'a Snapshot; 2],
    /// The lines after each kill, and at the end.
    lines: [&'a Lines; 3],
    outcome: Option<&'a Outcome>,
    baseline: Option<&'a String>,
}

/// Checks one key; returns whether it was interrupted in `charge`, and how many step runs
/// and compensations repeated an effect (in flight at a kill).
fn judge(key: &KeyRound<'_>, problems: &mut Vec<String>) -> (bool, u64, u64) {
    let [l1, l2, end] = key.lines;
    let before = [&Lines::default(), l1, l2];
    let mut repeats = 0;
    for (i, step) in STEPS.iter().enumerate() {
        let mut in_flight = 0;
        for (k, snap) in key.snapshots.iter().enumerate() {
            let at_kill = key.lines[k];
            if snap.completed.contains(&i) {
                if at_kill.steps[i] == 0 || end.steps[i] != at_kill.steps[i] {
                    problems.push(format!(
                        "{step}'s checkpoint was stored at kill {} with {} line(s), and it \
                         ended with {}",
                        k + 1,
                        at_kill.steps[i],
                        end.steps[i]
                    ));
                }
            } else if at_kill.steps[i] > before[k].steps[i] {
                in_flight += 1;
            }
            if snap.compensated.contains(&i) && end.undo[i] != at_kill.undo[i] {
                problems.push(format!(
                    "{step}'s compensation was stored at kill {} and ran again",
                    k + 1
                ));
            }
        }
        if end.steps[i] > 1 + in_flight {
            problems.push(format!(
                "{step} ran {} times, in flight at {in_flight} kill(s)",
                end.steps[i]
            ));
        }
        repeats += end.steps[i].saturating_sub(1);
    }
    if end.steps[CHARGE] > 1 {
        problems.push(format!(
            "charge (at most once) ran {} times",
            end.steps[CHARGE]
        ));
    }
    if !end.unstable_keys.is_empty() {
        problems.push(format!(
            "step keys changed in {}",
            end.unstable_keys.join(", ")
        ));
    }
    let interrupted = key.snapshots.iter().any(|s| s.open.contains(&CHARGE));
    let Some(outcome) = key.outcome else {
        problems.push("no final outcome".to_owned());
        return (interrupted, repeats, 0);
    };
    if let Some(e) = &outcome.run_error {
        problems.push(format!("the final call failed: {e}"));
        return (interrupted, repeats, 0);
    }
    if interrupted {
        let right = matches!(
            &outcome.error,
            Some(FlowError::StepInterrupted { step }) if step == STEPS[CHARGE]
        );
        if outcome.status != Some(Status::Failed) || !right {
            problems.push(format!(
                "charge was interrupted, but the run ended {:?} {:?}",
                outcome.status, outcome.error
            ));
        }
        for (i, step) in STEPS.iter().enumerate() {
            let completed = end.steps[i] > 0 && i != CHARGE && COMPENSATED[i];
            let undo = end.undo[i];
            if completed && !(1..=3).contains(&undo) || !completed && undo > 0 {
                problems.push(format!("{step}'s compensation ran {undo} times"));
            }
        }
    } else {
        if outcome.status != Some(Status::Completed) || outcome.output.as_ref() != key.baseline {
            problems.push(format!(
                "ended {:?} with {:?} ({:?}), uncrashed: {:?}",
                outcome.status, outcome.output, outcome.error, key.baseline
            ));
        }
        if end.undo.iter().any(|n| *n > 0) {
            problems.push(format!(
                "compensations ran in a completed run: {}",
                end.render()
            ));
        }
    }
    let undo_repeats = end.undo.iter().map(|n| n.saturating_sub(1)).sum();
    (interrupted, repeats, undo_repeats)
}

/// How one store's random-kill rounds went.
#[derive(Default)]
pub struct ChaosTally {
    pub keys: u64,
    /// The span a kill lands in, from the start of the killed process's runs (the second
    /// one: after the dead owner's lease).
    pub window: Duration,
    /// Keys by steps checkpointed at the first kill, and at the second.
    pub at_kill: [BTreeMap<usize, u64>; 2],
    pub interrupted: u64,
    pub completed: u64,
    pub repeats: u64,
    pub undo_repeats: u64,
    pub problems: Vec<String>,
}

/// Random-kill rounds on one store.
pub async fn run(
    kind: StoreKind,
    namespace: &Namespace,
    backend: &Backend,
    root: &Path,
    rounds: u64,
    keys: u64,
    lease: Duration,
) -> anyhow::Result<ChaosTally> {
    let store = backend.store();
    // Uncrashed runs of every input, at once: the outputs to match, and how long a run
    // takes here (the window the kills are spread over).
    let base_dir = root.join("chaos-baseline");
    std::fs::create_dir_all(&base_dir)?;
    let base_logs = Logs::open(&base_dir)?;
    let flow = crash_flow(
        Arc::clone(&store),
        &Effects::plain(&base_logs, BASELINE_FLOW, "baseline", Some(JITTER)),
    )?;
    let started = Instant::now();
    let runs = (0..keys).map(|i| {
        let flow = flow.clone();
        async move {
            let key = format!("chaos-baseline-{}-{i}", crate::stores::unique_suffix());
            (i, flow.run(input_of(i), options(&key, lease)).await)
        }
    });
    let mut baseline = HashMap::new();
    for (i, result) in futures_util::future::join_all(runs).await {
        let result = result.map_err(|e| anyhow::anyhow!("an uncrashed run failed: {e}"))?;
        let output = result.output.context("an uncrashed run has no output")?;
        baseline.insert(input_of(i), output);
    }
    let window = started.elapsed().mul_f64(1.5);
    let lapse = lease + kind.lapse_allowance();

    let mut tally = ChaosTally {
        window,
        ..ChaosTally::default()
    };
    for round in 0..rounds {
        let dir = root.join(format!("chaos-{round}"));
        std::fs::create_dir_all(&dir)?;
        let logs = Logs::open(&dir)?;
        let kill_at = |after: Duration| after + window.mul_f64(fastrand::f64());
        let recover = round % 2 == 1;
        let (snapshots, lines, outcomes) = if kind == StoreKind::Memory {
            let mut snapshots = Vec::new();
            let mut lines = Vec::new();
            for (role, after) in [("owner", Duration::ZERO), ("resumer", lapse)] {
                let crash = CancellationToken::new();
                let stage = run_all(
                    Arc::clone(&store),
                    &logs,
                    round,
                    keys,
                    lease,
                    role,
                    Some(crash.clone()),
                );
                let at = kill_at(after);
                let killer = async {
                    tokio::time::sleep(at).await;
                    crash.cancel();
                };
                let (outcomes, ()) = tokio::join!(stage, killer);
                outcomes?;
                snapshots.push(snapshot(&store, round, keys).await?);
                lines.push(read_lines(&dir, keys)?);
            }
            let outcomes =
                finish_all(Arc::clone(&store), &logs, round, keys, lease, recover).await?;
            (snapshots, lines, outcomes)
        } else {
            let spawn = |stage: &str| {
                let exe = std::env::current_exe()?;
                let mut command = tokio::process::Command::new(exe);
                command
                    .args(["child", &format!("durable-chaos-{stage}")])
                    .args(["--store", kind.name(), "--ns", &namespace.name])
                    .args(["--round", &round.to_string(), "--keys", &keys.to_string()])
                    .args(["--lease-ms", &lease.as_millis().to_string()])
                    .arg("--dir")
                    .arg(&dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true);
                anyhow::Ok(command.spawn()?)
            };
            let mut snapshots = Vec::new();
            let mut lines = Vec::new();
            for (stage, after) in [("owner", Duration::ZERO), ("resume", lapse)] {
                let mut child = spawn(stage)?;
                let mut out =
                    BufReader::new(child.stdout.take().context("a stage's stdout")?).lines();
                let ready = tokio::time::timeout(RESUMER_TIMEOUT, out.next_line()).await;
                if !matches!(ready, Ok(Ok(Some(ref l))) if l == STARTED_TAG) {
                    bail!(
                        "the {stage} process did not start: {}",
                        stderr_text(&mut child).await
                    );
                }
                tokio::time::sleep(kill_at(after)).await;
                child.kill().await?;
                snapshots.push(snapshot(&store, round, keys).await?);
                lines.push(read_lines(&dir, keys)?);
            }
            let child = spawn(if recover { "recover" } else { "retry" })?;
            let output = tokio::time::timeout(RESUMER_TIMEOUT, child.wait_with_output())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("the last stage ran longer than {RESUMER_TIMEOUT:?}")
                })??;
            if !output.status.success() {
                bail!(
                    "the last stage failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            let outcomes = String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix(OUTCOME_TAG))
                .map(serde_json::from_str::<Outcome>)
                .collect::<Result<Vec<_>, _>>()?;
            (snapshots, lines, outcomes)
        };
        let end = read_lines(&dir, keys)?;
        let outcomes: HashMap<u64, Outcome> = outcomes.into_iter().map(|o| (o.input, o)).collect();
        for i in 0..keys {
            let i_us = usize::try_from(i).unwrap_or(usize::MAX);
            let key = KeyRound {
                snapshots: [&snapshots[0][i_us], &snapshots[1][i_us]],
                lines: [&lines[0][i_us], &lines[1][i_us], &end[i_us]],
                outcome: outcomes.get(&input_of(i)),
                baseline: baseline.get(&input_of(i)),
            };
            let mut found = Vec::new();
            let (interrupted, repeats, undo_repeats) = judge(&key, &mut found);
            tally.undo_repeats += undo_repeats;
            tally.keys += 1;
            for k in 0..2 {
                *tally.at_kill[k]
                    .entry(key.snapshots[k].completed.len())
                    .or_insert(0) += 1;
            }
            if interrupted {
                tally.interrupted += 1;
            } else {
                tally.completed += 1;
            }
            tally.repeats += repeats;
            let how = if recover { "recover" } else { "retry" };
            tally.problems.extend(
                found
                    .into_iter()
                    .map(|p| format!("round {round} ({how}), key {}: {p}", key_of(round, i))),
            );
        }
    }
    Ok(tally)
}

/// The random-kill table's header.
pub fn table() -> Table {
    Table::new([
        "store",
        "rounds × keys",
        "kill window (ms)",
        "steps checkpointed at kill 1 (steps: keys)",
        "at kill 2",
        "completed = uncrashed",
        "StepInterrupted(charge)",
        "step effects repeated",
        "compensations repeated",
        "invariant",
    ])
}

pub fn row(table: &mut Table, kind: StoreKind, rounds: u64, keys: u64, tally: &ChaosTally) {
    let spread = |m: &BTreeMap<usize, u64>| {
        m.iter()
            .map(|(steps, n)| format!("{steps}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    table.row([
        kind.name().to_owned(),
        format!("{rounds} × {keys}"),
        format!("0–{}", tally.window.as_millis()),
        spread(&tally.at_kill[0]),
        spread(&tally.at_kill[1]),
        tally.completed.to_string(),
        tally.interrupted.to_string(),
        tally.repeats.to_string(),
        tally.undo_repeats.to_string(),
        if tally.problems.is_empty() {
            "held".to_owned()
        } else {
            "**BROKEN**".to_owned()
        },
    ]);
}
