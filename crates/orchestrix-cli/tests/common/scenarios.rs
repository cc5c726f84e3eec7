//! The command line's behaviours, one generic function each over a [`Backend`]: each backend's
//! test file runs them all through [`cli_tests!`](crate::cli_tests) (and
//! [`cli_journal_tests!`](crate::cli_journal_tests) where the store keeps journals).
//!
//! Records are made with the library (flows, or the store's own `start` for a record whose
//! owner is stuck), then looked at and changed with the binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use orchestrix::idempotency::scoped_key;
use orchestrix::store::{StartOutcome, StartRequest};
use orchestrix::{Flow, FlowResult, RunOptions, Status, Step, StepError};
use tokio::task::JoinHandle;

use super::{Backend, random};

/// A lease no test outlives: the owner of a record started with it is "stuck".
const STUCK: Duration = Duration::from_secs(3600);

/// How long a test waits for a background run to reach a state.
const WAIT: Duration = Duration::from_secs(20);

/// A flow name no other test uses, with a character its scoping escapes.
fn flow_name(what: &str) -> String {
    format!("{what}:{}", random())
}

/// A record whose owner is stuck: running under a long lease, never renewed or finished.
/// Without a fingerprint, it agrees with any run of the key.
async fn stuck(backend: &Backend, flow: &str, key: &str, fingerprint: Option<&str>) -> String {
    let stored = scoped_key(flow, key);
    let started = backend
        .store
        .start(StartRequest {
            key: &stored,
            fingerprint,
            lease: STUCK,
            rerun_failed: false,
        })
        .await;
    assert!(
        matches!(started, Ok(StartOutcome::Acquired(_))),
        "{started:?}"
    );
    stored
}

/// A plain flow over the backend's store that counts its runs; `fail` makes it fail.
fn checkout(backend: &Backend, name: &str, runs: Arc<AtomicU32>, fail: bool) -> Flow<u64, String> {
    Flow::<u64, String>::builder(name)
        .store(Arc::clone(&backend.store))
        .step("reserve", move |ctx| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if fail {
                    return Err(StepError::msg("card declined"));
                }
                ctx.set("receipt", format!("receipt-{}", ctx.input()))?;
                Ok(())
            }
        })
        .output(|ctx| Ok(ctx.get::<String>("receipt")?.unwrap_or_default()))
        .build()
        .expect("a valid flow")
}

async fn run(flow: &Flow<u64, String>, key: &str) -> FlowResult<String> {
    let options = RunOptions::key(key).ttl(Duration::from_secs(3600));
    match tokio::time::timeout(WAIT, flow.run(7, options)).await {
        Ok(Ok(result)) => result,
        other => panic!("the run of {key:?} failed: {other:?}"),
    }
}

/// A durable flow whose second step, `charge`, waits for a long time unless `charge_now`;
/// `reserves` counts the runs of its first step.
fn durable(
    backend: &Backend,
    name: &str,
    reserves: Arc<AtomicU32>,
    charge_now: bool,
) -> Flow<u64, String> {
    Flow::<u64, String>::builder(name)
        .durable()
        .store(Arc::clone(&backend.store))
        .step("reserve", move |ctx| {
            let reserves = Arc::clone(&reserves);
            async move {
                reserves.fetch_add(1, Ordering::SeqCst);
                ctx.set("reserved", true)?;
                Ok(())
            }
        })
        .then(Step::new("charge", move |ctx| async move {
            if !charge_now {
                tokio::select! {
                    () = ctx.cancellation().cancelled() => {
                        return Err(StepError::msg("cancelled while charging"));
                    }
                    () = tokio::time::sleep(STUCK) => {}
                }
            }
            ctx.set("receipt", "charged".to_owned())?;
            Ok(())
        }))
        .output(|ctx| Ok(ctx.get::<String>("receipt")?.unwrap_or_default()))
        .build()
        .expect("a valid durable flow")
}

