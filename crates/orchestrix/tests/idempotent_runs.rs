//! Idempotent runs: every row of the decision table, leases and fencing, bad input, and a
//! duplicate storm — on the in-memory store.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrix::idempotency::{IdempotencyError, KeyError, OnRunning};
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, MemoryStore, Record, StartOutcome, StartRequest,
    StoreError,
};
use orchestrix::{
    CancellationToken, Fingerprint, Flow, FlowError, KeyScope, RunError, RunOptions, Status,
    StepError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Payment {
    order: String,
    cents: u64,
}

fn payment(cents: u64) -> Payment {
    Payment {
        order: "order_123".into(),
        cents,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Receipt {
    id: String,
    cents: u64,
}

/// Counts executions of the flow's side effect; the step fails when `cents == 0`
/// (transiently when `cents == 1`), and waits for `gate` when one is given.
#[derive(Clone, Default)]
struct Charges {
    count: Arc<AtomicU32>,
    gate: Option<Arc<Notify>>,
    saw_cancel: Arc<AtomicU32>,
}

impl Charges {
    fn gated() -> Self {
        Self {
            gate: Some(Arc::new(Notify::new())),
            ..Self::default()
        }
    }

    fn count(&self) -> u32 {
        self.count.load(Ordering::SeqCst)
    }

    fn open(&self) {
        if let Some(gate) = &self.gate {
            gate.notify_waiters();
        }
    }

    fn flow(&self, store: Arc<dyn IdempotencyStore>) -> Flow<Payment, Receipt> {
        let charges = self.clone();
        let built = Flow::<Payment, Receipt>::builder("payment")
            .store(store)
            .step("charge", move |ctx| {
                let charges = charges.clone();
                async move {
                    charges.count.fetch_add(1, Ordering::SeqCst);
                    if let Some(gate) = &charges.gate {
                        tokio::select! {
                            () = gate.notified() => {}
                            () = ctx.cancellation().cancelled() => {
                                charges.saw_cancel.fetch_add(1, Ordering::SeqCst);
                                return Err(StepError::msg("cancelled"));
                            }
                        }
                    }
                    match ctx.input().cents {
                        0 => Err(StepError::msg("card declined")),
                        1 => Err(StepError::msg("gateway timeout").transient()),
                        cents => {
                            ctx.set("receipt", format!("rcpt-{}-{cents}", ctx.input().order))?;
                            Ok(())
                        }
                    }
                }
            })
            .output(|ctx| {
                Ok(Receipt {
                    id: ctx.get("receipt")?.unwrap_or_default(),
                    cents: ctx.input().cents,
                })
            })
            .build();
        match built {
            Ok(flow) => flow,
            Err(e) => panic!("build failed: {e}"),
        }
    }
}

fn memory() -> Arc<dyn IdempotencyStore> {
    Arc::new(MemoryStore::new())
}

async fn ok<O: std::fmt::Debug>(
    r: Result<orchestrix::FlowResult<O>, RunError<O>>,
) -> orchestrix::FlowResult<O> {
    match r {
        Ok(result) => result,
        Err(e) => panic!("run failed: {e:?}"),
    }
}

/// Acquires `payment:k` for `input` straight from the store, as another owner would.
async fn acquire_directly(store: &Arc<dyn IdempotencyStore>, input: &Payment) -> FencingToken {
    let fp = orchestrix::fingerprint_of(input).ok();
    let acquired = store
        .start(StartRequest {
            key: "payment:k",
            fingerprint: fp.as_deref(),
            lease: Duration::from_secs(30),
            rerun_failed: false,
        })
        .await;
    match acquired {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

/// Waits until the gated step has started `n` times in total.
async fn until_started(charges: &Charges, n: u32) {
    bounded("the gated step to start", async {
        while charges.count() < n {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

/// Awaits `fut`, failing with `what` after a minute of tokio's clock: a regression (a run
/// that is never cancelled, a gate never reached) is a named failure, not a hung test.
/// Under a paused clock the bound is reached as soon as nothing else can happen.
async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(60), fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after 60 s"),
    }
}

#[tokio::test]
async fn a_completed_run_is_replayed_without_running_a_step() {
    let charges = Charges::default();
    let flow = charges.flow(memory());
    let first = ok(flow.run(payment(4200), RunOptions::key("k")).await).await;
    let second = ok(flow.run(payment(4200), RunOptions::key("k")).await).await;
    assert_eq!(charges.count(), 1);
    assert!(!first.replayed);
    assert!(second.replayed);
    assert_eq!(second.status, Status::Completed);
    assert_eq!(second.output, first.output);
    assert_eq!(second.steps, first.steps);
    assert_eq!(
        second.output.map(|r| r.id),
        Some("rcpt-order_123-4200".to_owned())
    );
}

#[tokio::test]
async fn a_cached_failure_is_replayed_when_cache_result_is_true() {
    let charges = Charges::default();
    let flow = charges.flow(memory());
    let first = ok(flow.run(payment(0), RunOptions::key("k")).await).await;
    let second = ok(flow.run(payment(0), RunOptions::key("k")).await).await;
    assert_eq!(charges.count(), 1);
    assert_eq!(first.status, Status::Failed);
    assert!(second.replayed);
    assert_eq!(second.status, Status::Failed);
    assert_eq!(second.error, first.error);
}

#[tokio::test]
async fn a_failure_reruns_when_cache_result_is_false() {
    let charges = Charges::default();
    let store = memory();
    let flow = charges.flow(Arc::clone(&store));
    // A failure cached by an earlier run is re-run by a caller that does not cache.
    ok(flow.run(payment(0), RunOptions::key("k")).await).await;
    let rerun = ok(flow
        .run(payment(0), RunOptions::key("k").cache_result(false))
        .await)
    .await;
    assert!(!rerun.replayed);
    assert_eq!(charges.count(), 2);
    // And without caching, the failure is not kept at all.
    assert_eq!(store.get("payment:k").await.ok(), Some(None));
}

#[tokio::test]
async fn a_completed_run_without_cache_result_leaves_no_record() {
    let charges = Charges::default();
    let store = memory();
    let flow = charges.flow(Arc::clone(&store));
    let options = || RunOptions::key("k").cache_result(false);
    ok(flow.run(payment(4200), options()).await).await;
    assert_eq!(store.get("payment:k").await.ok(), Some(None));
    let again = ok(flow.run(payment(4200), options()).await).await;
    assert!(!again.replayed);
    assert_eq!(charges.count(), 2);
}

#[tokio::test]
async fn a_duplicate_while_running_gets_a_running_result_by_default() {
    let charges = Charges::gated();
    let flow = charges.flow(memory());
    let owner = tokio::spawn({
        let flow = flow.clone();
        async move { flow.run(payment(4200), RunOptions::key("k")).await }
    });
    until_started(&charges, 1).await;
    let dup = ok(flow.run(payment(4200), RunOptions::key("k")).await).await;
    assert_eq!(dup.status, Status::Running);
    assert!(!dup.replayed);
    assert_eq!(dup.output, None);
    charges.open();
    let owned = bounded("owner", owner).await.ok().and_then(Result::ok);
    assert_eq!(owned.map(|r| r.status), Some(Status::Completed));
    assert_eq!(charges.count(), 1);
}

#[tokio::test]
async fn a_duplicate_while_running_errors_with_throw_if_running() {
    let charges = Charges::gated();
    let flow = charges.flow(memory());
    let owner = tokio::spawn({
        let flow = flow.clone();
        async move { flow.run(payment(4200), RunOptions::key("k")).await }
    });
    until_started(&charges, 1).await;
    let dup = flow
        .run(payment(4200), RunOptions::key("k").throw_if_running(true))
        .await;
    assert!(matches!(
        dup,
        Err(RunError::Idempotency(IdempotencyError::AlreadyRunning { ref key })) if key == "payment:k"
    ));
    charges.open();
    let _ = bounded("owner", owner).await;
    assert_eq!(charges.count(), 1);
}

#[tokio::test]
async fn a_waiting_duplicate_receives_the_owners_result() {
    let charges = Charges::gated();
    let flow = charges.flow(memory());
    let owner = tokio::spawn({
        let flow = flow.clone();
        async move { flow.run(payment(4200), RunOptions::key("k")).await }
    });
    until_started(&charges, 1).await;
    let wait = OnRunning::Wait {
        timeout: Duration::from_secs(30),
    };
    let waiter = tokio::spawn({
        let flow = flow.clone();
        async move {
            flow.run(payment(4200), RunOptions::key("k").on_running(wait))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    charges.open();
    let owned = ok(bounded("owner", owner)
        .await
        .unwrap_or_else(|e| panic!("{e}")))
    .await;
    let waited = ok(bounded("waiter", waiter)
        .await
        .unwrap_or_else(|e| panic!("{e}")))
    .await;
    assert!(waited.replayed);
    assert_eq!(waited.status, Status::Completed);
    assert_eq!(waited.output, owned.output);
    assert_eq!(charges.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_gives_up_after_its_timeout() {
    let charges = Charges::gated();
    let flow = charges.flow(memory());
    let _owner = tokio::spawn({
        let flow = flow.clone();
        async move { flow.run(payment(4200), RunOptions::key("k")).await }
    });
    until_started(&charges, 1).await;
    let wait = OnRunning::Wait {
        timeout: Duration::from_secs(2),
    };
    let waited = flow
        .run(payment(4200), RunOptions::key("k").on_running(wait))
        .await;
    assert!(matches!(
        waited,
        Err(RunError::Idempotency(IdempotencyError::WaitTimedOut { .. }))
    ));
    assert_eq!(charges.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_owners_key_is_taken_over_after_its_lease() {
    let store = memory();
    let charges = Charges::default();
    let flow = charges.flow(Arc::clone(&store));
    // An owner acquires the key and dies without renewing or finishing.
    let stale = acquire_directly(&store, &payment(4200)).await;
    let early = ok(flow.run(payment(4200), RunOptions::key("k")).await).await;
    assert_eq!(early.status, Status::Running);
    tokio::time::sleep(Duration::from_secs(31)).await;
    let taken_over = ok(flow.run(payment(4200), RunOptions::key("k")).await).await;
    assert_eq!(taken_over.status, Status::Completed);
    assert!(!taken_over.replayed);
    assert_eq!(charges.count(), 1);
    // The dead owner's late write is fenced off.
    let late = store.complete("payment:k", stale, b"stale", None).await;
    assert!(matches!(late, Err(StoreError::StaleToken)));
    let replay = ok(flow.run(payment(4200), RunOptions::key("k")).await).await;
    assert_eq!(replay.output, taken_over.output);
}

#[tokio::test(start_paused = true)]
async fn the_heartbeat_keeps_a_run_longer_than_its_lease_exclusive() {
    let charges = Charges::gated();
    let flow = charges.flow(memory());
    let lease = Duration::from_secs(10);
    let owner = tokio::spawn({
        let flow = flow.clone();
        async move {
            flow.run(payment(4200), RunOptions::key("k").lease(lease))
                .await
        }
    });
    until_started(&charges, 1).await;
    for _ in 0..6 {
        // Well past several leases: the owner's heartbeat keeps the key.
        tokio::time::sleep(Duration::from_secs(25)).await;
        let dup = ok(flow
            .run(payment(4200), RunOptions::key("k").lease(lease))
            .await)
        .await;
        assert_eq!(dup.status, Status::Running);
    }
    charges.open();
    let owned = bounded("owner", owner).await.ok().and_then(Result::ok);
    assert_eq!(owned.map(|r| r.status), Some(Status::Completed));
    assert_eq!(charges.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn losing_the_lease_cancels_the_run_and_still_returns_its_result() {
    let store = memory();
    let charges = Charges::gated();
    let flow = charges.flow(Arc::clone(&store));
    let owner = tokio::spawn({
        let flow = flow.clone();
        async move {
            flow.run(
                payment(4200),
                RunOptions::key("k").lease(Duration::from_secs(3)),
            )
            .await
        }
    });
    until_started(&charges, 1).await;
    // Someone removes the record (an operator, or an expiry the owner missed): the next
    // renewal is refused and the run learns it no longer owns the key.
    assert!(store.delete("payment:k").await.is_ok());
    let outcome = bounded("owner", owner)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(charges.saw_cancel.load(Ordering::SeqCst), 1);
    match outcome {
        Err(RunError::NotPersisted { result, source }) => {
            assert!(matches!(source, StoreError::StaleToken));
            assert_eq!(result.status, Status::Cancelled);
        }
        other => panic!("expected NotPersisted with the result, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reused_key_with_a_different_input_is_rejected_and_runs_nothing() {
    let charges = Charges::default();
    let flow = charges.flow(memory());
    ok(flow.run(payment(4200), RunOptions::key("k")).await).await;
    let reused = flow.run(payment(9900), RunOptions::key("k")).await;
    assert!(matches!(
        reused,
        Err(RunError::Idempotency(IdempotencyError::KeyReused { ref key })) if key == "payment:k"
    ));
    assert_eq!(charges.count(), 1);
}

#[tokio::test]
async fn with_fingerprints_off_any_input_replays_the_key() {
    let charges = Charges::default();
    let count = Arc::clone(&charges.count);
    let flow = Flow::<Payment, ()>::builder("nofp")
        .step("charge", move |_ctx| {
            let count = Arc::clone(&count);
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .fingerprint(Fingerprint::Off)
        .build();
    let Ok(flow) = flow else { panic!("build") };
    ok(flow.run(payment(1), RunOptions::key("k")).await).await;
    let second = ok(flow.run(payment(2), RunOptions::key("k")).await).await;
    assert!(second.replayed);
    assert_eq!(charges.count(), 1);
}

#[tokio::test]
async fn a_custom_fingerprint_decides_what_counts_as_the_same_input() {
    let count = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&count);
    let flow = Flow::<Payment, ()>::builder("customfp")
        .step("charge", move |_ctx| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .fingerprint(Fingerprint::custom(|p: &Payment| p.order.clone()))
        .build();
    let Ok(flow) = flow else { panic!("build") };
    ok(flow.run(payment(1), RunOptions::key("k")).await).await;
    // Same order, different amount: the same operation under this fingerprint.
    assert!(
        ok(flow.run(payment(2), RunOptions::key("k")).await)
            .await
            .replayed
    );
    let other_order = Payment {
        order: "order_999".into(),
        cents: 1,
    };
    assert!(flow.run(other_order, RunOptions::key("k")).await.is_err());
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn cancellation_releases_the_key() {
    let store = memory();
    let charges = Charges::gated();
    let flow = charges.flow(Arc::clone(&store));
    let token = CancellationToken::new();
    let owner = tokio::spawn({
        let flow = flow.clone();
        let token = token.clone();
        async move {
            flow.run(payment(4200), RunOptions::key("k").cancellation(token))
                .await
        }
    });
    until_started(&charges, 1).await;
    token.cancel();
    let cancelled = bounded("owner", owner).await.ok().and_then(Result::ok);
    assert_eq!(cancelled.map(|r| r.status), Some(Status::Cancelled));
    assert_eq!(store.get("payment:k").await.ok(), Some(None));
    // The operation did not happen: the next caller runs it.
    let again = tokio::spawn({
        let flow = flow.clone();
        async move { flow.run(payment(4200), RunOptions::key("k")).await }
    });
    until_started(&charges, 2).await;
    charges.open();
    let again = bounded("again", again).await.ok().and_then(Result::ok);
    assert_eq!(
        again.map(|r| (r.status, r.replayed)),
        Some((Status::Completed, false))
    );
}

#[tokio::test]
async fn a_run_cancelled_before_its_first_step_frees_the_key() {
    let store = memory();
    let charges = Charges::default();
    let flow = charges.flow(Arc::clone(&store));
    let token = CancellationToken::new();
    token.cancel();
    let result = ok(flow
        .run(payment(4200), RunOptions::key("k").cancellation(token))
        .await)
    .await;
    assert_eq!(result.status, Status::Cancelled);
    assert_eq!(result.error, Some(FlowError::Cancelled));
    assert_eq!(charges.count(), 0);
    assert_eq!(store.get("payment:k").await.ok(), Some(None));
}

#[tokio::test]
async fn a_transient_step_error_releases_the_key_for_a_retry() {
    let store = memory();
    let charges = Charges::default();
    let flow = charges.flow(Arc::clone(&store));
    let first = ok(flow.run(payment(1), RunOptions::key("k")).await).await;
    assert_eq!(first.status, Status::Failed);
    assert!(first.error.as_ref().is_some_and(FlowError::is_transient));
    assert_eq!(store.get("payment:k").await.ok(), Some(None));
    let retried = ok(flow.run(payment(1), RunOptions::key("k")).await).await;
    assert!(!retried.replayed);
    assert_eq!(charges.count(), 2);
}

#[tokio::test]
async fn keys_are_scoped_by_flow_name_unless_global() {
    let store = memory();
    let a = Charges::default();
    let b = Charges::default();
    let flow_a = a.flow(Arc::clone(&store));
    let flow_b = Flow::<Payment, Receipt>::builder("refund")
        .store(Arc::clone(&store))
        .step("count", {
            let count = Arc::clone(&b.count);
            move |_ctx| {
                let count = Arc::clone(&count);
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        })
        .build();
    let Ok(flow_b) = flow_b else { panic!("build") };
    ok(flow_a.run(payment(4200), RunOptions::key("k")).await).await;
    let other_flow = ok(flow_b.run(payment(4200), RunOptions::key("k")).await).await;
    assert!(!other_flow.replayed, "same key, other flow: its own record");
    assert_eq!((a.count(), b.count()), (1, 1));
    let global = || RunOptions::key("shared").scope(KeyScope::Global);
    ok(flow_a.run(payment(4200), global()).await).await;
    let seen = ok(flow_b.run(payment(4200), global()).await).await;
    assert!(seen.replayed, "a global key is shared across flows");
    assert_eq!(b.count(), 1);
    assert!(store.get("shared").await.ok().flatten().is_some());
}

#[tokio::test]
async fn bad_keys_and_durations_are_typed_errors_and_run_nothing() {
    let charges = Charges::default();
    let store = CountingStore::default();
    let flow = charges.flow(Arc::new(store.clone()));
    type Expected = fn(&IdempotencyError) -> bool;
    let cases: Vec<(RunOptions, Expected)> = vec![
        (RunOptions::key(""), |e| {
            matches!(e, IdempotencyError::InvalidKey(KeyError::Empty))
        }),
        (RunOptions::key("k".repeat(1025)), |e| {
            matches!(
                e,
                IdempotencyError::InvalidKey(KeyError::TooLong { len: 1025 })
            )
        }),
        (RunOptions::key("a\u{0}b"), |e| {
            matches!(
                e,
                IdempotencyError::InvalidKey(KeyError::ControlCharacter { at: 1 })
            )
        }),
        (
            RunOptions::key("k").ttl(Duration::ZERO),
            |e| matches!(e, IdempotencyError::InvalidOption(o) if o.option == "ttl"),
        ),
        (
            RunOptions::key("k").ttl(Duration::from_secs(u64::MAX)),
            |e| matches!(e, IdempotencyError::InvalidOption(o) if o.option == "ttl"),
        ),
        (
            RunOptions::key("k").lease(Duration::ZERO),
            |e| matches!(e, IdempotencyError::InvalidOption(o) if o.option == "lease"),
        ),
        (
            RunOptions::key("k").lease(Duration::from_secs(10 * 24 * 3600)),
            |e| matches!(e, IdempotencyError::InvalidOption(o) if o.option == "lease"),
        ),
        (
            RunOptions::key("k").on_running(OnRunning::Wait {
                timeout: Duration::ZERO,
            }),
            |e| matches!(e, IdempotencyError::InvalidOption(o) if o.option == "wait timeout"),
        ),
    ];
    for (options, expected) in cases {
        let described = format!("{options:?}");
        match flow.run(payment(4200), options).await {
            Err(RunError::Idempotency(e)) => assert!(expected(&e), "{described}: got {e}"),
            other => panic!("{described}: expected a typed error, got {other:?}"),
        }
    }
    assert_eq!(charges.count(), 0);
    assert_eq!(store.calls(), 0, "the store was never touched");
}

#[tokio::test]
async fn runs_without_a_key_never_touch_the_store() {
    let charges = Charges::default();
    let store = CountingStore::default();
    let flow = charges.flow(Arc::new(store.clone()));
    ok(flow.run(payment(4200), RunOptions::new()).await).await;
    ok(flow.run(payment(4200), RunOptions::new()).await).await;
    assert_eq!(charges.count(), 2);
    assert_eq!(store.calls(), 0);
}

#[tokio::test]
async fn validation_runs_before_the_store_is_touched() {
    let store = CountingStore::default();
    let flow = Flow::<Payment, ()>::builder("validated")
        .store(Arc::new(store.clone()))
        .step("charge", |_ctx| async { Ok(()) })
        .validate(|p: &Payment| {
            if p.cents == 0 {
                Err(vec!["amount must be positive"])
            } else {
                Ok(())
            }
        })
        .build();
    let Ok(flow) = flow else { panic!("build") };
    let result = ok(flow.run(payment(0), RunOptions::key("k")).await).await;
    assert!(matches!(result.error, Some(FlowError::Validation { .. })));
    assert_eq!(store.calls(), 0);
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_and_runs_nothing() {
    let charges = Charges::default();
    let store = CountingStore::default();
    store.fail_all(true);
    let flow = charges.flow(Arc::new(store.clone()));
    let outcome = flow.run(payment(4200), RunOptions::key("k")).await;
    assert!(matches!(
        outcome,
        Err(RunError::Idempotency(IdempotencyError::Store(
            StoreError::Backend(_)
        )))
    ));
    assert_eq!(charges.count(), 0);
}

#[tokio::test]
async fn an_undecodable_stored_result_is_a_typed_error_and_runs_nothing() {
    let store = memory();
    let charges = Charges::default();
    let flow = charges.flow(Arc::clone(&store));
    let token = acquire_directly(&store, &payment(4200)).await;
    assert!(
        store
            .complete("payment:k", token, b"\xff not json", None)
            .await
            .is_ok()
    );
    let outcome = flow.run(payment(4200), RunOptions::key("k")).await;
    assert!(matches!(
        outcome,
        Err(RunError::Idempotency(IdempotencyError::Store(
            StoreError::Decode(_)
        )))
    ));
    assert_eq!(charges.count(), 0);
}

#[tokio::test]
async fn a_result_that_cannot_be_persisted_still_reaches_the_caller() {
    let charges = Charges::default();
    let store = CountingStore::default();
    store.fail_writes(true);
    let flow = charges.flow(Arc::new(store.clone()));
    let outcome = flow.run(payment(4200), RunOptions::key("k")).await;
    match outcome {
        Err(RunError::NotPersisted { result, source }) => {
            assert!(matches!(source, StoreError::Backend(_)));
            assert_eq!(result.status, Status::Completed);
            assert_eq!(result.output.map(|r| r.cents), Some(4200));
        }
        other => panic!("expected NotPersisted, got {other:?}"),
    }
    assert_eq!(charges.count(), 1);
    // The key is not left runnable: the record still holds it (running, leased).
    store.fail_writes(false);
    let dup = ok(flow.run(payment(4200), RunOptions::key("k")).await).await;
    assert_eq!(dup.status, Status::Running);
    assert_eq!(charges.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_duplicates_executes_each_key_exactly_once() {
    const KEYS: usize = 1000;
    const CALLERS: usize = 20;
    let executions = Arc::new(Mutex::new(vec![0u32; KEYS]));
    let log = Arc::clone(&executions);
    let flow = Flow::<usize, usize>::builder("storm")
        .step("effect", move |ctx| {
            let log = Arc::clone(&log);
            async move {
                log.lock().map_err(|_| StepError::msg("poisoned"))?[*ctx.input()] += 1;
                tokio::task::yield_now().await;
                Ok(())
            }
        })
        .output(|ctx| Ok(*ctx.input()))
        .build();
    let Ok(flow) = flow else { panic!("build") };
    let wait = OnRunning::Wait {
        timeout: Duration::from_secs(30),
    };
    let mut tasks = Vec::with_capacity(KEYS * CALLERS);
    for caller in 0..CALLERS {
        for key in 0..KEYS {
            let flow = flow.clone();
            // Half the callers wait for the owner, half get `Running` at once.
            let options = RunOptions::key(format!("key-{key}"));
            let options = if caller % 2 == 0 {
                options.on_running(wait)
            } else {
                options
            };
            tasks.push(tokio::spawn(
                async move { (key, flow.run(key, options).await) },
            ));
        }
    }
    let completed = AtomicUsize::new(0);
    for task in tasks {
        let (key, outcome) = bounded("task", task)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        match outcome {
            Ok(r) if r.status == Status::Completed => {
                assert_eq!(r.output, Some(key));
                completed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => assert_eq!(r.status, Status::Running),
            Err(e) => panic!("run failed: {e}"),
        }
    }
    let executions = executions.lock().map(|e| e.clone()).unwrap_or_default();
    assert_eq!(executions.iter().map(|&n| n as usize).sum::<usize>(), KEYS);
    assert!(
        executions.iter().all(|&n| n == 1),
        "some key ran twice or never"
    );
    assert!(completed.load(Ordering::Relaxed) >= KEYS * CALLERS / 2);
}

/// A memory store behind switches that make it fail, counting the calls that reach it.
/// A stand-in for an unreachable backend; real backends are tested in their own crates.
#[derive(Debug, Clone, Default)]
struct CountingStore {
    inner: Arc<MemoryStore>,
    calls: Arc<AtomicUsize>,
    fail_all: Arc<std::sync::atomic::AtomicBool>,
    fail_writes: Arc<std::sync::atomic::AtomicBool>,
}

impl CountingStore {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn fail_all(&self, on: bool) {
        self.fail_all.store(on, Ordering::SeqCst);
    }
    fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }
    fn check(&self, write: bool) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_all.load(Ordering::SeqCst)
            || (write && self.fail_writes.load(Ordering::SeqCst))
        {
            Err(StoreError::backend_msg("connection refused"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl IdempotencyStore for CountingStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.check(false)?;
        self.inner.get(key).await
    }
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        self.check(false)?;
        self.inner.start(req).await
    }
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.check(true)?;
        self.inner.finish(key, token, status, result, ttl).await
    }
    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.check(false)?;
        self.inner.renew(key, token, lease).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.check(true)?;
        self.inner.release(key, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.check(true)?;
        self.inner.delete(key).await
    }
}
