//! `PgStore` as a journal store, against the machine's PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`): the journal conformance suite, then what
//! is particular to this store (its columns, its migration, its lease index). Each test
//! that needs a table of its own drops it at its end; the conformance suite shares one.
#![cfg(feature = "postgres")]

use std::time::Duration;

use orchestrix::store::{
    DurableStartOutcome, FencingToken, IdempotencyStore, RecordStatus, StartOutcome, StoreError,
};
use orchestrix_conformance::journal::{durable, oversize_append_is_refused_and_appends_nothing};
use orchestrix_conformance::{PAST_SHORT, request, unique_key};
use orchestrix_sql::PgStore;
use sqlx::postgres::{PgPool, PgPoolOptions};

mod durable_checks;
use durable_checks::{acquire, journal, short};

const CONFORMANCE_TABLE: &str = "orx_test_journal";

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

async fn fresh_store() -> PgStore {
    store_in(&format!("orx_test_{}", random_suffix())).await
}

async fn sql(store: &PgStore, text: String) {
    sqlx::query(sqlx::AssertSqlSafe(text))
        .execute(store.pool())
        .await
        .expect("test SQL");
}

async fn drop_table(store: &PgStore) {
    sql(store, format!("DROP TABLE IF EXISTS {}", store.table())).await;
}

mod conformance {
    orchestrix_conformance::journal_conformance_tests!(async {
        super::store_in(super::CONFORMANCE_TABLE).await
    });

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversize_append_is_refused_and_appends_nothing() {
        let store = super::store_in(super::CONFORMANCE_TABLE)
            .await
            .with_max_journal_bytes(1024);
        super::oversize_append_is_refused_and_appends_nothing(&store, 1024).await;
    }
}

/// The table and index exactly as the previous build's `migrate` created them.
async fn create_previous_schema(store: &PgStore) {
    let t = store.table();
    sql(
        store,
        format!(
            "CREATE TABLE {t} (key text COLLATE \"C\" PRIMARY KEY, v integer NOT NULL, \
             status text NOT NULL, token text NOT NULL, fingerprint text, result bytea, \
             expires_at timestamptz)"
        ),
    )
    .await;
    sql(
        store,
        format!("CREATE INDEX {t}_expires_at_idx ON {t} (expires_at) WHERE expires_at IS NOT NULL"),
    )
    .await;
}

#[tokio::test]
async fn migrate_upgrades_a_table_of_the_previous_build_and_keeps_its_records() {
    let store = PgStore::new(pool(8).await)
        .with_table(&format!("orx_test_{}", random_suffix()))
        .expect("valid table name");
    create_previous_schema(&store).await;
    let old = unique_key("old");
    let token = FencingToken::generate();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (key, v, status, token, fingerprint, result) \
         VALUES ($1, 1, 'completed', $2, 'fp', 'receipt')",
        store.table()
    )))
    .bind(&old)
    .bind(token.to_string())
    .execute(store.pool())
    .await
    .expect("a record of the previous build");

    let migrations = (0..4).map(|_| store.migrate());
    for migrated in futures_util::future::join_all(migrations).await {
        assert!(migrated.is_ok(), "{migrated:?}");
    }

    match store.start(request(&old, Some("fp"))).await {
        Ok(StartOutcome::Existing(record)) => {
            assert_eq!(record.status, RecordStatus::Completed);
            assert_eq!(record.token, token);
            assert_eq!(record.result.as_deref(), Some(&b"receipt"[..]));
        }
        other => panic!("the old record must replay, got {other:?}"),
    }
    assert_eq!(journal(&store).read_journal(&old).await.ok(), Some(None));
    let key = unique_key("new");
    let token = acquire(&store, durable(&key, None, b"in")).await;
    assert!(journal(&store).append(&key, token, b"e").await.is_ok());
    assert!(journal(&store).suspend(&key, token).await.is_ok());
    match journal(&store)
        .start_durable(durable(&key, None, b"in"))
        .await
    {
        Ok(DurableStartOutcome::Acquired {
            resumed: Some(j), ..
        }) => assert_eq!(j.entries, vec![b"e".to_vec()]),
        other => panic!("the upgraded table must resume a run, got {other:?}"),
    }
    let index: Option<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = $1 AND indexname = $1 || '_lease_idx'",
    )
    .bind(store.table())
    .fetch_optional(store.pool())
    .await
    .expect("catalog");
    assert!(
        index.is_some_and(|d| d.contains("WHERE (lease_until IS NOT NULL)")),
        "the lease index must exist"
    );
    let storage: Option<String> = sqlx::query_scalar(
        "SELECT attstorage::text FROM pg_attribute \
         WHERE attrelid = to_regclass($1) AND attname = 'journal'",
    )
    .bind(store.table())
    .fetch_optional(store.pool())
    .await
    .expect("catalog");
    assert_eq!(
        storage.as_deref(),
        Some("e"),
        "the journal is kept uncompressed"
    );
    drop_table(&store).await;
}

