//! `PgStore` against the machine's PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test works in its own table, dropped at
//! its end; the conformance suite shares one table and isolates itself by random keys.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use orchestrix::store::{
    FencingToken, IdempotencyStore, RecordStatus, StartOutcome, StartRequest, StoreError,
};
use orchestrix::{Flow, RunError, RunOptions, StepError};
use orchestrix_conformance::storm::{StormChild, StormPlan, run_storm};
use orchestrix_conformance::{request, undecodable_record_is_a_typed_error, unique_key};
use orchestrix_sql::PgStore;
use sqlx::postgres::{PgPool, PgPoolOptions};

const CONFORMANCE_TABLE: &str = "orx_test_conformance";
const STORM_TABLE_VAR: &str = "ORX_STORM_TABLE";

/// A short random suffix for table names.
fn random_suffix() -> String {
    format!("{:012x}", fastrand::u64(..) >> 16)
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn pool(connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&database_url())
        .await
        .expect("PostgreSQL must answer on DATABASE_URL (scripts/services.sh ensure_postgres)")
}

async fn store_in(table: &str) -> PgStore {
    let store = PgStore::new(pool(8).await)
        .with_table(table)
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

/// A store over a table of its own.
async fn fresh_store() -> PgStore {
    store_in(&format!("orx_test_{}", random_suffix())).await
}

async fn drop_table(store: &PgStore) {
    let drop = format!("DROP TABLE IF EXISTS {}", store.table());
    sqlx::query(sqlx::AssertSqlSafe(drop))
        .execute(store.pool())
        .await
        .expect("drop test table");
}

mod conformance {
    orchestrix_conformance::store_conformance_tests!(async {
        super::store_in(super::CONFORMANCE_TABLE).await
    });
}

/// The same suite with `CachedStore` in front of the store.
mod cached_conformance {
    use std::sync::Arc;

    use orchestrix::store::CachedStore;

    orchestrix_conformance::store_conformance_tests!(async {
        CachedStore::new(Arc::new(super::store_in(super::CONFORMANCE_TABLE).await))
    });
}

/// Writes a row the way a foreign program (or a damaged table) might.
async fn write_row(
    store: &PgStore,
    key: &str,
    version: Option<i32>,
    status: Option<&str>,
    token: Option<&str>,
) {
    let insert = format!(
        "INSERT INTO {} (key, v, status, token) VALUES ($1, $2, $3, $4)",
        store.table()
    );
    sqlx::query(sqlx::AssertSqlSafe(insert))
        .bind(key)
        .bind(version)
        .bind(status)
        .bind(token)
        .execute(store.pool())
        .await
        .expect("write garbage row");
}

#[tokio::test]
async fn unknown_status_is_a_decode_error() {
    let store = fresh_store().await;
    let token = FencingToken::generate().to_string();
    let writer = store.clone();
    undecodable_record_is_a_typed_error(&store, |key| async move {
        write_row(&writer, &key, Some(1), Some("done"), Some(&token)).await;
    })
    .await;
    drop_table(&store).await;
}

#[tokio::test]
async fn malformed_token_is_a_decode_error() {
    let store = fresh_store().await;
    let key = unique_key("bad-token");
    write_row(
        &store,
        &key,
        Some(1),
        Some("completed"),
        Some("not-a-token"),
    )
    .await;
    assert!(matches!(store.get(&key).await, Err(StoreError::Decode(_))));
    let started = store.start(request(&key, None)).await;
    assert!(matches!(started, Err(StoreError::Decode(_))));
    drop_table(&store).await;
}

#[tokio::test]
async fn other_schema_version_is_unsupported() {
    let store = fresh_store().await;
    let key = unique_key("v99");
    let token = FencingToken::generate().to_string();
    write_row(&store, &key, Some(99), Some("completed"), Some(&token)).await;
    let got = store.get(&key).await;
    assert!(matches!(
        got,
        Err(StoreError::UnsupportedVersion { found: 99 })
    ));
    let started = store.start(request(&key, None)).await;
    assert!(matches!(
        started,
        Err(StoreError::UnsupportedVersion { found: 99 })
    ));
    drop_table(&store).await;
}

#[tokio::test]
async fn failed_record_of_another_version_is_never_taken_over() {
    let store = fresh_store().await;
    let key = unique_key("v99-failed");
    let token = FencingToken::generate().to_string();
    write_row(&store, &key, Some(99), Some("failed"), Some(&token)).await;
    let rerun = StartRequest {
        rerun_failed: true,
        ..request(&key, None)
    };
    let started = store.start(rerun).await;
    assert!(matches!(
        started,
        Err(StoreError::UnsupportedVersion { found: 99 })
    ));
    drop_table(&store).await;
}

#[tokio::test]
async fn null_columns_are_a_decode_error() {
    // A table made by hand without the NOT NULL constraints `migrate` would add.
    let table = format!("orx_test_{}", random_suffix());
    let pool = pool(2).await;
    let create = format!(
        "CREATE TABLE {table} (key text PRIMARY KEY, v integer, status text, token text, \
         fingerprint text, result bytea, expires_at timestamptz)"
    );
    sqlx::query(sqlx::AssertSqlSafe(create))
        .execute(&pool)
        .await
        .expect("create hand-made table");
    let store = PgStore::new(pool).with_table(&table).expect("valid name");
    store
        .migrate()
        .await
        .expect("migrate keeps the existing table");
    for (version, status, token) in [
        (None, Some("completed"), Some("0".repeat(32))),
        (Some(1), None, Some("0".repeat(32))),
        (Some(1), Some("completed"), None),
    ] {
        undecodable_record_is_a_typed_error(&store, |key| {
            let store = &store;
            async move {
                write_row(store, &key, version, status, token.as_deref()).await;
            }
        })
        .await;
    }
    drop_table(&store).await;
}

#[tokio::test]
async fn too_large_result_finishes_the_record_without_it() {
    let store = fresh_store().await.with_max_result_bytes(16);
    let key = unique_key("too-large");
    let StartOutcome::Acquired(token) = store.start(request(&key, None)).await.expect("start")
    else {
        panic!("a fresh key must be acquired");
    };
    let stored = store.complete(&key, token, &[7; 17], None).await;
    assert!(matches!(
        stored,
        Err(StoreError::TooLarge {
            size: 17,
            limit: 16
        })
    ));
    let record = store.get(&key).await.expect("get").expect("record kept");
    assert_eq!(
        (record.status, record.result),
        (RecordStatus::Completed, None)
    );
    drop_table(&store).await;
}

#[tokio::test]
async fn cleanup_deletes_expired_rows_in_batches_and_counts_them() {
    let store = fresh_store().await;
    let token = FencingToken::generate().to_string();
    let expired = format!(
        "INSERT INTO {} (key, v, status, token, expires_at) \
         SELECT 'expired:' || g, 1, 'completed', $1, now() - interval '1 second' \
         FROM generate_series(1, 2500) AS g",
        store.table()
    );
    sqlx::query(sqlx::AssertSqlSafe(expired))
        .bind(&token)
        .execute(store.pool())
        .await
        .expect("insert expired rows");
    let live = unique_key("live");
    store.start(request(&live, None)).await.expect("start");
    assert_eq!(store.cleanup().await.ok(), Some(2500));
    assert!(store.get(&live).await.expect("get").is_some());
    assert_eq!(store.cleanup().await.ok(), Some(0));
    drop_table(&store).await;
}

#[tokio::test]
async fn concurrent_migrations_succeed() {
    let store = PgStore::new(pool(8).await)
        .with_table(&format!("orx_test_{}", random_suffix()))
        .expect("valid table name");
    let migrations = (0..8).map(|_| store.migrate());
    for migrated in futures_util::future::join_all(migrations).await {
        assert!(migrated.is_ok(), "{migrated:?}");
    }
    drop_table(&store).await;
}

#[tokio::test]
async fn table_name_that_needs_quoting_is_refused() {
    let pool = PgPoolOptions::new()
        .connect_lazy(&database_url())
        .expect("valid url");
    let refused = PgStore::new(pool).with_table("idempotency; DROP TABLE users");
    assert_eq!(
        refused.err().map(|e| e.name().to_owned()),
        Some("idempotency; DROP TABLE users".to_owned())
    );
}

#[tokio::test]
async fn unreachable_server_is_a_backend_error_within_seconds() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .expect("valid url");
    let store = PgStore::new(pool);
    let began = Instant::now();
    let key = unique_key("unreachable");
    let started = store.start(request(&key, None)).await;
    assert!(
        matches!(started, Err(StoreError::Backend(_))),
        "{started:?}"
    );
    assert!(matches!(store.get(&key).await, Err(StoreError::Backend(_))));
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn unreachable_server_fails_the_run_closed_without_running_a_step() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .expect("valid url");
    let steps_run = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&steps_run);
    let flow = Flow::<u32, ()>::builder("unreachable")
        .store(Arc::new(PgStore::new(pool)))
        .step("effect", move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, StepError>(()) }
        })
        .build()
        .expect("flow");
    let run = flow
        .run(1, RunOptions::key(unique_key("unreachable")))
        .await;
    assert!(matches!(run, Err(RunError::Idempotency(_))), "{run:?}");
    assert_eq!(steps_run.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_across_processes_executes_each_key_once() {
    let store = fresh_store().await;
    let env = [(STORM_TABLE_VAR, store.table().to_owned())];
    run_storm(&StormPlan::STANDARD, "storm_child", &env).await;
    drop_table(&store).await;
}

/// One process of the storm; runs only when spawned by the storm test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "spawned by duplicate_storm_across_processes_executes_each_key_once"]
async fn storm_child() {
    let Some(child) = StormChild::from_env() else {
        return;
    };
    let table = std::env::var(STORM_TABLE_VAR).expect("storm table");
    let connections = u32::try_from(child.callers()).expect("a few callers");
    let store = PgStore::new(pool(connections).await)
        .with_table(&table)
        .expect("valid table name");
    child.run(Arc::new(store)).await;
}

/// Every wait in the tests below is bounded: a regression fails, it never hangs.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

async fn acquire(store: &PgStore, key: &str) -> FencingToken {
    match bounded("start", store.start(request(key, None))).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("a fresh key must be acquired: {other:?}"),
    }
}

