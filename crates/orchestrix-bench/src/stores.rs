//! The stores under test, each in a namespace of its own (a Redis key prefix, a SQL table,
//! a SQLite file, a DynamoDB table) that the parent creates, child processes open by name,
//! and the parent removes afterwards.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use orchestrix::store::{IdempotencyStore, MemoryStore};
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis;
use orchestrix_redis::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use orchestrix_sql::{PgStore, SqliteStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// Bounds every connection attempt, so an unreachable service is a quick, clear skip.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The stores a scenario can run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis,
    Postgres,
    Sqlite,
    Dynamodb,
}

impl StoreKind {
    pub const ALL: [Self; 5] = [
        Self::Memory,
        Self::Redis,
        Self::Postgres,
        Self::Sqlite,
        Self::Dynamodb,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
            Self::Dynamodb => "dynamodb",
        }
    }

    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .with_context(|| {
                format!("unknown store {name:?}: memory, redis, postgres, sqlite, dynamodb or all")
            })
    }

    /// `all`, one name, or a comma-separated list.
    pub fn parse_list(names: &str) -> anyhow::Result<Vec<Self>> {
        if names == "all" {
            return Ok(Self::ALL.to_vec());
        }
        names.split(',').map(Self::parse).collect()
    }

    /// How long past its end a lease still counts as held: DynamoDB has no server clock,
    /// so its store waits out a clock-skew allowance; the others decide on one clock.
    pub fn lapse_allowance(self) -> Duration {
        match self {
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb => orchestrix_dynamodb::DEFAULT_CLOCK_SKEW,
            _ => Duration::ZERO,
        }
    }
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A random lowercase hex suffix for prefixes, tables and keys.
pub fn unique_suffix() -> String {
    format!("{:012x}", fastrand::u64(..) >> 16)
}

/// One scenario's namespace in one store: what child processes need to open the same
/// records (`name`), and what the parent removes at the end.
#[derive(Debug)]
pub struct Namespace {
    pub kind: StoreKind,
    /// Redis key prefix, PostgreSQL table, SQLite file path, or DynamoDB table.
    pub name: String,
    /// Holds the SQLite file's directory until the scenario ends.
    _dir: Option<tempfile::TempDir>,
}

impl Namespace {
    /// A fresh namespace for `scenario`, created in the store (table, file), with the
    /// store opened on it.
    pub async fn create(
        kind: StoreKind,
        scenario: &str,
        connections: u32,
    ) -> anyhow::Result<(Self, Backend)> {
        let suffix = unique_suffix();
        let (name, dir) = match kind {
            StoreKind::Memory => (String::new(), None),
            StoreKind::Redis => (format!("orchestrix-bench:{scenario}:{suffix}:"), None),
            StoreKind::Postgres => (format!("orchestrix_bench_{scenario}_{suffix}"), None),
            StoreKind::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("orchestrix-bench-")
                    .tempdir()
                    .context("creating a temporary directory for the SQLite file")?;
                let path = dir.path().join(format!("{scenario}.db"));
                (path.display().to_string(), Some(dir))
            }
            StoreKind::Dynamodb => (format!("orchestrix-bench-{scenario}-{suffix}"), None),
        };
        let backend = Backend::open(kind, &name, connections).await?;
        backend.prepare().await?;
        Ok((
            Self {
                kind,
                name,
                _dir: dir,
            },
            backend,
        ))
    }

    /// Removes every record of the namespace (best effort: a failure is reported, not
    /// fatal, since the figures are already taken).
    pub async fn remove(self, backend: &Backend) -> Option<String> {
        let removed = tokio::time::timeout(
            Duration::from_secs(30),
            backend.remove_namespace(&self.name),
        )
        .await;
        match removed {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!(
                "{}: cleaning up {:?} failed: {e:#}",
                self.kind.name(),
                self.name
            )),
            Err(_) => Some(format!(
                "{}: cleaning up {:?} timed out",
                self.kind.name(),
                self.name
            )),
        }
    }
}

/// An opened store, with the raw client it runs on for round-trip measurements.
#[derive(Clone)]
pub enum Backend {
    Memory(Arc<MemoryStore>),
    Redis {
        store: RedisStore,
        /// A connection of the same kind and settings as the store's own.
        raw: ConnectionManager,
    },
    Postgres(PgStore),
    Sqlite {
        store: SqliteStore,
        /// The store's one pool (reads and writes), for `SELECT 1`.
        pool: SqlitePool,
    },
    #[cfg(feature = "dynamodb")]
    Dynamodb(crate::stores::dynamo::Dynamo),
}

