//! `SqliteStore` on temporary database files. Each test opens a file of its own; the
//! conformance suite shares one file in the temp directory and isolates itself by random
//! keys.
#![cfg(feature = "sqlite")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use orchestrix::store::{
    FencingToken, IdempotencyStore, RecordStatus, StartOutcome, StartRequest, StoreError,
};
use orchestrix_conformance::storm::{StormChild, StormPlan, run_child, run_storm};
use orchestrix_conformance::{request, undecodable_record_is_a_typed_error, unique_key};
use orchestrix_sql::SqliteStore;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

async fn store_at(path: &Path) -> SqliteStore {
    let store = SqliteStore::open(path).await.expect("open database file");
    store.migrate().await.expect("migrate");
    store
}

fn conformance_db() -> PathBuf {
    std::env::temp_dir().join("orchestrix-sql-conformance.sqlite3")
}

mod conformance {
    orchestrix_conformance::store_conformance_tests!(async {
        super::store_at(&super::conformance_db()).await
    });
}

/// The same suite with `CachedStore` in front of the store.
mod cached_conformance {
    use std::sync::Arc;

    use orchestrix::store::CachedStore;

    orchestrix_conformance::store_conformance_tests!(async {
        CachedStore::new(Arc::new(super::store_at(&super::conformance_db()).await))
    });
}

/// A second connection to the same file, to write what the store would not.
async fn raw_pool(path: &Path) -> SqlitePool {
    SqlitePool::connect_with(SqliteConnectOptions::new().filename(path))
        .await
        .expect("open raw connection")
}

async fn write_row(
    pool: &SqlitePool,
    key: &str,
    version: Option<i64>,
    status: Option<&str>,
    token: Option<&str>,
) {
    sqlx::query(
        "INSERT INTO orchestrix_idempotency (key, v, status, token) VALUES (?1, ?2, ?3, ?4)",
    )
    .bind(key)
    .bind(version)
    .bind(status)
    .bind(token)
    .execute(pool)
    .await
    .expect("write garbage row");
}

#[tokio::test]
async fn unknown_status_is_a_decode_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let raw = raw_pool(&path).await;
    let token = FencingToken::generate().to_string();
    undecodable_record_is_a_typed_error(&store, |key| async move {
        write_row(&raw, &key, Some(1), Some("done"), Some(&token)).await;
    })
    .await;
}

#[tokio::test]
async fn malformed_token_is_a_decode_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let key = unique_key("bad-token");
    write_row(
        &raw_pool(&path).await,
        &key,
        Some(1),
        Some("completed"),
        Some("xyz"),
    )
    .await;
    assert!(matches!(store.get(&key).await, Err(StoreError::Decode(_))));
    let started = store.start(request(&key, None)).await;
    assert!(matches!(started, Err(StoreError::Decode(_))));
}

#[tokio::test]
async fn other_schema_version_is_unsupported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let key = unique_key("v99");
    let token = FencingToken::generate().to_string();
    write_row(
        &raw_pool(&path).await,
        &key,
        Some(99),
        Some("completed"),
        Some(&token),
    )
    .await;
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
}

#[tokio::test]
async fn failed_record_of_another_version_is_never_taken_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let key = unique_key("v99-failed");
    let token = FencingToken::generate().to_string();
    write_row(
        &raw_pool(&path).await,
        &key,
        Some(99),
        Some("failed"),
        Some(&token),
    )
    .await;
    let rerun = StartRequest {
        rerun_failed: true,
        ..request(&key, None)
    };
    let started = store.start(rerun).await;
    assert!(matches!(
        started,
        Err(StoreError::UnsupportedVersion { found: 99 })
    ));
}

/// A table made by hand: not STRICT and without NOT NULL, as `migrate` would make it.
async fn hand_made_table(path: &Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    let pool = SqlitePool::connect_with(options)
        .await
        .expect("create file");
    sqlx::query(
        "CREATE TABLE orchestrix_idempotency (key TEXT PRIMARY KEY, v, status, token, \
         fingerprint, result, expires_at, sweep_at)",
    )
    .execute(&pool)
    .await
    .expect("create hand-made table");
    pool
}

