//! What durable flows cost, per store, beside the store's own operations in the same run:
//! one checkpoint (`JournalStore::append` of a real step entry) against the store's raw
//! round trip and a raw write of the same bytes (the floor of any append), and a 5-step
//! durable keyed run against the same flow keyed but not durable.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, IdempotencyStore, JournalStore,
};
use orchestrix::{Context, Flow, RunOptions, Status, StepError};
use orchestrix_redis::redis;
use orchestrix_redis::redis::aio::ConnectionManager;
use orchestrix_sql::{PgStore, SqliteStore};
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::section::{Section, Table};
use crate::stores::{Backend, Namespace, StoreKind, database_url, pg_pool_with, unique_suffix};
use crate::throughput::{ROUNDS, Rate, measure};

/// Entries per journal in the checkpoint measurement: a 5-step run's.
const ENTRIES: u64 = 5;
const TTL: Duration = Duration::from_secs(3600);
/// The lease of the measured records: long, so none lapses mid-measurement.
const LEASE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct DurableBenchConfig {
    /// Length of each measured figure (split into [`ROUNDS`] slices).
    pub phase: Duration,
}

impl DurableBenchConfig {
    pub fn from_args(args: &crate::args::Args) -> anyhow::Result<Self> {
        Ok(Self {
            phase: args.seconds("seconds", Duration::from_secs(2))?,
        })
    }
}

/// The benchmark flow: five steps, each writing one small value to the context (what a
/// checkpoint then carries), durable or not.
fn five_steps(store: Arc<dyn IdempotencyStore>, durable: bool) -> anyhow::Result<Flow<u64>> {
    let mut builder = Flow::<u64>::builder(if durable { "durable" } else { "plain" }).store(store);
    if durable {
        builder = builder.durable();
    }
    for name in ["reserve", "charge", "notify", "pack", "ship"] {
        builder = builder.step(name, move |ctx: Context<u64>| async move {
            ctx.set(format!("{name}_id"), format!("{name}_{:016x}", ctx.input()))?;
            Ok::<_, StepError>(())
        });
    }
    Ok(builder.build()?)
}

/// The entries a real run of the durable flow journals, read back from the store.
async fn real_entries(store: &Arc<dyn IdempotencyStore>) -> anyhow::Result<Vec<Vec<u8>>> {
    let flow = five_steps(Arc::clone(store), true)?;
    let key = format!("sample-{}", unique_suffix());
    flow.run(0xdead_beef, RunOptions::key(&key).ttl(TTL))
        .await?;
    let journal = store.journal_store().context("no journal store")?;
    let stored = journal
        .read_journal(&format!("durable:{key}"))
        .await?
        .context("the sample run left no journal")?;
    anyhow::ensure!(
        stored.entries.len() == ENTRIES as usize,
        "the sample run journaled {} entries",
        stored.entries.len()
    );
    Ok(stored.entries)
}

/// Time spent in the measured part of `count` operations.
#[derive(Debug, Default, Clone, Copy)]
struct Latency {
    count: u64,
    total: Duration,
    errors: u64,
}

impl Latency {
    fn micros(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        self.total.as_secs_f64() * 1e6 / self.count as f64
    }
}

impl std::ops::AddAssign for Latency {
    fn add_assign(&mut self, other: Self) {
        self.count += other.count;
        self.total += other.total;
        self.errors += other.errors;
    }
}

/// Runs `op(n)` one at a time for `slice`, numbering from `*next`; each returns the time
/// of its measured part (set-up it does first is not counted).
async fn timed<F, Fut>(slice: Duration, next: &mut u64, op: F) -> Latency
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<Duration>>,
{
    let deadline = Instant::now() + slice;
    let mut latency = Latency::default();
    while Instant::now() < deadline {
        let n = *next;
        *next += 1;
        match tokio::time::timeout(Duration::from_secs(10), op(n)).await {
            Ok(Ok(took)) => {
                latency.count += 1;
                latency.total += took;
            }
            _ => latency.errors += 1,
        }
    }
    latency
}

