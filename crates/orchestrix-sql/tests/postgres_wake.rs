//! `OnRunning::Wait` on PostgreSQL is woken by `LISTEN`/`NOTIFY`: two stores on the same
//! table (two processes, as far as PostgreSQL can tell), a waiter on one and the owner on
//! the other. The waiter's store has a safety poll of an hour, so within each test's bound
//! only a notification (or a listener reconnection) can wake it.
#![cfg(feature = "postgres")]

use std::time::Duration;

use orchestrix::store::{
    FencingToken, IdempotencyStore, RecordStatus, StartOutcome, StartRequest, Wait,
};
use orchestrix_sql::PgStore;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// The bound of each wait in these tests: far below the safety poll, far above any
/// notification's delay on a loaded machine.
const BOUND: Duration = Duration::from_secs(30);
const SAFETY_POLL: Duration = Duration::from_secs(3600);

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

/// Two stores on one new table, each with its own pool: the waiter's, then the owner's.
async fn two_stores() -> (PgStore, PgStore) {
    let table = format!("orx_test_wake_{:012x}", fastrand::u64(..) >> 16);
    let waiter = PgStore::new(pool().await)
        .with_table(&table)
        .expect("valid table name")
        .with_wait_safety_poll(SAFETY_POLL);
    waiter.migrate().await.expect("migrate");
    let owner = PgStore::new(pool().await)
        .with_table(&table)
        .expect("valid table name");
    (waiter, owner)
}

async fn drop_table(store: &PgStore) {
    let drop = format!("DROP TABLE IF EXISTS {}", store.table());
    let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
        .execute(store.pool())
        .await;
}

fn request(key: &str) -> StartRequest<'_> {
    StartRequest {
        key,
        fingerprint: None,
        lease: Duration::from_secs(600),
        rerun_failed: false,
    }
}

async fn acquire(store: &PgStore, key: &str) -> FencingToken {
    match store.start(request(key)).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("expected an acquire of {key}, got {other:?}"),
    }
}

/// What the engine does under `OnRunning::Wait`: look, and wait while the record runs.
/// Returns how many waits it took, and what it found at the end (`None`: the key is free).
async fn wait_until_not_running(store: &PgStore, key: &str) -> (u32, Option<RecordStatus>) {
    let mut wait = Wait::new(SAFETY_POLL);
    let mut waits = 0;
    loop {
        match store.get(key).await.expect("get") {
            Some(record) if record.status == RecordStatus::Running => {}
            other => return (waits, other.map(|r| r.status)),
        }
        store
            .wait_for_change(key, wait)
            .await
            .expect("wait_for_change");
        waits += 1;
        wait = wait.next(SAFETY_POLL);
    }
}

/// The listener's backend: the session whose last statement listened on the table's
/// channel.
async fn listener_pid(store: &PgStore) -> Option<i32> {
    let find =
        "SELECT pid FROM pg_stat_activity WHERE query = $1 ORDER BY backend_start DESC LIMIT 1";
    let listen = format!("LISTEN \"{}_wake\"", store.table());
    sqlx::query_scalar::<_, i32>(find)
        .bind(listen)
        .fetch_optional(store.pool())
        .await
        .expect("read pg_stat_activity")
}

/// Waits (without a deadline of its own: the test's bound applies) until the waiter's
/// store has a listening connection other than `not`.
async fn listening(store: &PgStore, not: Option<i32>) -> i32 {
    loop {
        if let Some(pid) = listener_pid(store).await
            && Some(pid) != not
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_waiter_is_woken_by_a_finish_committed_through_another_store() {
    let (waiter_store, owner_store) = two_stores().await;
    let key = "finished-elsewhere";
    let token = acquire(&owner_store, key).await;
    let waiter = tokio::spawn({
        let store = waiter_store.clone();
        async move { wait_until_not_running(&store, key).await }
    });
    let test = async {
        listening(&waiter_store, None).await;
        owner_store
            .complete(key, token, b"done", None)
            .await
            .expect("complete");
        waiter.await.expect("waiter task")
    };
    let outcome = tokio::time::timeout(BOUND, test).await;
    drop_table(&owner_store).await;
    let (_, status) = outcome.expect("the notification woke the waiter within the bound");
    assert_eq!(status, Some(RecordStatus::Completed));
}

#[tokio::test]
async fn a_waiter_is_woken_by_a_release_committed_through_another_store() {
    let (waiter_store, owner_store) = two_stores().await;
    let key = "released-elsewhere";
    let token = acquire(&owner_store, key).await;
    let waiter = tokio::spawn({
        let store = waiter_store.clone();
        async move { wait_until_not_running(&store, key).await }
    });
    let test = async {
        listening(&waiter_store, None).await;
        owner_store.release(key, token).await.expect("release");
        waiter.await.expect("waiter task")
    };
    let outcome = tokio::time::timeout(BOUND, test).await;
    drop_table(&owner_store).await;
    let (_, status) = outcome.expect("the notification woke the waiter within the bound");
    assert_eq!(status, None);
}

#[tokio::test]
async fn a_waiter_is_still_answered_after_the_listening_connection_is_killed() {
    let (waiter_store, owner_store) = two_stores().await;
    let key = "listener-killed";
    let token = acquire(&owner_store, key).await;
    let waiter = tokio::spawn({
        let store = waiter_store.clone();
        async move { wait_until_not_running(&store, key).await }
    });
    let test = async {
        let first = listening(&waiter_store, None).await;
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(first)
            .fetch_one(owner_store.pool())
            .await
            .expect("pg_terminate_backend");
        assert!(killed, "the listener's backend was terminated");
        // The store listens again on a new connection...
        let second = listening(&waiter_store, Some(first)).await;
        assert_ne!(first, second);
        // ...and the waiter, which survived the loss, is woken by the next notification.
        owner_store
            .complete(key, token, b"done", None)
            .await
            .expect("complete");
        waiter.await.expect("waiter task")
    };
    let outcome = tokio::time::timeout(BOUND, test).await;
    drop_table(&owner_store).await;
    let (_, status) = outcome.expect("the waiter was answered within the bound");
    assert_eq!(status, Some(RecordStatus::Completed));
}