/// Runs `sql` (test setup) on the store's table.
async fn run_sql(store: &PgStore, sql: String) {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .expect("test setup SQL");
}

/// After a refused finish: the record is finished with `status` and no result, and a new
/// `start` does not acquire the key.
async fn assert_finished_without_result(store: &PgStore, key: &str, status: RecordStatus) {
    let record = bounded("get", store.get(key))
        .await
        .expect("get")
        .expect("record kept");
    assert_eq!((record.status, record.result), (status, None));
    let again = bounded("start", store.start(request(key, None))).await;
    assert!(
        matches!(&again, Ok(StartOutcome::Existing(r)) if r.status == status),
        "the operation must never run again: {again:?}"
    );
}

/// A deferred constraint trigger fails the implicit transaction at its commit, after the
/// statement returned its row. `start` must report that failure, never an acquire of a
/// record that was not written.
#[tokio::test]
async fn start_whose_commit_fails_is_an_error_and_acquires_nothing() {
    let store = fresh_store().await;
    let t = store.table().to_owned();
    run_sql(
        &store,
        format!(
            "CREATE FUNCTION {t}_refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$"
        ),
    )
    .await;
    run_sql(
        &store,
        format!(
            "CREATE CONSTRAINT TRIGGER {t}_at_commit AFTER INSERT OR UPDATE ON {t} \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
             WHEN (NEW.key LIKE 'doomed:%') EXECUTE FUNCTION {t}_refuse()"
        ),
    )
    .await;
    let key = format!("doomed:{}", unique_key("commit-fails"));
    let started = bounded("start", store.start(request(&key, None))).await;
    assert!(
        matches!(started, Err(StoreError::Backend(_))),
        "a start whose commit failed must be an error: {started:?}"
    );
    assert_eq!(bounded("get", store.get(&key)).await.ok(), Some(None));
    drop_table(&store).await;
    run_sql(&store, format!("DROP FUNCTION {t}_refuse()")).await;
}

