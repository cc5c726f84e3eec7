//! Durable flows end to end on both SQL stores: the engine's resume, recovery and redrive
//! over their journals, with real time (the database's clock decides leases). Each test
//! works on a table (PostgreSQL) or file (SQLite) of its own, so `recover` sees only its
//! own runs.
//!
//! A crash is a run future that is forgotten (`std::mem::forget`) while a step is in
//! flight: nothing of it runs again and nothing settles its record, as when the process is
//! killed. Every wait is bounded.
#![cfg(all(feature = "postgres", feature = "sqlite"))]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrix::store::IdempotencyStore;
use orchestrix::{Context, Flow, FlowResult, RunError, RunOptions, Status, Step, StepError};
use orchestrix_conformance::unique_key;
use orchestrix_sql::{PgStore, SqliteStore};
use sqlx::postgres::PgPoolOptions;

const LEASE: Duration = Duration::from_millis(600);

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after 30 s"),
    }
}

fn ok<O: std::fmt::Debug>(r: Result<FlowResult<O>, RunError<O>>) -> FlowResult<O> {
    r.unwrap_or_else(|e| panic!("run failed: {e:?}"))
}

fn key(k: &str) -> RunOptions {
    RunOptions::key(k).lease(LEASE)
}

/// A store of its own for one test, and what removes it afterwards.
struct Fixture {
    store: Arc<dyn IdempotencyStore>,
    pg: Option<PgStore>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    async fn postgres() -> Self {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await
            .expect("PostgreSQL must answer on DATABASE_URL");
        let table = format!("orx_test_{:012x}", fastrand::u64(..) >> 16);
        let store = PgStore::new(pool).with_table(&table).expect("valid name");
        store.migrate().await.expect("migrate");
        Self {
            store: Arc::new(store.clone()),
            pg: Some(store),
            _dir: None,
        }
    }

    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("records.db"))
            .await
            .expect("open");
        store.migrate().await.expect("migrate");
        Self {
            store: Arc::new(store),
            pg: None,
            _dir: Some(dir),
        }
    }

    async fn finish(self) {
        if let Some(pg) = self.pg {
            let drop = format!("DROP TABLE IF EXISTS {}", pg.table());
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(pg.pool())
                .await;
        }
    }
}

/// What the steps did, shared by the flows of one test.
#[derive(Clone, Default)]
struct World {
    runs: Arc<Mutex<BTreeMap<&'static str, u32>>>,
    /// `ship` waits (until cancelled) while set.
    hold_ship: Arc<AtomicBool>,
    /// `ship` fails while set.
    fail_ship: Arc<AtomicBool>,
}

