//! `cluster`: the Redis store on a Redis Cluster beside one Redis, in the same run.
//!
//! * Fresh runs/s and replays/s of the 3-step no-op flow at concurrency 50, each as a
//!   fraction of `PING`s/s through the same kind of connection (a `ConnectionManager` for
//!   one Redis; the cluster connection for the cluster, each `PING` routed to one primary,
//!   as each store operation is); on the cluster also with `wait_for_replicas(1, 1 s)`.
//! * Redis's own time per fresh run (`INFO commandstats` after `CONFIG RESETSTAT`, summed
//!   over the primaries), per command.
//! * Wake-up latency of a waiter (`OnRunning::Wait`): from the owner's `finish` call to
//!   the waiter seeing the finished record, p50 and p99, polling (the core's default
//!   `wait_for_change`) vs the store's pub/sub notification, beside one round trip.
//!
//! One Redis is a private `redis-server` of this process (its `commandstats` are the
//! benchmark's alone); the cluster is `REDIS_CLUSTER_NODES` (default ports 7101–7106, as
//! `scripts/services.sh` starts it), skipped with a note when it does not answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wake::Polling;
use anyhow::Context as _;
use orchestrix::store::{
    FinalStatus, IdempotencyStore, RecordStatus, StartOutcome, StartRequest, StoreError, Wait,
};
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::{self, cluster_routing as routing};

use crate::args::Args;
use crate::redis_server::PrivateRedis;
use crate::section::{Section, Table};
use crate::throughput::{Rate, fresh, measure, noop_flow, replay};

const CONCURRENCY: u64 = 50;
const WAKE_SAMPLES: usize = 100;

#[derive(Debug, Clone)]
pub struct ClusterBenchConfig {
    /// Length of each timed phase.
    pub phase: Duration,
}

impl ClusterBenchConfig {
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        Ok(Self {
            phase: args.seconds("seconds", Duration::from_secs(2))?,
        })
    }
}