/// A raw operation of the store's client, and a raw write appending bytes to one value,
/// for comparison with a checkpoint.
#[derive(Clone)]
enum Raw {
    /// In-process: nothing to compare with.
    None,
    /// `SET` as the raw round trip, `APPEND` as the raw write, on a connection of the
    /// store's kind.
    Redis {
        conn: ConnectionManager,
        prefix: String,
    },
    /// `SELECT 1` on the pool; the raw write is `UPDATE … SET j = j || $1` of a table
    /// of its own (key text primary key, j bytea).
    Postgres { pool: sqlx::PgPool, table: String },
    Sqlite {
        pool: sqlx::SqlitePool,
        table: String,
    },
    /// `GetItem`; the raw write is an unconditional `UpdateItem` with `list_append`.
    #[cfg(feature = "dynamodb")]
    Dynamodb(crate::stores::dynamo::Dynamo),
}

impl Raw {
    fn names(&self) -> (&'static str, &'static str) {
        match self {
            Self::None => ("-", "-"),
            Self::Redis { .. } => ("SET", "APPEND"),
            Self::Postgres { .. } | Self::Sqlite { .. } => ("SELECT 1", "UPDATE j = j || $1"),
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb(_) => ("GetItem", "UpdateItem list_append"),
        }
    }

    async fn prepare(&self) -> anyhow::Result<()> {
        match self {
            Self::Postgres { pool, table } => {
                let create = format!(
                    "CREATE TABLE IF NOT EXISTS {table} (k text PRIMARY KEY, j bytea NOT NULL)"
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(create))
                    .execute(pool)
                    .await?;
            }
            Self::Sqlite { pool, table } => {
                let create = format!(
                    "CREATE TABLE IF NOT EXISTS {table} (k TEXT PRIMARY KEY, j BLOB NOT NULL)"
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(create))
                    .execute(pool)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn remove(&self) {
        let drop = |table: &str| format!("DROP TABLE IF EXISTS {table}");
        match self {
            Self::Postgres { pool, table } => {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop(table)))
                    .execute(pool)
                    .await;
            }
            Self::Sqlite { pool, table } => {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop(table)))
                    .execute(pool)
                    .await;
            }
            _ => {}
        }
    }

    /// One raw round trip, timed.
    async fn round_trip(&self, n: u64, value: &[u8]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        match self {
            Self::None => {}
            Self::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let () = redis::cmd("SET")
                    .arg(format!("{prefix}set-{}", n % 1000))
                    .arg(value)
                    .query_async(&mut conn)
                    .await?;
            }
            Self::Postgres { pool, .. } => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
            Self::Sqlite { pool, .. } => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb(d) => d.get_item().await?,
        }
        Ok(started.elapsed())
    }

    /// Appends `entry` to the value of key `n / ENTRIES` (created, untimed, at its first
    /// entry); the append is timed.
    async fn raw_append(&self, tag: &str, n: u64, entry: &[u8]) -> anyhow::Result<Duration> {
        let key = format!("floor-{tag}-{}", n / ENTRIES);
        let first = n.is_multiple_of(ENTRIES);
        match self {
            Self::None => Ok(Duration::ZERO),
            Self::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let key = format!("{prefix}{key}");
                if first {
                    let () = redis::cmd("SET")
                        .arg(&key)
                        .arg("")
                        .arg("PX")
                        .arg(600_000)
                        .query_async(&mut conn)
                        .await?;
                }
                let started = Instant::now();
                let _: u64 = redis::cmd("APPEND")
                    .arg(&key)
                    .arg(entry)
                    .query_async(&mut conn)
                    .await?;
                Ok(started.elapsed())
            }
            Self::Postgres { pool, table } => {
                if first {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "INSERT INTO {table} (k, j) VALUES ($1, ''::bytea)"
                    )))
                    .bind(&key)
                    .execute(pool)
                    .await?;
                }
                let started = Instant::now();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {table} SET j = j || $2::bytea WHERE k = $1"
                )))
                .bind(&key)
                .bind(entry)
                .execute(pool)
                .await?;
                Ok(started.elapsed())
            }
            Self::Sqlite { pool, table } => {
                if first {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "INSERT INTO {table} (k, j) VALUES ($1, x'')"
                    )))
                    .bind(&key)
                    .execute(pool)
                    .await?;
                }
                let started = Instant::now();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {table} SET j = j || $2 WHERE k = $1"
                )))
                .bind(&key)
                .bind(entry)
                .execute(pool)
                .await?;
                Ok(started.elapsed())
            }
            #[cfg(feature = "dynamodb")]
            Self::Dynamodb(d) => {
                use aws_sdk_dynamodb::primitives::Blob;
                use aws_sdk_dynamodb::types::AttributeValue;
                let started = Instant::now();
                d.client
                    .update_item()
                    .table_name(&d.table)
                    .key(
                        orchestrix_dynamodb::DEFAULT_KEY_ATTRIBUTE,
                        AttributeValue::S(format!("orchestrix-bench:{key}")),
                    )
                    .update_expression("SET j = list_append(if_not_exists(j, :empty), :entry)")
                    .expression_attribute_values(":empty", AttributeValue::L(Vec::new()))
                    .expression_attribute_values(
                        ":entry",
                        AttributeValue::L(vec![AttributeValue::B(Blob::new(entry))]),
                    )
                    .send()
                    .await?;
                Ok(started.elapsed())
            }
        }
    }
}

