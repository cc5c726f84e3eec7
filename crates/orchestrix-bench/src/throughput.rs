//! Throughput: fresh idempotent runs/s and replays/s of a 3-step no-op flow, beside the
//! raw round-trip rate of the same client in the same run, and the round trips each
//! operation costs.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use orchestrix::store::{IdempotencyStore, MemoryStore};
use orchestrix::{Context, Flow, RunOptions, Status, StepError};
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::{ConnectionAddr, IntoConnectionInfo};
use orchestrix_sql::PgStore;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::args::Args;
use crate::machine::rss_bytes;
use crate::section::{Section, Table};
use crate::stores::{
    Backend, Namespace, StoreKind, database_url, pg_pool_with, redis_info, redis_url,
};
use crate::wire::{CountingProxy, Counts, Protocol};

/// The bound on one operation; past it, it counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Runs per operation-count pass.
const COUNT_RUNS: u64 = 200;
const TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct ThroughputConfig {
    /// Length of each timed phase.
    pub phase: Duration,
    /// Memory store: records stored before measuring.
    pub records: Vec<u64>,
}

impl ThroughputConfig {
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        let records = match args.get("records") {
            None => vec![1_000, 100_000, 1_000_000],
            Some(list) => list
                .split(',')
                .map(|n| {
                    n.trim()
                        .replace('_', "")
                        .parse::<u64>()
                        .with_context(|| format!("--records: {n:?}"))
                })
                .collect::<anyhow::Result<_>>()?,
        };
        Ok(Self {
            phase: args.seconds("seconds", Duration::from_secs(2))?,
            records,
        })
    }
}

/// Runs counted in one timed phase.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rate {
    pub ops: u64,
    /// Completed, but not as the phase expects (a fresh run replayed, a replay that ran).
    pub wrong: u64,
    pub errors: u64,
    /// How many operations were started (fresh runs: keys `0..attempted` exist).
    pub attempted: u64,
    pub secs: f64,
}

impl Rate {
    pub fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

impl std::ops::AddAssign for Rate {
    /// Sums two slices of one phase; `attempted` is the later slice's, since slices of a
    /// phase number their operations on from where the previous one stopped.
    fn add_assign(&mut self, later: Self) {
        self.ops += later.ops;
        self.wrong += later.wrong;
        self.errors += later.errors;
        self.attempted = later.attempted;
        self.secs += later.secs;
    }
}

/// Runs `op(n)` for n = `first`, `first` + 1, … from `concurrency` tasks until `duration`
/// has passed. The rate's `attempted` is the next unused n.
pub async fn measure<F, Fut>(concurrency: u64, duration: Duration, first: u64, op: F) -> Rate
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<bool>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(first));
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, next) = (Arc::clone(&op), Arc::clone(&next));
            tokio::spawn(async move {
                let mut rate = Rate::default();
                while Instant::now() < deadline {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    match tokio::time::timeout(OP_TIMEOUT, op(n)).await {
                        Ok(Ok(true)) => rate.ops += 1,
                        Ok(Ok(false)) => {
                            rate.ops += 1;
                            rate.wrong += 1;
                        }
                        Ok(Err(_)) | Err(_) => rate.errors += 1,
                    }
                }
                rate
            })
        })
        .collect();
    let mut total = Rate::default();
    for task in tasks {
        if let Ok(rate) = task.await {
            total.ops += rate.ops;
            total.wrong += rate.wrong;
            total.errors += rate.errors;
        } else {
            total.errors += 1;
        }
    }
    total.secs = started.elapsed().as_secs_f64();
    total.attempted = next.load(Ordering::Relaxed);
    total
}

/// The benchmark flow: three no-op steps, as in the original's benchmark.
pub(crate) fn noop_flow(store: Arc<dyn IdempotencyStore>) -> anyhow::Result<Flow<u64>> {
    async fn noop(ctx: Context<u64>) -> Result<(), StepError> {
        std::hint::black_box(ctx.input());
        Ok(())
    }
    Ok(Flow::<u64>::builder("bench")
        .store(store)
        .step("a", noop)
        .step("b", noop)
        .step("c", noop)
        .build()?)
}

