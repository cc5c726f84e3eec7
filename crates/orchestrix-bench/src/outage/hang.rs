//! The server is frozen with SIGSTOP during the storm and thawed with SIGCONT: a hung
//! server (a stuck process, a paused VM, a stop-the-world pause), not a crash. It keeps
//! its connections and its records and accepts requests, but answers none until it
//! resumes; then it executes everything it had read, including requests whose callers
//! gave up long ago. The freeze outlasts the store's response timeout and the runs'
//! lease, so calls time out and leases lapse (Redis's clock runs on) while it hangs.
//!
//! # What is checked, exactly
//!
//! 1. **Bounded**: every `Flow::run` returns within its deadline (twice the longest a run
//!    can take when each reply is awaited for the store's response timeout, see
//!    [`deadline_for`](super::deadline_for)), although the server answers nothing: the
//!    store's timeouts must end each call. The freeze is longer than the deadline, so a
//!    call they did not end is seen.
//! 2. **No step without an acquired record**: every execution of the step must find its
//!    key held by an acquisition the observer saw `start` answer, not yet settled.
//! 3. **Once, with the documented exception**: no key executes again after an execution
//!    whose outcome the store accepted (a `finish` answered with success). A key may
//!    execute more than once only after an execution whose outcome could not be stored
//!    (every `finish`/`release` failed: the record stays running until its lease lapses,
//!    which a hang may make happen) or that freed the key (`release`).
//! 4. **Fail closed**: no run that began after the freeze and ended before the thaw
//!    succeeds.
//! 5. **No key stays locked longer than one lease after the thaw**: once the storm has
//!    ended and one lease (plus [`LAPSE_MARGIN`]) has passed since SIGCONT, a probe run of
//!    every key the storm used never answers `Running`. (An acquire the server reads only
//!    at the thaw, whose caller gave up, may hold a key nobody runs — for one lease.)
//! 6. **Typed errors only, no panics**, as in the kill scenario.
//! 7. **Recovery**: runs succeed again after the thaw.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::StreamExt as _;
use orchestrix::{FlowResult, RunError, Status};
use tokio::time::Instant;

use super::observed::{Held, Settled};
use super::{
    OutageConfig, REVISIT_EVERY, Storm, WINDOW, options, storm_through_fault, unexpected_errors,
};
use crate::redis_server::PrivateRedis;
use crate::section::{Section, Table};
use crate::storm::error_kind;

/// Past one lease after the thaw, how much longer the probe waits.
const LAPSE_MARGIN: std::time::Duration = std::time::Duration::from_millis(300);
/// How many probe runs are in flight at once.
const PROBES_IN_FLIGHT: usize = 16;

/// What the probe runs found, one lease after the thaw.
#[derive(Debug, Default)]
struct Probe {
    probed: usize,
    /// Keys whose probe answered `Running`.
    locked: Vec<String>,
    /// Probes that failed or hung, in words.
    failed: Vec<String>,
}