/// Starts a durable run of `key` in the background and waits until its first step is
/// journaled: the run is then blocked in `charge`, owning the key.
async fn durable_run_in_charge(
    backend: &Backend,
    flow: &Flow<u64, String>,
    key: &str,
    stored: &str,
) -> JoinHandle<()> {
    let running = flow.clone();
    let options = RunOptions::key(key).ttl(Duration::from_secs(3600));
    let handle = tokio::spawn(async move {
        let _ = running.run(7, options).await;
    });
    let journal = backend
        .store
        .journal_store()
        .expect("a store with journals");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let read = journal.read_journal(stored).await;
        if read
            .as_ref()
            .is_ok_and(|j| j.as_ref().is_some_and(|j| !j.entries.is_empty()))
        {
            return handle;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the durable run never journaled: {read:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record `list` shows with `args`, as JSON, following the cursor to the end: a
/// store that scans (Redis) may end a page early, even with no record on it.
async fn list_all(backend: &Backend, args: &[&str]) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut all = vec!["list", "--json"];
        all.extend(args);
        if let Some(cursor) = &cursor {
            all.extend(["--cursor", cursor]);
        }
        let page = backend.cli(&all).await.json();
        records.extend(page["records"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return records,
        }
    }
    panic!("the listing did not end");
}

/// The tables `list` prints with `args`, page after page, following the printed cursor.
async fn list_tables(backend: &Backend, args: &[&str]) -> String {
    let mut tables = String::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut all = vec!["list"];
        all.extend(args);
        if let Some(cursor) = &cursor {
            all.extend(["--cursor", cursor]);
        }
        let run = backend.cli(&all).await;
        let out = run.ok();
        tables.push_str(out);
        match out
            .lines()
            .find_map(|l| l.strip_prefix("next page: --cursor "))
        {
            Some(next) => cursor = Some(next.to_owned()),
            None => return tables,
        }
    }
    panic!("the listing did not end");
}

fn keys_of(records: &[serde_json::Value]) -> Vec<&str> {
    records.iter().filter_map(|r| r["key"].as_str()).collect()
}

/// A running record shows its owner's token, its lease, its fingerprint and no result.
pub async fn inspect_shows_a_running_record_with_its_owner_and_lease(backend: &Backend) {
    let flow = flow_name("inspect");
    let stored = stuck(backend, &flow, "order-1", Some("fp-stuck")).await;
    let run = backend.cli(&["inspect", "--flow", &flow, "order-1"]).await;
    let out = run.ok();
    assert!(out.contains(&format!("key             {stored}")), "{out}");
    assert!(out.contains("status          running"), "{out}");
    assert!(out.contains("lease           held, "), "{out}");
    assert!(out.contains("fingerprint     fp-stuck"), "{out}");
    assert!(out.contains("result          none yet"), "{out}");
    assert!(out.contains("schema version  1"), "{out}");
    let json = backend.cli(&["inspect", &stored, "--json"]).await.json();
    assert_eq!(json["status"], "running");
    assert_eq!(json["lease"]["state"], "held");
    // DynamoDB counts its clock skew allowance (a second by default) into what is left.
    let left = json["lease"]["left_ms"].as_u64().unwrap_or(0);
    assert!(left > 3_000_000 && left <= 3_602_000, "{json}");
    let record = backend.store.get(&stored).await.ok().flatten();
    assert_eq!(
        json["token"].as_str(),
        record.map(|r| r.token.to_string()).as_deref()
    );
}

/// A completed run shows its result's size, what is left of its TTL, and no lease.
pub async fn inspect_shows_a_completed_run_with_its_result_size_and_ttl(backend: &Backend) {
    let flow_name = flow_name("completed");
    let flow = checkout(backend, &flow_name, Arc::default(), false);
    let result = run(&flow, "order-2").await;
    assert_eq!(result.status, Status::Completed);
    let json = backend
        .cli(&["inspect", "--flow", &flow_name, "order-2", "--json"])
        .await
        .json();
    assert_eq!(json["status"], "completed");
    assert_eq!(json["lease"], serde_json::Value::Null);
    assert!(
        json["result_bytes"].as_u64().is_some_and(|n| n > 0),
        "{json}"
    );
    let ttl = json["expires_in_ms"].as_u64().unwrap_or(0);
    assert!(ttl > 3_000_000 && ttl <= 3_602_000, "{json}");
    let out = backend
        .cli(&["inspect", "--flow", &flow_name, "order-2"])
        .await;
    assert!(out.ok().contains("expires         in "), "{out:?}");
}

/// A key without a record exits with 3 and says so.
pub async fn inspect_of_a_missing_key_exits_with_3(backend: &Backend) {
    let run = backend
        .cli(&["inspect", &format!("missing-{}", random())])
        .await;
    assert!(run.failed(3).starts_with("no record under"), "{run:?}");
}

/// Each status filter lists its records of the flow, and paging with the printed cursor
/// goes through all of them.
pub async fn list_filters_by_status_and_pages_with_the_cursor(backend: &Backend) {
    let flow_name = flow_name("list");
    let stored_running = stuck(backend, &flow_name, "a-running", None).await;
    let ok = checkout(backend, &flow_name, Arc::default(), false);
    run(&ok, "b-completed").await;
    let failing = checkout(backend, &flow_name, Arc::default(), true);
    let failed = run(&failing, "c-failed").await;
    assert_eq!(failed.status, Status::Failed);
    let key = |k: &str| scoped_key(&flow_name, k);
    for (flag, expected) in [
        ("--running", vec![stored_running.clone()]),
        ("--completed", vec![key("b-completed")]),
        ("--failed", vec![key("c-failed")]),
        ("--expired-lease", vec![]),
    ] {
        let records = list_all(backend, &["--flow", &flow_name, flag]).await;
        assert_eq!(keys_of(&records), expected, "{flag}");
    }
    // Page by page, one record at a time, following the cursor the table prints.
    let prefix = scoped_key(&flow_name, "");
    let tables = list_tables(backend, &["--flow", &flow_name, "--limit", "1"]).await;
    let mut seen: Vec<&str> = tables
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        vec![
            stored_running.as_str(),
            &key("b-completed"),
            &key("c-failed")
        ]
    );
}