/// Checkpoints: acquire a durable record (untimed), then append the real run's entries to
/// it one by one (timed), a new record every [`ENTRIES`].
async fn checkpoint(
    journal: &dyn JournalStore,
    entries: &[Vec<u8>],
    tag: &str,
    n: u64,
    token: &std::sync::Mutex<Option<FencingToken>>,
) -> anyhow::Result<Duration> {
    let key = format!("durable:ckpt-{tag}-{}", n / ENTRIES);
    if n.is_multiple_of(ENTRIES) {
        let start = DurableStart {
            key: &key,
            fingerprint: None,
            lease: LEASE,
            rerun_failed: false,
            input: b"OJ\x01",
            retain: Some(TTL),
        };
        match journal.start_durable(start).await? {
            DurableStartOutcome::Acquired { token: t, .. } => {
                *token.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
            }
            DurableStartOutcome::Existing(_) => anyhow::bail!("the checkpoint key was taken"),
        }
    }
    let t = (*token.lock().unwrap_or_else(|p| p.into_inner())).context("no record held")?;
    let entry = &entries[(n % ENTRIES) as usize];
    let started = Instant::now();
    journal.append(&key, t, entry).await?;
    Ok(started.elapsed())
}

/// One measured setting of a store: its journal, and its raw client.
struct Setting {
    label: String,
    store: Arc<dyn IdempotencyStore>,
    raw: Raw,
}

/// What one setting measured.
struct Checkpoint {
    raw: Latency,
    floor: Latency,
    append: Latency,
    /// Redis: its own time per command (`INFO commandstats`, µs): `SET`, `APPEND`, and the
    /// scripts of the append slices (the appends and, one in six, their record's
    /// `start_durable`).
    redis_usec: Option<[f64; 3]>,
}

/// Calls and µs Redis spent in the commands named (`cmdstat_<name>`, prefixes).
async fn redis_stats(raw: &Raw, names: &[&str]) -> Option<(u64, u64)> {
    let Raw::Redis { conn, .. } = raw else {
        return None;
    };
    let info = crate::stores::redis_info(conn.clone(), "commandstats")
        .await
        .ok()?;
    let (mut calls, mut usec) = (0, 0);
    for line in info.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if !names.iter().any(|n| name.starts_with(n)) {
            continue;
        }
        let stat = |field: &str| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
                .and_then(|n| n.parse::<u64>().ok())
        };
        calls += stat("calls").unwrap_or(0);
        usec += stat("usec").unwrap_or(0);
    }
    Some((calls, usec))
}

