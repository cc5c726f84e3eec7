//! "Once" at the edges: panics, unreadable outputs, cancellation at every position, shared
//! tokens, scoping, fingerprints and dropped futures never make the library run a completed
//! step again, replay the wrong result, or cancel work nobody asked to cancel.
//!
//! Every wait is bounded ([`bounded`]): a regression is a named failure, never a hung test.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use orchestrix::idempotency::IdempotencyError;
use orchestrix::store::{IdempotencyStore, MemoryStore, RecordStatus, StoreError};
use orchestrix::{
    CancellationToken, Flow, FlowError, FlowResult, RetryPolicy, RunError, RunOptions, Status,
    Step, StepError,
};
use tokio::sync::Notify;

/// Awaits `fut`, failing the test with `what` if it takes more than a minute (of tokio's
/// clock: under a paused clock the bound is reached as soon as nothing else can happen).
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(60), fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after 60 s"),
    }
}

fn memory() -> Arc<dyn IdempotencyStore> {
    Arc::new(MemoryStore::new())
}

fn ok<O: std::fmt::Debug>(r: Result<FlowResult<O>, RunError<O>>) -> FlowResult<O> {
    r.unwrap_or_else(|e| panic!("run failed: {e:?}"))
}

/// Counts what a flow's steps and compensations did.
#[derive(Clone, Default)]
struct Log {
    runs: Arc<AtomicU32>,
    undone: Arc<AtomicU32>,
}

