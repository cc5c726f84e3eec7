//! The server is killed with SIGKILL during the storm and restarted, empty, on the same
//! port.
//!
//! # What is checked, exactly
//!
//! A restart of a Redis without persistence forgets every record, so a key that executed
//! before the kill may legitimately execute once more after the restart: that is the data
//! loss the store's README warns about, not a duplicate. The invariants are therefore:
//!
//! 1. **No duplicate while a server was up**: for every key, at most one execution whose
//!    acquire was answered by the first server, and at most one whose acquire was answered
//!    by the restarted one. An acquire is attributed to the first server when its `start`
//!    call returned before the kill completed, to the restarted one when it began after;
//!    a call that straddled the kill is counted as ambiguous (reported, never a duplicate).
//!    The lease (30 s) outlasts the scenario, so no lease lapses within one server's life.
//! 2. **No step without an acquired record**: every execution of the step must find its
//!    key held by an acquisition the observer saw `start` answer, not yet settled.
//! 3. **Fail closed**: no run succeeds while no server is running.
//! 4. **Bounded**: every `Flow::run` returns within [`RUN_TIMEOUT`]; none hangs.
//! 5. **Typed errors only, no panics**: every `Err` is a `StoreError::Backend` (not
//!    started, or ran but not persisted) or a `StaleToken` on persisting (the record was
//!    lost with the server); any other kind, and any panicking caller, is a violation.
//! 6. **Recovery**: runs succeed again after the restart.

use std::collections::BTreeMap;

use super::{
    OutageConfig, REVISIT_EVERY, RUN_TIMEOUT, Storm, WINDOW, storm_through_fault, unexpected_errors,
};
use crate::redis_server::PrivateRedis;
use crate::section::{Section, Table};

pub async fn main(config: &OutageConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Redis outage");
    section.about(format!(
        "A private `redis-server` (`--save \"\" --appendonly no`, its own loopback port) serves \
         {} concurrent callers running keyed flows for {:?}, whose one step (the side effect) \
         takes {:?}. The keys roll: every {WINDOW:?} all callers move on to {} new keys and race \
         for them, and one run in {REVISIT_EVERY} revisits an earlier key at random. At {:?} the \
         server is killed with SIGKILL — runs are mid-step — and {:?} later restarted, empty, on \
         the same port. The store uses its default timeouts (1 s connect, 2 s response) and the \
         runs the default lease (30 s, longer than the scenario).",
        config.callers,
        config.duration,
        config.step,
        config.window_keys,
        config.down_at,
        config.down_for
    ));
    section.about(
        "**Invariants, exactly as checked** — a restart of a Redis without persistence loses \
         its records, so a key may execute once before the kill and once more after the \
         restart; that is expected data loss, not a duplicate. Checked: (1) no key executes \
         twice under acquisitions answered by the same server instance (a `start` that \
         returned before the kill completed belongs to the first server, one that began after \
         it to the restarted one; calls straddling the kill are counted as ambiguous); (2) \
         every execution of the step happens under an acquisition that `start` answered and \
         that is not yet settled (an observer wraps the store); (3) no run succeeds while no \
         server is running (fail closed); (4) every `Flow::run` returns within 15 s; (5) every \
         error is a typed `StoreError` — `Backend` (not started, or ran but not persisted) or \
         `StaleToken` when persisting to a server that lost the record — and no caller panics; \
         (6) runs succeed again after the restart."
            .to_owned(),
    );
    let mut server = PrivateRedis::start().await?;
    let outcome = storm_through_fault(&mut server, config).await;
    server.kill().await?;
    let storm = outcome?;
    let executions = storm.take_executions();
    let Storm {
        tally,
        runs,
        timeline,
        ..
    } = storm;
    let (t_dead, t_respawn, t_up) = (timeline.fault, timeline.recovering, timeline.recovered);

    // (1) duplicates per server instance.
    let mut per_key: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
    for (key, acquisition) in &executions.attributed {
        let class = if acquisition.ended < t_dead {
            0
        } else if acquisition.began > t_dead {
            1
        } else {
            2
        };
        per_key.entry(key.as_str()).or_default()[class] += 1;
    }
    let duplicates: Vec<String> = per_key
        .iter()
        .filter(|(_, c)| c[0] > 1 || c[1] > 1)
        .map(|(k, c)| format!("{k} (first server ×{}, restarted ×{})", c[0], c[1]))
        .collect();
    let first = per_key.values().filter(|c| c[0] > 0).count();
    let second = per_key.values().filter(|c| c[1] > 0).count();
    let again = per_key.values().filter(|c| c[0] > 0 && c[1] > 0).count();
    let ambiguous: u64 = per_key.values().map(|c| c[2]).sum();
    if !duplicates.is_empty() {
        section.violation(format!(
            "{} keys executed twice against the same server instance: {}",
            duplicates.len(),
            duplicates
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // (2) steps without an acquisition.
    if !executions.orphans.is_empty() {
        section.violation(format!(
            "{} executions without an acquired record (e.g. {})",
            executions.orphans.len(),
            executions.orphans[0]
        ));
    }
    // (3) fail closed while down.
    let succeeded_while_down = runs
        .iter()
        .filter(|r| r.ok && r.began > t_dead && r.ended < t_respawn)
        .count();
    if succeeded_while_down > 0 {
        section.violation(format!(
            "{succeeded_while_down} runs succeeded while no server was running (fail open)"
        ));
    }
    // (4) and (5).
    if tally.timeouts > 0 {
        section.violation(format!(
            "{} runs did not return within {RUN_TIMEOUT:?} (hang)",
            tally.timeouts
        ));
    }
    if tally.panics > 0 {
        section.violation(format!("{} caller tasks panicked", tally.panics));
    }
    if let Some(unexpected) = unexpected_errors(&tally) {
        section.violation(unexpected);
    }
    // (6) recovery.
    let recovered = runs.iter().filter(|r| r.ok && r.began > t_up).count();
    if recovered == 0 {
        section.violation("no run succeeded after the restart");
    }
    let longest = runs
        .iter()
        .map(|r| r.ended - r.began)
        .max()
        .unwrap_or_default();
    let first_ok_after = runs
        .iter()
        .filter(|r| r.ok && r.began > t_respawn)
        .map(|r| r.ended.saturating_duration_since(t_respawn))
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
    row("runs that hung (> 15 s)", tally.timeouts.to_string());
    row("longest run", format!("{:.2} s", longest.as_secs_f64()));
    row("keys executed under the first server", first.to_string());
    row(
        "keys executed under the restarted server",
        second.to_string(),
    );
    row(
        "keys executed under both (records lost in the restart)",
        again.to_string(),
    );
    row(
        "keys executed twice under one server",
        duplicates.len().to_string(),
    );
    row(
        "executions with an ambiguous server (straddled the kill)",
        ambiguous.to_string(),
    );
    row(
        "executions without an acquired record",
        executions.orphans.len().to_string(),
    );
    row(
        "runs that succeeded while no server ran",
        succeeded_while_down.to_string(),
    );
    row(
        "first success after the restart",
        first_ok_after.map_or("never".to_owned(), |d| {
            format!("{:.0} ms after respawn", d.as_secs_f64() * 1000.0)
        }),
    );
    row("successful runs after the restart", recovered.to_string());
    section.tables.push(table);
    Ok(section)
}
