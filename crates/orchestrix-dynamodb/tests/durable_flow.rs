//! Durable flows end to end on DynamoDB: the engine's journal over this store, with real
//! time against the local DynamoDB-compatible server. A crash is a run future forgotten
//! (`std::mem::forget`) while a step is in flight: nothing of it runs again and nothing
//! settles its record, as when the process is killed. Every wait is bounded.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrix::idempotency::IdempotencyError;
use orchestrix::store::{IdempotencyStore, RecordStatus};
use orchestrix::{Flow, FlowResult, RunError, RunOptions, Status, Step, StepError};
use orchestrix_conformance::unique_key;
use tokio::sync::Notify;

/// Short enough to watch lapse; long enough for the heartbeat of a live run on moto.
const LEASE: Duration = Duration::from_secs(1);
/// A lease past its end and the skew allowance of `common::options()`.
const PAST_LEASE: Duration = Duration::from_millis(1_500);

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(60), fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after 60 s"),
    }
}

fn ok<O: std::fmt::Debug>(r: Result<FlowResult<O>, RunError<O>>) -> FlowResult<O> {
    r.unwrap_or_else(|e| panic!("run failed: {e:?}"))
}

fn key(k: &str) -> RunOptions {
    RunOptions::key(k).lease(LEASE)
}

/// What the steps did, shared by every flow built from one `World`.
#[derive(Clone, Default)]
struct World {
    runs: Arc<Mutex<BTreeMap<String, u32>>>,
    /// Steps named here wait for `gate`, counting a start in `waiting`.
    gated: Arc<Mutex<Vec<String>>>,
    gate: Arc<Notify>,
    waiting: Arc<AtomicU32>,
    /// Steps named here fail.
    failing: Arc<Mutex<Vec<String>>>,
}