impl Backend {
    /// Opens the store on an existing namespace (child processes) or a new one.
    /// `connections` sizes the PostgreSQL pool.
    pub async fn open(kind: StoreKind, name: &str, connections: u32) -> anyhow::Result<Self> {
        match kind {
            StoreKind::Memory => Ok(Self::Memory(Arc::new(MemoryStore::new()))),
            StoreKind::Redis => {
                let url = redis_url();
                let store = RedisStore::builder(url.as_str())
                    .key_prefix(name)
                    .connect()
                    .await
                    .with_context(|| format!("Redis at {url} is unreachable"))?;
                let raw = redis_connection(&url).await?;
                Ok(Self::Redis { store, raw })
            }
            StoreKind::Postgres => {
                let pool = pg_pool(&database_url(), connections).await?;
                let store = PgStore::new(pool).with_table(name)?;
                Ok(Self::Postgres(store))
            }
            StoreKind::Sqlite => {
                let pool = sqlite_pool(PathBuf::from(name)).await?;
                let store = SqliteStore::from_pool(pool.clone());
                Ok(Self::Sqlite { store, pool })
            }
            #[cfg(feature = "dynamodb")]
            StoreKind::Dynamodb => Ok(Self::Dynamodb(dynamo::Dynamo::open(name)?)),
            #[cfg(not(feature = "dynamodb"))]
            StoreKind::Dynamodb => bail!("this build has no DynamoDB support (feature `dynamodb`)"),
        }
    }

    pub fn store(&self) -> Arc<dyn IdempotencyStore> {
        match self {
            Self::Memory(store) => Arc::clone(store) as Arc<dyn IdempotencyStore>,
            Self::Redis { store, .. } => Arc::new(store.clone()),
            Self::Postgres(store) => Arc::new(store.clone()),
            Self::Sqlite { store, .. } => Arc::new(store.clone()),
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb(d) => Arc::new(d.store.clone()),
        }
    }

    /// Creates the namespace's table (the parent does this once).
    async fn prepare(&self) -> anyhow::Result<()> {
        match self {
            Self::Memory(_) | Self::Redis { .. } => Ok(()),
            Self::Postgres(store) => Ok(store.migrate().await?),
            Self::Sqlite { store, .. } => Ok(store.migrate().await?),
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb(d) => d.prepare().await,
        }
    }

