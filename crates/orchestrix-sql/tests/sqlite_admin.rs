//! `SqliteStore`'s record admin on a temporary database file: the shared admin conformance
//! suite (isolated by random keys), and garbage rows written through a raw connection.
#![cfg(feature = "sqlite")]

use std::path::PathBuf;

use orchestrix::store::FencingToken;
use orchestrix_conformance::admin::{self, undecodable_records_are_reported_not_skipped};
use orchestrix_sql::SqliteStore;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

fn admin_db() -> PathBuf {
    std::env::temp_dir().join("orchestrix-sql-admin.sqlite3")
}

async fn store() -> SqliteStore {
    let store = SqliteStore::open(admin_db())
        .await
        .expect("open database file");
    store.migrate().await.expect("migrate");
    store
}

orchestrix_conformance::admin_conformance_tests!(store());
orchestrix_conformance::admin_journal_conformance_tests!(store());

#[tokio::test]
async fn keyset_pages_hold_limit_records_in_key_order() {
    admin::keyset_pages_hold_limit_records_in_key_order(&store().await).await;
}

/// Rows of this table that are not records: a status this build does not write, a token
/// that is not one, another schema version. Each is inspected as a decode error and listed
/// as undecodable.
#[tokio::test]
async fn undecodable_rows_are_reported_not_skipped() {
    let store = store().await;
    let raw = SqlitePool::connect_with(SqliteConnectOptions::new().filename(admin_db()))
        .await
        .expect("open a raw connection");
    let token = FencingToken::generate().to_string();
    for (version, status, token) in [
        (1, "done", token.as_str()),
        (1, "running", "not-a-token"),
        (7, "completed", token.as_str()),
    ] {
        let raw = raw.clone();
        undecodable_records_are_reported_not_skipped(&store, |key| async move {
            sqlx::query(
                "INSERT INTO orchestrix_idempotency (key, v, status, token, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, unixepoch('subsec') + 3600)",
            )
            .bind(key)
            .bind(version)
            .bind(status)
            .bind(token)
            .execute(&raw)
            .await
            .expect("write a garbage row");
        })
        .await;
    }
}
