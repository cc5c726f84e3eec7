//! Opening the store a [`StoreSpec`] names, within the connect timeout.

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use orchestrix::store::IdempotencyStore;
use orchestrix_dynamodb::{DynamoOptions, DynamoStore};
use orchestrix_redis::RedisStore;
use orchestrix_sql::{PgStore, SqliteStore};
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;

use crate::store_url::{DynamoSpec, StoreSpec, redacted};

/// How long to wait for the store.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a connection to be accepted.
    pub connect: Duration,
    /// For one answer.
    pub answer: Duration,
}

/// The store `url` names, connected (Redis, PostgreSQL, SQLite) or configured (DynamoDB,
/// whose client connects on its first request).
///
/// # Errors
/// A bad URL, an unreachable store (within `timeouts.connect`), a missing SQLite file,
/// DynamoDB without a region or credentials.
pub async fn open(
    url: &str,
    prefix: Option<&str>,
    table: Option<&str>,
    timeouts: Timeouts,
) -> anyhow::Result<Arc<dyn IdempotencyStore>> {
    let spec = StoreSpec::parse(url, prefix, table)?;
    // Each client bounds its own connection; this bounds the whole of opening, retries and
    // name resolution included.
    let bound = timeouts.connect + Duration::from_secs(1);
    let opened = tokio::time::timeout(bound, open_spec(spec, timeouts)).await;
    opened.unwrap_or_else(|_| {
        Err(anyhow!(
            "{} did not answer within {:?}",
            redacted(url),
            timeouts.connect
        ))
    })
}

async fn open_spec(
    spec: StoreSpec,
    timeouts: Timeouts,
) -> anyhow::Result<Arc<dyn IdempotencyStore>> {
    Ok(match spec {
        StoreSpec::Redis { url, prefix } => {
            let mut builder = RedisStore::builder(url.as_str())
                .connection_timeout(timeouts.connect)
                .response_timeout(timeouts.answer);
            if let Some(prefix) = prefix {
                builder = builder.key_prefix(prefix);
            }
            let store = builder
                .connect()
                .await
                .with_context(|| format!("cannot open {}", redacted(&url)))?;
            Arc::new(store)
        }
        StoreSpec::Postgres { url, table } => {
            let options = PgConnectOptions::from_str(&url)
                .with_context(|| format!("{} is not a PostgreSQL URL", redacted(&url)))?;
            // One connection first, so that a refused one says why (a pool only says that
            // it timed out); the pool opens its own on first use.
            let first = PgConnection::connect_with(&options)
                .await
                .with_context(|| format!("cannot connect to {}", redacted(&url)))?;
            let _ = first.close().await;
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(timeouts.connect)
                .connect_lazy_with(options);
            let mut store = PgStore::new(pool).with_operation_timeout(timeouts.answer);
            if let Some(table) = table {
                store = store.with_table(&table)?;
            }
            Arc::new(store)
        }
        StoreSpec::Sqlite { path, table } => Arc::new(open_sqlite(&path, table.as_deref()).await?),
        StoreSpec::Dynamo(spec) => Arc::new(open_dynamo(spec, timeouts)?),
    })
}

/// An existing SQLite database: an operator's tool never creates one.
async fn open_sqlite(path: &Path, table: Option<&str>) -> anyhow::Result<SqliteStore> {
    if !path.is_file() {
        bail!("no SQLite database at {}", path.display());
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(5));
    let mut store = SqliteStore::open_with(options)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    if let Some(table) = table {
        store = store.with_table(table)?;
    }
    Ok(store)
}

/// A DynamoDB store with a client of its own: the region and endpoint of `spec`,
/// credentials from the environment, bounded timeouts and two attempts per request.
fn open_dynamo(spec: DynamoSpec, timeouts: Timeouts) -> anyhow::Result<DynamoStore> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let region = spec
        .region
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .context("no AWS region: add ?region=REGION to the URL, or set AWS_REGION")?;
    let (Some(access_key), Some(secret_key)) =
        (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
    else {
        bail!(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)"
        );
    };
    let credentials = Credentials::new(
        access_key,
        secret_key,
        env("AWS_SESSION_TOKEN"),
        None,
        "environment",
    );
    let timeout_config = TimeoutConfig::builder()
        .connect_timeout(timeouts.connect)
        .operation_attempt_timeout(timeouts.answer)
        .operation_timeout(timeouts.answer * 2)
        .build();
    let mut config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region))
        .credentials_provider(credentials)
        .timeout_config(timeout_config)
        .retry_config(RetryConfig::standard().with_max_attempts(2));
    if let Some(endpoint) = spec.endpoint {
        config = config.endpoint_url(endpoint);
    }
    let client = aws_sdk_dynamodb::Client::from_conf(config.build());
    let mut options = DynamoOptions::new(spec.table);
    if let Some(name) = spec.key_attribute {
        options = options.key_attribute(name);
    }
    if let Some(name) = spec.ttl_attribute {
        options = options.ttl_attribute(name);
    }
    Ok(DynamoStore::new(client, options)?)
}
