//! The fault scenarios at small sizes, so `scripts/test` checks their invariants on every
//! run (the full sizes run from the bench binary): storms over fresh keys, expired leases
//! and failed records, crash takeover, a hung Redis (SIGSTOP / SIGCONT), and results a Redis
//! refuses. Each test runs the real binary, which spawns its own child processes (and
//! private `redis-server`s), against the services on 127.0.0.1 (Redis at `REDIS_URL`, a
//! temporary SQLite file); every run uses its own key prefix or file. The binary exits
//! non-zero when an invariant breaks; the tests also read its table. Every wait in the
//! binary is bounded, so a broken invariant fails a test by name instead of hanging it.

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrix-bench"))
        .args(args)
        .output()
        .expect("run orchestrix-bench")
}

/// Asserts the scenario held its invariants and its table has a `held` row for `store`.
fn assert_held(output: &Output, store: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "invariant broken or scenario failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let row = stdout
        .lines()
        .find(|line| line.starts_with(&format!("| {store} ")))
        .unwrap_or_else(|| panic!("no row for {store}:\n{stdout}\n{stderr}"));
    assert!(row.contains("| held"), "{row}");
    assert!(stdout.contains("all invariants held"), "{stdout}");
}

/// The cells of the table row that starts with `first` (its first cell).
fn row_cells(output: &Output, first: &str) -> Vec<String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let row = stdout
        .lines()
        .find(|line| line.starts_with(&format!("| {first} ")))
        .unwrap_or_else(|| panic!("no row for {first}:\n{stdout}"));
    // The text before the first `|` is empty: cell `n` of the row is at `n + 1`.
    row.split('|')
        .skip(1)
        .map(|cell| cell.trim().to_owned())
        .collect()
}

/// The storm row's "executed (file)" and "distinct keys" cells.
fn executed_and_distinct(output: &Output, store: &str) -> (String, String) {
    let cells = row_cells(output, store);
    (cells[3].clone(), cells[4].clone())
}

#[test]
fn storm_on_the_memory_store_executes_each_key_once() {
    let output = bench(&[
        "storm",
        "--store",
        "memory",
        "--callers",
        "8",
        "--keys",
        "50",
    ]);
    assert_held(&output, "memory");
    assert_eq!(
        executed_and_distinct(&output, "memory"),
        ("50".to_owned(), "50".to_owned())
    );
}

#[test]
fn storm_from_two_processes_on_redis_executes_each_key_once() {
    let output = bench(&[
        "storm",
        "--store",
        "redis",
        "--processes",
        "2",
        "--callers",
        "4",
        "--keys",
        "50",
    ]);
    assert_held(&output, "redis");
    assert_eq!(
        executed_and_distinct(&output, "redis"),
        ("50".to_owned(), "50".to_owned())
    );
}

#[test]
fn storm_from_two_processes_on_sqlite_executes_each_key_once() {
    let output = bench(&[
        "storm",
        "--store",
        "sqlite",
        "--processes",
        "2",
        "--callers",
        "4",
        "--keys",
        "50",
    ]);
    assert_held(&output, "sqlite");
    assert_eq!(
        executed_and_distinct(&output, "sqlite"),
        ("50".to_owned(), "50".to_owned())
    );
}

/// A storm over keys that must be taken over: `race` is `expired` (an owner process
/// held every key and was killed) or `failed` (every key's first run failed).
fn takeover_storm(race: &str, store: &str, processes: &str) -> Output {
    bench(&[
        "storm",
        "--race",
        race,
        "--store",
        store,
        "--processes",
        processes,
        "--callers",
        "4",
        "--keys",
        "40",
        "--lease-ms",
        "1000",
    ])
}

/// Asserts a takeover storm held and took each of its 40 keys over exactly once.
fn assert_each_key_taken_over_once(output: &Output, store: &str) {
    assert_held(output, store);
    let cells = row_cells(output, store);
    // Prepared (dead owner's / failed first runs), takeovers executed, distinct keys.
    assert_eq!(
        (cells[3].as_str(), cells[5].as_str(), cells[6].as_str()),
        ("40", "40", "40"),
        "{cells:?}"
    );
}