/// A fresh run of key `{tag}-{n}`: true when it executed.
pub(crate) fn fresh(
    flow: &Flow<u64>,
    tag: String,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<bool>> + Send>>
+ Send
+ Sync
+ 'static {
    let flow = flow.clone();
    move |n| {
        let (flow, key) = (flow.clone(), format!("{tag}-{n}"));
        Box::pin(async move {
            let result = flow.run(n, RunOptions::key(key).ttl(TTL)).await?;
            Ok(result.status == Status::Completed && !result.replayed)
        })
    }
}

/// A replay of one of the keys `{tag}-0 .. {tag}-{pool}`: true when it was replayed.
pub(crate) fn replay(
    flow: &Flow<u64>,
    tag: String,
    pool: u64,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<bool>> + Send>>
+ Send
+ Sync
+ 'static {
    let flow = flow.clone();
    let pool = pool.max(1);
    move |n| {
        let i = n.wrapping_mul(7919) % pool;
        let (flow, key) = (flow.clone(), format!("{tag}-{i}"));
        Box::pin(async move {
            let result = flow.run(i, RunOptions::key(key).ttl(TTL)).await?;
            Ok(result.status == Status::Completed && result.replayed)
        })
    }
}

pub async fn main(kinds: &[StoreKind], config: &ThroughputConfig) -> anyhow::Result<Vec<Section>> {
    let mut sections = Vec::new();
    if kinds.contains(&StoreKind::Memory) {
        sections.push(memory(config).await?);
    }
    let shared: Vec<_> = kinds
        .iter()
        .copied()
        .filter(|k| *k != StoreKind::Memory)
        .collect();
    if !shared.is_empty() {
        sections.push(shared_stores(&shared, config).await?);
    }
    Ok(sections)
}

/// The in-memory store at several record counts, one caller.
async fn memory(config: &ThroughputConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Throughput: in-memory store");
    section.about(format!(
        "A 3-step no-op flow on `MemoryStore`, one caller, after storing N records (keys \
         `order-<n>`, TTL 1 h). Fresh runs use new keys; replays pick stored keys spread over \
         the whole map. Bytes per record: growth of the process's resident memory (VmRSS) \
         while storing the N records, divided by N (the stores of smaller N stay alive, so \
         each figure is new memory). Each phase runs {:?}.",
        config.phase
    ));
    let mut table = Table::new([
        "records",
        "fresh runs/s",
        "replays/s",
        "bytes/record (RSS)",
        "store time",
    ]);
    let mut keep_alive = Vec::new();
    for &records in &config.records {
        let store = Arc::new(MemoryStore::new());
        let flow = noop_flow(Arc::clone(&store) as Arc<dyn IdempotencyStore>)?;
        let before = rss_bytes();
        let started = Instant::now();
        for i in 0..records {
            flow.run(i, RunOptions::key(format!("order-{i}")).ttl(TTL))
                .await?;
        }
        let filled = started.elapsed();
        let per_record = match (before, rss_bytes()) {
            (Some(b), Some(a)) if records > 0 => {
                format!("{:.0}", a.saturating_sub(b) as f64 / records as f64)
            }
            _ => "-".to_owned(),
        };
        let fresh_rate = measure(1, config.phase, 0, fresh(&flow, format!("new{records}"))).await;
        let replay_flow = flow.clone();
        let replays = measure(1, config.phase, 0, move |n| {
            let flow = replay_flow.clone();
            async move {
                let i = n.wrapping_mul(7919) % records.max(1);
                let result = flow
                    .run(i, RunOptions::key(format!("order-{i}")).ttl(TTL))
                    .await?;
                Ok(result.replayed)
            }
        })
        .await;
        check(
            &mut section,
            "memory",
            records.to_string().as_str(),
            &fresh_rate,
            &replays,
        );
        table.row([
            records.to_string(),
            format!("{:.0}", fresh_rate.per_sec()),
            format!("{:.0}", replays.per_sec()),
            per_record,
            format!("{:.1} s", filled.as_secs_f64()),
        ]);
        keep_alive.push(store);
    }
    drop(keep_alive);
    section.tables.push(table);
    Ok(section)
}