#[tokio::test]
async fn null_columns_are_a_decode_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let raw = hand_made_table(&path).await;
    let store = store_at(&path).await;
    for (version, status, token) in [
        (None, Some("completed"), Some("0".repeat(32))),
        (Some(1), None, Some("0".repeat(32))),
        (Some(1), Some("completed"), None),
    ] {
        undecodable_record_is_a_typed_error(&store, |key| {
            let raw = &raw;
            async move {
                write_row(raw, &key, version, status, token.as_deref()).await;
            }
        })
        .await;
    }
}

#[tokio::test]
async fn mistyped_columns_are_a_decode_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let raw = hand_made_table(&path).await;
    let store = store_at(&path).await;
    undecodable_record_is_a_typed_error(&store, |key| async move {
        sqlx::query(
            "INSERT INTO orchestrix_idempotency (key, v, status, token) \
             VALUES (?1, 'one', X'00FF', 12345)",
        )
        .bind(&key)
        .execute(&raw)
        .await
        .expect("write mistyped row");
    })
    .await;
}

#[tokio::test]
async fn too_large_result_finishes_the_record_without_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_at(&dir.path().join("records.db"))
        .await
        .with_max_result_bytes(16);
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
}

#[tokio::test]
async fn cleanup_deletes_expired_rows_in_batches_and_counts_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let token = FencingToken::generate().to_string();
    sqlx::query(
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 2500) \
         INSERT INTO orchestrix_idempotency (key, v, status, token, expires_at, sweep_at) \
         SELECT 'expired:' || n, 1, 'completed', ?1, unixepoch('subsec') - 1, \
                unixepoch('subsec') - 1 FROM g",
    )
    .bind(&token)
    .execute(&raw_pool(&path).await)
    .await
    .expect("insert expired rows");
    let live = unique_key("live");
    store.start(request(&live, None)).await.expect("start");
    assert_eq!(store.cleanup().await.ok(), Some(2500));
    assert!(store.get(&live).await.expect("get").is_some());
    assert_eq!(store.cleanup().await.ok(), Some(0));
}

#[tokio::test]
async fn blocked_start_writes_nothing_to_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let key = unique_key("replay");
    let StartOutcome::Acquired(token) = store.start(request(&key, None)).await.expect("start")
    else {
        panic!("a fresh key must be acquired");
    };
    let ttl = Some(std::time::Duration::from_secs(3600));
    store
        .complete(&key, token, b"done", ttl)
        .await
        .expect("complete");
    let raw = raw_pool(&path).await;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&raw)
        .await
        .expect("checkpoint");
    let wal = dir.path().join("records.db-wal");
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).ok(), Some(0));
    for _ in 0..10 {
        let replay = store.start(request(&key, None)).await.expect("replay");
        assert!(matches!(replay, StartOutcome::Existing(_)));
    }
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).ok(), Some(0));
}

const REPLAY_DB_VAR: &str = "ORX_REPLAY_DB";
const REPLAY_KEY_VAR: &str = "ORX_REPLAY_KEY";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_record_replays_in_another_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let key = unique_key("durable");
    let store = store_at(&path).await;
    let StartOutcome::Acquired(token) = store.start(request(&key, None)).await.expect("start")
    else {
        panic!("a fresh key must be acquired");
    };
    store
        .complete(&key, token, b"receipt-42", None)
        .await
        .expect("complete");
    store.close().await;
    let env = [
        (REPLAY_DB_VAR, path.display().to_string()),
        (REPLAY_KEY_VAR, key),
    ];
    run_child("replay_child", &env, Duration::from_secs(60)).await;
}