async fn measure_checkpoints(
    setting: &Setting,
    entries: &[Vec<u8>],
    phase: Duration,
) -> anyhow::Result<Checkpoint> {
    let journal = setting.store.journal_store().context("no journal store")?;
    let slice = phase / ROUNDS;
    let tag = unique_suffix();
    let token = std::sync::Mutex::new(None);
    let (mut raw, mut floor, mut append) = Default::default();
    let (mut n_raw, mut n_floor, mut n_append) = (0u64, 0u64, 0u64);
    let value = &entries[1];
    // Warm-up: connections, prepared statements, scripts.
    let warm_tag = format!("warm-{tag}");
    let mut warm = 0;
    timed(Duration::from_millis(200), &mut warm, |n| {
        checkpoint(journal, entries, &warm_tag, n, &token)
    })
    .await;
    let mut warm = 0;
    timed(Duration::from_millis(100), &mut warm, |n| {
        setting.raw.raw_append(&warm_tag, n, value)
    })
    .await;
    // Redis's own time, summed over the slices: (calls, µs) of SET, APPEND, scripts.
    let mut server = [(0u64, 0u64); 3];
    let mut counted = matches!(setting.raw, Raw::Redis { .. });
    let mut add =
        |i: usize, before: Option<(u64, u64)>, after: Option<(u64, u64)>| match (before, after) {
            (Some(b), Some(a)) => {
                server[i].0 += a.0.saturating_sub(b.0);
                server[i].1 += a.1.saturating_sub(b.1);
            }
            _ => counted = false,
        };
    for _ in 0..ROUNDS {
        let before = redis_stats(&setting.raw, &["set"]).await;
        raw += timed(slice, &mut n_raw, |n| setting.raw.round_trip(n, value)).await;
        add(0, before, redis_stats(&setting.raw, &["set"]).await);
        n_floor = n_floor.div_ceil(ENTRIES) * ENTRIES;
        let before = redis_stats(&setting.raw, &["append"]).await;
        floor += timed(slice, &mut n_floor, |n| {
            setting.raw.raw_append(&tag, n, value)
        })
        .await;
        add(1, before, redis_stats(&setting.raw, &["append"]).await);
        // Each slice starts on a fresh record.
        n_append = n_append.div_ceil(ENTRIES) * ENTRIES;
        let before = redis_stats(&setting.raw, &["eval", "fcall"]).await;
        append += timed(slice, &mut n_append, |n| {
            checkpoint(journal, entries, &tag, n, &token)
        })
        .await;
        add(
            2,
            before,
            redis_stats(&setting.raw, &["eval", "fcall"]).await,
        );
    }
    let redis_usec = counted.then(|| server.map(|(calls, usec)| usec as f64 / calls.max(1) as f64));
    Ok(Checkpoint {
        raw,
        floor,
        append,
        redis_usec,
    })
}

/// Fresh keyed runs of the 5-step flow, durable and not, alternating in slices.
async fn measure_runs(
    store: &Arc<dyn IdempotencyStore>,
    concurrency: u64,
    phase: Duration,
) -> anyhow::Result<(Rate, Rate)> {
    let slice = phase / ROUNDS;
    let tag = unique_suffix();
    let flows = [
        five_steps(Arc::clone(store), false)?,
        five_steps(Arc::clone(store), true)?,
    ];
    let mut rates = [Rate::default(), Rate::default()];
    for flow in &flows {
        // Warm-up.
        let flow = flow.clone();
        let warm_tag = format!("warm-{tag}");
        measure(2, Duration::from_millis(200), 0, move |n| {
            let (flow, key) = (flow.clone(), format!("{warm_tag}-{n}"));
            async move {
                Ok(flow.run(n, RunOptions::key(key).ttl(TTL)).await?.status == Status::Completed)
            }
        })
        .await;
    }
    for _ in 0..ROUNDS {
        for (flow, rate) in flows.iter().zip(&mut rates) {
            let flow = flow.clone();
            let tag = format!("{tag}-c{concurrency}");
            *rate += measure(concurrency, slice, rate.attempted, move |n| {
                let (flow, key) = (flow.clone(), format!("{tag}-{n}"));
                async move {
                    let result = flow.run(n, RunOptions::key(key).ttl(TTL)).await?;
                    Ok(result.status == Status::Completed && !result.replayed)
                }
            })
            .await;
        }
    }
    let [plain, durable] = rates;
    Ok((plain, durable))
}