fn check(section: &mut Section, store: &str, at: &str, fresh: &Rate, replays: &Rate) {
    for (what, rate) in [("fresh runs", fresh), ("replays", replays)] {
        if rate.errors > 0 || rate.wrong > 0 {
            section.violation(format!(
                "{store} ({at}): {what}: {} errors, {} with the wrong outcome",
                rate.errors, rate.wrong
            ));
        }
    }
}

/// Operations per run, counted alongside a timed phase.
#[derive(Debug, Clone, Copy)]
struct PerOp {
    /// Redis: every command executed, inside scripts included; DynamoDB: requests.
    all: f64,
    /// What the client sent: Redis script calls; DynamoDB requests.
    sent: f64,
    /// Redis's own time in the scripts, µs (`commandstats` usec); 0 elsewhere.
    server_us: f64,
}

/// The figures of one store at one concurrency.
struct Level {
    concurrency: u64,
    raw: Rate,
    /// Redis: two native commands in sequence, the floor of a fresh run (see
    /// `Backend::native_pair`).
    pair: Option<Rate>,
    fresh: Rate,
    replays: Rate,
    /// (all, sent by the client) commands or requests per fresh run and per replay, when
    /// counted in the same phases.
    per_op: Option<(PerOp, PerOp)>,
}

/// The network stores: raw round trips, fresh runs, replays at concurrency 1 and N.
async fn shared_stores(kinds: &[StoreKind], config: &ThroughputConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Throughput: shared stores");
    section.about(format!(
        "A 3-step no-op flow, at concurrency 1 and 50 (Redis) or 32 (SQL, DynamoDB), each phase \
         {:?} in all, run as {ROUNDS} alternating slices of raw, fresh and replay so that noise \
         on the shared machine falls on all three alike: fresh runs use new keys, replays \
         repeat keys of the fresh slices so far. Beside them, the \
         raw round-trip rate of the **same client in the same run**: Redis `PING` through a \
         multiplexed `ConnectionManager` configured like the store's, `SELECT 1` on the store's \
         own pool (PostgreSQL; SQLite: its one-connection pool), DynamoDB `GetItem` on the \
         store's client. A fresh run needs two round trips (`start`, `complete`) and a replay \
         one, so fresh/raw can reach at most 0.5 and replay/raw 1.0.",
        config.phase
    ));
    let mut table = Table::new([
        "store",
        "concurrency",
        "raw op",
        "raw ops/s",
        "fresh runs/s",
        "fresh/raw",
        "replays/s",
        "replay/raw",
        "target (fresh/raw, replay/raw)",
    ]);
    let mut ops_table = Table::new(["store", "counted", "per fresh run", "per replay", "target"]);
    let mut floor_table = Table::new([
        "store",
        "concurrency",
        "PING/s",
        "two native commands/s",
        "native pair/PING",
        "fresh runs/s",
        "fresh/native pair",
    ]);
    for &kind in kinds {
        let high = if kind == StoreKind::Redis { 50 } else { 32 };
        let connections = u32::try_from(high + 2).unwrap_or(34);
        let (namespace, backend) = match Namespace::create(kind, "throughput", connections).await {
            Ok(opened) => opened,
            Err(e) => {
                section.note(format!("{}: skipped — {e:#}", kind.name()));
                continue;
            }
        };
        let measured = measure_store(&backend, &namespace, config.phase, high).await;
        let counted = count_round_trips(&backend, &namespace).await;
        if let Some(problem) = namespace.remove(&backend).await {
            section.note(problem);
        }
        let levels = match measured {
            Ok(levels) => levels,
            Err(e) => {
                section.violation(format!("{}: the measurement failed: {e:#}", kind.name()));
                continue;
            }
        };
        for level in &levels {
            check(
                &mut section,
                kind.name(),
                &format!("concurrency {}", level.concurrency),
                &level.fresh,
                &level.replays,
            );
            let raw = level.raw.per_sec();
            let ratio = |rate: &Rate| {
                if raw > 0.0 {
                    format!("{:.2}", rate.per_sec() / raw)
                } else {
                    "-".to_owned()
                }
            };
            let target = match (kind, level.concurrency) {
                (StoreKind::Redis, 1) => "≥ 0.45, ≥ 0.85",
                (StoreKind::Redis, _) => "≥ 0.30, ≥ 0.60",
                _ => "-",
            };
            if let Some(pair) = &level.pair {
                let pair_rate = pair.per_sec();
                let of = |x: f64, y: f64| {
                    if y > 0.0 {
                        format!("{:.2}", x / y)
                    } else {
                        "-".to_owned()
                    }
                };
                floor_table.row([
                    kind.name().to_owned(),
                    level.concurrency.to_string(),
                    format!("{raw:.0}"),
                    format!("{pair_rate:.0}"),
                    of(pair_rate, raw),
                    format!("{:.0}", level.fresh.per_sec()),
                    of(level.fresh.per_sec(), pair_rate),
                ]);
                if pair.errors > 0 || pair.wrong > 0 {
                    section.violation(format!(
                        "{} (concurrency {}): native floor: {} errors",
                        kind.name(),
                        level.concurrency,
                        pair.errors + pair.wrong
                    ));
                }
            }
            table.row([
                kind.name().to_owned(),
                level.concurrency.to_string(),
                backend.round_trip_name().to_owned(),
                format!("{raw:.0}"),
                format!("{:.0}", level.fresh.per_sec()),
                ratio(&level.fresh),
                format!("{:.0}", level.replays.per_sec()),
                ratio(&level.replays),
                target.to_owned(),
            ]);
            if let Some((fresh, replay)) = level.per_op {
                let PerOp {
                    all: fresh_all,
                    sent: fresh_sent,
                    server_us: fresh_us,
                } = fresh;
                let PerOp {
                    all: replay_all,
                    sent: replay_sent,
                    server_us: replay_us,
                } = replay;

                if kind == StoreKind::Redis {
                    ops_table.row([
                        kind.name().to_owned(),
                        format!(
                            "Redis's own time in the scripts, µs (`commandstats` usec), concurrency {}",
                            level.concurrency
                        ),
                        format!("{fresh_us:.1}"),
                        format!("{replay_us:.1}"),
                        "-".to_owned(),
                    ]);
                }
                let c = level.concurrency;
                let row = match kind {
                    StoreKind::Redis => [
                        format!(
                            "`INFO commandstats`, concurrency {c}: script calls / every command Redis executed (top-level and inside scripts)"
                        ),
                        format!("{fresh_sent:.2} / {fresh_all:.2}"),
                        format!("{replay_sent:.2} / {replay_all:.2}"),
                    ],
                    _ => [
                        format!(
                            "HTTP requests (SDK interceptor, retries included), concurrency {c}"
                        ),
                        format!("{fresh_sent:.2}"),
                        format!("{replay_sent:.2}"),
                    ],
                };
                let [how, fresh, replay] = row;
                // For Redis the target (2 commands per fresh run, 1 per replay) is what the
                // client sends: the on-the-wire row. Server-side counts include what the
                // scripts run inside Redis.
                let target = if kind == StoreKind::Redis {
                    "-"
                } else {
                    "2, 1"
                };
                ops_table.row([
                    kind.name().to_owned(),
                    how,
                    fresh,
                    replay,
                    target.to_owned(),
                ]);
            }
        }
        match counted {
            Ok(Some(row)) => ops_table.row(row),
            Ok(None) => {}
            Err(e) => section.note(format!(
                "{}: counting round trips failed: {e:#}",
                kind.name()
            )),
        }
    }
    section.tables.push(table);
    if !floor_table.is_empty() {
        section.tables.push(floor_table);
    }
    section.tables.push(ops_table);
    section.note(
        "The floor table (Redis) measures, in the same rounds, two native commands in \
         sequence with a fresh run's payloads (`SET key <running record> NX PX … GET`, then \
         `SET key <finished record> PX …`) on the same kind of connection: no fencing, no \
         script, no engine. It is the most any design needing two round trips per fresh run \
         gets out of this client on this machine, so `native pair/PING` is the real ceiling \
         of `fresh/raw` (the 0.5 of the targets assumes a second command costs no more than \
         a `PING`), and `fresh/native pair` is how close the store comes to it.",
    );
    section.note(
        "Redis `INFO commandstats` is server-wide (other clients of the same Redis would \
         inflate it) and counts the commands a Lua script runs inside Redis as well as the \
         `EVALSHA` that ran it. The store's `start` is a native `SET … NX PX … GET` (no \
         script) unless failures are re-run, `get` a native `GET`, and only the fenced \
         writes are scripts, so a fresh run is one native command and one script call, a \
         replay one native command. The `on the wire` row counts the commands the store's \
         connection actually sent, through a loopback proxy, in a separate pass of 200 \
         sequential runs after warm-up: that is the figure the targets (2, 1) are about.",
    );
    section.note(
        "Redis runs one command at a time: a script call costs Redis its own time in the \
         script (the µs row; a few µs when Redis is busy, more at concurrency 1, where every \
         call finds its caches cold after an idle wait) where a `PING` costs well under a \
         microsecond. Replays run no script.",
    );
    section.note(
        "PostgreSQL statements and round trips are counted on the wire by a loopback proxy \
         (`Execute` messages = statements, `Sync` = round trips) in a separate pass of 200 \
         sequential runs, after warm-up (prepared statements cached); `pg_stat_statements` is \
         not assumed to be loaded. Each operation is one statement; the extra round trips \
         are sqlx's pool pings (an empty `Sync` when a connection is acquired — \
         `test_before_acquire`, on by default — and another when it is returned), which the \
         `SELECT 1` baseline on the same pool pays too.",
    );
    section.note(
        "SQLite runs in-process (no network): each operation is one SQL statement by \
         construction (see `orchestrix-sql`'s `sqlite` module); it is not counted here. Its \
         fresh runs pay two `fsync`s (`synchronous = FULL`: `start` and `complete` each commit).",
    );
    Ok(section)
}

