//! `PgStore`'s record admin, against the machine's PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`): the shared admin conformance suite on one
//! table (isolated by random keys), and garbage rows in tables of their own.
#![cfg(feature = "postgres")]

use std::time::Duration;

use orchestrix::store::FencingToken;
use orchestrix_conformance::admin::{self, undecodable_records_are_reported_not_skipped};
use orchestrix_sql::PgStore;
use sqlx::postgres::{PgPool, PgPoolOptions};

const CONFORMANCE_TABLE: &str = "orx_test_admin";

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn pool() -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&database_url())
        .await
        .expect("PostgreSQL must answer on DATABASE_URL (scripts/services.sh ensure_postgres)")
}

async fn store_in(table: &str) -> PgStore {
    let store = PgStore::new(pool().await)
        .with_table(table)
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

async fn conformance_store() -> PgStore {
    store_in(CONFORMANCE_TABLE).await
}

orchestrix_conformance::admin_conformance_tests!(conformance_store());
orchestrix_conformance::admin_journal_conformance_tests!(conformance_store());

#[tokio::test]
async fn keyset_pages_hold_limit_records_in_key_order() {
    let store = conformance_store().await;
    admin::keyset_pages_hold_limit_records_in_key_order(&store).await;
}

/// Rows of this table that are not records: a status this build does not write, a token
/// that is not one, another schema version. Each is inspected as a decode error and listed
/// as undecodable.
#[tokio::test]
async fn undecodable_rows_are_reported_not_skipped() {
    let store = conformance_store().await;
    let token = FencingToken::generate().to_string();
    for (version, status, token) in [
        (1, "done", token.as_str()),
        (1, "running", "not-a-token"),
        (7, "completed", token.as_str()),
    ] {
        let writer = store.clone();
        undecodable_records_are_reported_not_skipped(&store, |key| async move {
            let insert = format!(
                "INSERT INTO {} (key, v, status, token, expires_at) \
                 VALUES ($1, $2, $3, $4, now() + interval '1 hour')",
                writer.table()
            );
            sqlx::query(sqlx::AssertSqlSafe(insert))
                .bind(key)
                .bind(version)
                .bind(status)
                .bind(token)
                .execute(writer.pool())
                .await
                .expect("write a garbage row");
        })
        .await;
    }
}