/// An index on the result column (one a user might add) cannot hold a large value:
/// PostgreSQL refuses the row with SQLSTATE 54000, program_limit_exceeded.
#[tokio::test]
async fn result_refused_for_a_program_limit_finishes_the_record_without_it() {
    let store = fresh_store().await;
    let t = store.table().to_owned();
    run_sql(
        &store,
        format!("CREATE INDEX {t}_result_idx ON {t} (result)"),
    )
    .await;
    let key = unique_key("index-limit");
    let token = acquire(&store, &key).await;
    // Incompressible, so the index cannot squeeze it under its limit.
    let result: Vec<u8> = (0..64 * 1024).map(|_| fastrand::u8(..)).collect();
    let completed = bounded("complete", store.complete(&key, token, &result, None)).await;
    assert!(
        matches!(completed, Err(StoreError::ResultRefused { size, .. }) if size == result.len()),
        "{completed:?}"
    );
    assert_finished_without_result(&store, &key, RecordStatus::Completed).await;
    drop_table(&store).await;
}

/// A full disk (SQLSTATE 53100, disk_full), raised by a trigger for writes that carry a
/// result, since the test cannot fill the server's disk.
#[tokio::test]
async fn result_refused_for_a_full_disk_finishes_the_record_without_it() {
    let store = fresh_store().await;
    let t = store.table().to_owned();
    run_sql(
        &store,
        format!(
            "CREATE FUNCTION {t}_disk_full() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' \
                USING ERRCODE = 'disk_full'; END $$"
        ),
    )
    .await;
    run_sql(
        &store,
        format!(
            "CREATE TRIGGER {t}_full BEFORE UPDATE ON {t} FOR EACH ROW \
             WHEN (NEW.result IS NOT NULL) EXECUTE FUNCTION {t}_disk_full()"
        ),
    )
    .await;
    let key = unique_key("disk-full");
    let token = acquire(&store, &key).await;
    let failed = bounded("fail", store.fail(&key, token, b"boom", None)).await;
    assert!(
        matches!(failed, Err(StoreError::ResultRefused { size: 4, .. })),
        "{failed:?}"
    );
    assert_finished_without_result(&store, &key, RecordStatus::Failed).await;
    drop_table(&store).await;
    run_sql(&store, format!("DROP FUNCTION {t}_disk_full()")).await;
}