/// Slices each concurrency level is measured in: the raw, fresh and replay phases take
/// turns, so a burst of noise on the shared machine falls on all three alike and the
/// ratios between them stay fair.
pub const ROUNDS: u32 = 5;

async fn measure_store(
    backend: &Backend,
    namespace: &Namespace,
    phase: Duration,
    high: u64,
) -> anyhow::Result<Vec<Level>> {
    let flow = noop_flow(backend.store())?;
    // Warm-up: connections opened, scripts loaded, statements prepared.
    let warm = measure(
        4,
        Duration::from_millis(300),
        0,
        fresh(&flow, "warm".to_owned()),
    )
    .await;
    measure(
        4,
        Duration::from_millis(300),
        0,
        replay(&flow, "warm".to_owned(), warm.attempted),
    )
    .await;
    let slice = phase / ROUNDS;
    let mut levels = Vec::new();
    for concurrency in [1, high] {
        let tag = format!("c{concurrency}");
        let (mut raw, mut fresh_rate, mut replays) =
            (Rate::default(), Rate::default(), Rate::default());
        let mut pair: Option<Rate> = None;
        // Counter deltas over the fresh and the replay slices: (all, sent, server µs).
        let mut counted = Some(([0u64; 3], [0u64; 3]));
        for _ in 0..ROUNDS {
            let raw_backend = backend.clone();
            raw += measure(concurrency, slice, 0, move |_| {
                let backend = raw_backend.clone();
                async move { backend.round_trip().await.map(|()| true) }
            })
            .await;
            if backend.has_native_pair() {
                let pair_backend = backend.clone();
                let pair_tag = format!("floor-c{concurrency}");
                let first = pair.map_or(0, |p| p.attempted);
                let slice_rate = measure(concurrency, slice, first, move |n| {
                    let (backend, key) = (pair_backend.clone(), format!("{pair_tag}-{n}"));
                    async move { backend.native_pair(key).await.map(|()| true) }
                })
                .await;
                *pair.get_or_insert_with(Rate::default) += slice_rate;
            }
            let before = op_counter(backend).await;
            fresh_rate += measure(
                concurrency,
                slice,
                fresh_rate.attempted,
                fresh(&flow, tag.clone()),
            )
            .await;
            let middle = op_counter(backend).await;
            replays += measure(
                concurrency,
                slice,
                0,
                replay(&flow, tag.clone(), fresh_rate.attempted),
            )
            .await;
            let after = op_counter(backend).await;
            counted = match (counted, before, middle, after) {
                (Some((mut f, mut r)), Some(b), Some(m), Some(a)) => {
                    let delta = |from: (u64, u64, u64), to: (u64, u64, u64)| {
                        [
                            to.0.saturating_sub(from.0),
                            to.1.saturating_sub(from.1),
                            to.2.saturating_sub(from.2),
                        ]
                    };
                    for (sum, d) in [(&mut f, delta(b, m)), (&mut r, delta(m, a))] {
                        sum.iter_mut().zip(d).for_each(|(s, d)| *s += d);
                    }
                    Some((f, r))
                }
                _ => None,
            };
        }
        let per_op = match counted {
            Some((f, r)) if fresh_rate.ops > 0 && replays.ops > 0 => {
                let phase = |sums: [u64; 3], ops: u64| PerOp {
                    all: sums[0] as f64 / ops as f64,
                    sent: sums[1] as f64 / ops as f64,
                    server_us: sums[2] as f64 / ops as f64,
                };
                Some((phase(f, fresh_rate.ops), phase(r, replays.ops)))
            }
            _ => None,
        };
        levels.push(Level {
            concurrency,
            raw,
            pair,
            fresh: fresh_rate,
            replays,
            per_op,
        });
    }
    let _ = namespace;
    Ok(levels)
}