pub async fn main(config: &OutageConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Redis hang (SIGSTOP / SIGCONT)");
    let response_timeout = config
        .response_timeout
        .map_or("its default 2 s".to_owned(), |t| format!("{t:?}"));
    section.about(format!(
        "The outage storm above — a private `redis-server`, {} concurrent callers, keys rolling \
         every {WINDOW:?} ({} new ones, one run in {REVISIT_EVERY} revisiting an old one), a \
         step of {:?} — but at {:?} the server is frozen with SIGSTOP instead of killed: it \
         keeps its connections and records and accepts requests, but answers none. The store \
         waits {response_timeout} for a reply, so a run (`start`, then up to three attempts at \
         persisting, 0.5 s of backoff between them) is given {:?}. {:?} later — longer than \
         that deadline, and than the runs' lease of {:?} — the server is thawed with SIGCONT \
         and executes everything it had read, including requests whose callers gave up. The \
         storm runs {:?}; then, one lease after the thaw, every key it used is probed with \
         one more run.",
        config.callers,
        config.window_keys,
        config.step,
        config.down_at,
        config.deadline,
        config.down_for,
        config.lease,
        config.duration,
    ));
    section.about(format!(
        "**Invariants, exactly as checked**: (1) every `Flow::run` returns within its \
         deadline ({:?}) although the server answers nothing; (2) every execution of the \
         step happens under an acquisition that `start` answered and that is not yet \
         settled; (3) no key executes again after an execution whose outcome the store \
         accepted (`finish` succeeded) — a key may execute again only after an execution \
         whose outcome could not be stored (its record stayed running until the lease \
         lapsed, the documented exception) or that freed its key; (4) no run succeeds while \
         the server is frozen; (5) **no key stays locked longer than one lease after the \
         server resumes**: one lease (+ {LAPSE_MARGIN:?}) after SIGCONT, with the storm over, \
         no probe run answers `Running`; (6) every error is a typed `StoreError` (`Backend`, \
         or `StaleToken` when persisting after the lease lapsed), no caller panics; (7) runs \
         succeed again after the thaw.",
        config.deadline
    ));
    let mut server = PrivateRedis::start().await?;
    let outcome = async {
        let storm = storm_through_fault(&mut server, config).await?;
        let probe = probe_every_key(&storm, config).await;
        anyhow::Ok((storm, probe))
    }
    .await;
    server.kill().await?;
    let (storm, probe) = outcome?;
    let executions = storm.take_executions();
    let (tally, runs, timeline) = (&storm.tally, &storm.runs, storm.timeline);
    let (frozen, thawed) = (timeline.fault, timeline.recovered);

    // (1), (6)
    if tally.timeouts > 0 {
        section.violation(format!(
            "{} runs did not return within their deadline of {:?} (hang)",
            tally.timeouts, config.deadline
        ));
    }
    if tally.panics > 0 {
        section.violation(format!("{} caller tasks panicked", tally.panics));
    }
    if let Some(unexpected) = unexpected_errors(tally) {
        section.violation(unexpected);
    }
    // (2)
    if !executions.orphans.is_empty() {
        section.violation(format!(
            "{} executions without an acquired record (e.g. {})",
            executions.orphans.len(),
            executions.orphans[0]
        ));
    }
    // (3)
    let (again_after_kept, rerun) = reruns(&executions.attributed, &storm.held);
    if !again_after_kept.is_empty() {
        section.violation(format!(
            "{} keys executed again after their outcome was stored: {}",
            again_after_kept.len(),
            again_after_kept
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // (4)
    let succeeded_while_frozen = runs
        .iter()
        .filter(|r| r.ok && r.began > frozen && r.ended < timeline.recovering)
        .count();
    if succeeded_while_frozen > 0 {
        section.violation(format!(
            "{succeeded_while_frozen} runs succeeded while the server was frozen"
        ));
    }
    // (5)
    if !probe.locked.is_empty() {
        section.violation(format!(
            "{} keys still locked one lease after the server resumed: {}",
            probe.locked.len(),
            probe
                .locked
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !probe.failed.is_empty() {
        section.violation(format!(
            "{} probe runs after the thaw failed, e.g. {}",
            probe.failed.len(),
            probe.failed[0]
        ));
    }
    // (7)
    let recovered = runs.iter().filter(|r| r.ok && r.began > thawed).count();
    if recovered == 0 {
        section.violation("no run succeeded after the thaw");
    }

    let longest = runs
        .iter()
        .map(|r| r.ended - r.began)
        .max()
        .unwrap_or_default();
    let first_ok_after = runs
        .iter()
        .filter(|r| r.ok && r.began > thawed)
        .map(|r| r.ended.saturating_duration_since(thawed))
        .min();
    let mut table = Table::new(["measure", "value"]);
    let mut row = |name: &str, value: String| table.row([name.to_owned(), value]);
    row("runs (all callers)", tally.runs.to_string());
    row(
        "executed / replayed / running",
        format!(
            "{} / {} / {}",
            tally.executed, tally.replayed, tally.running
        ),
    );
    row("errors (typed)", tally.errors_text());
    row(
        &format!("runs that hung (> {:?})", config.deadline),
        tally.timeouts.to_string(),
    );
    row("longest run", format!("{:.2} s", longest.as_secs_f64()));
    row(
        "executions (storm and probes)",
        executions.attributed.len().to_string(),
    );
    row(
        "keys executed again after an outcome that could not be stored (allowed)",
        rerun.to_string(),
    );
    row(
        "keys executed again after their outcome was stored",
        again_after_kept.len().to_string(),
    );
    row(
        "executions without an acquired record",
        executions.orphans.len().to_string(),
    );
    row(
        "runs that succeeded while the server was frozen",
        succeeded_while_frozen.to_string(),
    );
    row(
        "keys probed one lease after the thaw / still locked",
        format!("{} / {}", probe.probed, probe.locked.len()),
    );
    row(
        "first success after the thaw",
        first_ok_after.map_or("never".to_owned(), |d| {
            format!("{:.0} ms after SIGCONT", d.as_secs_f64() * 1000.0)
        }),
    );
    row("successful runs after the thaw", recovered.to_string());
    section.tables.push(table);
    Ok(section)
}

/// Keys that executed again after an execution whose outcome was stored (violations), and
/// how many keys executed more than once in all.
fn reruns(
    attributed: &[(String, super::observed::Acquisition)],
    held: &Held,
) -> (Vec<String>, usize) {
    let mut by_key: BTreeMap<&str, Vec<Option<Settled>>> = BTreeMap::new();
    for (key, acquisition) in attributed {
        by_key
            .entry(key.as_str())
            .or_default()
            .push(held.settlement(acquisition.token));
    }
    let mut again_after_kept = Vec::new();
    let mut rerun_allowed = 0;
    for (key, settlements) in &by_key {
        let Some((_, earlier)) = settlements.split_last() else {
            continue;
        };
        if earlier.contains(&Some(Settled::Kept)) {
            again_after_kept.push(format!("{key} ({settlements:?})"));
        } else if !earlier.is_empty() {
            rerun_allowed += 1;
        }
    }
    (again_after_kept, rerun_allowed)
}

/// One lease after the thaw (and after the storm), one more run of every key the storm
/// used: none may find its key still held.
async fn probe_every_key(storm: &Storm, config: &OutageConfig) -> Probe {
    let free_at = Instant::from_std(storm.timeline.recovered) + config.lease + LAPSE_MARGIN;
    tokio::time::sleep_until(free_at).await;
    let keys: BTreeSet<u64> = storm.runs.iter().map(|r| r.key).collect();
    let (lease, deadline) = (config.lease, config.deadline);
    let outcomes: Vec<(u64, ProbeOutcome)> = futures_util::stream::iter(keys)
        .map(|i| {
            let flow = storm.flow.clone();
            async move {
                let outcome = tokio::time::timeout(deadline, flow.run(i, options(i, lease))).await;
                (i, outcome)
            }
        })
        .buffer_unordered(PROBES_IN_FLIGHT)
        .collect()
        .await;
    let mut probe = Probe {
        probed: outcomes.len(),
        ..Probe::default()
    };
    for (i, outcome) in outcomes {
        match outcome {
            Ok(Ok(result)) if result.status == Status::Running => {
                probe.locked.push(format!("k{i}"))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => probe.failed.push(format!("k{i}: {}", error_kind(&e))),
            Err(_) => probe.failed.push(format!("k{i}: hung")),
        }
    }
    probe.locked.sort();
    probe
}

type ProbeOutcome = Result<Result<FlowResult<()>, RunError<()>>, tokio::time::error::Elapsed>;
