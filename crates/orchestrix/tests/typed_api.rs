//! The typed surface a caller works with: a step's own error type in the result, typed
//! state keys, records reached by the caller's key, async and structured validation.
//! Step closures here carry no type annotations: the flow's input type and the step's
//! error type are inferred.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use orchestrix::store::{IdempotencyStore, MemoryStore, RecordStatus};
use orchestrix::validation::Issue;
use orchestrix::{Flow, FlowError, IdempotencyError, RunOptions, StateKey, Status, StepError};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum PaymentError {
    #[error("card declined")]
    Declined,
    #[error("gateway unreachable")]
    Unreachable,
}

/// An error that wraps another, to find the inner one through the source chain.
#[derive(Debug, thiserror::Error)]
#[error("charge failed")]
struct ChargeFailed(#[source] PaymentError);

fn declining(store: Arc<dyn IdempotencyStore>) -> Flow<u64, String> {
    let built = Flow::<u64, String>::builder("billing")
        .store(store)
        .step("charge", |ctx| async move {
            if *ctx.input() > 100 {
                Err(PaymentError::Declined)?;
            }
            Ok(())
        })
        .output(|_| Ok("ok".to_owned()))
        .build();
    built.unwrap_or_else(|e| panic!("the flow builds: {e}"))
}

#[tokio::test]
async fn a_failed_steps_own_error_is_typed_in_the_live_result() {
    let flow = declining(Arc::new(MemoryStore::new()));
    let result = flow.run(4200, RunOptions::new()).await;
    let error = result.ok().and_then(|r| r.error);
    assert_eq!(
        error
            .as_ref()
            .and_then(FlowError::step_error::<PaymentError>),
        Some(&PaymentError::Declined)
    );
    assert!(
        error
            .as_ref()
            .and_then(FlowError::step_error::<std::io::Error>)
            .is_none()
    );
    // The standard source chain reaches it too.
    let source = error
        .as_ref()
        .and_then(|e| std::error::Error::source(e))
        .map(ToString::to_string);
    assert_eq!(source.as_deref(), Some("card declined"));
}

#[tokio::test]
async fn step_error_finds_the_type_anywhere_in_the_source_chain() {
    let flow = Flow::<u64>::builder("billing")
        .step("charge", |_ctx| async {
            Err(StepError::new(ChargeFailed(PaymentError::Unreachable)).transient())
        })
        .build();
    let flow = flow.unwrap_or_else(|e| panic!("{e}"));
    let error = flow
        .run(1, RunOptions::new())
        .await
        .ok()
        .and_then(|r| r.error);
    assert!(error.as_ref().is_some_and(FlowError::is_transient));
    assert_eq!(
        error
            .as_ref()
            .and_then(FlowError::step_error::<PaymentError>),
        Some(&PaymentError::Unreachable)
    );
    assert!(
        error
            .as_ref()
            .and_then(FlowError::step_error::<ChargeFailed>)
            .is_some()
    );
}

#[tokio::test]
async fn a_replayed_failure_keeps_the_message_but_not_the_type() {
    let flow = declining(Arc::new(MemoryStore::new()));
    let first = flow.run(4200, RunOptions::key("order-1")).await.ok();
    let replay = flow.run(4200, RunOptions::key("order-1")).await.ok();
    assert_eq!(replay.as_ref().map(|r| r.replayed), Some(true));
    let live = first.and_then(|r| r.error);
    let stored = replay.and_then(|r| r.error);
    // Equal as stored: the source is not part of equality.
    assert_eq!(live, stored);
    assert!(
        matches!(&stored, Some(FlowError::Step { message, source: None, .. }) if message == "card declined")
    );
    assert_eq!(
        stored
            .as_ref()
            .and_then(FlowError::step_error::<PaymentError>),
        None
    );
}

const RESERVATION: StateKey<String> = StateKey::new("reservation");
const QUANTITY: StateKey<u32> = StateKey::new("quantity");

#[tokio::test]
async fn typed_state_keys_carry_values_between_steps() {
    let flow = Flow::<u32, String>::builder("stock")
        .step("reserve", |ctx| async move {
            ctx.put(QUANTITY, *ctx.input())?;
            ctx.put(RESERVATION, format!("rsv-{}", ctx.input()))?;
            Ok(())
        })
        .step("check", |ctx| async move {
            let quantity = ctx.get(QUANTITY)?.unwrap_or_default();
            if quantity == 0 || !ctx.has(RESERVATION) {
                return Err(StepError::msg("nothing reserved"));
            }
            Ok(())
        })
        .output(|ctx| Ok(ctx.get(RESERVATION)?.unwrap_or_default()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let result = flow.run(3, RunOptions::new()).await.ok();
    assert_eq!(
        result.and_then(|r| r.output).as_deref(),
        Some("rsv-3"),
        "the typed values went through"
    );
}

#[tokio::test]
async fn a_typed_key_and_the_string_form_share_the_value() {
    let ctx = orchestrix::Context::new(());
    assert!(ctx.set("quantity", 7u32).is_ok());
    assert_eq!(ctx.get(QUANTITY).ok().flatten(), Some(7));
    assert!(ctx.put(QUANTITY, 8).is_ok());
    assert_eq!(ctx.get::<u32>("quantity").ok().flatten(), Some(8));
    // The string form with an owned name still works.
    assert_eq!(
        ctx.get::<u32>(String::from("quantity")).ok().flatten(),
        Some(8)
    );
    // A value of another type under the same name is a typed error, not a wrong value.
    assert!(ctx.set("reservation", 5).is_ok());
    assert!(ctx.get(RESERVATION).is_err());
}

#[tokio::test]
async fn record_reads_a_finished_run_by_the_callers_key_with_its_replay() {
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::new());
    let flow = declining(Arc::clone(&store));
    assert!(flow.run(7, RunOptions::key("order-7")).await.is_ok());
    let record = flow.record("order-7").await;
    let Ok(Some(record)) = record else {
        panic!("the record is found: {record:?}")
    };
    assert_eq!(record.status, RecordStatus::Completed);
    assert_eq!(record.stored_key, "billing:order-7");
    assert!(record.fingerprint.is_some());
    let replay = record.replay.and_then(Result::ok);
    assert_eq!(
        replay.map(|r| (r.status, r.replayed, r.output)),
        Some((Status::Completed, true, Some("ok".to_owned())))
    );
    // The store holds it under the flow's own scoping.
    assert!(matches!(store.get("billing:order-7").await, Ok(Some(_))));
}

#[tokio::test]
async fn record_of_a_failed_run_replays_the_failure() {
    let flow = declining(Arc::new(MemoryStore::new()));
    assert!(flow.run(700, RunOptions::key("order-8")).await.is_ok());
    let record = flow.record("order-8").await.ok().flatten();
    assert_eq!(
        record.as_ref().map(|r| r.status),
        Some(RecordStatus::Failed)
    );
    let replay = record.and_then(|r| r.replay).and_then(Result::ok);
    assert_eq!(replay.map(|r| r.status), Some(Status::Failed));
}

#[tokio::test]
async fn record_of_a_key_never_run_is_none_and_a_bad_key_is_refused() {
    let flow = declining(Arc::new(MemoryStore::new()));
    assert!(matches!(flow.record("never").await, Ok(None)));
    assert!(matches!(
        flow.record("").await,
        Err(IdempotencyError::InvalidKey(_))
    ));
    assert!(matches!(
        flow.forget("bad\nkey").await,
        Err(IdempotencyError::InvalidKey(_))
    ));
}

#[tokio::test]
async fn record_of_a_running_key_has_no_replay() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let flow = {
        let (gate, started) = (Arc::clone(&gate), Arc::clone(&started));
        Flow::<u64>::builder("slow")
            .step("wait", move |_ctx| {
                let (gate, started) = (Arc::clone(&gate), Arc::clone(&started));
                async move {
                    started.notify_one();
                    gate.notified().await;
                    Ok(())
                }
            })
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let owner = tokio::spawn({
        let flow = flow.clone();
        async move { flow.run(1, RunOptions::key("k")).await.is_ok() }
    });
    started.notified().await;
    let record = flow.record("k").await.ok().flatten();
    assert_eq!(
        record.as_ref().map(|r| r.status),
        Some(RecordStatus::Running)
    );
    assert!(record.is_some_and(|r| r.replay.is_none()));
    gate.notify_one();
    assert!(owner.await.unwrap_or(false));
}

#[tokio::test]
async fn forget_deletes_the_record_so_the_key_runs_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let flow = {
        let runs = Arc::clone(&runs);
        Flow::<u64>::builder("once")
            .step("count", move |_ctx| {
                let runs = Arc::clone(&runs);
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    for _ in 0..2 {
        assert!(flow.run(1, RunOptions::key("k")).await.is_ok());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(flow.forget("k").await.is_ok());
    assert!(matches!(flow.record("k").await, Ok(None)));
    assert!(flow.run(1, RunOptions::key("k")).await.is_ok());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // Forgetting a key nobody holds is not an error.
    assert!(flow.forget("nobody").await.is_ok());
}

#[tokio::test]
async fn records_of_two_flows_on_one_store_stay_apart() {
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::new());
    let billing = declining(Arc::clone(&store));
    let other = Flow::<u64, String>::builder("orders:refund")
        .store(Arc::clone(&store))
        .step("noop", |_ctx| async { Ok(()) })
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(billing.run(1, RunOptions::key("k")).await.is_ok());
    assert!(matches!(other.record("k").await, Ok(None)));
    assert!(other.run(1, RunOptions::key("k")).await.is_ok());
    let scoped = other.record("k").await.ok().flatten().map(|r| r.stored_key);
    assert_eq!(scoped.as_deref(), Some("orders%3Arefund:k"));
    assert!(other.forget("k").await.is_ok());
    assert!(matches!(billing.record("k").await, Ok(Some(_))));
}

/// A flow whose one step counts its runs, validated by `build`'s validator.
fn counted(builder: orchestrix::FlowBuilder<u32, ()>, runs: &Arc<AtomicU32>) -> Flow<u32, ()> {
    let runs = Arc::clone(runs);
    builder
        .step("count", move |_ctx| {
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
async fn an_async_validator_rejects_the_input_with_structured_issues_and_nothing_runs() {
    let runs = Arc::new(AtomicU32::new(0));
    let flow = counted(
        Flow::builder("checkout").validate_async(|n: &u32| {
            let n = *n;
            async move {
                tokio::task::yield_now().await;
                if n > 5 {
                    Err(vec![Issue::at("quantity", "must be <= 5")])
                } else {
                    Ok(())
                }
            }
        }),
        &runs,
    );
    let rejected = flow.run(7, RunOptions::key("k")).await.ok();
    assert_eq!(rejected.as_ref().map(|r| r.status), Some(Status::Failed));
    let Some(Some(FlowError::Validation { issues })) = rejected.map(|r| r.error) else {
        panic!("a validation error")
    };
    assert_eq!(issues, vec![Issue::at("quantity", "must be <= 5")]);
    assert_eq!(issues[0].to_string(), "quantity: must be <= 5");
    // Nothing ran, and the store was not touched: the key is still free.
    assert!(matches!(flow.record("k").await, Ok(None)));
    assert!(flow.run(3, RunOptions::key("k")).await.is_ok());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_panicking_validator_rejects_the_input_instead_of_unwinding_through_run() {
    let runs = Arc::new(AtomicU32::new(0));
    let flow = counted(
        Flow::builder("sync-panic")
            .validate(|_: &u32| -> Result<(), Vec<String>> { panic!("validator bug") }),
        &runs,
    );
    let result = flow.run(1, RunOptions::key("k")).await.ok();
    assert!(matches!(
        result.and_then(|r| r.error),
        Some(FlowError::Validation { issues }) if issues[0].message.contains("validator bug")
    ));
    assert!(matches!(flow.record("k").await, Ok(None)));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_panicking_async_validator_rejects_the_input_instead_of_unwinding_through_run() {
    let runs = Arc::new(AtomicU32::new(0));
    // One that panics while it builds its future, one that panics inside it.
    let eager = counted(
        Flow::builder("eager-panic").validate_async(
            |_: &u32| -> std::future::Ready<Result<(), String>> { panic!("eager validator bug") },
        ),
        &runs,
    );
    let lazy = counted(
        Flow::builder("lazy-panic").validate_async(|_: &u32| async {
            tokio::task::yield_now().await;
            if true {
                panic!("lazy validator bug");
            }
            Ok::<(), String>(())
        }),
        &runs,
    );
    for (flow, message) in [(eager, "eager validator bug"), (lazy, "lazy validator bug")] {
        let result = flow.run(1, RunOptions::key("k")).await.ok();
        assert!(matches!(
            result.and_then(|r| r.error),
            Some(FlowError::Validation { issues }) if issues[0].message.contains(message)
        ));
        assert!(matches!(flow.record("k").await, Ok(None)));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[cfg(feature = "garde")]
#[tokio::test]
async fn a_garde_derive_is_the_flows_validator_with_field_paths() {
    #[derive(serde::Serialize, garde::Validate)]
    struct Line {
        #[garde(range(min = 1))]
        quantity: u32,
    }
    #[derive(serde::Serialize, garde::Validate)]
    struct Order {
        #[garde(length(min = 1))]
        id: String,
        #[garde(dive)]
        items: Vec<Line>,
    }
    let flow = Flow::<Order>::builder("garde")
        .validate(orchestrix::validation::garde)
        .step("ship", |_ctx| async { Ok(()) })
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let order = Order {
        id: String::new(),
        items: vec![
            Line { quantity: 1 },
            Line { quantity: 1 },
            Line { quantity: 0 },
        ],
    };
    let result = flow.run(order, RunOptions::new()).await.ok();
    let Some(Some(FlowError::Validation { issues })) = result.map(|r| r.error) else {
        panic!("a validation error")
    };
    let mut paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(paths, vec!["id", "items[2].quantity"]);
    assert!(issues.iter().all(|i| !i.message.is_empty()));
    let valid = Order {
        id: "o-1".into(),
        items: vec![Line { quantity: 2 }],
    };
    let result = flow.run(valid, RunOptions::new()).await.ok();
    assert_eq!(result.map(|r| r.status), Some(Status::Completed));
}