#[tokio::test]
async fn migrate_of_an_upgraded_table_does_not_wait_for_readers() {
    let store = fresh_store().await;
    // A long read (a report, `pg_dump`) holds ACCESS SHARE: an `ALTER TABLE` would queue
    // behind it, and every operation on the table behind the `ALTER`. A migrate that reads
    // the catalog first alters nothing once the table is up to date.
    let mut holder = store.pool().begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {} IN ACCESS SHARE MODE",
        store.table()
    )))
    .execute(&mut *holder)
    .await
    .expect("lock");
    let migrated = tokio::time::timeout(Duration::from_secs(5), store.migrate()).await;
    assert!(
        matches!(migrated, Ok(Ok(()))),
        "migrate waited for a lock: {migrated:?}"
    );
    holder.rollback().await.expect("rollback");
    drop_table(&store).await;
}

mod checks {
    crate::durable_checks!(async { super::store_in(super::CONFORMANCE_TABLE).await });
}

#[tokio::test]
async fn cleanup_removes_durable_records_past_their_retention_only() {
    let store = fresh_store().await;
    durable_checks::cleanup_removes_durable_records_past_their_retention_only(&store).await;
    drop_table(&store).await;
}

#[tokio::test]
async fn cleanup_removes_a_taken_over_record_once_it_expires() {
    let store = fresh_store().await;
    durable_checks::cleanup_removes_a_taken_over_record_once_it_expires(&store).await;
    drop_table(&store).await;
}

#[tokio::test]
async fn an_oversize_input_is_refused_before_anything_is_written() {
    let store = fresh_store().await.with_max_journal_bytes(16);
    durable_checks::an_oversize_input_is_refused_before_anything_is_written(&store).await;
    drop_table(&store).await;
}

#[tokio::test]
async fn abandoned_reads_the_lease_index_not_the_table() {
    let store = fresh_store().await;
    let t = store.table();
    // Many plain records and a few durable ones, as a real table would hold.
    sql(
        &store,
        format!(
            "INSERT INTO {t} (key, v, status, token, expires_at) \
             SELECT 'flow:' || g, 1, 'completed', repeat('0', 32), now() + interval '1 hour' \
             FROM generate_series(1, 20000) AS g"
        ),
    )
    .await;
    for n in 0..5 {
        acquire(&store, short(&format!("flow:durable-{n}"), b"in")).await;
    }
    sql(&store, format!("ANALYZE {t}")).await;
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN SELECT key FROM {t} \
         WHERE lease_until IS NOT NULL AND lease_until <= now() AND durable \
           AND status = 'running' AND (expires_at IS NULL OR expires_at > now()) \
           AND key >= 'flow:' AND key < 'flow;' ORDER BY key LIMIT 100"
    )))
    .fetch_all(store.pool())
    .await
    .expect("explain");
    let plan = plan.join("\n");
    assert!(plan.contains(&format!("{t}_lease_idx")), "{plan}");
    tokio::time::sleep(PAST_SHORT).await;
    let listed = journal(&store).abandoned("flow:", None, 100).await;
    assert_eq!(listed.map(|k| k.len()).ok(), Some(5));
    drop_table(&store).await;
}

#[tokio::test]
async fn a_damaged_journal_is_a_decode_error_never_an_empty_one() {
    let store = fresh_store().await;
    let key = unique_key("damaged");
    let token = acquire(&store, short(&key, b"in")).await;
    assert!(journal(&store).append(&key, token, b"entry").await.is_ok());
    sql(
        &store,
        format!(
            "UPDATE {} SET journal = substring(journal from 1 for 6) WHERE key = '{key}'",
            store.table()
        ),
    )
    .await;
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
    sql(
        &store,
        format!(
            "UPDATE {} SET journal = NULL WHERE key = '{missing}'",
            store.table()
        ),
    )
    .await;
    assert!(matches!(
        journal(&store).read_journal(&missing).await,
        Err(StoreError::Decode(_))
    ));
    drop_table(&store).await;
}

/// `append` at concurrency 1 beside `renew` and `SELECT 1` on the same one-connection
/// pool (see `durable_checks::measure_append`): as configured (`synchronous_commit` of the
/// server, `on` by default: each commit waits for its WAL flush), then with
/// `synchronous_commit = off` for the session, to show what the flush costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test -p orchestrix-sql --test postgres_journal -- --ignored --nocapture"]
async fn append_latency_beside_select_1() {
    let table = format!("orx_bench_{}", random_suffix());
    for flush in ["on", "off"] {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    let set = format!("SET synchronous_commit = {flush}");
                    sqlx::query(sqlx::AssertSqlSafe(set))
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .connect(&database_url())
            .await
            .expect("PostgreSQL");
        let store = PgStore::new(pool.clone())
            .with_table(&table)
            .expect("valid name");
        store.migrate().await.expect("migrate");
        let label = format!("PostgreSQL synchronous_commit={flush}");
        durable_checks::measure_append(&store, &label, || async {
            let selected = sqlx::query("SELECT 1").execute(&pool).await;
            assert!(selected.is_ok(), "SELECT 1: {selected:?}");
        })
        .await;
        if flush == "off" {
            drop_table(&store).await;
        }
    }
}