    async fn remove_namespace(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Self::Memory(_) | Self::Sqlite { .. } => Ok(()),
            Self::Redis { raw, .. } => delete_prefix(raw.clone(), name).await,
            Self::Postgres(store) => {
                let drop = format!("DROP TABLE IF EXISTS {}", store.table());
                sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                    .execute(store.pool())
                    .await?;
                Ok(())
            }
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb(d) => d.remove().await,
        }
    }

    /// What one raw round trip of the store's client is, for tables.
    pub fn round_trip_name(&self) -> &'static str {
        match self {
            Self::Memory(_) => "-",
            Self::Redis { .. } => "PING",
            Self::Postgres(_) | Self::Sqlite { .. } => "SELECT 1",
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb(_) => "GetItem",
        }
    }

    /// One raw round trip through the same kind of client the store uses: the physical
    /// limit a store operation is compared with.
    pub async fn round_trip(&self) -> anyhow::Result<()> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis { raw, .. } => {
                let mut conn = raw.clone();
                let _: String = redis::cmd("PING").query_async(&mut conn).await?;
                Ok(())
            }
            Self::Postgres(store) => {
                sqlx::query("SELECT 1").execute(store.pool()).await?;
                Ok(())
            }
            Self::Sqlite { pool, .. } => {
                sqlx::query("SELECT 1").execute(pool).await?;
                Ok(())
            }
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb(d) => d.get_item().await,
        }
    }

    /// Whether [`native_pair`](Self::native_pair) measures anything (Redis).
    pub fn has_native_pair(&self) -> bool {
        matches!(self, Self::Redis { .. })
    }

    /// Redis only: the floor of any design that needs two round trips per fresh run, on
    /// this client. Two native commands in sequence with the payloads a fresh run sends:
    /// `SET <key> <running record> NX PX <lease> GET`, then `SET <key> <finished record>
    /// PX <ttl>`. No fencing, no script, no engine: what is left is the client and
    /// the server handling two commands.
    pub async fn native_pair(&self, key: String) -> anyhow::Result<()> {
        let Self::Redis { store, raw } = self else {
            anyhow::bail!("only the Redis store has a native floor");
        };
        let mut conn = raw.clone();
        let key = format!("{}{key}", store.key_prefix());
        let _: Option<Vec<u8>> = redis::cmd("SET")
            .arg(&key)
            .arg(NATIVE_RUNNING)
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .arg("GET")
            .query_async(&mut conn)
            .await?;
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(NATIVE_FINISHED)
            .arg("PX")
            .arg(3_600_000)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// A short description of the service, for reports.
    pub async fn service_version(&self) -> String {
        let version = match self {
            Self::Memory(_) => Ok("in-process".to_owned()),
            Self::Redis { raw, .. } => redis_info(raw.clone(), "server").await.map(|info| {
                let version = info_field(&info, "redis_version").unwrap_or("?");
                format!("Redis {version}")
            }),
            Self::Postgres(store) => sqlx::query_scalar::<_, String>(
                "SELECT current_setting('server_version') || ' (synchronous_commit=' \
                 || current_setting('synchronous_commit') || ')'",
            )
            .fetch_one(store.pool())
            .await
            .map(|v| format!("PostgreSQL {v}"))
            .map_err(Into::into),
            Self::Sqlite { pool, .. } => sqlx::query_scalar::<_, String>("SELECT sqlite_version()")
                .fetch_one(pool)
                .await
                .map(|v| format!("SQLite {v} (WAL, synchronous=FULL)"))
                .map_err(Into::into),
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb(d) => Ok(format!("DynamoDB API at {}", d.endpoint)),
        };
        version.unwrap_or_else(|e| format!("unknown ({e})"))
    }
}

/// A running record of the size the store writes (version, status, token, a 32-digit
/// fingerprint), for the native floor.
const NATIVE_RUNNING: &str =
    "1r0123456789abcdef0123456789abcdef00200123456789abcdef0123456789abcdef-";
/// A finished record of the size the store writes for the benchmark's no-op flow (its
/// stored result is about 80 bytes).
const NATIVE_FINISHED: &str = concat!(
    "1c0123456789abcdef0123456789abcdef00200123456789abcdef0123456789abcdef+",
    "............................................................................"
);

/// A multiplexed, self-reconnecting connection configured as `RedisStore` configures its
/// own (1 s connect, 2 s response, 2 reconnection attempts).
pub async fn redis_connection(url: &str) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(url).with_context(|| format!("invalid Redis URL {url}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        ConnectionManager::new_with_config(client, config),
    )
    .await
    .map_err(|_| anyhow::anyhow!("Redis at {url} did not answer within {CONNECT_TIMEOUT:?}"))?
    .with_context(|| format!("Redis at {url} is unreachable"))
}

/// `INFO <section>` as text.
pub async fn redis_info(mut conn: ConnectionManager, section: &str) -> anyhow::Result<String> {
    Ok(redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await?)
}

/// One `name:value` field of `INFO` output.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Deletes every key under `prefix`, with a bounded number of `SCAN` rounds.
async fn delete_prefix(mut conn: ConnectionManager, prefix: &str) -> anyhow::Result<()> {
    if prefix.is_empty() || prefix.contains(['*', '?', '[', '\\']) {
        bail!("refusing to delete keys under the prefix {prefix:?}");
    }
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    for _ in 0..100_000 {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(keys).exec_async(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
    bail!("too many SCAN rounds under {prefix:?}")
}

/// A PostgreSQL pool of `connections`, failing fast when the server does not answer.
pub async fn pg_pool(url: &str, connections: u32) -> anyhow::Result<sqlx::PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("invalid DATABASE_URL {url}"))?;
    pg_pool_with(options, connections)
        .await
        .with_context(|| format!("PostgreSQL at {url} is unreachable"))
}

pub async fn pg_pool_with(
    options: PgConnectOptions,
    connections: u32,
) -> anyhow::Result<sqlx::PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options);
    Ok(tokio::time::timeout(CONNECT_TIMEOUT * 2, pool)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {:?}", CONNECT_TIMEOUT * 2))??)
}

