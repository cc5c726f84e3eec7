//! `SqliteStore` as a journal store, on temporary database files: the journal conformance
//! suite, then what is particular to this store (its migration, its lease index, what a
//! blocked durable start writes). The conformance suite shares one file in the temp
//! directory; other tests open a file of their own.
#![cfg(feature = "sqlite")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use orchestrix::store::{
    DurableStartOutcome, FencingToken, IdempotencyStore, RecordStatus, StartOutcome, StoreError,
};
use orchestrix_conformance::journal::{durable, oversize_append_is_refused_and_appends_nothing};
use orchestrix_conformance::{PAST_SHORT, request, unique_key};
use orchestrix_sql::SqliteStore;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

mod durable_checks;
use durable_checks::{acquire, journal, short};

async fn store_at(path: &Path) -> SqliteStore {
    let store = SqliteStore::open(path).await.expect("open database file");
    store.migrate().await.expect("migrate");
    store
}

fn conformance_db() -> PathBuf {
    std::env::temp_dir().join("orchestrix-sql-journal.sqlite3")
}

/// A store on a file of its own, with the directory that holds it.
async fn fresh_store() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_at(&dir.path().join("records.db")).await;
    (store, dir)
}

/// A second connection to the same file, to write what the store would not.
async fn raw_pool(path: &Path) -> SqlitePool {
    SqlitePool::connect_with(SqliteConnectOptions::new().filename(path))
        .await
        .expect("open raw connection")
}

async fn sql(pool: &SqlitePool, text: &str) {
    sqlx::query(sqlx::AssertSqlSafe(text))
        .execute(pool)
        .await
        .expect("test SQL");
}

mod conformance {
    orchestrix_conformance::journal_conformance_tests!(async {
        super::store_at(&super::conformance_db()).await
    });

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversize_append_is_refused_and_appends_nothing() {
        let store = super::store_at(&super::conformance_db())
            .await
            .with_max_journal_bytes(1024);
        super::oversize_append_is_refused_and_appends_nothing(&store, 1024).await;
    }
}

mod checks {
    crate::durable_checks!(async { super::store_at(&super::conformance_db()).await });
}

#[tokio::test]
async fn cleanup_removes_durable_records_past_their_retention_only() {
    let (store, _dir) = fresh_store().await;
    durable_checks::cleanup_removes_durable_records_past_their_retention_only(&store).await;
}

#[tokio::test]
async fn cleanup_removes_a_taken_over_record_once_it_expires() {
    let (store, _dir) = fresh_store().await;
    durable_checks::cleanup_removes_a_taken_over_record_once_it_expires(&store).await;
}

#[tokio::test]
async fn an_oversize_input_is_refused_before_anything_is_written() {
    let (store, _dir) = fresh_store().await;
    let store = store.with_max_journal_bytes(16);
    durable_checks::an_oversize_input_is_refused_before_anything_is_written(&store).await;
}

/// The table and index exactly as the previous build's `migrate` created them.
const PREVIOUS_SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS orchestrix_idempotency ( \
       key TEXT PRIMARY KEY NOT NULL, v INTEGER NOT NULL, status TEXT NOT NULL, \
       token TEXT NOT NULL, fingerprint TEXT, result BLOB, expires_at REAL, sweep_at REAL \
     ) STRICT",
    "CREATE INDEX IF NOT EXISTS orchestrix_idempotency_sweep_at_idx \
     ON orchestrix_idempotency (sweep_at) WHERE sweep_at IS NOT NULL",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_a_file_of_the_previous_build_and_keeps_its_records() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let raw = SqlitePool::connect_with(options)
        .await
        .expect("create file");
    for ddl in PREVIOUS_SCHEMA {
        sql(&raw, ddl).await;
    }
    let old = unique_key("old");
    let token = FencingToken::generate();
    sqlx::query(
        "INSERT INTO orchestrix_idempotency (key, v, status, token, fingerprint, result) \
         VALUES (?1, 1, 'completed', ?2, 'fp', X'7265636569707400')",
    )
    .bind(&old)
    .bind(token.to_string())
    .execute(&raw)
    .await
    .expect("a record of the previous build");

    // Several processes' stores (each its own connections) upgrading the file at once.
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(SqliteStore::open(&path).await.expect("open"));
    }
    let migrations = stores.iter().map(SqliteStore::migrate);
    for migrated in futures_util::future::join_all(migrations).await {
        assert!(migrated.is_ok(), "{migrated:?}");
    }
    let store = &stores[0];
    match store.start(request(&old, Some("fp"))).await {
        Ok(StartOutcome::Existing(record)) => {
            assert_eq!(record.status, RecordStatus::Completed);
            assert_eq!(record.token, token);
            assert_eq!(record.result.as_deref(), Some(&b"receipt\0"[..]));
        }
        other => panic!("the old record must replay, got {other:?}"),
    }
    assert_eq!(journal(store).read_journal(&old).await.ok(), Some(None));
    let key = unique_key("new");
    let token = acquire(store, durable(&key, None, b"in")).await;
    assert!(journal(store).append(&key, token, b"e").await.is_ok());
    assert!(journal(store).suspend(&key, token).await.is_ok());
    match journal(store)
        .start_durable(durable(&key, None, b"in"))
        .await
    {
        Ok(DurableStartOutcome::Acquired {
            resumed: Some(j), ..
        }) => assert_eq!(j.entries, vec![b"e".to_vec()]),
        other => panic!("the upgraded file must resume a run, got {other:?}"),
    }
    let strict: Option<i64> = sqlx::query_scalar(
        "SELECT strict FROM pragma_table_list WHERE name = 'orchestrix_idempotency'",
    )
    .fetch_optional(&raw)
    .await
    .expect("catalog");
    assert_eq!(strict, Some(1), "the upgraded table stays STRICT");
}