impl World {
    fn runs(&self, step: &str) -> u32 {
        self.runs
            .lock()
            .map(|r| r.get(step).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn set(list: &Mutex<Vec<String>>, step: &str, on: bool) {
        if let Ok(mut list) = list.lock() {
            list.retain(|s| s != step);
            if on {
                list.push(step.to_owned());
            }
        }
    }

    fn has(list: &Mutex<Vec<String>>, step: &str) -> bool {
        list.lock()
            .map(|l| l.iter().any(|s| s == step))
            .unwrap_or(false)
    }

    fn ungate(&self) {
        if let Ok(mut g) = self.gated.lock() {
            g.clear();
        }
        self.gate.notify_waiters();
    }

    /// A step that counts itself, writes `<name>-id` to the state, and may wait or fail.
    fn step(&self, name: &str) -> Step<u64> {
        let world = self.clone();
        let name = name.to_owned();
        Step::new(name.clone(), move |ctx| {
            let world = world.clone();
            let name = name.clone();
            async move {
                if let Ok(mut runs) = world.runs.lock() {
                    *runs.entry(name.clone()).or_default() += 1;
                }
                if Self::has(&world.gated, &name) {
                    let opened = world.gate.notified();
                    world.waiting.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        () = opened => {}
                        () = ctx.cancellation().cancelled() => {
                            return Err(StepError::msg(format!("{name} stopped")));
                        }
                    }
                }
                if Self::has(&world.failing, &name) {
                    return Err(StepError::msg(format!("{name} failed")));
                }
                ctx.set(format!("{name}-id"), format!("{name}:{}", ctx.input()))?;
                Ok(())
            }
        })
    }

    /// `charge` → `reserve` → `ship`, durable, named `flow`; the output lists the ids.
    fn order(&self, flow: &str, store: &Arc<dyn IdempotencyStore>) -> Flow<u64, String> {
        Flow::<u64, String>::builder(flow)
            .durable()
            .store(Arc::clone(store))
            .then(self.step("charge"))
            .then(self.step("reserve"))
            .then(self.step("ship"))
            .output(|ctx| {
                let ids: Vec<String> = ["charge", "reserve", "ship"]
                    .iter()
                    .map(|s| {
                        ctx.get::<String>(&format!("{s}-id"))
                            .ok()
                            .flatten()
                            .unwrap_or_default()
                    })
                    .collect();
                Ok(ids.join(","))
            })
            .build()
            .unwrap_or_else(|e| panic!("build: {e}"))
    }
}

async fn dynamo() -> Arc<dyn IdempotencyStore> {
    Arc::new(common::store().await)
}

/// Polls `run` until `ready`, and hands it back still pending.
async fn run_until<F: Future>(run: F, ready: impl Fn() -> bool) -> Pin<Box<F>> {
    let mut run: Pin<Box<F>> = Box::pin(run);
    bounded("the run to reach the point", async {
        loop {
            tokio::select! {
                biased;
                _ = &mut run => panic!("the run ended before the point"),
                () = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
            if ready() {
                break;
            }
        }
    })
    .await;
    run
}

/// Polls `run` until `ready`, then forgets it: the owner vanishes without a trace, as a
/// killed process would (no drop, no settlement, no more steps).
async fn crash<F: Future>(run: F, ready: impl Fn() -> bool) {
    std::mem::forget(run_until(run, ready).await);
}

fn restored(result: &FlowResult<String>) -> Vec<bool> {
    result.steps.iter().map(|s| s.restored).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_next_call_resumes_without_running_completed_steps() {
    let (world, store) = (World::default(), dynamo().await);
    let flow = world.order(&unique_key("crash"), &store);
    World::set(&world.gated, "ship", true);
    crash(flow.run(7, key("o-1")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    world.ungate();
    // Within the lease the owner may still be alive: the duplicate is told so.
    let early = ok(flow.run(7, key("o-1")).await);
    assert_eq!(early.status, Status::Running);
    tokio::time::sleep(PAST_LEASE).await;
    let resumed = ok(bounded("the resumed run", flow.run(7, key("o-1"))).await);
    assert_eq!(resumed.status, Status::Completed, "{resumed:?}");
    assert_eq!(resumed.output.as_deref(), Some("charge:7,reserve:7,ship:7"));
    assert_eq!(restored(&resumed), [true, true, false]);
    assert_eq!(
        (
            world.runs("charge"),
            world.runs("reserve"),
            world.runs("ship")
        ),
        (1, 1, 2),
        "only the step in flight ran again"
    );
    let replay = ok(flow.run(7, key("o-1")).await);
    assert!(replay.replayed);
    assert_eq!(replay.output, resumed.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_future_gives_the_run_up_and_the_next_call_resumes_at_once() {
    let (world, store) = (World::default(), dynamo().await);
    let flow = world.order(&unique_key("dropped"), &store);
    World::set(&world.gated, "reserve", true);
    // A lease far longer than the test: only the dropped run's suspension frees the key.
    let options = || RunOptions::key("o-2").lease(Duration::from_secs(300));
    let run = run_until(flow.run(7, options()), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(run);
    world.ungate();
    // The dropped run's guard suspends it from a spawned task: look until it did.
    let resumed = bounded("the dropped run to be given up", async {
        loop {
            let result = ok(flow.run(7, options()).await);
            if result.status != Status::Running {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(resumed.status, Status::Completed, "{resumed:?}");
    assert_eq!(restored(&resumed), [true, false, false]);
    assert_eq!((world.runs("charge"), world.runs("reserve")), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_finds_abandoned_runs_by_scanning_and_resumes_them() {
    let (world, store) = (World::default(), dynamo().await);
    let flow = world.order(&unique_key("recover"), &store);
    World::set(&world.gated, "ship", true);
    crash(flow.run(1, key("a")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    crash(flow.run(2, key("b").ttl(Duration::from_secs(3600))), || {
        world.waiting.load(Ordering::SeqCst) == 2
    })
    .await;
    world.ungate();
    tokio::time::sleep(PAST_LEASE).await;
    let recovered = bounded("recovery", flow.recover())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut keys: Vec<(&str, Option<String>)> = recovered
        .iter()
        .map(|r| {
            let output = r.outcome.as_ref().ok().and_then(|o| o.output.clone());
            (r.key.as_str(), output)
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            ("a", Some("charge:1,reserve:1,ship:1".to_owned())),
            ("b", Some("charge:2,reserve:2,ship:2".to_owned()))
        ]
    );
    assert_eq!(world.runs("charge"), 2, "each order charged once");
    assert_eq!(world.runs("ship"), 4, "each in-flight ship ran again once");
    let replay = ok(flow.run(2, key("b")).await);
    assert!(replay.replayed);
    assert!(
        bounded("a second recovery", flow.recover())
            .await
            .is_ok_and(|r| r.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_durable_run_is_redriven_at_its_failed_step() {
    let (world, store) = (World::default(), dynamo().await);
    let flow = world.order(&unique_key("redrive"), &store);
    World::set(&world.failing, "ship", true);
    let failed = ok(flow.run(3, key("r-1")).await);
    assert_eq!(failed.status, Status::Failed);
    let replay = ok(flow.run(3, key("r-1")).await);
    assert!(replay.replayed && replay.status == Status::Failed);
    World::set(&world.failing, "ship", false);
    let redriven = ok(bounded("the redrive", flow.redrive(key("r-1"))).await);
    assert_eq!(redriven.status, Status::Completed, "{redriven:?}");
    assert_eq!(
        redriven.output.as_deref(),
        Some("charge:3,reserve:3,ship:3")
    );
    assert_eq!(
        (
            world.runs("charge"),
            world.runs("reserve"),
            world.runs("ship")
        ),
        (1, 1, 2)
    );
    let again = flow.redrive(key("r-1")).await;
    assert!(
        matches!(
            again,
            Err(RunError::Idempotency(IdempotencyError::NotFailed {
                status: RecordStatus::Completed,
                ..
            }))
        ),
        "{again:?}"
    );
}