/// The settings measured for a store: as opened by the scenarios (the store's defaults),
/// and for the SQL stores also without a flush to disk per commit.
async fn settings(
    backend: &Backend,
    namespace: &Namespace,
) -> anyhow::Result<(Vec<Setting>, Vec<String>)> {
    let floor_table = |t: &str| format!("{t}_floor");
    let mut notes = Vec::new();
    let mut settings = Vec::new();
    match backend {
        Backend::Memory(_) => settings.push(Setting {
            label: "in-process".to_owned(),
            store: backend.store(),
            raw: Raw::None,
        }),
        Backend::Redis { store, raw } => settings.push(Setting {
            label: "default".to_owned(),
            store: backend.store(),
            raw: Raw::Redis {
                conn: raw.clone(),
                prefix: store.key_prefix().to_owned(),
            },
        }),
        Backend::Postgres(store) => {
            settings.push(Setting {
                label: "default (synchronous_commit=on)".to_owned(),
                store: backend.store(),
                raw: Raw::Postgres {
                    pool: store.pool().clone(),
                    table: floor_table(store.table()),
                },
            });
            let options: PgConnectOptions = database_url().parse()?;
            let options = options.options([("synchronous_commit", "off")]);
            let pool = pg_pool_with(options, 2).await?;
            settings.push(Setting {
                label: "synchronous_commit=off (this pool's sessions)".to_owned(),
                store: Arc::new(PgStore::new(pool.clone()).with_table(store.table())?),
                raw: Raw::Postgres {
                    pool,
                    table: floor_table(store.table()),
                },
            });
        }
        Backend::Sqlite { pool, .. } => {
            settings.push(Setting {
                label: "default (WAL, synchronous=FULL)".to_owned(),
                store: backend.store(),
                raw: Raw::Sqlite {
                    pool: pool.clone(),
                    table: "journal_floor".to_owned(),
                },
            });
            let options = SqliteConnectOptions::new()
                .filename(&namespace.name)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(orchestrix_sql::DEFAULT_BUSY_TIMEOUT);
            let normal = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await?;
            settings.push(Setting {
                label: "WAL, synchronous=NORMAL (no fsync per commit)".to_owned(),
                store: Arc::new(SqliteStore::from_pool(normal.clone())),
                raw: Raw::Sqlite {
                    pool: normal,
                    table: "journal_floor".to_owned(),
                },
            });
            notes.push(
                "sqlite: the two settings are two one-connection pools on the same file, \
                 measured one after the other"
                    .to_owned(),
            );
        }
        #[cfg(feature = "dynamodb")]
        Backend::Dynamodb(d) => settings.push(Setting {
            label: "moto (local)".to_owned(),
            store: backend.store(),
            raw: Raw::Dynamodb(d.clone()),
        }),
    }
    Ok((settings, notes))
}