/// Operations the service has seen so far, counted alongside the timed phases: for Redis
/// (from `INFO commandstats`, `INFO` itself excluded) every command executed and the script
/// invocations among them (`commandstats` also counts the commands scripts run inside
/// Redis, so only the invocations are what clients sent); for DynamoDB the requests the
/// SDK transmitted (twice, as both figures).
async fn op_counter(backend: &Backend) -> Option<(u64, u64, u64)> {
    match backend {
        Backend::Redis { raw, .. } => {
            let info = redis_info(raw.clone(), "commandstats").await.ok()?;
            let mut all = 0;
            let mut invocations = 0;
            let mut script_usec = 0;
            for line in info.lines() {
                let Some((name, stats)) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let stat = |field: &str| {
                    stats
                        .split(',')
                        .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
                        .and_then(|n| n.parse::<u64>().ok())
                };
                let Some(calls) = stat("calls") else {
                    continue;
                };
                if name == "info" {
                    continue;
                }
                all += calls;
                if name.starts_with("eval")
                    || name.starts_with("fcall")
                    || name.starts_with("script")
                {
                    invocations += calls;
                    script_usec += stat("usec").unwrap_or(0);
                }
            }
            Some((all, invocations, script_usec))
        }
        #[cfg(feature = "dynamodb")]
        Backend::Dynamodb(d) => Some((d.requests(), d.requests(), 0)),
        _ => None,
    }
}