/// A record whose owner is stuck is freed by `release`, and the next run of the key
/// executes the flow.
pub async fn release_frees_a_stuck_record_for_the_next_run(backend: &Backend) {
    let flow_name = flow_name("release");
    let stored = stuck(backend, &flow_name, "order-3", None).await;
    let runs = Arc::new(AtomicU32::new(0));
    let flow = checkout(backend, &flow_name, Arc::clone(&runs), false);
    // While the stuck owner holds the key, a run reports it running and executes nothing.
    let blocked = run(&flow, "order-3").await;
    assert_eq!(blocked.status, Status::Running);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let released = backend
        .cli(&["release", "--flow", &flow_name, "order-3", "--yes"])
        .await;
    assert!(
        released
            .ok()
            .contains("deleted (the next run of the key starts over)"),
        "{released:?}"
    );
    assert!(backend.store.get(&stored).await.ok().flatten().is_none());
    let next = run(&flow, "order-3").await;
    assert_eq!((next.status, next.replayed), (Status::Completed, false));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A finished record is not released: that would be a delete.
pub async fn release_refuses_a_completed_record(backend: &Backend) {
    let flow_name = flow_name("refuse");
    let flow = checkout(backend, &flow_name, Arc::default(), false);
    run(&flow, "order-4").await;
    let refused = backend
        .cli(&["release", "--flow", &flow_name, "order-4", "--yes"])
        .await;
    let line = refused.failed(1);
    assert!(line.contains("is completed, not running"), "{line}");
    assert!(line.contains("orchestrix delete"), "{line}");
    assert_eq!(line.lines().count(), 1, "{line}");
    let replay = run(&flow, "order-4").await;
    assert!(replay.replayed);
}

/// Without `--yes`, release asks, and anything but yes changes nothing.
pub async fn release_asks_before_it_changes_anything(backend: &Backend) {
    let flow_name = flow_name("confirm");
    let stored = stuck(backend, &flow_name, "order-5", None).await;
    let declined = backend
        .cli_with_input(&["release", "--flow", &flow_name, "order-5"], "n\n")
        .await;
    assert!(declined.failed(1).contains("not confirmed"), "{declined:?}");
    assert!(
        declined.stderr.contains("Release the running record"),
        "{declined:?}"
    );
    assert!(backend.store.get(&stored).await.ok().flatten().is_some());
    let no_answer = backend
        .cli_with_input(&["release", "--flow", &flow_name, "order-5"], "")
        .await;
    no_answer.failed(1);
    assert!(backend.store.get(&stored).await.ok().flatten().is_some());
    let confirmed = backend
        .cli_with_input(&["release", "--flow", &flow_name, "order-5"], "y\n")
        .await;
    assert!(confirmed.ok().contains("released"), "{confirmed:?}");
    assert!(backend.store.get(&stored).await.ok().flatten().is_none());
}

/// `delete` removes a finished record (asking first), after which the key runs again.
pub async fn delete_removes_a_record(backend: &Backend) {
    let flow_name = flow_name("delete");
    let runs = Arc::new(AtomicU32::new(0));
    let flow = checkout(backend, &flow_name, Arc::clone(&runs), false);
    run(&flow, "order-6").await;
    let declined = backend
        .cli_with_input(&["delete", "--flow", &flow_name, "order-6"], "no\n")
        .await;
    assert!(
        declined.stderr.contains("Delete the completed record"),
        "{declined:?}"
    );
    declined.failed(1);
    let deleted = backend
        .cli(&["delete", "--flow", &flow_name, "order-6", "--yes"])
        .await;
    assert!(deleted.ok().starts_with("deleted"), "{deleted:?}");
    backend
        .cli(&["inspect", "--flow", &flow_name, "order-6"])
        .await
        .failed(3);
    let again = run(&flow, "order-6").await;
    assert!(!again.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    backend
        .cli(&["delete", "--flow", &flow_name, "missing", "--yes"])
        .await
        .failed(3);
}

/// A value that is not a record: `inspect` and `release` fail on one line saying it
/// cannot be decoded, `list` shows it as undecodable between the records around it, and
/// `delete` clears it.
pub async fn a_garbage_record_is_reported_never_a_panic(backend: &Backend) {
    let flow_name = flow_name("garbage");
    let garbage = scoped_key(&flow_name, "b-garbage");
    backend.write_garbage(&garbage).await;
    stuck(backend, &flow_name, "a-good", None).await;
    let inspected = backend.cli(&["inspect", &garbage]).await;
    let line = inspected.failed(1);
    assert!(line.contains("could not be decoded"), "{line}");
    assert_eq!(line.lines().count(), 1, "{line}");
    let released = backend.cli(&["release", &garbage, "--yes"]).await;
    assert!(
        released.failed(1).contains("could not be decoded"),
        "{released:?}"
    );
    let out = list_tables(backend, &["--flow", &flow_name]).await;
    let garbage_line = out.lines().find(|l| l.starts_with(&garbage));
    assert!(
        garbage_line.is_some_and(|l| l.contains("UNDECODABLE")),
        "{out}"
    );
    assert!(out.contains(&scoped_key(&flow_name, "a-good")), "{out}");
    let records = list_all(backend, &["--flow", &flow_name]).await;
    assert!(
        records
            .iter()
            .any(|r| r["key"] == garbage.as_str() && r["undecodable"].is_string()),
        "{records:?}"
    );
    let deleted = backend.cli(&["delete", &garbage, "--yes"]).await;
    assert!(deleted.ok().starts_with("deleted"), "{deleted:?}");
    backend.cli(&["inspect", &garbage]).await.failed(3);
}

/// A durable run blocked in its second step shows its journal: the first step completed.
pub async fn inspect_shows_a_durable_run_with_its_journal_steps(backend: &Backend) {
    let flow_name = flow_name("journal");
    let stored = scoped_key(&flow_name, "order-7");
    let flow = durable(backend, &flow_name, Arc::default(), false);
    let owner = durable_run_in_charge(backend, &flow, "order-7", &stored).await;
    let out = backend
        .cli(&["inspect", "--flow", &flow_name, "order-7"])
        .await;
    let out = out.ok().to_owned();
    owner.abort();
    assert!(out.contains("durable         yes"), "{out}");
    assert!(out.contains("lease           held"), "{out}");
    assert!(out.contains("1 entries"), "{out}");
    assert!(out.contains("completed    step 0 \"reserve\""), "{out}");
    let json = backend.cli(&["inspect", &stored, "--json"]).await.json();
    assert_eq!(json["journal"]["entries"][0]["step"], "reserve");
    assert_eq!(json["journal"]["entries"][0]["kind"], "completed");
}

/// A durable run whose owner died is what `abandoned` and `list --expired-lease` show, and
/// what `inspect` reads as lapsed.
pub async fn abandoned_and_expired_lease_show_a_crashed_durable_run(backend: &Backend) {
    let flow_name = flow_name("abandoned");
    let stored = scoped_key(&flow_name, "order-8");
    let flow = durable(backend, &flow_name, Arc::default(), false);
    let owner = durable_run_in_charge(backend, &flow, "order-8", &stored).await;
    // The owner's future is dropped: the run gives its key up with its journal.
    owner.abort();
    let journal = backend.store.journal_store().expect("journals");
    let prefix = scoped_key(&flow_name, "");
    let deadline = tokio::time::Instant::now() + WAIT;
    while journal.abandoned(&prefix, None, 10).await.ok() != Some(vec![stored.clone()]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run was never abandoned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = backend.cli(&["abandoned", "--flow", &flow_name]).await;
    assert_eq!(
        listed.ok().lines().collect::<Vec<_>>(),
        vec![stored.as_str()]
    );
    let json = backend
        .cli(&["abandoned", "--flow", &flow_name, "--json"])
        .await
        .json();
    assert_eq!(json["keys"][0], stored.as_str());
    let records = list_all(backend, &["--flow", &flow_name, "--expired-lease"]).await;
    assert_eq!(keys_of(&records), vec![stored.as_str()]);
    assert_eq!(records[0]["lease"]["state"], "lapsed");
    let out = backend.cli(&["inspect", &stored]).await;
    assert!(out.ok().contains("lease           lapsed"), "{out:?}");
}

/// `release` of a running durable run keeps its journal: the run is abandoned, and the
/// next run of the key resumes it without running its first step again.
pub async fn release_of_a_durable_run_keeps_its_journal_for_the_next_run(backend: &Backend) {
    let flow_name = flow_name("release-durable");
    let stored = scoped_key(&flow_name, "order-9");
    let reserves = Arc::new(AtomicU32::new(0));
    let stuck_flow = durable(backend, &flow_name, Arc::clone(&reserves), false);
    let owner = durable_run_in_charge(backend, &stuck_flow, "order-9", &stored).await;
    let released = backend.cli(&["release", &stored, "--yes"]).await;
    assert!(
        released.ok().contains("lease lapsed, journal kept"),
        "{released:?}"
    );
    owner.abort();
    let listed = backend.cli(&["abandoned", "--flow", &flow_name]).await;
    assert_eq!(
        listed.ok().lines().collect::<Vec<_>>(),
        vec![stored.as_str()]
    );
    let flow = durable(backend, &flow_name, Arc::clone(&reserves), true);
    let resumed = run(&flow, "order-9").await;
    assert_eq!(resumed.status, Status::Completed, "{resumed:?}");
    assert_eq!(resumed.output.as_deref(), Some("charged"));
    assert_eq!(
        reserves.load(Ordering::SeqCst),
        1,
        "reserve ran once, before the release"
    );
}

/// One `#[tokio::test]` per behaviour, on the backend `$make` builds.
#[macro_export]
macro_rules! cli_tests {
    ($make:expr) => {
        $crate::cli_tests!(@tests $make;
            inspect_shows_a_running_record_with_its_owner_and_lease,
            inspect_shows_a_completed_run_with_its_result_size_and_ttl,
            inspect_of_a_missing_key_exits_with_3,
            list_filters_by_status_and_pages_with_the_cursor,
            release_frees_a_stuck_record_for_the_next_run,
            release_refuses_a_completed_record,
            release_asks_before_it_changes_anything,
            delete_removes_a_record,
            a_garbage_record_is_reported_never_a_panic,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let backend = $make.await;
                let check = common::scenarios::$name(&backend);
                if tokio::time::timeout(std::time::Duration::from_secs(180), check).await.is_err() {
                    panic!("{} did not finish within 180 s", stringify!($name));
                }
            }
        )*
    };
}

/// The behaviours of durable runs, for a backend whose store keeps journals.
#[macro_export]
macro_rules! cli_journal_tests {
    ($make:expr) => {
        $crate::cli_tests!(@tests $make;
            inspect_shows_a_durable_run_with_its_journal_steps,
            abandoned_and_expired_lease_show_a_crashed_durable_run,
            release_of_a_durable_run_keeps_its_journal_for_the_next_run,
        );
    };
}