/// The statement `abandoned` runs, for `EXPLAIN QUERY PLAN`.
const ABANDONED: &str = "SELECT key FROM orchestrix_idempotency \
     INDEXED BY orchestrix_idempotency_lease_idx \
     WHERE lease_until IS NOT NULL AND lease_until <= unixepoch('subsec') AND durable = 1 \
       AND status = 'running' \
       AND (expires_at IS NULL OR expires_at > unixepoch('subsec')) \
       AND key >= ?1 AND (?2 IS NULL OR key < ?2) AND (?3 IS NULL OR key > ?3) \
     ORDER BY key LIMIT ?4";

#[tokio::test]
async fn abandoned_reads_the_lease_index_not_the_table() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    for n in 0..5 {
        acquire(&store, short(&format!("flow:durable-{n}"), b"in")).await;
    }
    let raw = raw_pool(&path).await;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "EXPLAIN QUERY PLAN {ABANDONED}"
    )))
    .bind("flow:")
    .bind("flow;")
    .bind(None::<&str>)
    .bind(100)
    .fetch_all(&raw)
    .await
    .expect("explain");
    let plan: Vec<String> = rows
        .iter()
        .map(|r| sqlx::Row::get::<String, _>(r, "detail"))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains(
            "SEARCH orchestrix_idempotency USING INDEX orchestrix_idempotency_lease_idx ("
        ) && !plan.contains("SCAN"),
        "{plan}"
    );
    tokio::time::sleep(PAST_SHORT).await;
    let listed = journal(&store).abandoned("flow:", None, 100).await;
    assert_eq!(listed.map(|k| k.len()).ok(), Some(5));
}

/// The size of the write-ahead log after `f`, starting from an empty one.
async fn wal_growth(path: &Path, raw: &SqlitePool, f: impl AsyncFnOnce()) -> u64 {
    sql(raw, "PRAGMA wal_checkpoint(TRUNCATE)").await;
    let wal = path.with_extension("db-wal");
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).ok(), Some(0));
    f().await;
    std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(u64::MAX)
}

#[tokio::test]
async fn a_durable_start_blocked_by_a_finished_record_writes_nothing_to_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let raw = raw_pool(&path).await;
    let key = unique_key("durable-replay");
    let token = acquire(&store, durable(&key, None, b"in")).await;
    assert!(
        journal(&store)
            .append(&key, token, &[1; 5000])
            .await
            .is_ok()
    );
    let ttl = Some(Duration::from_secs(3600));
    assert!(store.complete(&key, token, b"done", ttl).await.is_ok());
    let plain = unique_key("plain-replay");
    let Ok(StartOutcome::Acquired(token)) = store.start(request(&plain, None)).await else {
        panic!("acquire");
    };
    assert!(store.complete(&plain, token, b"done", ttl).await.is_ok());
    let written = wal_growth(&path, &raw, async || {
        for _ in 0..10 {
            let replay = journal(&store)
                .start_durable(durable(&key, None, b"in"))
                .await;
            assert!(matches!(replay, Ok(DurableStartOutcome::Existing(_))));
            let replay = journal(&store)
                .start_durable(durable(&plain, None, b"in"))
                .await;
            assert!(matches!(replay, Ok(DurableStartOutcome::Existing(_))));
            let replay = store.start(request(&key, None)).await;
            assert!(matches!(replay, Ok(StartOutcome::Existing(_))));
        }
    })
    .await;
    assert_eq!(written, 0, "replays wrote {written} bytes of log");
}

