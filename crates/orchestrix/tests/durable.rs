//! Durable flows on the memory store: resume after a crash, a dropped future, a lost lease
//! or a cancellation without running a completed step again; at-most-once steps; journal
//! mismatches; redrive; recovery; step keys.
//!
//! A crash is a run future that is forgotten (`std::mem::forget`) while a step is in
//! flight: nothing of it runs again and nothing settles its record, as when the process is
//! killed. Every wait is bounded.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrix::idempotency::{IdempotencyError, OnRunning};
use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, FinalStatus, IdempotencyStore, Journal,
    JournalStore, MemoryStore, Record, RecordStatus, Redrive, StartOutcome, StartRequest,
    StoreError,
};
use orchestrix::{
    BuildError, CancellationToken, Event, Flow, FlowError, FlowResult, Parallel, RetryPolicy,
    RunError, RunOptions, Status, Step, StepError,
};
use tokio::sync::Notify;

const LEASE: Duration = Duration::from_secs(5);

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(120), fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after 120 s"),
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
    /// Executions per step name.
    runs: Arc<Mutex<BTreeMap<String, u32>>>,
    /// Compensations, in the order they ran.
    undone: Arc<Mutex<Vec<String>>>,
    /// Steps named here wait for `gate` (and count a start in `waiting`).
    gated: Arc<Mutex<Vec<String>>>,
    gate: Arc<Notify>,
    waiting: Arc<AtomicU32>,
    /// Steps named here fail.
    failing: Arc<Mutex<Vec<String>>>,
    /// Step keys seen, by step name (the compensation's under "undo:<name>").
    keys: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
}

impl World {
    fn runs(&self, step: &str) -> u32 {
        self.runs
            .lock()
            .map(|r| r.get(step).copied().unwrap_or(0))
            .unwrap_or(0)
    }
    fn undone(&self) -> Vec<String> {
        self.undone.lock().map(|u| u.clone()).unwrap_or_default()
    }
    fn gate(&self, step: &str) {
        if let Ok(mut g) = self.gated.lock() {
            g.push(step.to_owned());
        }
    }
    fn ungate(&self) {
        if let Ok(mut g) = self.gated.lock() {
            g.clear();
        }
        self.gate.notify_waiters();
    }
    fn fail(&self, step: &str, on: bool) {
        if let Ok(mut f) = self.failing.lock() {
            f.retain(|s| s != step);
            if on {
                f.push(step.to_owned());
            }
        }
    }
    fn keys(&self, what: &str) -> Vec<String> {
        self.keys
            .lock()
            .map(|k| k.get(what).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// A step that counts itself, records `<name>-id` in the state, may wait or fail, and
    /// compensates by recording its name (reading its own state back).
    fn step(&self, name: &str) -> Step<u64> {
        let world = self.clone();
        let owned = name.to_owned();
        let undo_world = self.clone();
        let undo_name = name.to_owned();
        Step::new(name, move |ctx| {
            let world = world.clone();
            let name = owned.clone();
            async move {
                if let (Ok(mut keys), Some(k)) = (world.keys.lock(), ctx.step_key()) {
                    keys.entry(name.clone()).or_default().push(k);
                }
                if let Ok(mut runs) = world.runs.lock() {
                    *runs.entry(name.clone()).or_default() += 1;
                }
                let gated = world
                    .gated
                    .lock()
                    .map(|g| g.contains(&name))
                    .unwrap_or(false);
                if gated {
                    let opened = world.gate.notified();
                    world.waiting.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        () = opened => {}
                        () = ctx.cancellation().cancelled() => {
                            return Err(StepError::msg(format!("{name} stopped")));
                        }
                    }
                }
                let failing = world
                    .failing
                    .lock()
                    .map(|f| f.contains(&name))
                    .unwrap_or(false);
                if failing {
                    return Err(StepError::msg(format!("{name} failed")));
                }
                ctx.set(format!("{name}-id"), format!("{name}:{}", ctx.input()))?;
                Ok(())
            }
        })
        .compensate(move |ctx| {
            let world = undo_world.clone();
            let name = undo_name.clone();
            async move {
                if let (Ok(mut keys), Some(k)) = (world.keys.lock(), ctx.step_key()) {
                    keys.entry(format!("undo:{name}")).or_default().push(k);
                }
                // A compensation sees the state its step wrote, restored or not.
                let id: Option<String> = ctx.get(format!("{name}-id"))?;
                if let Ok(mut undone) = world.undone.lock() {
                    undone.push(format!("{name}={}", id.unwrap_or_default()));
                }
                Ok(())
            }
        })
    }

    /// `charge` → `reserve` → `ship`, durable, on `store`; the output lists the ids.
    fn order(&self, store: &Arc<dyn IdempotencyStore>) -> Flow<u64, String> {
        self.order_with(store, |b| b)
    }

    fn order_with(
        &self,
        store: &Arc<dyn IdempotencyStore>,
        tweak: impl FnOnce(orchestrix::FlowBuilder<u64, String>) -> orchestrix::FlowBuilder<u64, String>,
    ) -> Flow<u64, String> {
        let builder = Flow::<u64, String>::builder("order")
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
            });
        tweak(builder)
            .build()
            .unwrap_or_else(|e| panic!("build: {e}"))
    }
}