impl World {
    fn runs(&self, step: &str) -> u32 {
        self.runs
            .lock()
            .map(|r| r.get(step).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn count(&self, step: &'static str) {
        if let Ok(mut runs) = self.runs.lock() {
            *runs.entry(step).or_default() += 1;
        }
    }

    /// `charge` then `ship`, durable, on `store`; the output joins their ids.
    fn order(&self, store: Arc<dyn IdempotencyStore>) -> Flow<u64, String> {
        let charge = {
            let world = self.clone();
            Step::new("charge", move |ctx: Context<u64>| {
                let world = world.clone();
                async move {
                    world.count("charge");
                    ctx.set("charge-id", format!("ch_{}", ctx.input()))?;
                    Ok(())
                }
            })
        };
        let ship = {
            let world = self.clone();
            Step::new("ship", move |ctx: Context<u64>| {
                let world = world.clone();
                async move {
                    world.count("ship");
                    if world.hold_ship.load(Ordering::SeqCst) {
                        ctx.cancellation().cancelled().await;
                        return Err(StepError::msg("ship stopped"));
                    }
                    if world.fail_ship.load(Ordering::SeqCst) {
                        return Err(StepError::msg("ship failed"));
                    }
                    ctx.set("ship-id", format!("sh_{}", ctx.input()))?;
                    Ok(())
                }
            })
        };
        Flow::<u64, String>::builder("order")
            .durable()
            .store(store)
            .then(charge)
            .then(ship)
            .output(|ctx| {
                let charge: String = ctx.get("charge-id")?.unwrap_or_default();
                let ship: String = ctx.get("ship-id")?.unwrap_or_default();
                Ok(format!("{charge},{ship}"))
            })
            .build()
            .unwrap_or_else(|e| panic!("build: {e}"))
    }
}

/// Polls `run` until `ship` has started `ships` times in all, then forgets it.
async fn crash<F: Future>(world: &World, ships: u32, run: F) {
    let mut run: Pin<Box<F>> = Box::pin(run);
    bounded("the run to reach ship", async {
        while world.runs("ship") < ships {
            tokio::select! {
                biased;
                _ = &mut run => panic!("the run ended before the crash point"),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    })
    .await;
    std::mem::forget(run);
}

async fn after_a_crash_the_next_call_resumes_without_running_completed_steps(store: Fixture) {
    let world = World::default();
    let flow = world.order(Arc::clone(&store.store));
    let order = unique_key("order");
    world.hold_ship.store(true, Ordering::SeqCst);
    crash(&world, 1, flow.run(7, key(&order))).await;
    world.hold_ship.store(false, Ordering::SeqCst);
    let early = ok(flow.run(7, key(&order)).await);
    assert_eq!(
        early.status,
        Status::Running,
        "the lease is still the owner's"
    );
    tokio::time::sleep(LEASE * 2).await;
    let resumed = ok(bounded("the resumed run", flow.run(7, key(&order))).await);
    assert_eq!(resumed.status, Status::Completed, "{resumed:?}");
    assert_eq!(resumed.output.as_deref(), Some("ch_7,sh_7"));
    assert!(resumed.steps[0].restored && !resumed.steps[1].restored);
    assert_eq!((world.runs("charge"), world.runs("ship")), (1, 2));
    let replay = ok(flow.run(7, key(&order)).await);
    assert!(replay.replayed);
    assert_eq!(replay.output, resumed.output);
    store.finish().await;
}

async fn a_dropped_future_gives_the_run_up_and_the_next_call_resumes_at_once(store: Fixture) {
    let world = World::default();
    let flow = world.order(Arc::clone(&store.store));
    let order = unique_key("order");
    world.hold_ship.store(true, Ordering::SeqCst);
    let run = flow.run(7, RunOptions::key(&order).lease(Duration::from_secs(30)));
    let mut run = Box::pin(run);
    bounded("the run to reach ship", async {
        while world.runs("ship") < 1 {
            tokio::select! {
                _ = &mut run => panic!("the run ended before ship"),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    })
    .await;
    drop(run);
    world.hold_ship.store(false, Ordering::SeqCst);
    // The guard suspends the run in a spawned task; the long lease is given up at once.
    let resumed = bounded("the resumed run", async {
        loop {
            let result = ok(flow.run(7, RunOptions::key(&order)).await);
            if result.status != Status::Running {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(resumed.status, Status::Completed, "{resumed:?}");
    assert!(resumed.steps[0].restored);
    assert_eq!((world.runs("charge"), world.runs("ship")), (1, 2));
    store.finish().await;
}

async fn recover_finds_abandoned_runs_through_the_index_and_resumes_them(store: Fixture) {
    let world = World::default();
    let flow = world.order(Arc::clone(&store.store));
    let (a, b) = (unique_key("order-a"), unique_key("order-b"));
    world.hold_ship.store(true, Ordering::SeqCst);
    crash(&world, 1, flow.run(1, key(&a))).await;
    crash(&world, 2, flow.run(2, key(&b))).await;
    world.hold_ship.store(false, Ordering::SeqCst);
    tokio::time::sleep(LEASE * 2).await;
    let recovered = bounded("recovery", flow.recover())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut done: Vec<(String, Option<String>)> = recovered
        .into_iter()
        .map(|r| (r.key, r.outcome.ok().and_then(|o| o.output)))
        .collect();
    done.sort();
    let mut expected = vec![
        (a.clone(), Some("ch_1,sh_1".to_owned())),
        (b.clone(), Some("ch_2,sh_2".to_owned())),
    ];
    expected.sort();
    assert_eq!(done, expected);
    assert_eq!((world.runs("charge"), world.runs("ship")), (2, 4));
    let again = bounded("a second recovery", flow.recover()).await;
    assert!(again.is_ok_and(|r| r.is_empty()));
    store.finish().await;
}

async fn a_failed_durable_run_is_redriven_at_its_failed_step(store: Fixture) {
    let world = World::default();
    let flow = world.order(Arc::clone(&store.store));
    let order = unique_key("order");
    world.fail_ship.store(true, Ordering::SeqCst);
    let failed = ok(flow.run(7, key(&order)).await);
    assert_eq!(failed.status, Status::Failed);
    world.fail_ship.store(false, Ordering::SeqCst);
    let redriven = ok(bounded("the redrive", flow.redrive(key(&order))).await);
    assert_eq!(redriven.status, Status::Completed, "{redriven:?}");
    assert_eq!(redriven.output.as_deref(), Some("ch_7,sh_7"));
    assert_eq!((world.runs("charge"), world.runs("ship")), (1, 2));
    store.finish().await;
}

/// One `#[tokio::test]` per scenario and store.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Fixture::postgres().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Fixture::sqlite().await).await;
                }
            )*
        }
    };
}

on_both_stores!(
    after_a_crash_the_next_call_resumes_without_running_completed_steps,
    a_dropped_future_gives_the_run_up_and_the_next_call_resumes_at_once,
    recover_finds_abandoned_runs_through_the_index_and_resumes_them,
    a_failed_durable_run_is_redriven_at_its_failed_step,
);
