//! Property tests of row decoding, through the public stores against real databases:
//! arbitrary column values written with raw SQL make `get` and `start` return a record or a
//! typed error — never a panic, never a backend error, and never "free" while the row is
//! live and cannot be read.
//!
//! SQLite: a test table created without `STRICT`, so a column may hold any SQLite type.
//! PostgreSQL: the store's own table (typed columns, arbitrary values), and a table whose
//! columns have the wrong types (read with `get`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use orchestrix::store::{IdempotencyStore, Record, StartOutcome, StartRequest, StoreError};
use orchestrix_sql::{PgStore, SqliteStore};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: 128,
        failure_persistence: None,
        ..Config::default()
    })
}

fn typed(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Decode(_) | StoreError::UnsupportedVersion { .. }
    )
}

/// `start` must agree with `get`: the same record, or a typed error where `get` failed.
/// It may acquire only a key that `get` reads as absent (expired) or as a failed record it
/// may re-run, or — `failed_row_rerun` — a row whose decision columns say "failed, this
/// schema version, agreeing fingerprint" while the caller re-runs failures.
///
/// The stores check the decision columns and the token's form (and, on SQLite, the
/// fingerprint's type) before a takeover, so a row with a malformed token is reported,
/// never freed. What remains is a failed row whose *other* columns are of the wrong type —
/// possible only in this test's loose (non-STRICT) SQLite table — which is overwritten with
/// a well-formed record, never read as garbage.
/// The form `FencingToken`'s `Display` writes.
fn is_token(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_start(
    read: &Result<Option<Record>, StoreError>,
    started: Result<StartOutcome, StoreError>,
    req: &StartRequest<'_>,
    failed_row_rerun: bool,
) -> Result<(), TestCaseError> {
    match started {
        Ok(StartOutcome::Existing(record)) => {
            prop_assert_eq!(Some(&record), read.as_ref().ok().and_then(Option::as_ref));
        }
        Ok(StartOutcome::Acquired(_)) => match read {
            Ok(None) => {}
            Ok(Some(record)) => prop_assert!(
                req.may_take_over(record.status, record.fingerprint.as_deref()),
                "start took over a live record it may not: {record:?}"
            ),
            Err(_) => prop_assert!(
                failed_row_rerun,
                "start took over a live row get cannot read: {read:?}"
            ),
        },
        Err(e) => {
            prop_assert!(typed(&e), "start: untyped error {e:?}");
            prop_assert!(
                read.is_err(),
                "start failed ({e:?}) where get read {read:?}"
            );
        }
    }
    Ok(())
}

fn read_is_typed(read: &Result<Option<Record>, StoreError>) -> Result<(), TestCaseError> {
    if let Err(e) = read {
        prop_assert!(typed(e), "get: untyped error {e:?}");
    }
    Ok(())
}

/// Any SQLite value.
#[derive(Debug, Clone)]
enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Real),
        ".{0,12}".prop_map(Value::Text),
        prop::collection::vec(any::<u8>(), 0..12).prop_map(Value::Blob),
    ]
}

fn version() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => Just(Value::Int(1)),
        1 => Just(Value::Int(2)),
        1 => Just(Value::Int(-1)),
        1 => Just(Value::Int(i64::MAX)),
        1 => Just(Value::Real(1.0)),
        1 => Just(Value::Text("1".to_owned())),
        1 => any_value(),
    ]
}

fn status() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => prop_oneof![Just("running"), Just("completed"), Just("failed")]
            .prop_map(|s| Value::Text(s.to_owned())),
        1 => Just(Value::Text("done".to_owned())),
        1 => Just(Value::Blob(b"failed".to_vec())),
        1 => any_value(),
    ]
}

fn token() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => "[0-9a-f]{32}".prop_map(Value::Text),
        1 => "[0-9a-fA-Fx+ -]{30,33}".prop_map(Value::Text),
        1 => any_value(),
    ]
}

fn fingerprint() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => Just(Value::Null),
        2 => Just(Value::Text("fp-1".to_owned())),
        1 => Just(Value::Blob(vec![0xff, 0xfe])),
        1 => any_value(),
    ]
}

/// Live rows (no expiry, or an hour ahead) mostly; sometimes expired.
fn expiry() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        2 => Just(None),
        2 => Just(Some(3600.0)),
        1 => Just(Some(-3600.0)),
    ]
}

#[derive(Debug, Clone)]
struct Row {
    v: Value,
    status: Value,
    token: Value,
    fingerprint: Value,
    result: Value,
    /// Seconds from now; `None`: kept forever.
    expires_in: Option<f64>,
}