pub async fn main(kinds: &[StoreKind], config: &DurableBenchConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Durable flows");
    section.about(format!(
        "**One checkpoint**, at concurrency 1: `JournalStore::append` of the entries a real \
         5-step durable run journals (read back from the store; each step wrote one \
         25-byte value, so an entry is about 60 bytes), five to a record, as a run appends \
         them, beside the raw round trip of the same client (Redis `SET` of an entry on a \
         connection of the store's kind, `SELECT 1` on the store's pool, DynamoDB \
         `GetItem`) and a raw write appending the same bytes to one value (Redis `APPEND`, \
         SQL `UPDATE … SET j = j || $1` of a table of its own, DynamoDB `UpdateItem` with \
         `list_append`): the floor of any append on that store, without fencing. Mean \
         latency, in {ROUNDS} alternating slices, {:?} per figure. Target: append ≤ 1.3× \
         the raw round trip.",
        config.phase
    ));
    section.about(format!(
        "**A durable run**: fresh keyed runs of a 5-step flow (each step writes one value), \
         durable ÷ the same flow keyed but not durable, in {ROUNDS} alternating slices, \
         {:?} per figure, at concurrency 1 and 50 (memory, Redis) or 32 (SQL, DynamoDB). A \
         plain keyed run is two store operations (`start`, `finish`); a durable one seven \
         (`start_durable`, five appends, `finish`), so on a store whose every operation \
         costs one round trip, 2/7 ≈ 0.29 is the ceiling. Targets: memory ≥ 0.5; Redis at \
         concurrency 50 ≥ 0.25.",
        config.phase
    ));
    let mut checkpoints = Table::new([
        "store",
        "setting",
        "raw op",
        "raw µs",
        "raw write",
        "raw write µs",
        "append µs",
        "append / raw",
        "append / raw write",
        "target",
    ]);
    let mut runs = Table::new([
        "store",
        "concurrency",
        "keyed runs/s",
        "durable runs/s",
        "durable / keyed",
        "target",
    ]);
    for &kind in kinds {
        let high = match kind {
            StoreKind::Memory | StoreKind::Redis => 50,
            _ => 32,
        };
        let (namespace, backend) =
            match Namespace::create(kind, "durable", u32::try_from(high + 2).unwrap_or(34)).await {
                Ok(opened) => opened,
                Err(e) => {
                    section.note(format!("{}: skipped — {e:#}", kind.name()));
                    continue;
                }
            };
        let measured = measure_store(kind, &namespace, &backend, high, config.phase).await;
        if let Some(problem) = namespace.remove(&backend).await {
            section.note(problem);
        }
        let (ckpt_rows, run_rows, notes) = match measured {
            Ok(m) => m,
            Err(e) => {
                section.violation(format!("{}: the measurement failed: {e:#}", kind.name()));
                continue;
            }
        };
        let redis_time: Vec<(String, [f64; 3])> = ckpt_rows
            .iter()
            .filter_map(|(label, _, c)| Some((label.clone(), c.redis_usec?)))
            .collect();
        for (label, raw_names, c) in ckpt_rows {
            let errors = c.raw.errors + c.floor.errors + c.append.errors;
            if errors > 0 {
                section.violation(format!(
                    "{} ({label}): {errors} operations failed",
                    kind.name()
                ));
            }
            let ratio = |a: &Latency, b: &Latency| {
                if b.count > 0 && a.count > 0 && kind != StoreKind::Memory {
                    format!("{:.2}", a.micros() / b.micros())
                } else {
                    "-".to_owned()
                }
            };
            let us = |l: &Latency| {
                if l.count > 0 && kind != StoreKind::Memory {
                    format!("{:.1}", l.micros())
                } else {
                    "-".to_owned()
                }
            };
            checkpoints.row([
                kind.name().to_owned(),
                label,
                raw_names.0.to_owned(),
                us(&c.raw),
                raw_names.1.to_owned(),
                us(&c.floor),
                format!("{:.2}", c.append.micros()),
                ratio(&c.append, &c.raw),
                ratio(&c.append, &c.floor),
                if kind == StoreKind::Memory {
                    "-"
                } else {
                    "≤ 1.3"
                }
                .to_owned(),
            ]);
        }
        for (concurrency, plain, durable) in run_rows {
            for (what, rate) in [("keyed", &plain), ("durable", &durable)] {
                if rate.errors > 0 || rate.wrong > 0 {
                    section.violation(format!(
                        "{} (concurrency {concurrency}): {what} runs: {} errors, {} not executed",
                        kind.name(),
                        rate.errors,
                        rate.wrong
                    ));
                }
            }
            let target = match (kind, concurrency) {
                (StoreKind::Memory, _) => "≥ 0.5",
                (StoreKind::Redis, 50) => "≥ 0.25",
                _ => "-",
            };
            runs.row([
                kind.name().to_owned(),
                concurrency.to_string(),
                format!("{:.0}", plain.per_sec()),
                format!("{:.0}", durable.per_sec()),
                format!(
                    "{:.2}",
                    durable.per_sec() / plain.per_sec().max(f64::MIN_POSITIVE)
                ),
                target.to_owned(),
            ]);
        }
        for note in notes {
            section.note(note);
        }
        for (label, c) in &redis_time {
            section.note(format!(
                "redis ({label}): Redis's own time per command (`INFO commandstats`, server-wide, \
                 same slices): `SET` {:.1} µs, `APPEND` {:.1} µs, a journal script \
                 (the appends and their records' `start_durable`) {:.1} µs",
                c[0], c[1], c[2]
            ));
        }
    }
    section.tables.push(checkpoints);
    section.tables.push(runs);
    Ok(section)
}

type CheckpointRow = (String, (&'static str, &'static str), Checkpoint);

async fn measure_store(
    kind: StoreKind,
    namespace: &Namespace,
    backend: &Backend,
    high: u64,
    phase: Duration,
) -> anyhow::Result<(Vec<CheckpointRow>, Vec<(u64, Rate, Rate)>, Vec<String>)> {
    let store = backend.store();
    let entries = real_entries(&store).await?;
    let (settings, notes) = settings(backend, namespace).await?;
    let mut ckpt_rows = Vec::new();
    for setting in &settings {
        setting.raw.prepare().await?;
        let measured = measure_checkpoints(setting, &entries, phase).await;
        setting.raw.remove().await;
        ckpt_rows.push((setting.label.clone(), setting.raw.names(), measured?));
    }
    let mut run_rows = Vec::new();
    for concurrency in [1, high] {
        let (plain, durable) = measure_runs(&store, concurrency, phase).await?;
        run_rows.push((concurrency, plain, durable));
    }
    let _ = kind;
    Ok((ckpt_rows, run_rows, notes))
}