fn cluster_nodes() -> Vec<String> {
    std::env::var("REDIS_CLUSTER_NODES")
        .unwrap_or_else(|_| {
            (7101..=7106)
                .map(|port| format!("redis://127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// One deployment under test.
enum Mode {
    One { url: String },
    Cluster { nodes: Vec<String> },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Self::One { .. } => "one Redis",
            Self::Cluster { .. } => "cluster (3 primaries + 3 replicas)",
        }
    }

    fn builder(&self) -> orchestrix_redis::RedisStoreBuilder {
        match self {
            Self::One { url } => RedisStore::builder(url.as_str()),
            Self::Cluster { nodes } => RedisStore::cluster(nodes.clone()),
        }
    }

    /// The nodes whose `commandstats` count: the server, or every node (replicas are
    /// told apart by `INFO replication` and left out).
    fn node_urls(&self) -> Vec<String> {
        match self {
            Self::One { url } => vec![url.clone()],
            Self::Cluster { nodes } => nodes.clone(),
        }
    }

    /// A `PING` through the same kind of connection the store uses, to one server.
    async fn pinger(&self) -> anyhow::Result<Pinger> {
        Ok(match self {
            Self::One { url } => Pinger::One(
                redis::Client::open(url.as_str())?
                    .get_connection_manager()
                    .await?,
            ),
            Self::Cluster { nodes } => Pinger::Cluster(
                redis::cluster::ClusterClient::new(nodes.clone())?
                    .get_async_connection()
                    .await?,
            ),
        })
    }
}

#[derive(Clone)]
enum Pinger {
    One(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Pinger {
    async fn ping(&self) -> anyhow::Result<()> {
        let cmd = redis::cmd("PING");
        match self.clone() {
            Self::One(mut conn) => cmd.exec_async(&mut conn).await?,
            Self::Cluster(mut conn) => {
                // To the primary of a random slot: one server, as a store operation.
                let route = routing::Route::new(fastrand::u16(..16384), routing::SlotAddr::Master);
                let routing = routing::RoutingInfo::SingleNode(
                    routing::SingleNodeRoutingInfo::SpecificNode(route),
                );
                conn.route_command(cmd, routing).await?;
            }
        }
        Ok(())
    }
}

pub async fn main(config: &ClusterBenchConfig) -> anyhow::Result<Vec<Section>> {
    let private = PrivateRedis::start().await?;
    let mut modes = vec![Mode::One { url: private.url() }];
    let nodes = cluster_nodes();
    let mut notes = Vec::new();
    match RedisStore::cluster(nodes.clone()).connect().await {
        Ok(_) => modes.push(Mode::Cluster { nodes }),
        Err(e) => notes.push(format!(
            "cluster skipped: no Redis Cluster answers at REDIS_CLUSTER_NODES ({e}); \
             `source scripts/services.sh; ensure_redis_cluster` starts one"
        )),
    }

    let mut throughput = Section::new("Redis Cluster vs one Redis: throughput at concurrency 50");
    throughput.about(
        "The 3-step no-op flow at concurrency 50: fresh runs/s (each a new key: `start`, \
         then the fenced `complete` script) and replays/s (keys already completed: one \
         `SET NX GET`), each beside `PING`s/s through the same kind of connection in the \
         same run (one Redis: a `ConnectionManager`; cluster: the cluster connection, each \
         `PING` routed to the primary of a random slot). `+ WAIT 1` is the same store with \
         `wait_for_replicas(1, 1 s)`: a `WAIT` on the key's primary after each acquire and \
         finish. One Redis is a private `redis-server` without replicas (no `WAIT` row); \
         the cluster runs on the same two cores as the harness, its six servers included.",
    );
    let mut rates = Table::new([
        "deployment",
        "PING/s",
        "fresh runs/s",
        "fresh ÷ PING",
        "replays/s",
        "replay ÷ PING",
        "errors",
    ]);
    let mut cpu = Section::new("Redis time per fresh run (`INFO commandstats`)");
    cpu.about(
        "Redis's own time per fresh run at concurrency 50: `CONFIG RESETSTAT` on every \
         primary, a timed phase of `start`s alone (fresh keys), then again before a phase \
         of fresh runs; `INFO commandstats` summed over the primaries gives the usec Redis \
         spent in each command (a script's includes the commands it runs inside, shown \
         under it in parentheses). `INFO cpu` adds the server's whole CPU time (network \
         I/O included) per operation.",
    );
    let mut wake = Section::new("Wake-up latency: owner finishes → waiter returns");
    wake.about(
        "A waiter (another store instance, as another process would have) sees the key \
         running and waits as `OnRunning::Wait` does: `wait_for_change`, then a read of \
         the record, until it is finished. The owner finishes 20–70 ms later; the latency \
         runs from the owner's `finish` call (its round trip included), and from the \
         owner receiving the finish's reply, to the waiter seeing the finished record (a \
         notified waiter still reads the record: one round trip, as the engine's `start` \
         after a wake-up). Polling is the core's default \
         `wait_for_change`; notification is the Redis store's sharded pub/sub. \
         Sequential samples; one round trip is a `PING` p50 on the same kind of connection.",
    );
    let mut wake_table = Table::new([
        "deployment",
        "waiting by",
        "samples",
        "from the finish call: p50 / p99",
        "from the finish's reply: p50 / p99",
        "PING p50",
        "p50 ÷ PING (call / reply)",
    ]);

    for mode in &modes {
        let prefix = format!("orchestrix-bench:cluster:{:08x}:", fastrand::u32(..));
        let store = mode.builder().key_prefix(&prefix).connect().await?;
        let pinger = mode.pinger().await?;
        let flow = noop_flow(Arc::new(store.clone()))?;
        // Warm-up: connections, scripts.
        measure(
            4,
            Duration::from_millis(300),
            0,
            fresh(&flow, "warm".to_owned()),
        )
        .await;
        let ping_rate = {
            let pinger = pinger.clone();
            measure(CONCURRENCY, config.phase, 0, move |_| {
                let pinger = pinger.clone();
                async move { pinger.ping().await.map(|()| true) }
            })
            .await
        };
        // Redis's time per operation: `start` alone (native), then whole fresh runs.
        reset_stats(mode).await?;
        let cpu_before = cpu_usec(mode).await?;
        let starts = {
            let store = store.clone();
            measure(CONCURRENCY, config.phase, 0, move |n| {
                let store = store.clone();
                async move {
                    let key = format!("start-only-{n}");
                    let outcome = store
                        .start(StartRequest {
                            key: &key,
                            fingerprint: None,
                            lease: Duration::from_secs(60),
                            rerun_failed: false,
                        })
                        .await?;
                    Ok(matches!(outcome, StartOutcome::Acquired(_)))
                }
            })
            .await
        };
        let start_stats = command_stats(mode).await?;
        let start_cpu = cpu_usec(mode).await?.saturating_sub(cpu_before);
        reset_stats(mode).await?;
        let cpu_before = cpu_usec(mode).await?;
        let fresh_rate =
            measure(CONCURRENCY, config.phase, 0, fresh(&flow, "c50".to_owned())).await;
        let stats = command_stats(mode).await?;
        let fresh_cpu = cpu_usec(mode).await?.saturating_sub(cpu_before);
        let replay_rate = measure(
            CONCURRENCY,
            config.phase,
            0,
            replay(&flow, "c50".to_owned(), fresh_rate.attempted),
        )
        .await;
        rates.row(rate_row(
            mode.name(),
            &ping_rate,
            &fresh_rate,
            Some(&replay_rate),
        ));
        if let Mode::Cluster { .. } = mode {
            let waiting = mode
                .builder()
                .key_prefix(&prefix)
                .wait_for_replicas(1, Duration::from_secs(1))
                .connect()
                .await?;
            let flow = noop_flow(Arc::new(waiting))?;
            let waited = measure(
                CONCURRENCY,
                config.phase,
                0,
                fresh(&flow, "wait".to_owned()),
            )
            .await;
            rates.row(rate_row(
                &format!("{} + WAIT 1", mode.name()),
                &ping_rate,
                &waited,
                None,
            ));
        }
        delete_prefix(mode, &prefix).await?;
        cpu.tables.push(cpu_table(
            mode.name(),
            (&start_stats, starts.ops, start_cpu),
            (&stats, fresh_rate.ops, fresh_cpu),
        ));

        let rtt = ping_p50(&pinger).await?;
        let variants: Vec<(&str, Arc<dyn IdempotencyStore>)> = match mode {
            Mode::One { .. } => vec![
                (
                    "polling (default)",
                    Arc::new(Polling(Arc::new(
                        mode.builder().key_prefix(&prefix).connect().await?,
                    ))),
                ),
                (
                    "notification",
                    Arc::new(mode.builder().key_prefix(&prefix).connect().await?),
                ),
            ],
            Mode::Cluster { .. } => vec![(
                "notification",
                Arc::new(mode.builder().key_prefix(&prefix).connect().await?),
            )],
        };
        for (how, waiter) in variants {
            let latencies = wake_latencies(&store, waiter.as_ref(), how).await?;
            let quantiles = |mut samples: Vec<Duration>| {
                samples.sort_unstable();
                let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
                (p(0.5), p(0.99))
            };
            let (call_p50, call_p99) = quantiles(latencies.iter().map(|l| l.0).collect());
            let (ret_p50, ret_p99) = quantiles(latencies.iter().map(|l| l.1).collect());
            wake_table.row([
                mode.name().to_owned(),
                how.to_owned(),
                latencies.len().to_string(),
                format!("{:.2} / {:.2} ms", ms(call_p50), ms(call_p99)),
                format!("{:.2} / {:.2} ms", ms(ret_p50), ms(ret_p99)),
                format!("{:.3} ms", ms(rtt)),
                format!(
                    "{:.1} / {:.1}",
                    ms(call_p50) / ms(rtt),
                    ms(ret_p50) / ms(rtt)
                ),
            ]);
        }
    }
    throughput.tables.push(rates);
    for note in notes {
        throughput.note(note);
    }
    throughput.note(
        "Shared 2-core VM: the harness, the six cluster servers and one Redis share two \
         cores, so a cluster cannot show its scaling here; read the ratios, measured in \
         the same run.",
    );
    wake.tables.push(wake_table);
    drop(private);
    Ok(vec![throughput, cpu, wake])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rate_row(name: &str, ping: &Rate, fresh: &Rate, replays: Option<&Rate>) -> Vec<String> {
    let ratio = |r: &Rate| format!("{:.2}", r.per_sec() / ping.per_sec().max(1.0));
    vec![
        name.to_owned(),
        format!("{:.0}", ping.per_sec()),
        format!("{:.0}", fresh.per_sec()),
        ratio(fresh),
        replays.map_or("-".to_owned(), |r| format!("{:.0}", r.per_sec())),
        replays.map_or("-".to_owned(), ratio),
        (fresh.errors + fresh.wrong + replays.map_or(0, |r| r.errors + r.wrong)).to_string(),
    ]
}

/// Deletes the keys the benchmark wrote (tens of thousands, kept for an hour otherwise),
/// node by node, one key per `UNLINK` (a cluster refuses one across slots).
async fn delete_prefix(mode: &Mode, prefix: &str) -> anyhow::Result<()> {
    for mut conn in node_connections(mode).await? {
        let mut cursor: u64 = 0;
        loop {
            let scanned: Result<(u64, Vec<Vec<u8>>), _> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await;
            // A replica answers SCAN but refuses writes: its primary deletes the keys.
            let Ok((next, keys)) = scanned else { break };
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("UNLINK").arg(key).ignore();
                }
                let _: Result<(), _> = pipe.query_async(&mut conn).await;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// A plain connection to each node of `mode`.
async fn node_connections(mode: &Mode) -> anyhow::Result<Vec<redis::aio::MultiplexedConnection>> {
    let mut conns = Vec::new();
    for url in mode.node_urls() {
        let conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        conns.push(conn);
    }
    Ok(conns)
}

async fn reset_stats(mode: &Mode) -> anyhow::Result<()> {
    for mut conn in node_connections(mode).await? {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .exec_async(&mut conn)
            .await?;
    }
    Ok(())
}

/// `(command, calls, usec)` summed over the primaries.
async fn command_stats(mode: &Mode) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mut sums: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for mut conn in node_connections(mode).await? {
        let replication: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await?;
        if replication.contains("role:slave") {
            continue;
        }
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await?;
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
                    .unwrap_or(0)
            };
            let sum = sums.entry(name.to_owned()).or_default();
            sum.0 += stat("calls");
            sum.1 += stat("usec");
        }
    }
    Ok(sums
        .into_iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config" | "ping" | "cluster"))
        .map(|(name, (calls, usec))| (name, calls, usec))
        .collect())
}

/// The server's CPU time so far, µs (`INFO cpu`: user + system, every thread), summed
/// over the primaries.
async fn cpu_usec(mode: &Mode) -> anyhow::Result<u64> {
    let mut total = 0.0;
    for mut conn in node_connections(mode).await? {
        let info: String = redis::cmd("INFO")
            .arg("default")
            .query_async(&mut conn)
            .await?;
        if info.contains("role:slave") {
            continue;
        }
        for field in ["used_cpu_user:", "used_cpu_sys:"] {
            total += info
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    Ok((total * 1e6) as u64)
}

/// `(calls, usec)` of `command` in `stats`.
fn stat(stats: &[(String, u64, u64)], command: &str) -> (u64, u64) {
    stats
        .iter()
        .find(|(name, _, _)| name == command)
        .map_or((0, 0), |(_, calls, usec)| (*calls, *usec))
}

/// Per operation: `start` (measured alone: its native `SET`), `complete` (the `EVALSHA`
/// of whole fresh runs, the commands it runs inside shown under it), their sum, and the
/// server's whole CPU time per operation (network I/O included).
fn cpu_table(
    name: &str,
    (start_stats, starts, start_cpu): (&[(String, u64, u64)], u64, u64),
    (stats, runs, fresh_cpu): (&[(String, u64, u64)], u64, u64),
) -> Table {
    let mut table = Table::new([
        format!("{name}: operation"),
        "commands".to_owned(),
        "calls / op".to_owned(),
        "µs / call".to_owned(),
        "µs / op".to_owned(),
    ]);
    let (starts, runs) = (starts.max(1) as f64, runs.max(1) as f64);
    let (set_calls, set_usec) = stat(start_stats, "set");
    let start_us = set_usec as f64 / starts;
    table.row([
        "start (acquire)".to_owned(),
        "`SET NX PX GET`".to_owned(),
        format!("{:.2}", set_calls as f64 / starts),
        format!("{:.2}", set_usec as f64 / set_calls.max(1) as f64),
        format!("{start_us:.2}"),
    ]);
    let (eval_calls, eval_usec) = stat(stats, "evalsha");
    let complete_us = eval_usec as f64 / runs;
    table.row([
        "complete (fenced)".to_owned(),
        "`EVALSHA`".to_owned(),
        format!("{:.2}", eval_calls as f64 / runs),
        format!("{:.2}", eval_usec as f64 / eval_calls.max(1) as f64),
        format!("{complete_us:.2}"),
    ]);
    for inner in ["get", "spublish"] {
        let (calls, usec) = stat(stats, inner);
        table.row([
            "  ↳ inside the script".to_owned(),
            format!("`{}`", inner.to_uppercase()),
            format!("{:.2}", calls as f64 / runs),
            format!("{:.2}", usec as f64 / calls.max(1) as f64),
            format!("({:.2})", usec as f64 / runs),
        ]);
    }
    table.row([
        "**fresh run** (start + complete)".to_owned(),
        String::new(),
        String::new(),
        String::new(),
        format!("**{:.2}**", start_us + complete_us),
    ]);
    table.row([
        "server CPU per start / per fresh run (`INFO cpu`, I/O included)".to_owned(),
        String::new(),
        String::new(),
        String::new(),
        format!(
            "{:.1} / {:.1}",
            start_cpu as f64 / starts,
            fresh_cpu as f64 / runs
        ),
    ]);
    table
}

async fn ping_p50(pinger: &Pinger) -> anyhow::Result<Duration> {
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        let began = Instant::now();
        pinger.ping().await?;
        samples.push(began.elapsed());
    }
    samples.sort_unstable();
    Ok(samples[samples.len() / 2])
}

/// Sequential wake-ups: the owner acquires, the waiter waits, the owner finishes.
async fn wake_latencies(
    owner: &RedisStore,
    waiter: &dyn IdempotencyStore,
    tag: &str,
) -> anyhow::Result<Vec<(Duration, Duration)>> {
    let run = fastrand::u32(..);
    let mut latencies = Vec::with_capacity(WAKE_SAMPLES);
    for i in 0..WAKE_SAMPLES {
        let key = format!("wake-{tag}-{run:08x}-{i}");
        let StartOutcome::Acquired(token) = owner
            .start(StartRequest {
                key: &key,
                fingerprint: None,
                lease: Duration::from_secs(30),
                rerun_failed: false,
            })
            .await?
        else {
            anyhow::bail!("a fresh key was not acquired");
        };
        let waiting = async {
            loop {
                let record = waiter.get(&key).await?;
                if record.is_none_or(|r| r.status != RecordStatus::Running) {
                    return Ok::<Instant, StoreError>(Instant::now());
                }
                waiter
                    .wait_for_change(&key, Wait::new(Duration::from_secs(5)))
                    .await?;
            }
        };
        let finishing = async {
            tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(..50))).await;
            let began = Instant::now();
            owner
                .finish(
                    &key,
                    token,
                    FinalStatus::Completed,
                    b"done",
                    Some(Duration::from_secs(60)),
                )
                .await?;
            Ok::<(Instant, Instant), StoreError>((began, Instant::now()))
        };
        let (seen, (began, returned)) = tokio::try_join!(waiting, finishing)?;
        latencies.push((
            seen.saturating_duration_since(began),
            seen.saturating_duration_since(returned),
        ));
    }
    Ok(latencies)
}