fn row() -> impl Strategy<Value = Row> {
    (
        version(),
        status(),
        token(),
        fingerprint(),
        any_value(),
        expiry(),
    )
        .prop_map(|(v, status, token, fingerprint, result, expires_in)| Row {
            v,
            status,
            token,
            fingerprint,
            result,
            expires_in,
        })
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

fn bind_sqlite(query: SqliteQuery<'_>, value: Value) -> SqliteQuery<'_> {
    match value {
        Value::Null => query.bind(None::<i64>),
        Value::Int(n) => query.bind(n),
        Value::Real(x) => query.bind(x),
        Value::Text(s) => query.bind(s),
        Value::Blob(b) => query.bind(b),
    }
}

#[test]
fn arbitrary_sqlite_values_are_records_or_typed_errors() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("props.db");
    let (store, raw) = runtime.block_on(async {
        let store = SqliteStore::open(&path)
            .await
            .unwrap()
            .with_table("loose")
            .unwrap();
        let raw = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
        // Not STRICT: every column takes any value. `migrate` keeps this table.
        sqlx::query(
            "CREATE TABLE loose (key TEXT PRIMARY KEY NOT NULL, v, status, token, \
             fingerprint, result, expires_at REAL, sweep_at REAL)",
        )
        .execute(&raw)
        .await
        .unwrap();
        store.migrate().await.unwrap();
        (store, raw)
    });
    let case = AtomicU64::new(0);
    let outcome = runner().run(
        &(row(), any::<bool>(), any::<bool>()),
        |(row, rerun_failed, with_fingerprint)| {
            runtime.block_on(async {
                let key = format!("k{}", case.fetch_add(1, Ordering::Relaxed));
                let insert = sqlx::query(
                    "INSERT INTO loose (key, v, status, token, fingerprint, result, expires_at, \
                     sweep_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, unixepoch('subsec') + ?7, NULL)",
                )
                .bind(&key);
                let insert = bind_sqlite(insert, row.v.clone());
                let insert = bind_sqlite(insert, row.status.clone());
                let insert = bind_sqlite(insert, row.token.clone());
                let insert = bind_sqlite(insert, row.fingerprint.clone());
                let insert = bind_sqlite(insert, row.result.clone());
                insert
                    .bind(row.expires_in)
                    .execute(&raw)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("insert: {e}")))?;
                let read = store.get(&key).await;
                read_is_typed(&read)?;
                if row.expires_in.is_some_and(|s| s < 0.0) {
                    prop_assert!(matches!(read, Ok(None)), "an expired row read as {read:?}");
                }
                let req = StartRequest {
                    key: &key,
                    fingerprint: with_fingerprint.then_some("fp-1"),
                    lease: Duration::from_secs(30),
                    rerun_failed,
                };
                let started = store.start(req).await;
                let version_1 =
                    matches!(row.v, Value::Int(1)) || matches!(row.v, Value::Real(x) if x == 1.0);
                let failed = matches!(&row.status, Value::Text(s) if s == "failed");
                let agrees = !with_fingerprint
                    || matches!(&row.fingerprint, Value::Null)
                    || matches!(&row.fingerprint, Value::Text(fp) if fp == "fp-1");
                let token_ok = matches!(&row.token, Value::Text(t) if is_token(t));
                let fingerprint_ok = matches!(&row.fingerprint, Value::Null | Value::Text(_));
                let failed_row_rerun =
                    rerun_failed && version_1 && failed && agrees && token_ok && fingerprint_ok;
                check_start(&read, started, &req, failed_row_rerun)
            })
        },
    );
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn table_name(what: &str) -> String {
    format!("props_{what}_{:012x}", fastrand::u64(..) >> 16)
}

/// PostgreSQL text cannot hold NUL.
fn pg_text() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

#[derive(Debug, Clone)]
struct PgRow {
    v: i32,
    status: String,
    token: String,
    fingerprint: Option<String>,
    result: Option<Vec<u8>>,
    /// Seconds from now; `None`: kept forever.
    expires_in: Option<f64>,
}