impl Log {
    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
    fn undone(&self) -> u32 {
        self.undone.load(Ordering::SeqCst)
    }
    /// A step that counts its runs.
    fn step(&self, name: &str) -> Step<u64> {
        let runs = Arc::clone(&self.runs);
        Step::new(name, move |_ctx| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    }
    /// A step that counts its runs and its compensations.
    fn undoable(&self, name: &str) -> Step<u64> {
        let undone = Arc::clone(&self.undone);
        self.step(name).compensate(move |_ctx| {
            let undone = Arc::clone(&undone);
            async move {
                undone.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    }
}

/// A step that counts its start, then waits for `gate` and completes, whatever the
/// cancellation token says (a step that does not watch the token).
fn gated(name: &str, started: &Arc<AtomicU32>, gate: &Arc<Notify>) -> Step<u64> {
    let started = Arc::clone(started);
    let gate = Arc::clone(gate);
    Step::new(name, move |_ctx| {
        let started = Arc::clone(&started);
        let gate = Arc::clone(&gate);
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            Ok(())
        }
    })
}

async fn until(what: &str, counter: &AtomicU32, n: u32) {
    bounded(what, async {
        while counter.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

// Defect 1: a panic in the output builder.

#[tokio::test]
async fn a_panicking_output_builder_fails_the_run_and_its_steps_never_run_again() {
    let log = Log::default();
    let flow = Flow::<u64, u64>::builder("output-panic")
        .then(log.step("charge"))
        .output(|_ctx| panic!("output builder bug"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let first = ok(bounded("first run", flow.run(1, RunOptions::key("k"))).await);
    assert_eq!(first.status, Status::Failed);
    match &first.error {
        Some(FlowError::Output { message }) => {
            assert!(message.contains("panicked"), "{message}");
            assert!(message.contains("output builder bug"), "{message}");
        }
        other => panic!("expected an output error, got {other:?}"),
    }
    let again = ok(bounded("second run", flow.run(1, RunOptions::key("k"))).await);
    assert!(again.replayed);
    assert_eq!(again.status, Status::Failed);
    assert_eq!(log.runs(), 1);
}

// Defect 3: cancellation frees the key only when nothing the run did remains.

/// `charge` (no compensation, or one when `undoable`), then a gated `ship`.
fn charge_then_ship(
    log: &Log,
    undoable: bool,
    started: &Arc<AtomicU32>,
    gate: &Arc<Notify>,
) -> Flow<u64, ()> {
    let charge = if undoable {
        log.undoable("charge")
    } else {
        log.step("charge")
    };
    let started = Arc::clone(started);
    let gate = Arc::clone(gate);
    let ship = Step::new("ship", move |ctx| {
        let started = Arc::clone(&started);
        let gate = Arc::clone(&gate);
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            tokio::select! {
                () = gate.notified() => Ok(()),
                () = ctx.cancellation().cancelled() => Err(StepError::msg("shipping stopped")),
            }
        }
    });
    Flow::builder("order")
        .store(memory())
        .then(charge)
        .then(ship)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn a_cancelled_run_with_an_uncompensated_step_keeps_its_outcome_and_never_reruns_it() {
    let (log, started, gate) = (Log::default(), Arc::default(), Arc::new(Notify::new()));
    let flow = charge_then_ship(&log, false, &started, &gate);
    let token = CancellationToken::new();
    let owner = tokio::spawn({
        let flow = flow.clone();
        let options = RunOptions::key("k").cancellation(token.clone());
        async move { flow.run(7, options).await }
    });
    until("ship to start", &started, 1).await;
    token.cancel();
    let cancelled = ok(bounded("the cancelled run", owner)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(cancelled.status, Status::Cancelled);
    assert_eq!(
        cancelled.step("charge").map(|s| s.status),
        Some(Status::Completed)
    );
    let record = flow.store().get("order:k").await.ok().flatten();
    assert_eq!(record.map(|r| r.status), Some(RecordStatus::Failed));
    // A retry (the client reconnecting) gets the stored outcome: charge never runs twice.
    let retry = ok(bounded("the retry", flow.run(7, RunOptions::key("k"))).await);
    assert!(retry.replayed);
    assert_eq!(retry.status, Status::Cancelled);
    assert_eq!(retry.error, Some(FlowError::Cancelled));
    assert_eq!(log.runs(), 1);
}

#[tokio::test]
async fn a_cancelled_run_whose_completed_steps_were_compensated_frees_its_key() {
    let (log, started, gate) = (Log::default(), Arc::default(), Arc::new(Notify::new()));
    let flow = charge_then_ship(&log, true, &started, &gate);
    let token = CancellationToken::new();
    let owner = tokio::spawn({
        let flow = flow.clone();
        let options = RunOptions::key("k").cancellation(token.clone());
        async move { flow.run(7, options).await }
    });
    until("ship to start", &started, 1).await;
    token.cancel();
    let cancelled = ok(bounded("the cancelled run", owner)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(cancelled.status, Status::Cancelled);
    assert_eq!(log.undone(), 1);
    assert_eq!(flow.store().get("order:k").await.ok(), Some(None));
}

// Defect 4: an output that is stored but cannot be read back.

#[tokio::test]
async fn an_output_that_would_not_read_back_is_not_stored_and_a_replay_says_so() {
    let log = Log::default();
    let flow = Flow::<u64, f64>::builder("nan")
        .then(log.step("measure"))
        .output(|_ctx| Ok(f64::NAN))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    match bounded("first run", flow.run(1, RunOptions::key("k"))).await {
        Err(RunError::NotPersisted { result, source }) => {
            assert_eq!(result.status, Status::Completed);
            assert!(
                result.output.is_some_and(f64::is_nan),
                "the caller gets its output"
            );
            assert!(matches!(source, StoreError::Encode(_)), "{source:?}");
        }
        other => panic!("expected NotPersisted, got {other:?}"),
    }
    let replay = bounded("replay", flow.run(1, RunOptions::key("k"))).await;
    assert!(
        matches!(
            replay,
            Err(RunError::Idempotency(
                IdempotencyError::ResultNotStored { .. }
            ))
        ),
        "{replay:?}"
    );
    assert_eq!(log.runs(), 1);
}

// Defect 5: the caller's token is never fired by the library.

#[tokio::test(start_paused = true)]
async fn losing_one_runs_lease_cancels_only_that_run_and_never_the_callers_token() {
    let store = memory();
    let shutdown = CancellationToken::new();
    let (started, gate) = (Arc::new(AtomicU32::new(0)), Arc::new(Notify::new()));
    let saw_cancel = Arc::new(AtomicU32::new(0));
    let flow = {
        let (started, gate, saw_cancel) = (started.clone(), gate.clone(), saw_cancel.clone());
        Flow::<u64, ()>::builder("shared")
            .store(Arc::clone(&store))
            .step("work", move |ctx| {
                let (started, gate, saw_cancel) =
                    (started.clone(), gate.clone(), saw_cancel.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        () = gate.notified() => Ok(()),
                        () = ctx.cancellation().cancelled() => {
                            saw_cancel.fetch_add(1, Ordering::SeqCst);
                            Err(StepError::msg("stopped"))
                        }
                    }
                }
            })
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let run = |key: &'static str| {
        let flow = flow.clone();
        let options = RunOptions::key(key)
            .lease(Duration::from_secs(3))
            .cancellation(shutdown.clone());
        tokio::spawn(async move { flow.run(1, options).await })
    };
    let a = run("a");
    let b = run("b");
    until("both runs to start", &started, 2).await;
    // Run A's record disappears: its next renewal is refused and A is cancelled.
    assert!(store.delete("shared:a").await.is_ok());
    let a = bounded("run A", a).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(&a, Err(RunError::NotPersisted { result, .. }) if result.status == Status::Cancelled),
        "{a:?}"
    );
    assert!(!shutdown.is_cancelled(), "the caller's token was fired");
    assert_eq!(
        saw_cancel.load(Ordering::SeqCst),
        1,
        "only run A was cancelled"
    );
    gate.notify_waiters();
    let b = ok(bounded("run B", b).await.unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(b.status, Status::Completed);
}

// Defect 6: one rule for a cancel at every position.

/// Three compensable steps `a`, `b`, `c`; `gated_at` (if any) waits for `gate` and then
/// completes without watching the token. Returns the flow and its log.
fn three_steps(
    gated_at: Option<&str>,
    started: &Arc<AtomicU32>,
    gate: &Arc<Notify>,
) -> (Flow<u64, ()>, Log) {
    let log = Log::default();
    let mut builder = Flow::<u64, ()>::builder("three").store(memory());
    for name in ["a", "b", "c"] {
        let step = if gated_at == Some(name) {
            let undone = Arc::clone(&log.undone);
            gated(name, started, gate).compensate(move |_ctx| {
                let undone = Arc::clone(&undone);
                async move {
                    undone.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
        } else {
            log.undoable(name)
        };
        builder = builder.then(step);
    }
    (builder.build().unwrap_or_else(|e| panic!("{e}")), log)
}

/// Cancels the run while the gated step runs, then lets that step complete.
async fn cancel_during(step: &str) -> (FlowResult<()>, Log, Arc<dyn IdempotencyStore>) {
    let (started, gate) = (Arc::new(AtomicU32::new(0)), Arc::new(Notify::new()));
    let (flow, log) = three_steps(Some(step), &started, &gate);
    let token = CancellationToken::new();
    let owner = tokio::spawn({
        let flow = flow.clone();
        let options = RunOptions::key("k").cancellation(token.clone());
        async move { flow.run(1, options).await }
    });
    until("the gated step to start", &started, 1).await;
    token.cancel();
    gate.notify_waiters();
    let result = ok(bounded("the cancelled run", owner)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    (result, log, Arc::clone(flow.store()))
}

fn statuses(result: &FlowResult<()>) -> Vec<(String, Status)> {
    result
        .steps
        .iter()
        .map(|s| (s.name.to_string(), s.status))
        .collect()
}

#[tokio::test]
async fn a_cancel_during_a_middle_step_stops_before_the_next_and_compensates() {
    let (result, log, store) = cancel_during("b").await;
    assert_eq!(result.status, Status::Cancelled);
    assert_eq!(result.error, Some(FlowError::Cancelled));
    assert_eq!(
        statuses(&result),
        [
            ("a".into(), Status::Cancelled),
            ("b".into(), Status::Cancelled),
            ("c".into(), Status::Pending)
        ]
    );
    assert_eq!(log.undone(), 2, "a and the completed b were compensated");
    assert_eq!(
        store.get("three:k").await.ok(),
        Some(None),
        "nothing remains: key freed"
    );
}

#[tokio::test]
async fn a_cancel_during_the_last_step_is_not_ignored() {
    let (result, log, store) = cancel_during("c").await;
    assert_eq!(result.status, Status::Cancelled);
    assert_eq!(result.error, Some(FlowError::Cancelled));
    assert_eq!(
        log.undone(),
        3,
        "every step, the last included, was compensated"
    );
    assert!(
        statuses(&result)
            .iter()
            .all(|(_, s)| *s == Status::Cancelled)
    );
    assert_eq!(store.get("three:k").await.ok(), Some(None));
}

#[tokio::test]
async fn a_cancel_during_a_retry_delay_stops_at_once_and_compensates() {
    let log = Log::default();
    let attempts = Arc::new(AtomicU32::new(0));
    let flaky = {
        let attempts = Arc::clone(&attempts);
        Step::new("flaky", move |_ctx| {
            let attempts = Arc::clone(&attempts);
            async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err(StepError::msg("not yet"))
            }
        })
        .retry(RetryPolicy::retries(3).fixed(Duration::from_secs(3600)))
    };
    let flow = Flow::<u64, ()>::builder("retrying")
        .then(log.undoable("a"))
        .then(flaky)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let token = CancellationToken::new();
    let owner = tokio::spawn({
        let flow = flow.clone();
        let options = RunOptions::key("k").cancellation(token.clone());
        async move { flow.run(1, options).await }
    });
    until("the first attempt", &attempts, 1).await;
    token.cancel();
    let result = ok(bounded("the cancelled run", owner)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(result.status, Status::Cancelled);
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(log.undone(), 1);
    assert_eq!(flow.store().get("retrying:k").await.ok(), Some(None));
}

// Defect 9: scoping is injective.

#[tokio::test]
async fn a_flow_name_with_a_colon_never_shares_a_record_with_another_flow() {
    let store = memory();
    let (refunds, orders) = (Log::default(), Log::default());
    let refund = Flow::<u64, String>::builder("orders:refund")
        .store(Arc::clone(&store))
        .then(refunds.step("refund"))
        .output(|_ctx| Ok("refund receipt".to_owned()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let order = Flow::<u64, String>::builder("orders")
        .store(Arc::clone(&store))
        .then(orders.step("charge"))
        .output(|_ctx| Ok("charge receipt".to_owned()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    ok(refund.run(1001, RunOptions::key("1001")).await);
    let charged = ok(order.run(1001, RunOptions::key("refund:1001")).await);
    assert!(!charged.replayed, "another flow's record was replayed");
    assert_eq!(charged.output.as_deref(), Some("charge receipt"));
    assert_eq!((refunds.runs(), orders.runs()), (1, 1));
}

// Defect 10: fingerprints that lie.

fn flow_of<I>(name: &str, log: &Log) -> Flow<I, ()>
where
    I: serde::Serialize + Send + Sync + 'static,
{
    let runs = Arc::clone(&log.runs);
    Flow::<I, ()>::builder(name)
        .step("effect", move |_ctx| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn nan_under_a_key_first_used_with_none_is_a_reused_key_not_a_replay() {
    let log = Log::default();
    let flow = flow_of::<Option<f64>>("amounts", &log);
    ok(flow.run(None, RunOptions::key("k")).await);
    let nan = flow.run(Some(f64::NAN), RunOptions::key("k")).await;
    assert!(
        matches!(
            nan,
            Err(RunError::Idempotency(IdempotencyError::KeyReused { .. }))
        ),
        "{nan:?}"
    );
    let infinite = flow.run(Some(f64::INFINITY), RunOptions::key("k")).await;
    assert!(matches!(
        infinite,
        Err(RunError::Idempotency(IdempotencyError::KeyReused { .. }))
    ));
    assert_eq!(log.runs(), 1);
}

#[tokio::test]
async fn negative_zero_replays_a_run_of_zero() {
    let log = Log::default();
    let flow = flow_of::<f64>("zero", &log);
    ok(flow.run(0.0, RunOptions::key("k")).await);
    let again = ok(flow.run(-0.0, RunOptions::key("k")).await);
    assert!(again.replayed);
    assert_eq!(log.runs(), 1);
}

#[tokio::test]
async fn inputs_with_128_bit_integers_run_and_replay() {
    let log = Log::default();
    let flow = flow_of::<u128>("wide", &log);
    ok(flow.run(u128::MAX, RunOptions::key("k")).await);
    assert!(ok(flow.run(u128::MAX, RunOptions::key("k")).await).replayed);
    let other = flow.run(u128::MAX - 1, RunOptions::key("k")).await;
    assert!(matches!(
        other,
        Err(RunError::Idempotency(IdempotencyError::KeyReused { .. }))
    ));
    assert_eq!(log.runs(), 1);
}

// Defect 7: cleanup reports what it removed.

#[tokio::test(start_paused = true)]
async fn memory_store_cleanup_returns_every_record_it_removed() {
    let store = MemoryStore::new();
    for i in 0..3 {
        let key = format!("k{i}");
        let started = store
            .start(orchestrix::store::StartRequest {
                key: &key,
                fingerprint: None,
                lease: Duration::from_secs(30),
                rerun_failed: false,
            })
            .await;
        let Ok(orchestrix::store::StartOutcome::Acquired(token)) = started else {
            panic!("acquire {key}: {started:?}");
        };
        assert!(
            store
                .complete(&key, token, b"x", Some(Duration::from_secs(1)))
                .await
                .is_ok()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.cleanup().await.ok(), Some(3));
    assert!(store.is_empty());
}

// Defect 12: a future dropped between admission and the heartbeat, or later.

#[tokio::test(start_paused = true)]
async fn a_run_dropped_before_any_step_completed_frees_its_key_at_once() {
    let store = memory();
    let (started, gate) = (Arc::new(AtomicU32::new(0)), Arc::new(Notify::new()));
    let flow = Flow::<u64, ()>::builder("dropped")
        .store(Arc::clone(&store))
        .then(gated("work", &started, &gate))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let lease = Duration::from_secs(5);
    // A caller's timeout drops the run as soon as it is admitted and its step started.
    let dropped = tokio::time::timeout(
        Duration::from_millis(1),
        flow.run(1, RunOptions::key("k").lease(lease)),
    )
    .await;
    assert!(
        dropped.is_err(),
        "the run should have been dropped by the timeout"
    );
    assert_eq!(started.load(Ordering::SeqCst), 1);
    // The guard releases the key in a task of its own: give it a turn, not a lease.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        store.get("dropped:k").await.ok(),
        Some(None),
        "nothing remained: key freed"
    );
    let retry = tokio::spawn({
        let flow = flow.clone();
        async move { flow.run(1, RunOptions::key("k").lease(lease)).await }
    });
    until("the retry to start", &started, 2).await;
    gate.notify_waiters();
    let retried = ok(bounded("the retry", retry)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(retried.status, Status::Completed);
}

#[tokio::test(start_paused = true)]
async fn a_run_dropped_after_a_step_completed_keeps_its_outcome_and_never_reruns_it() {
    let store = memory();
    let log = Log::default();
    let (started, gate) = (Arc::new(AtomicU32::new(0)), Arc::new(Notify::new()));
    let flow = Flow::<u64, ()>::builder("dropped")
        .store(Arc::clone(&store))
        .then(log.step("charge"))
        .then(gated("ship", &started, &gate))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let dropped =
        tokio::time::timeout(Duration::from_millis(1), flow.run(1, RunOptions::key("k"))).await;
    assert!(dropped.is_err());
    tokio::time::sleep(Duration::from_millis(1)).await;
    let record = store.get("dropped:k").await.ok().flatten();
    assert_eq!(record.map(|r| r.status), Some(RecordStatus::Failed));
    let retry = ok(bounded("the retry", flow.run(1, RunOptions::key("k"))).await);
    assert!(retry.replayed);
    assert_eq!(retry.status, Status::Cancelled);
    assert_eq!(
        retry.step("charge").map(|s| s.status),
        Some(Status::Completed)
    );
    assert_eq!(log.runs(), 1, "charge never runs twice");
}

#[tokio::test(start_paused = true)]
async fn a_crashed_run_holds_its_key_for_one_lease_at_most() {
    let store = memory();
    let (started, gate) = (Arc::new(AtomicU32::new(0)), Arc::new(Notify::new()));
    let flow = Flow::<u64, ()>::builder("crashed")
        .store(Arc::clone(&store))
        .then(gated("work", &started, &gate))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let lease = Duration::from_secs(5);
    // A crash: the run is never polled again and never dropped, so nothing settles it.
    let mut run = Box::pin(flow.run(1, RunOptions::key("k").lease(lease)));
    let _ = tokio::time::timeout(Duration::from_millis(1), &mut run).await;
    std::mem::forget(run);
    let record = store.get("crashed:k").await.ok().flatten();
    assert_eq!(record.map(|r| r.status), Some(RecordStatus::Running));
    tokio::time::sleep(lease).await;
    assert_eq!(
        store.get("crashed:k").await.ok(),
        Some(None),
        "free after one lease"
    );
}
