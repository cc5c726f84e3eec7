//! What every backend's test file needs: a store the tests write records into with the
//! library, the command line that opens the same store, a way to write garbage under a
//! key, and the `orchestrix` binary run against it.
#![allow(dead_code)] // each test binary uses its own backend

pub mod scenarios;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::types::AttributeValue;
use orchestrix::store::IdempotencyStore;
use orchestrix_dynamodb::{DynamoOptions, DynamoStore};
use orchestrix_redis::RedisStore;
use orchestrix_sql::{PgStore, SqliteStore};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use tokio::sync::OnceCell;

/// How long one run of the binary may take: a hang is a failure, not a stuck test.
const COMMAND_BOUND: Duration = Duration::from_secs(60);

/// A random suffix, unique across tests and runs.
pub fn random() -> String {
    format!("{:012x}", fastrand::u64(..) >> 16)
}

/// The store under test, seen from both sides.
pub struct Backend {
    /// The store, for writing records with the library.
    pub store: Arc<dyn IdempotencyStore>,
    /// The global options that open the same store from the command line.
    args: Vec<String>,
    /// Environment the command line needs besides (DynamoDB's credentials).
    envs: Vec<(String, String)>,
    garbage: Garbage,
    /// A directory that lives as long as the backend (SQLite's file).
    _dir: Option<tempfile::TempDir>,
}

/// How to write a value under a key that is not a record.
enum Garbage {
    Redis {
        prefix: String,
    },
    Postgres {
        pool: PgPool,
        table: String,
    },
    Sqlite {
        pool: SqlitePool,
    },
    Dynamo {
        client: aws_sdk_dynamodb::Client,
        table: String,
    },
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The run succeeded; its standard output.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "expected success, got {self:#?}");
        &self.stdout
    }

    /// The run failed with `code`, one line on standard error and no panic.
    pub fn failed(&self, code: i32) -> &str {
        assert_eq!(self.code, code, "expected exit {code}, got {self:#?}");
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
        self.stderr.trim_end()
    }

    /// The run's standard output as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }
}