#[test]
fn storm_taking_over_expired_leases_on_the_memory_store_executes_each_key_once() {
    let output = takeover_storm("expired", "memory", "1");
    assert_each_key_taken_over_once(&output, "memory");
}

#[test]
fn storm_taking_over_expired_leases_from_two_processes_on_redis_executes_each_key_once() {
    let output = takeover_storm("expired", "redis", "2");
    assert_each_key_taken_over_once(&output, "redis");
}

#[test]
fn storm_taking_over_expired_leases_from_two_processes_on_sqlite_executes_each_key_once() {
    let output = takeover_storm("expired", "sqlite", "2");
    assert_each_key_taken_over_once(&output, "sqlite");
}

#[test]
fn storm_taking_over_failed_records_on_the_memory_store_executes_each_key_once() {
    let output = takeover_storm("failed", "memory", "1");
    assert_each_key_taken_over_once(&output, "memory");
}

#[test]
fn storm_taking_over_failed_records_from_two_processes_on_redis_executes_each_key_once() {
    let output = takeover_storm("failed", "redis", "2");
    assert_each_key_taken_over_once(&output, "redis");
}

#[test]
fn storm_taking_over_failed_records_from_two_processes_on_sqlite_executes_each_key_once() {
    let output = takeover_storm("failed", "sqlite", "2");
    assert_each_key_taken_over_once(&output, "sqlite");
}

#[test]
fn crash_takeover_on_redis_refuses_the_killed_owners_stale_writes_while_the_taker_runs() {
    let output = bench(&["crash", "--store", "redis", "--lease-ms", "1000"]);
    assert_held(&output, "redis");
    let cells = row_cells(&output, "redis");
    // Refused while the taker's step was running, and again after it completed.
    assert_eq!((cells[4].as_str(), cells[5].as_str()), ("4 of 4", "4 of 4"));
}

#[test]
fn crash_takeover_on_sqlite_refuses_the_killed_owners_stale_writes_while_the_taker_runs() {
    let output = bench(&["crash", "--store", "sqlite", "--lease-ms", "1000"]);
    assert_held(&output, "sqlite");
    let cells = row_cells(&output, "sqlite");
    // Refused while the taker's step was running, and again after it completed.
    assert_eq!((cells[4].as_str(), cells[5].as_str()), ("4 of 4", "4 of 4"));
}

#[test]
fn big_results_a_redis_refuses_for_their_length_still_execute_each_key_once() {
    let output = bench(&[
        "big-results",
        "--limit",
        "bulk",
        "--keys",
        "3",
        "--callers",
        "3",
    ]);
    let row = "`--proto-max-bulk-len 1mb`";
    assert_held(&output, row);
    assert_eq!(row_cells(&output, row)[3], "3");
}

#[test]
fn big_results_a_redis_refuses_for_its_memory_still_execute_each_key_once() {
    let output = bench(&[
        "big-results",
        "--limit",
        "memory",
        "--keys",
        "3",
        "--callers",
        "3",
    ]);
    let row = "`--maxmemory 4mb --maxmemory-policy noeviction`";
    assert_held(&output, row);
    assert_eq!(row_cells(&output, row)[3], "3");
}

/// The value of the row of a measure table whose name starts with `name`.
fn measure(output: &Output, name: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let row = stdout
        .lines()
        .find(|line| line.starts_with(&format!("| {name}")))
        .unwrap_or_else(|| panic!("no measure {name:?}:\n{stdout}"));
    row.split('|').nth(2).unwrap_or_default().trim().to_owned()
}