fn pg_row() -> impl Strategy<Value = PgRow> {
    let v = prop_oneof![3 => Just(1), 1 => Just(2), 1 => Just(-1), 1 => any::<i32>()];
    let status = prop_oneof![
        3 => prop_oneof![Just("running"), Just("completed"), Just("failed")].prop_map(str::to_owned),
        1 => pg_text(),
    ];
    let token = prop_oneof![3 => "[0-9a-f]{32}", 1 => "[0-9a-fA-Fx+ -]{30,33}", 1 => pg_text()];
    let fingerprint = prop_oneof![
        Just(None),
        Just(Some("fp-1".to_owned())),
        pg_text().prop_map(Some)
    ];
    let result = prop::option::of(prop::collection::vec(any::<u8>(), 0..12));
    (v, status, token, fingerprint, result, expiry()).prop_map(
        |(v, status, token, fingerprint, result, expires_in)| PgRow {
            v,
            status,
            token,
            fingerprint,
            result,
            expires_in,
        },
    )
}

#[test]
fn arbitrary_postgres_values_are_records_or_typed_errors() {
    let runtime = runtime();
    let table = table_name("values");
    let store = runtime.block_on(async {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&database_url())
            .await
            .expect("PostgreSQL must answer on DATABASE_URL");
        let store = PgStore::new(pool).with_table(&table).unwrap();
        store.migrate().await.unwrap();
        store
    });
    let case = AtomicU64::new(0);
    let insert_sql = format!(
        "INSERT INTO {table} (key, v, status, token, fingerprint, result, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, now() + $7 * interval '1 second')"
    );
    let outcome = runner().run(
        &(pg_row(), any::<bool>(), any::<bool>()),
        |(row, rerun_failed, with_fingerprint)| {
            runtime.block_on(async {
                let key = format!("k{}", case.fetch_add(1, Ordering::Relaxed));
                sqlx::query(sqlx::AssertSqlSafe(insert_sql.as_str()))
                    .bind(&key)
                    .bind(row.v)
                    .bind(&row.status)
                    .bind(&row.token)
                    .bind(&row.fingerprint)
                    .bind(&row.result)
                    .bind(row.expires_in)
                    .execute(store.pool())
                    .await
                    .map_err(|e| TestCaseError::fail(format!("insert: {e}")))?;
                let read = store.get(&key).await;
                read_is_typed(&read)?;
                if row.expires_in.is_some_and(|s| s < 0.0) {
                    prop_assert!(matches!(read, Ok(None)), "an expired row read as {read:?}");
                }
                let req = StartRequest {
                    key: &key,
                    fingerprint: with_fingerprint.then_some("fp-1"),
                    lease: Duration::from_secs(30),
                    rerun_failed,
                };
                let started = store.start(req).await;
                // Every PostgreSQL column is typed: with a well-formed token the row decodes,
                // so no takeover of an undecodable row is allowed at all.
                check_start(&read, started, &req, false)
            })
        },
    );
    runtime.block_on(async {
        let drop = format!("DROP TABLE IF EXISTS {table}");
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(store.pool())
            .await;
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

#[test]
fn postgres_columns_of_the_wrong_type_are_decode_errors() {
    let runtime = runtime();
    let table = table_name("types");
    let store = runtime.block_on(async {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&database_url())
            .await
            .expect("PostgreSQL must answer on DATABASE_URL");
        let create = format!(
            "CREATE TABLE {table} (key text COLLATE \"C\" PRIMARY KEY, v text, status bytea, \
             token bigint, fingerprint bytea, result text, expires_at timestamptz)"
        );
        sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&pool)
            .await
            .unwrap();
        PgStore::new(pool).with_table(&table).unwrap()
    });
    let case = AtomicU64::new(0);
    let insert_sql = format!(
        "INSERT INTO {table} (key, v, status, token, fingerprint, result) \
         VALUES ($1, $2, $3, $4, $5, $6)"
    );
    let values = (
        prop::option::of(pg_text()),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
        prop::option::of(any::<i64>()),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
        prop::option::of(pg_text()),
    );
    let outcome = runner().run(&values, |(v, status, token, fingerprint, result)| {
        runtime.block_on(async {
            let key = format!("k{}", case.fetch_add(1, Ordering::Relaxed));
            sqlx::query(sqlx::AssertSqlSafe(insert_sql.as_str()))
                .bind(&key)
                .bind(&v)
                .bind(&status)
                .bind(token)
                .bind(&fingerprint)
                .bind(&result)
                .execute(store.pool())
                .await
                .map_err(|e| TestCaseError::fail(format!("insert: {e}")))?;
            let read = store.get(&key).await;
            prop_assert!(
                matches!(read, Err(StoreError::Decode(_))),
                "a row of the wrong column types read as {read:?}"
            );
            Ok(())
        })
    });
    runtime.block_on(async {
        let drop = format!("DROP TABLE IF EXISTS {table}");
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(store.pool())
            .await;
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