/// Runs the binary with `args`, `envs` and `stdin`.
pub async fn orchestrix(args: Vec<String>, envs: &[(String, String)], stdin: &str) -> Run {
    let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_orchestrix"));
    // Nothing of the environment this test runs in may point the binary elsewhere (AWS's
    // own endpoints above all): it gets only what `envs` says.
    for name in [
        "ORCHESTRIX_STORE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ] {
        cmd.env_remove(name);
    }
    cmd.args(args)
        .envs(envs.iter().cloned())
        .write_stdin(stdin)
        .timeout(COMMAND_BOUND);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("the command's thread")
        .expect("run the binary");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

impl Backend {
    /// Runs the binary on this store with `args`.
    pub async fn cli(&self, args: &[&str]) -> Run {
        self.cli_with_input(args, "").await
    }

    /// Runs the binary on this store with `args`, `stdin` as its standard input.
    pub async fn cli_with_input(&self, args: &[&str], stdin: &str) -> Run {
        let all = self
            .args
            .iter()
            .cloned()
            .chain(args.iter().map(|a| (*a).to_owned()))
            .collect();
        orchestrix(all, &self.envs, stdin).await
    }

    /// Whether the store keeps journals (durable flows run on it).
    pub fn keeps_journals(&self) -> bool {
        self.store.journal_store().is_some()
    }

    /// Writes a value that is not a record under `key`.
    pub async fn write_garbage(&self, key: &str) {
        match &self.garbage {
            Garbage::Redis { prefix } => {
                let client = orchestrix_redis::redis::Client::open(redis_url()).expect("URL");
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("Redis answers");
                let _: () = orchestrix_redis::redis::cmd("SET")
                    .arg(format!("{prefix}{key}"))
                    .arg("not a record")
                    .query_async(&mut conn)
                    .await
                    .expect("SET");
            }
            Garbage::Postgres { pool, table } => {
                let insert = format!(
                    "INSERT INTO {table} (key, v, status, token, expires_at) \
                     VALUES ($1, 1, 'done', '0123456789abcdef0123456789abcdef', \
                     now() + interval '1 hour')"
                );
                sqlx::query(sqlx::AssertSqlSafe(insert))
                    .bind(key)
                    .execute(pool)
                    .await
                    .expect("insert a garbage row");
            }
            Garbage::Sqlite { pool } => {
                sqlx::query(
                    "INSERT INTO orchestrix_idempotency (key, v, status, token, expires_at) \
                     VALUES (?1, 1, 'done', '0123456789abcdef0123456789abcdef', \
                     unixepoch('subsec') + 3600)",
                )
                .bind(key)
                .execute(pool)
                .await
                .expect("insert a garbage row");
            }
            Garbage::Dynamo { client, table } => {
                client
                    .put_item()
                    .table_name(table)
                    .item("key", AttributeValue::S(key.to_owned()))
                    .item("junk", AttributeValue::S("written by someone else".into()))
                    .send()
                    .await
                    .expect("raw PutItem");
            }
        }
    }
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A Redis store under a key prefix of its own.
pub async fn redis() -> Backend {
    let prefix = format!("orchestrix-cli-test:{}:", random());
    let store = RedisStore::builder(redis_url())
        .key_prefix(&prefix)
        .connect()
        .await
        .expect("Redis must answer at REDIS_URL (scripts/test starts one)");
    Backend {
        store: Arc::new(store),
        args: vec![
            "--store".into(),
            redis_url(),
            "--prefix".into(),
            prefix.clone(),
        ],
        envs: Vec::new(),
        garbage: Garbage::Redis { prefix },
        _dir: None,
    }
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A PostgreSQL store on this binary's table (tests keep to flows of their own).
pub async fn postgres() -> Backend {
    const TABLE: &str = "orx_cli_test";
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&database_url())
        .await
        .expect("PostgreSQL must answer on DATABASE_URL (scripts/services.sh ensure_postgres)");
    let store = PgStore::new(pool.clone())
        .with_table(TABLE)
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    Backend {
        store: Arc::new(store),
        args: vec![
            "--store".into(),
            database_url(),
            "--table".into(),
            TABLE.into(),
        ],
        envs: Vec::new(),
        garbage: Garbage::Postgres {
            pool,
            table: TABLE.into(),
        },
        _dir: None,
    }
}

/// A SQLite store in a file of its own.
pub async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path: PathBuf = dir.path().join("records.db");
    let store = SqliteStore::open(&path).await.expect("open the database");
    store.migrate().await.expect("migrate");
    let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path))
        .await
        .expect("a raw connection");
    Backend {
        store: Arc::new(store),
        args: vec!["--store".into(), format!("sqlite://{}", path.display())],
        envs: Vec::new(),
        garbage: Garbage::Sqlite { pool },
        _dir: Some(dir),
    }
}

/// The local DynamoDB-compatible server's endpoint (`scripts/test` starts one).
pub fn dynamodb_endpoint() -> String {
    std::env::var("DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "DYNAMODB_ENDPOINT is not set: run the tests through scripts/test, which starts a \
             DynamoDB-compatible server on loopback and exports it"
        )
    })
}

fn dynamodb_client() -> aws_sdk_dynamodb::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1))
        .operation_attempt_timeout(Duration::from_secs(10))
        .build();
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(dynamodb_endpoint())
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(2))
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// A DynamoDB store on this binary's table, created on first use.
pub async fn dynamodb() -> Backend {
    static TABLE: OnceCell<String> = OnceCell::const_new();
    let client = dynamodb_client();
    let table = TABLE
        .get_or_init(|| async {
            let table = format!("orchestrix-cli-{}", random());
            let store = DynamoStore::new(dynamodb_client(), DynamoOptions::new(&table))
                .expect("valid options");
            store
                .create_table_if_missing()
                .await
                .expect("create the test table");
            table
        })
        .await
        .clone();
    let store =
        DynamoStore::new(client.clone(), DynamoOptions::new(&table)).expect("valid options");
    let url = format!(
        "dynamodb://{table}?endpoint={}&region=us-east-1",
        dynamodb_endpoint()
    );
    Backend {
        store: Arc::new(store),
        args: vec!["--store".into(), url],
        envs: [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into(),
        garbage: Garbage::Dynamo { client, table },
        _dir: None,
    }
}