#[test]
fn a_hung_redis_ends_every_call_in_time_and_frees_every_key_one_lease_after_it_resumes() {
    // The store waits 300 ms for a reply, so a run is given 3.4 s; the server is frozen
    // for 4 s, longer than that and than the 1 s lease.
    let output = bench(&[
        "outage",
        "--fault",
        "stop",
        "--callers",
        "8",
        "--window-keys",
        "10",
        "--seconds",
        "5.5",
        "--down-at-ms",
        "500",
        "--down-for-ms",
        "4000",
        "--lease-ms",
        "1000",
        "--response-timeout-ms",
        "300",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("all invariants held"),
        "invariant broken or scenario failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(measure(&output, "runs that hung"), "0");
    assert_eq!(
        measure(&output, "executions without an acquired record"),
        "0"
    );
    assert_eq!(
        measure(
            &output,
            "keys executed again after their outcome was stored"
        ),
        "0"
    );
    assert!(
        measure(&output, "keys probed one lease after the thaw").ends_with("/ 0"),
        "{stdout}"
    );
}

/// The durable crash proof on `store`: every kill point resumed by a retry and by
/// `recover`, the owner frozen at every point and thawed after a retry resumed it, and
/// random kills of the owner and of its taker.
fn durable_crash(store: &str) -> Output {
    bench(&[
        "durable-crash",
        "--store",
        store,
        "--lease-ms",
        "1000",
        "--chaos-keys",
        "8",
    ])
}

/// Asserts the crash proof held on `store` at every kill point and under random kills,
/// and that the kill points the table names ended as the invariants say.
fn assert_durable_crash_held(output: &Output, store: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("all invariants held"),
        "invariant broken or scenario failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Vec<String>> = stdout
        .lines()
        .filter(|line| line.starts_with(&format!("| {store} ")))
        .map(|row| {
            row.split('|')
                .skip(1)
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect();
    // Twelve kill points, then the random kills' row.
    assert_eq!(rows.len(), 13, "{stdout}");
    assert!(
        rows.iter().all(|r| r.contains(&"held".to_owned())),
        "{stdout}"
    );
    let point = |name: &str| {
        rows.iter()
            .find(|r| r[1] == name)
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"))
    };
    // In a step: it ran twice (killed owner, resumer), every other step once.
    let in_pack = point("in pack");
    assert_eq!(
        (in_pack[3].as_str(), in_pack[5].as_str()),
        ("1 1 1 2 1", "1 1 1 2 1")
    );
    // Interrupted in the at-most-once step: not run again, the run compensates.
    let in_charge = point("in charge");
    assert_eq!(in_charge[2], "reserve charge(started)");
    assert_eq!(in_charge[3], "1 1 1 0 0 · undo reserve notify");
    assert!(
        in_charge[4].starts_with("failed: StepInterrupted(charge)"),
        "{in_charge:?}"
    );
    // Killed after the last checkpoint: all five restored, none run again.
    let after_ship = point("after ship");
    assert_eq!(after_ship[3], "1 1 1 1 1");
    assert_eq!(after_ship[6], "completed = uncrashed, 5 restored");
    // Frozen past its lease after a checkpoint, then thawed once another process resumed
    // the run: the owner stops before the next step (the taker ran it).
    let after_notify = point("after notify");
    assert_eq!(after_notify[7], "1 1 1 1 1");
    assert_eq!(
        after_notify[8],
        "completed = uncrashed, 3 restored; thawed owner stopped"
    );
}

#[test]
fn durable_crash_on_redis_never_repeats_a_checkpointed_step_at_any_kill_point() {
    assert_durable_crash_held(&durable_crash("redis"), "redis");
}

#[test]
fn durable_crash_on_sqlite_never_repeats_a_checkpointed_step_at_any_kill_point() {
    assert_durable_crash_held(&durable_crash("sqlite"), "sqlite");
}

#[test]
fn durable_crash_on_postgres_never_repeats_a_checkpointed_step_at_any_kill_point() {
    assert_durable_crash_held(&durable_crash("postgres"), "postgres");
}