fn memory() -> Arc<dyn IdempotencyStore> {
    Arc::new(MemoryStore::new())
}

/// Polls `run` until `ready`, then forgets it: the owner vanishes without a trace, as a
/// killed process would (no drop, no settlement, no more steps).
async fn crash<F: Future>(run: F, ready: impl Fn() -> bool) {
    let mut run: Pin<Box<F>> = Box::pin(run);
    bounded("the run to reach the crash point", async {
        loop {
            tokio::select! {
                biased;
                _ = &mut run => panic!("the run ended before the crash point"),
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
            if ready() {
                break;
            }
        }
    })
    .await;
    std::mem::forget(run);
}

fn restored(result: &FlowResult<String>) -> Vec<(String, bool)> {
    result
        .steps
        .iter()
        .map(|s| (s.name.to_string(), s.restored))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn after_a_crash_the_next_call_resumes_without_running_completed_steps() {
    let (world, store) = (World::default(), memory());
    let flow = world.order(&store);
    world.gate("ship");
    crash(flow.run(7, key("o-1")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(
        (
            world.runs("charge"),
            world.runs("reserve"),
            world.runs("ship")
        ),
        (1, 1, 1)
    );
    world.ungate();
    // Within the lease the owner may still be alive: the duplicate is told so.
    let early = ok(flow.run(7, key("o-1")).await);
    assert_eq!(early.status, Status::Running);
    tokio::time::sleep(LEASE).await;
    let resumed = ok(bounded("the resumed run", flow.run(7, key("o-1"))).await);
    assert_eq!(resumed.status, Status::Completed);
    assert_eq!(resumed.output.as_deref(), Some("charge:7,reserve:7,ship:7"));
    assert_eq!(
        restored(&resumed),
        [
            ("charge".into(), true),
            ("reserve".into(), true),
            ("ship".into(), false)
        ]
    );
    assert_eq!(
        (
            world.runs("charge"),
            world.runs("reserve"),
            world.runs("ship")
        ),
        (1, 1, 2)
    );
    let replay = ok(flow.run(7, key("o-1")).await);
    assert!(replay.replayed);
    assert_eq!(replay.output, resumed.output);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_future_gives_the_run_up_and_the_next_call_resumes_at_once() {
    let (world, store) = (World::default(), memory());
    let flow = world.order(&store);
    world.gate("reserve");
    let dropped = tokio::time::timeout(Duration::from_millis(10), flow.run(7, key("o-2"))).await;
    assert!(dropped.is_err());
    world.ungate();
    // The guard gives the key up in a spawned task: let it run.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let resumed = ok(bounded("the resumed run", flow.run(7, key("o-2"))).await);
    assert_eq!(resumed.status, Status::Completed, "{resumed:?}");
    assert!(resumed.steps[0].restored);
    assert_eq!((world.runs("charge"), world.runs("reserve")), (1, 2));
}

/// Renewals that fail while `failing` is set, over a memory store.
#[derive(Debug, Clone, Default)]
struct FlakyRenewals {
    inner: Arc<MemoryStore>,
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl IdempotencyStore for FlakyRenewals {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
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
        self.inner.finish(key, token, status, result, ttl).await
    }
    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::backend_msg("connection reset"));
        }
        self.inner.renew(key, token, lease).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    fn journal_store(&self) -> Option<&dyn orchestrix::store::JournalStore> {
        self.inner.journal_store()
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_that_lost_its_heartbeat_is_resumed_by_the_next_caller() {
    let world = World::default();
    let flaky = FlakyRenewals::default();
    let store: Arc<dyn IdempotencyStore> = Arc::new(flaky.clone());
    let flow = world.order(&store);
    world.gate("ship");
    flaky.failing.store(true, Ordering::SeqCst);
    let lost = bounded("the run that loses its lease", flow.run(7, key("o-3"))).await;
    // The heartbeat gave up before the lease lapsed, cancelled the run, and `ship` stopped.
    match lost {
        Err(RunError::NotPersisted { result, .. }) => assert_eq!(result.status, Status::Cancelled),
        Ok(result) => assert_eq!(result.status, Status::Cancelled),
        other => panic!("expected a cancelled run, got {other:?}"),
    }
    flaky.failing.store(false, Ordering::SeqCst);
    world.ungate();
    tokio::time::sleep(LEASE).await;
    let resumed = ok(bounded("the resumed run", flow.run(7, key("o-3"))).await);
    assert_eq!(resumed.status, Status::Completed);
    assert_eq!(
        (
            world.runs("charge"),
            world.runs("reserve"),
            world.runs("ship")
        ),
        (1, 1, 2)
    );
}

/// A memory store whose journal append number `hold_at` (0-based), once stored, waits
/// until `release`: the owner frozen (a paused VM, SIGSTOP, a long stall) right after a
/// journal write, before its next step (or the step it marked started) runs.
#[derive(Debug, Clone)]
struct HeldAppends {
    inner: Arc<MemoryStore>,
    hold_at: u32,
    appended: Arc<AtomicU32>,
    held: Arc<AtomicU32>,
    release: Arc<Notify>,
}

impl HeldAppends {
    fn holding(hold_at: u32) -> Self {
        Self {
            inner: Arc::default(),
            hold_at,
            appended: Arc::default(),
            held: Arc::default(),
            release: Arc::default(),
        }
    }
}

impl HeldAppends {
    fn journal(&self) -> Result<&dyn JournalStore, StoreError> {
        self.inner
            .journal_store()
            .ok_or_else(|| StoreError::backend_msg("no journal"))
    }
}

#[async_trait]
impl IdempotencyStore for HeldAppends {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
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
        self.inner.finish(key, token, status, result, ttl).await
    }
    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    fn journal_store(&self) -> Option<&dyn JournalStore> {
        Some(self)
    }
}

#[async_trait]
impl JournalStore for HeldAppends {
    async fn start_durable(
        &self,
        req: DurableStart<'_>,
    ) -> Result<DurableStartOutcome, StoreError> {
        self.journal()?.start_durable(req).await
    }
    async fn append(&self, key: &str, token: FencingToken, entry: &[u8]) -> Result<(), StoreError> {
        self.journal()?.append(key, token, entry).await?;
        if self.appended.fetch_add(1, Ordering::SeqCst) == self.hold_at {
            let released = self.release.notified();
            self.held.fetch_add(1, Ordering::SeqCst);
            released.await;
        }
        Ok(())
    }
    async fn suspend(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.journal()?.suspend(key, token).await
    }
    async fn redrive(
        &self,
        key: &str,
        lease: Duration,
        retain: Option<Duration>,
    ) -> Result<Redrive, StoreError> {
        self.journal()?.redrive(key, lease, retain).await
    }
    async fn read_journal(&self, key: &str) -> Result<Option<Journal>, StoreError> {
        self.journal()?.read_journal(key).await
    }
    async fn abandoned(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.journal()?.abandoned(prefix, after, limit).await
    }
}

#[tokio::test(start_paused = true)]
async fn an_owner_frozen_past_its_lease_does_not_run_a_step_its_taker_completed() {
    // The first append: `charge`'s checkpoint.
    let (world, held) = (World::default(), HeldAppends::holding(0));
    let store: Arc<dyn IdempotencyStore> = Arc::new(held.clone());
    let flow = world.order(&store);
    let mut owner = Box::pin(flow.run(7, key("o-frozen")));
    bounded("the owner to store charge's checkpoint", async {
        while held.held.load(Ordering::SeqCst) == 0 {
            tokio::select! {
                biased;
                _ = &mut owner => panic!("the owner ended before its first checkpoint"),
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
    })
    .await;
    // Frozen: not polled for two leases, so neither its steps nor its heartbeat run.
    tokio::time::sleep(LEASE * 2).await;
    let taken = ok(bounded("the taker", flow.run(7, key("o-frozen"))).await);
    assert_eq!(taken.status, Status::Completed);
    assert_eq!(
        (
            world.runs("charge"),
            world.runs("reserve"),
            world.runs("ship")
        ),
        (1, 1, 1)
    );
    // Thawed: the owner goes on from right after its checkpoint. Its lease lapsed long
    // ago, so it must not start `reserve`, which its taker completed.
    held.release.notify_waiters();
    let thawed = bounded("the thawed owner", owner).await;
    assert_eq!(
        (world.runs("reserve"), world.runs("ship")),
        (1, 1),
        "the thawed owner ran steps its taker had completed: {thawed:?}"
    );
    let replay = ok(flow.run(7, key("o-frozen")).await);
    assert!(replay.replayed);
    assert_eq!(replay.output, taken.output);
}

#[tokio::test(start_paused = true)]
async fn an_owner_frozen_after_marking_an_at_most_once_step_started_does_not_run_it() {
    // The second append: the start mark of `transfer`, after `charge`'s checkpoint.
    let (world, held) = (World::default(), HeldAppends::holding(1));
    let store: Arc<dyn IdempotencyStore> = Arc::new(held.clone());
    let flow = Flow::<u64, String>::builder("payout")
        .durable()
        .store(Arc::clone(&store))
        .then(world.step("charge"))
        .then(world.step("transfer").at_most_once())
        .then(world.step("notify"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut owner = Box::pin(flow.run(7, key("p-frozen")));
    bounded("the owner to mark transfer started", async {
        while held.held.load(Ordering::SeqCst) == 0 {
            tokio::select! {
                biased;
                _ = &mut owner => panic!("the owner ended before the mark"),
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
    })
    .await;
    tokio::time::sleep(LEASE * 2).await;
    // The taker finds `transfer` started and unfinished: it fails and undoes `charge`.
    let taken = ok(bounded("the taker", flow.run(7, key("p-frozen"))).await);
    assert_eq!(
        taken.error,
        Some(FlowError::StepInterrupted {
            step: "transfer".into()
        })
    );
    assert_eq!(world.undone(), ["charge=charge:7"]);
    // Thawed right after its mark, the owner must not transfer now: the run it belonged
    // to has failed and been compensated.
    held.release.notify_waiters();
    let thawed = bounded("the thawed owner", owner).await;
    assert_eq!(
        world.runs("transfer"),
        0,
        "the thawed owner ran transfer: {thawed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_owner_frozen_past_its_lease_whose_step_then_fails_compensates_nothing() {
    let (world, store) = (World::default(), memory());
    let flow = world.order(&store);
    world.gate("reserve");
    let mut owner = Box::pin(flow.run(7, key("o-frozen-fail")));
    bounded("the owner to reach reserve", async {
        while world.waiting.load(Ordering::SeqCst) == 0 {
            tokio::select! {
                biased;
                _ = &mut owner => panic!("the owner ended before reserve"),
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
    })
    .await;
    // Frozen inside `reserve` for two leases; a taker resumes and completes the order.
    tokio::time::sleep(LEASE * 2).await;
    world.ungate();
    let taken = ok(bounded("the taker", flow.run(7, key("o-frozen-fail"))).await);
    assert_eq!(taken.status, Status::Completed);
    // Thawed, the owner's `reserve` fails: undoing `charge` now would undo the taker's
    // completed order.
    world.fail("reserve", true);
    let thawed = bounded("the thawed owner", owner).await;
    assert!(
        world.undone().is_empty(),
        "the thawed owner compensated {:?}: {thawed:?}",
        world.undone()
    );
    let replay = ok(flow.run(7, key("o-frozen-fail")).await);
    assert_eq!(replay.output, taken.output);
}

#[tokio::test(start_paused = true)]
async fn a_later_failure_compensates_restored_steps_in_reverse_with_their_state() {
    let (world, store) = (World::default(), memory());
    let flow = world.order(&store);
    world.gate("ship");
    crash(flow.run(7, key("o-4")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    world.ungate();
    world.fail("ship", true);
    tokio::time::sleep(LEASE).await;
    let failed = ok(bounded("the resumed run", flow.run(7, key("o-4"))).await);
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(world.undone(), ["reserve=reserve:7", "charge=charge:7"]);
    assert_eq!((world.runs("charge"), world.runs("reserve")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_journal_of_another_plan_is_refused_and_kept_for_a_build_that_matches() {
    let (world, store) = (World::default(), memory());
    let flow = world.order(&store);
    world.gate("ship");
    crash(flow.run(7, key("o-5")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    world.ungate();
    tokio::time::sleep(LEASE).await;
    // A build where the second step is another one.
    let changed = Flow::<u64, String>::builder("order")
        .durable()
        .store(Arc::clone(&store))
        .then(world.step("charge"))
        .then(world.step("audit"))
        .then(world.step("ship"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = changed.run(7, key("o-5")).await;
    match refused {
        Err(RunError::Idempotency(IdempotencyError::JournalMismatch {
            position,
            expected,
            found,
            ..
        })) => {
            assert_eq!(
                (position, expected.as_deref(), found.as_str()),
                (1, Some("audit"), "reserve")
            );
        }
        other => panic!("expected a journal mismatch, got {other:?}"),
    }
    assert_eq!(
        (world.runs("audit"), world.runs("ship")),
        (0, 1),
        "nothing ran"
    );
    // The run was given back with its journal: the matching build resumes it at once.
    let resumed = ok(bounded("the matching build", flow.run(7, key("o-5"))).await);
    assert_eq!(resumed.status, Status::Completed);
    assert_eq!(world.runs("charge"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_journal_of_another_version_is_refused() {
    let (world, store) = (World::default(), memory());
    let flow = world.order(&store);
    world.gate("ship");
    crash(flow.run(7, key("o-6")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    world.ungate();
    tokio::time::sleep(LEASE).await;
    let v2 = world.order_with(&store, |b| b.version("2"));
    let refused = v2.run(7, key("o-6")).await;
    assert!(
        matches!(
            &refused,
            Err(RunError::Idempotency(IdempotencyError::JournalVersion { found, expected, .. }))
                if found == "1" && expected == "2"
        ),
        "{refused:?}"
    );
    assert_eq!(world.runs("ship"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_at_most_once_step_is_not_run_again_and_the_run_compensates() {
    let (world, store) = (World::default(), memory());
    let build = |world: &World| {
        Flow::<u64, String>::builder("payout")
            .durable()
            .store(Arc::clone(&store))
            .then(world.step("charge"))
            .then(world.step("transfer").at_most_once())
            .then(world.step("notify"))
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let flow = build(&world);
    world.gate("transfer");
    crash(flow.run(7, key("p-1")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    world.ungate();
    tokio::time::sleep(LEASE).await;
    let resumed = ok(bounded("the resumed run", flow.run(7, key("p-1"))).await);
    assert_eq!(resumed.status, Status::Failed);
    assert_eq!(
        resumed.error,
        Some(FlowError::StepInterrupted {
            step: "transfer".into()
        })
    );
    assert_eq!((world.runs("transfer"), world.runs("notify")), (1, 0));
    assert_eq!(world.undone(), ["charge=charge:7"]);
}

#[tokio::test(start_paused = true)]
async fn step_keys_are_stable_across_retries_and_resumes_and_distinct_otherwise() {
    let (world, store) = (World::default(), memory());
    let retries = Arc::new(AtomicU32::new(0));
    let flow = {
        let retries = Arc::clone(&retries);
        let world2 = world.clone();
        Flow::<u64, String>::builder("keys")
            .durable()
            .store(Arc::clone(&store))
            .then(world.step("charge"))
            .then(
                Step::new("flaky", move |ctx| {
                    let retries = Arc::clone(&retries);
                    let world = world2.clone();
                    async move {
                        if let (Ok(mut keys), Some(k)) = (world.keys.lock(), ctx.step_key()) {
                            keys.entry("flaky".into()).or_default().push(k);
                        }
                        if retries.fetch_add(1, Ordering::SeqCst) == 0 {
                            return Err(StepError::msg("first attempt fails"));
                        }
                        Ok(())
                    }
                })
                .retry(RetryPolicy::retries(1)),
            )
            .then(world.step("ship"))
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    world.gate("ship");
    crash(flow.run(7, key("k-1")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    world.ungate();
    world.fail("ship", true);
    tokio::time::sleep(LEASE).await;
    ok(bounded("the resumed run", flow.run(7, key("k-1"))).await);
    let flaky = world.keys("flaky");
    assert_eq!(flaky.len(), 2, "two attempts");
    assert_eq!(flaky[0], flaky[1], "the same key in every attempt");
    let ship = world.keys("ship");
    assert_eq!(ship.len(), 2, "before the crash and after the resume");
    assert_eq!(ship[0], ship[1], "the same key after a resume");
    let charge = world.keys("charge");
    let undo = world.keys("undo:charge");
    assert_eq!(charge.len(), 1);
    assert_eq!(undo.len(), 1);
    assert_ne!(charge[0], undo[0], "a compensation has a key of its own");
    assert_ne!(charge[0], ship[0]);
    assert_eq!(charge[0].len(), 32);
    // Another run key gives other step keys.
    world.fail("ship", false);
    ok(flow.run(8, key("k-2")).await);
    assert_ne!(world.keys("charge")[1], charge[0]);
}

#[tokio::test]
async fn a_cancelled_durable_run_keeps_its_journal_and_the_next_call_resumes() {
    let (world, store) = (World::default(), memory());
    // `charge` cannot be undone here: a cancel must not lose it.
    let flow = Flow::<u64, String>::builder("order")
        .durable()
        .store(Arc::clone(&store))
        .compensate_on_cancel(false)
        .then(world.step("charge"))
        .then(world.step("ship"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    world.gate("ship");
    let token = CancellationToken::new();
    let owner = tokio::spawn({
        let flow = flow.clone();
        let options = key("c-1").cancellation(token.clone());
        async move { flow.run(7, options).await }
    });
    bounded("ship to start", async {
        while world.waiting.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    token.cancel();
    let cancelled = ok(bounded("the cancelled run", owner)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(cancelled.status, Status::Cancelled);
    world.ungate();
    let resumed = ok(bounded("the next call", flow.run(7, key("c-1"))).await);
    assert_eq!(resumed.status, Status::Completed);
    assert!(resumed.steps[0].restored);
    assert_eq!((world.runs("charge"), world.runs("ship")), (1, 2));
}

#[tokio::test]
async fn a_failed_durable_run_is_redriven_at_its_failed_step() {
    let (world, store) = (World::default(), memory());
    // Without compensations on a failure, the completed step stays done.
    let flow = Flow::<u64, String>::builder("order")
        .durable()
        .store(Arc::clone(&store))
        .step("charge", {
            let world = world.clone();
            move |ctx| {
                let world = world.clone();
                async move {
                    if let Ok(mut runs) = world.runs.lock() {
                        *runs.entry("charge".into()).or_default() += 1;
                    }
                    ctx.set("charge-id", "ch_1")?;
                    Ok(())
                }
            }
        })
        .then(world.step("ship"))
        .output(|ctx| Ok(ctx.get::<String>("charge-id")?.unwrap_or_default()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    world.fail("ship", true);
    let failed = ok(flow.run(7, key("r-1")).await);
    assert_eq!(failed.status, Status::Failed);
    let replay = ok(flow.run(7, key("r-1")).await);
    assert!(replay.replayed && replay.status == Status::Failed);
    world.fail("ship", false);
    let redriven = ok(bounded("the redrive", flow.redrive(key("r-1"))).await);
    assert_eq!(redriven.status, Status::Completed);
    assert_eq!(
        redriven.output.as_deref(),
        Some("ch_1"),
        "the journaled state is restored"
    );
    assert!(redriven.steps[0].restored);
    assert_eq!((world.runs("charge"), world.runs("ship")), (1, 2));
    let again = flow.redrive(key("r-1")).await;
    assert!(matches!(
        again,
        Err(RunError::Idempotency(IdempotencyError::NotFailed {
            status: RecordStatus::Completed,
            ..
        }))
    ));
    let absent = flow.redrive(key("nothing")).await;
    assert!(matches!(
        absent,
        Err(RunError::Idempotency(IdempotencyError::NoDurableRun { .. }))
    ));
}

#[tokio::test(start_paused = true)]
async fn recover_resumes_abandoned_runs_and_waiters_get_their_results() {
    let (world, store) = (World::default(), memory());
    let flow = world.order(&store);
    world.gate("ship");
    crash(flow.run(1, key("a")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    crash(flow.run(2, key("b").ttl(Duration::from_secs(3600))), || {
        world.waiting.load(Ordering::SeqCst) == 2
    })
    .await;
    world.ungate();
    let waiter = tokio::spawn({
        let flow = flow.clone();
        let options = key("a").on_running(OnRunning::Wait {
            timeout: Duration::from_secs(3600),
        });
        async move { flow.run(1, options).await }
    });
    tokio::time::sleep(LEASE).await;
    let recovered = bounded("recovery", flow.recover())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The waiter may have resumed "a" itself; recovery resumed the rest.
    let waited = ok(bounded("the waiter", waiter)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(waited.status, Status::Completed);
    assert_eq!(waited.output.as_deref(), Some("charge:1,reserve:1,ship:1"));
    assert!(
        recovered
            .iter()
            .any(|r| r.key == "b" && r.outcome.as_ref().is_ok_and(|o| o.is_completed()))
    );
    assert_eq!(world.runs("charge"), 2, "each order charged once");
    assert_eq!(world.runs("ship"), 4, "each in-flight ship ran again once");
    let replay = ok(flow.run(2, key("b")).await);
    assert!(replay.replayed);
    assert_eq!(replay.output.as_deref(), Some("charge:2,reserve:2,ship:2"));
    assert!(
        bounded("a second recovery", flow.recover())
            .await
            .is_ok_and(|r| r.is_empty())
    );
}

#[tokio::test(start_paused = true)]
async fn resume_by_key_reads_the_input_from_the_journal() {
    let (world, store) = (World::default(), memory());
    let flow = world.order(&store);
    world.gate("ship");
    crash(flow.run(41, key("o-7")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    world.ungate();
    tokio::time::sleep(LEASE).await;
    let resumed = ok(bounded("resume", flow.resume(key("o-7"))).await);
    assert_eq!(
        resumed.output.as_deref(),
        Some("charge:41,reserve:41,ship:41")
    );
    assert_eq!(world.runs("charge"), 1);
    let nothing = flow.resume(key("never")).await;
    assert!(matches!(
        nothing,
        Err(RunError::Idempotency(IdempotencyError::NoDurableRun { .. }))
    ));
}

#[tokio::test(start_paused = true)]
async fn parallel_branches_are_journaled_one_by_one() {
    let (world, store) = (World::default(), memory());
    let flow = Flow::<u64, String>::builder("fanout")
        .durable()
        .store(Arc::clone(&store))
        .then(world.step("charge"))
        .parallel(
            Parallel::new()
                .with(world.step("email"))
                .with(world.step("sms")),
        )
        .then(world.step("ship"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    world.gate("sms");
    crash(flow.run(7, key("f-1")), || {
        world.waiting.load(Ordering::SeqCst) == 1 && world.runs("email") == 1
    })
    .await;
    world.ungate();
    // Let email's checkpoint land before the lease lapses (it completed before the crash).
    tokio::time::sleep(LEASE).await;
    let resumed = ok(bounded("the resumed run", flow.run(7, key("f-1"))).await);
    assert_eq!(resumed.status, Status::Completed);
    assert_eq!(
        (
            world.runs("charge"),
            world.runs("email"),
            world.runs("sms"),
            world.runs("ship")
        ),
        (1, 1, 2, 1)
    );
}

#[tokio::test]
async fn a_transient_failure_keeps_the_journal_and_the_retry_resumes_at_the_failed_step() {
    let (world, store) = (World::default(), memory());
    let attempts = Arc::new(AtomicU32::new(0));
    let flow = {
        let attempts = Arc::clone(&attempts);
        Flow::<u64, String>::builder("order")
            .durable()
            .store(Arc::clone(&store))
            .step("charge", {
                let world = world.clone();
                move |_ctx| {
                    let world = world.clone();
                    async move {
                        if let Ok(mut runs) = world.runs.lock() {
                            *runs.entry("charge".into()).or_default() += 1;
                        }
                        Ok(())
                    }
                }
            })
            .step("ship", move |_ctx| {
                let attempts = Arc::clone(&attempts);
                async move {
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(StepError::msg("carrier down").transient());
                    }
                    Ok(())
                }
            })
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let first = ok(flow.run(7, key("t-1")).await);
    assert_eq!(first.status, Status::Failed);
    let retry = ok(flow.run(7, key("t-1")).await);
    assert_eq!(retry.status, Status::Completed);
    assert_eq!(world.runs("charge"), 1);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_input_that_would_not_read_back_is_refused_before_anything_runs() {
    let world = World::default();
    let flow = Flow::<f64, ()>::builder("nan")
        .durable()
        .step("count", {
            let world = world.clone();
            move |_ctx| {
                let world = world.clone();
                async move {
                    if let Ok(mut runs) = world.runs.lock() {
                        *runs.entry("count".into()).or_default() += 1;
                    }
                    Ok(())
                }
            }
        })
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = flow.run(f64::NAN, RunOptions::key("k")).await;
    assert!(matches!(
        refused,
        Err(RunError::Idempotency(IdempotencyError::InputNotJournaled(
            _
        )))
    ));
    assert_eq!(world.runs("count"), 0);
    // Unkeyed runs of a durable flow are not journaled at all.
    ok(flow.run(f64::NAN, RunOptions::new()).await);
    assert_eq!(world.runs("count"), 1);
}

#[tokio::test]
async fn restored_steps_are_reported_to_plugins() {
    let (world, store) = (World::default(), memory());
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    let flow = world.order_with(&store, move |b| {
        b.plugin(move |event: &Event<'_>| {
            if let Event::StepRestored { step, .. } = event
                && let Ok(mut e) = seen.lock()
            {
                e.push(step.to_string());
            }
        })
    });
    world.gate("ship");
    tokio::time::pause();
    crash(flow.run(7, key("e-1")), || {
        world.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    world.ungate();
    tokio::time::sleep(LEASE).await;
    ok(bounded("resume", flow.run(7, key("e-1"))).await);
    assert_eq!(
        events.lock().map(|e| e.clone()).unwrap_or_default(),
        ["charge", "reserve"]
    );
}

/// A store that keeps no journals.
#[derive(Debug, Default)]
struct NoJournal(MemoryStore);

#[async_trait]
impl IdempotencyStore for NoJournal {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.0.get(key).await
    }
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        self.0.start(req).await
    }
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.0.finish(key, token, status, result, ttl).await
    }
    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.0.renew(key, token, lease).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.0.release(key, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key).await
    }
}

#[test]
fn a_durable_flow_needs_a_store_that_keeps_journals() {
    let built = Flow::<u64, ()>::builder("d")
        .durable()
        .store(Arc::new(NoJournal::default()))
        .step("s", |_ctx| async { Ok(()) })
        .build();
    assert!(matches!(built, Err(BuildError::StoreKeepsNoJournal { .. })));
}

#[tokio::test]
async fn resume_and_redrive_of_a_flow_that_is_not_durable_are_typed_errors() {
    let flow = Flow::<u64, ()>::builder("plain")
        .step("s", |_ctx| async { Ok(()) })
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        flow.resume(RunOptions::key("k")).await,
        Err(RunError::Idempotency(IdempotencyError::NotDurable { .. }))
    ));
    assert!(matches!(
        flow.redrive(RunOptions::key("k")).await,
        Err(RunError::Idempotency(IdempotencyError::NotDurable { .. }))
    ));
    assert!(matches!(
        flow.recover().await,
        Err(IdempotencyError::NotDurable { .. })
    ));
}