#[tokio::test]
async fn a_finish_without_result_that_finds_the_result_stored_is_ok() {
    let store = fresh_store().await;
    let small_limit = store.clone().with_max_result_bytes(4);
    let key = unique_key("stored-already");
    let token = acquire(&store, &key).await;
    let result = b"receipt-42";
    let stored = bounded("complete", store.complete(&key, token, result, None)).await;
    stored.expect("complete");
    let again = bounded("complete", small_limit.complete(&key, token, result, None)).await;
    assert!(again.is_ok(), "{again:?}");
    let record = bounded("get", store.get(&key))
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.result.as_deref(), Some(&result[..]));
    drop_table(&store).await;
}

#[tokio::test]
async fn a_finish_that_finds_the_record_finished_without_result_reports_it_refused() {
    let store = fresh_store().await;
    let small_limit = store.clone().with_max_result_bytes(4);
    let key = unique_key("without-already");
    let token = acquire(&store, &key).await;
    let result = b"receipt-42";
    let first = bounded("complete", small_limit.complete(&key, token, result, None)).await;
    assert!(
        matches!(first, Err(StoreError::TooLarge { .. })),
        "{first:?}"
    );
    let again = bounded("complete", store.complete(&key, token, result, None)).await;
    assert!(
        matches!(again, Err(StoreError::ResultRefused { size: 10, .. })),
        "{again:?}"
    );
    let record = bounded("get", store.get(&key))
        .await
        .expect("get")
        .expect("record");
    assert_eq!(
        (record.status, record.result),
        (RecordStatus::Completed, None)
    );
    drop_table(&store).await;
}