/// The SQLite store's pool as `SqliteStore::open` configures its connections (WAL,
/// `synchronous = FULL`, 5 s busy timeout), with the single connection its docs
/// recommend for a pool serving reads and writes.
async fn sqlite_pool(path: PathBuf) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(orchestrix_sql::DEFAULT_BUSY_TIMEOUT);
    SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(orchestrix_sql::DEFAULT_BUSY_TIMEOUT * 2)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot open the SQLite file {}", path.display()))
}

#[cfg(feature = "dynamodb")]
pub mod dynamo {
    //! The DynamoDB store on a client whose every HTTP request is counted.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use anyhow::Context as _;
    use aws_sdk_dynamodb::Client;
    use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
    use aws_sdk_dynamodb::config::retry::RetryConfig;
    use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
    use aws_sdk_dynamodb::config::{
        BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
    };
    use aws_sdk_dynamodb::error::BoxError;
    use aws_sdk_dynamodb::types::AttributeValue;
    use orchestrix_dynamodb::{DEFAULT_KEY_ATTRIBUTE, DynamoOptions, DynamoStore};

    /// The endpoint of a DynamoDB-compatible server, from `DYNAMODB_ENDPOINT`.
    pub fn endpoint() -> anyhow::Result<String> {
        std::env::var("DYNAMODB_ENDPOINT").map_err(|_| {
            anyhow::anyhow!(
                "DYNAMODB_ENDPOINT is not set (start a local server with \
                 `source scripts/services.sh; start_dynamodb`)"
            )
        })
    }

    /// Counts every HTTP request the client transmits (retries included).
    #[derive(Debug, Clone, Default)]
    pub struct RequestCounter(pub Arc<AtomicU64>);

    impl Intercept for RequestCounter {
        fn name(&self) -> &'static str {
            "orchestrix-bench request counter"
        }

        fn read_before_transmit(
            &self,
            _context: &BeforeTransmitInterceptorContextRef<'_>,
            _runtime_components: &RuntimeComponents,
            _cfg: &mut ConfigBag,
        ) -> Result<(), BoxError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[derive(Clone)]
    pub struct Dynamo {
        pub store: DynamoStore,
        pub client: Client,
        pub table: String,
        pub endpoint: String,
        pub requests: RequestCounter,
    }

    impl Dynamo {
        pub fn open(table: &str) -> anyhow::Result<Self> {
            let endpoint = endpoint()?;
            let requests = RequestCounter::default();
            let timeouts = TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_attempt_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(20))
                .build();
            let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned());
            let key_id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".to_owned());
            let secret =
                std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".to_owned());
            let config = aws_sdk_dynamodb::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(region))
                .credentials_provider(Credentials::new(
                    key_id,
                    secret,
                    None,
                    None,
                    "orchestrix-bench",
                ))
                .endpoint_url(&endpoint)
                .timeout_config(timeouts)
                .retry_config(RetryConfig::standard().with_max_attempts(2))
                .interceptor(requests.clone())
                .build();
            let client = Client::from_conf(config);
            let store = DynamoStore::new(client.clone(), DynamoOptions::new(table))?;
            Ok(Self {
                store,
                client,
                table: table.to_owned(),
                endpoint,
                requests,
            })
        }

        pub async fn prepare(&self) -> anyhow::Result<()> {
            tokio::time::timeout(
                Duration::from_secs(30),
                self.store.create_table_if_missing(),
            )
            .await
            .map_err(|_| anyhow::anyhow!("creating the DynamoDB table timed out"))?
            .with_context(|| format!("DynamoDB at {} is unreachable", self.endpoint))?;
            Ok(())
        }

        pub async fn remove(&self) -> anyhow::Result<()> {
            self.client
                .delete_table()
                .table_name(&self.table)
                .send()
                .await?;
            Ok(())
        }

        pub async fn get_item(&self) -> anyhow::Result<()> {
            self.client
                .get_item()
                .table_name(&self.table)
                .key(
                    DEFAULT_KEY_ATTRIBUTE,
                    AttributeValue::S("orchestrix-bench:probe".to_owned()),
                )
                .consistent_read(true)
                .send()
                .await?;
            Ok(())
        }

        pub fn requests(&self) -> u64 {
            self.requests.0.load(Ordering::Relaxed)
        }
    }
}