#[tokio::test]
async fn a_plain_start_blocked_by_a_running_durable_record_writes_nothing_to_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let raw = raw_pool(&path).await;
    let key = unique_key("durable-running");
    acquire(&store, durable(&key, None, b"in")).await;
    let written = wal_growth(&path, &raw, async || {
        for _ in 0..10 {
            let replay = store.start(request(&key, None)).await;
            assert!(matches!(replay, Ok(StartOutcome::Existing(_))));
        }
    })
    .await;
    assert_eq!(written, 0, "blocked starts wrote {written} bytes of log");
}

/// The one write of a blocked start: a durable start blocked by a *running* durable record
/// rewrites that record's lease-index entry (with the same value), one page per attempt —
/// the price of deciding and answering in one statement (see the `durable` module docs).
#[tokio::test]
async fn a_durable_start_blocked_by_a_running_durable_record_writes_one_page() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let raw = raw_pool(&path).await;
    let page: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&raw)
        .await
        .expect("page size");
    let key = unique_key("durable-running");
    acquire(&store, durable(&key, None, b"in")).await;
    let written = wal_growth(&path, &raw, async || {
        for _ in 0..10 {
            let blocked = journal(&store)
                .start_durable(durable(&key, None, b"in"))
                .await;
            assert!(matches!(blocked, Ok(DurableStartOutcome::Existing(_))));
        }
    })
    .await;
    // The log's 32-byte header, then per commit one frame: a 24-byte header and a page.
    let one_page_each = 32 + 10 * (24 + u64::try_from(page).unwrap_or(u64::MAX));
    assert!(written <= one_page_each, "{written} > {one_page_each}");
}

#[tokio::test]
async fn a_damaged_journal_is_a_decode_error_never_an_empty_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records.db");
    let store = store_at(&path).await;
    let raw = raw_pool(&path).await;
    let key = unique_key("damaged");
    let token = acquire(&store, short(&key, b"in")).await;
    assert!(journal(&store).append(&key, token, b"entry").await.is_ok());
    sqlx::query("UPDATE orchestrix_idempotency SET journal = substr(journal, 1, 6) WHERE key = ?1")
        .bind(&key)
        .execute(&raw)
        .await
        .expect("damage");
    assert!(matches!(
        journal(&store).read_journal(&key).await,
        Err(StoreError::Decode(_))
    ));
    tokio::time::sleep(PAST_SHORT).await;
    assert!(matches!(
        journal(&store)
            .start_durable(durable(&key, None, b"in"))
            .await,
        Err(StoreError::Decode(_))
    ));
    let missing = unique_key("missing");
    acquire(&store, durable(&missing, None, b"in")).await;
    sqlx::query("UPDATE orchestrix_idempotency SET input = NULL WHERE key = ?1")
        .bind(&missing)
        .execute(&raw)
        .await
        .expect("damage");
    assert!(matches!(
        journal(&store).read_journal(&missing).await,
        Err(StoreError::Decode(_))
    ));
}

/// `append` at concurrency 1 beside `renew` and `SELECT 1` on the same pool (one
/// connection serving both, as `SqliteStore::from_pool` uses it; see
/// `durable_checks::measure_append`): with `synchronous = FULL` (the default of `open`: an
/// `fsync` per commit), then `NORMAL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test -p orchestrix-sql --test sqlite_journal -- --ignored --nocapture"]
async fn append_latency_beside_select_1() {
    for synchronous in [SqliteSynchronous::Full, SqliteSynchronous::Normal] {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("bench.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("open");
        let store = SqliteStore::from_pool(pool.clone());
        store.migrate().await.expect("migrate");
        let label = format!("SQLite synchronous={synchronous:?}");
        durable_checks::measure_append(&store, &label, || async {
            let selected = sqlx::query("SELECT 1").execute(&pool).await;
            assert!(selected.is_ok(), "SELECT 1: {selected:?}");
        })
        .await;
        store.close().await;
    }
}