/// Round trips per operation counted on the wire, through a counting proxy, in a separate
/// sequential pass (PostgreSQL and Redis).
async fn count_round_trips(
    backend: &Backend,
    namespace: &Namespace,
) -> anyhow::Result<Option<Vec<String>>> {
    let (proxy, store): (CountingProxy, Arc<dyn IdempotencyStore>) = match backend {
        Backend::Postgres(store) => {
            let options: PgConnectOptions = database_url().parse()?;
            if options.get_host().starts_with('/') {
                anyhow::bail!("DATABASE_URL names a Unix socket; the counting proxy needs TCP");
            }
            let upstream = format!("{}:{}", options.get_host(), options.get_port());
            let proxy = CountingProxy::start(Protocol::Postgres, upstream).await?;
            let proxied = options
                .host("127.0.0.1")
                .port(proxy.addr.port())
                .ssl_mode(PgSslMode::Disable);
            let pool = pg_pool_with(proxied, 1).await?;
            (
                proxy,
                Arc::new(PgStore::new(pool).with_table(store.table())?),
            )
        }
        Backend::Redis { .. } => {
            let url = redis_url();
            let info = url.as_str().into_connection_info()?;
            let upstream = match info.addr() {
                ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
                _ => anyhow::bail!("REDIS_URL is not plain TCP; the counting proxy needs TCP"),
            };
            let proxy = CountingProxy::start(Protocol::Redis, upstream).await?;
            let proxied = info.clone().set_addr(ConnectionAddr::Tcp(
                "127.0.0.1".to_owned(),
                proxy.addr.port(),
            ));
            let store = RedisStore::builder(proxied)
                .key_prefix(namespace.name.clone())
                .connect()
                .await?;
            (proxy, Arc::new(store))
        }
        _ => return Ok(None),
    };
    let flow = noop_flow(store)?;
    let tag = format!("counted-{}", crate::stores::unique_suffix());
    for n in 0..20 {
        fresh(&flow, format!("{tag}-warm"))(n).await?;
        replay(&flow, format!("{tag}-warm"), 20)(n).await?;
    }
    let counts = &proxy.counts;
    let sample = |counts: &Counts| match backend {
        Backend::Redis { .. } => (counts.commands(), counts.commands(), 0),
        _ => (
            counts.statements(),
            counts.round_trips(),
            counts.messages(b'P'),
        ),
    };
    counts.reset();
    for n in 0..COUNT_RUNS {
        fresh(&flow, tag.clone())(n).await?;
    }
    let fresh_counts = sample(counts);
    counts.reset();
    for n in 0..COUNT_RUNS {
        replay(&flow, tag.clone(), COUNT_RUNS)(n).await?;
    }
    let replay_counts = sample(counts);
    let runs = COUNT_RUNS as f64;
    let per = |n: u64| n as f64 / runs;
    Ok(Some(match backend {
        Backend::Redis { .. } => vec![
            "redis".to_owned(),
            "commands sent, on the wire (proxy), sequential".to_owned(),
            format!("{:.2}", per(fresh_counts.0)),
            format!("{:.2}", per(replay_counts.0)),
            "2, 1".to_owned(),
        ],
        _ => vec![
            "postgres".to_owned(),
            format!(
                "statements / round trips on the wire (proxy), sequential; statements prepared: {}",
                fresh_counts.2 + replay_counts.2
            ),
            format!("{:.2} / {:.2}", per(fresh_counts.0), per(fresh_counts.1)),
            format!("{:.2} / {:.2}", per(replay_counts.0), per(replay_counts.1)),
            "2, 1 (statements)".to_owned(),
        ],
    }))
}