/// The restarted process; runs only when spawned by the durability test.
#[tokio::test]
#[ignore = "spawned by completed_record_replays_in_another_process"]
async fn replay_child() {
    let (Ok(path), Ok(key)) = (std::env::var(REPLAY_DB_VAR), std::env::var(REPLAY_KEY_VAR)) else {
        return;
    };
    let store = SqliteStore::open(&path)
        .await
        .expect("reopen database file");
    match store.start(request(&key, None)).await {
        Ok(StartOutcome::Existing(record)) => {
            assert_eq!(record.status, RecordStatus::Completed);
            assert_eq!(record.result.as_deref(), Some(&b"receipt-42"[..]));
        }
        other => panic!("the record must replay after a restart, got {other:?}"),
    }
}

const STORM_DB_VAR: &str = "ORX_STORM_DB";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_across_processes_executes_each_key_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    store_at(&path).await.close().await;
    let env = [(STORM_DB_VAR, path.display().to_string())];
    run_storm(&StormPlan::STANDARD, "storm_child", &env).await;
}

/// One process of the storm; runs only when spawned by the storm test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "spawned by duplicate_storm_across_processes_executes_each_key_once"]
async fn storm_child() {
    let Some(child) = StormChild::from_env() else {
        return;
    };
    let path = std::env::var(STORM_DB_VAR).expect("storm database");
    let store = SqliteStore::open(&path).await.expect("open database file");
    child.run(Arc::new(store)).await;
}

/// Every wait in the tests below is bounded: a regression fails, it never hangs.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

async fn acquire(store: &SqliteStore, key: &str) -> FencingToken {
    match bounded("start", store.start(request(key, None))).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("a fresh key must be acquired: {other:?}"),
    }
}

/// In rollback-journal mode a commit needs the file's EXCLUSIVE lock, which a reader's
/// SHARED lock blocks: past the busy timeout the commit fails and the insert is rolled
/// back. `start` must report that failure, never an acquire of a record that was not
/// written.
#[tokio::test]
async fn start_whose_commit_fails_is_an_error_and_acquires_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Delete)
        .busy_timeout(Duration::from_millis(100));
    let store = SqliteStore::open_with(options).await.expect("open");
    store.migrate().await.expect("migrate");
    let raw = raw_pool(&path).await;
    let mut reading = raw.begin().await.expect("begin a read transaction");
    sqlx::query("SELECT count(*) FROM orchestrix_idempotency")
        .fetch_one(&mut *reading)
        .await
        .expect("read, taking the SHARED lock");
    let key = unique_key("commit-fails");
    let started = bounded("start", store.start(request(&key, None))).await;
    assert!(
        matches!(started, Err(StoreError::Backend(_))),
        "a start whose commit failed must be an error: {started:?}"
    );
    reading.rollback().await.expect("end the read transaction");
    assert_eq!(bounded("get", store.get(&key)).await.ok(), Some(None));
    acquire(&store, &key).await;
}

/// `max_page_count` caps the database file as a full disk would: SQLite answers
/// `SQLITE_FULL` to a write that needs more pages.
#[tokio::test]
async fn result_refused_for_a_full_database_finishes_the_record_without_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .pragma("max_page_count", "16");
    let store = SqliteStore::open_with(options).await.expect("open");
    store.migrate().await.expect("migrate");
    let key = unique_key("full");
    let token = acquire(&store, &key).await;
    let result = vec![7u8; 256 * 1024];
    let completed = bounded("complete", store.complete(&key, token, &result, None)).await;
    assert!(
        matches!(completed, Err(StoreError::ResultRefused { size, .. }) if size == result.len()),
        "{completed:?}"
    );
    let record = bounded("get", store.get(&key))
        .await
        .expect("get")
        .expect("record kept");
    assert_eq!(
        (record.status, record.result),
        (RecordStatus::Completed, None)
    );
    let again = bounded("start", store.start(request(&key, None))).await;
    assert!(
        matches!(&again, Ok(StartOutcome::Existing(r)) if r.status == RecordStatus::Completed),
        "the operation must never run again: {again:?}"
    );
}

#[tokio::test]
async fn a_finish_without_result_that_finds_the_result_stored_is_ok() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_at(&dir.path().join("records.db")).await;
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
}

#[tokio::test]
async fn a_finish_that_finds_the_record_finished_without_result_reports_it_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_at(&dir.path().join("records.db")).await;
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
}
