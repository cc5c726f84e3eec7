//! `orchestrix-bench`: proof under faults and load, with figures.
//!
//! Every scenario drives real flows (`Flow::run` with an idempotency key) against a real
//! store on 127.0.0.1, prints its tables, and exits with status 1 when one of its
//! invariants breaks (2 for a usage or setup error):
//!
//! * `storm` — P processes × C concurrent callers × K keys race for every key; each
//!   execution of the side effect appends a line to a file opened with `O_APPEND`, an
//!   independent counter. Invariant: exactly K executions, each key once.
//!   With `--race expired` every key is first held by an owner process killed with
//!   SIGKILL, and the callers race to take it over once its lease lapsed; with `--race
//!   failed` every key's first run fails and the callers race with `cache_result(false)`.
//!   Invariant: exactly one takeover execution per key.
//! * `crash` — an owner process is killed with SIGKILL mid-flow; another process takes
//!   the key over once the lease lapses; the killed owner's late writes (its stale token
//!   replayed) land while the taker's step is still running, and again after it
//!   completed, and are refused. Invariant: the taker's record is untouched by them; one
//!   completed record holding the new owner's result, zero stale overwrites.
//! * `outage` — a private `redis-server` is killed during a storm and restarted
//!   (`--fault kill`), or frozen with SIGSTOP and thawed with SIGCONT (`--fault stop`, a
//!   hung server). Every call ends within a bound, every error is a typed store error, no
//!   step runs without an acquired record, and no key executes twice against the same
//!   server instance (stop: none after its outcome was stored, and none is still locked
//!   one lease after the thaw).
//! * `big-results` — a private `redis-server` with a value limit
//!   (`--proto-max-bulk-len 1mb`) or a memory limit (`--maxmemory 4mb`, `noeviction`)
//!   refuses results above it. Invariant: each key still executes exactly once; the
//!   caller is told the record was finished without its result, and later callers are
//!   refused with "result not stored", also after the lease.
//! * `durable-crash` — a durable flow's owner process is killed with SIGKILL at every step
//!   boundary and in every step; another process resumes each run by retrying its key
//!   and by `Flow::recover`. Invariant: no step that completed runs again, the step in
//!   flight at most once more (never an at-most-once step), and the output equals an
//!   uncrashed run's.
//! * `durable` — one checkpoint beside the store's raw round trip, and durable ÷ plain
//!   keyed runs of a 5-step flow.
//! * `throughput` — fresh runs/s and replays/s beside the raw round-trip rate of the same
//!   client, and round trips per operation.
//! * `cluster` — the Redis store on a Redis Cluster beside one Redis: runs/s as a
//!   fraction of `PING`, the cost of `WAIT`, Redis's time per fresh run, and the wake-up
//!   latency of waiters, polling vs pub/sub.
//! * `wake` — how soon a waiting duplicate (`OnRunning::Wait`) returns once the owner
//!   finished, by notification and by polling, beside one round trip of the store.
//! * `cache` — Redis replays/s of hot keys, straight and through `CachedStore`.
//! * `report` — all of the above at moderate sizes, written to `BENCHMARKS.md`.
//!
//! Child processes are this binary again, with the hidden `child` subcommand.
#![forbid(unsafe_code)]

mod args;
mod arrivals;
mod big_results;
mod cache_bench;
mod child;
mod cluster;
mod counter;
mod crash;
mod durable_bench;
mod durable_chaos;
mod durable_crash;
mod machine;
mod outage;
mod redis_server;
mod report;
mod section;
mod stores;
mod storm;
mod takeover;
mod throughput;
mod wake;
mod wire;

use std::process::ExitCode;
use std::time::Duration;

use args::Args;
use section::Section;
use stores::StoreKind;

const USAGE: &str = "\
usage: orchestrix-bench <scenario> [options]

scenarios:
  storm       --store S [--processes 4] [--callers 5] [--keys 500]
              [--race fresh|expired|failed|all] [--lease-ms 1000]
  crash       --store S [--lease-ms 1000] [--rounds 1]
  durable-crash --store S [--lease-ms 1000] [--rounds 1] [--points all|P,P,...]
              [--chaos-keys 16 (random kills per round; 0: none)]
              (P: acquired, in-reserve, after-reserve, started-charge, in-charge, ...)
  outage      [--store redis] [--fault kill|stop] [--window-keys 20] [--callers 16]
              [--step-ms 5] [--down-at-ms 2500]
              [--seconds 8 (kill) | 10 (stop)] [--down-for-ms 1500 (kill) | 6000 (stop)]
              [--lease-ms 30000 (kill) | 2000 (stop)]
              [--response-timeout-ms 2000 (kill) | 500 (stop)] [--deadline-ms D]
  big-results [--limit bulk|memory|all] [--keys 10] [--callers 4] [--lease-ms 1000]
  throughput  --store S [--seconds 2] [--records 1000,100000,1000000]
  durable     --store S [--seconds 2]
  cluster     [--seconds 2]   (REDIS_CLUSTER_NODES, e.g. from scripts/services.sh)
  wake        --store S [--samples 60]
  cache       [--seconds 2]
  report      [--output PATH] [--seconds 2]

S: memory | redis | postgres | sqlite | dynamodb | all
   (all: every store whose service answers; the others are skipped with a line)

services (loopback only): REDIS_URL (redis://127.0.0.1:6379),
  DATABASE_URL (postgres://postgres@127.0.0.1:5432/test),
  DYNAMODB_ENDPOINT (e.g. from `source scripts/services.sh; start_dynamodb`).

exit status: 0 all invariants held, 1 an invariant broke, 2 usage or setup error.";

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(args: Args) -> anyhow::Result<ExitCode> {
    let sections = match args.scenario.as_str() {
        "child" => return child::main(&args).await.map(|()| ExitCode::SUCCESS),
        "report" => return report::main(&args).await,
        "storm" => {
            let size = storm::StormSize::from_args(&args)?;
            let kinds = stores_arg(&args)?;
            let lease = args.millis("lease-ms", Duration::from_secs(1))?;
            let mut sections = Vec::new();
            for race in storm::Race::parse_list(args.get("race").unwrap_or("fresh"))? {
                sections.push(match race {
                    storm::Race::Fresh => storm::main(&kinds, &|_| size).await?,
                    race => takeover::main(&kinds, race, &|_| size, lease).await?,
                });
            }
            sections
        }
        "crash" => {
            vec![crash::main(&stores_arg(&args)?, &crash::CrashConfig::from_args(&args)?).await?]
        }
        "durable-crash" => vec![
            durable_crash::main(
                &stores_arg(&args)?,
                &durable_crash::DurableCrashConfig::from_args(&args)?,
            )
            .await?,
        ],
        "durable" => vec![
            durable_bench::main(
                &stores_arg(&args)?,
                &durable_bench::DurableBenchConfig::from_args(&args)?,
            )
            .await?,
        ],
        "outage" => {
            let kinds = stores_arg(&args).unwrap_or_else(|_| vec![StoreKind::Redis]);
            if kinds != [StoreKind::Redis] {
                anyhow::bail!("outage runs against a private redis-server only: --store redis");
            }
            vec![outage::main(&outage::OutageConfig::from_args(&args)?).await?]
        }
        "big-results" => {
            vec![big_results::main(&big_results::BigResultsConfig::from_args(&args)?).await?]
        }
        "throughput" => {
            throughput::main(
                &stores_arg(&args)?,
                &throughput::ThroughputConfig::from_args(&args)?,
            )
            .await?
        }
        "cluster" => cluster::main(&cluster::ClusterBenchConfig::from_args(&args)?).await?,
        "wake" => {
            vec![wake::main(&stores_arg(&args)?, &wake::WakeConfig::from_args(&args)?).await?]
        }
        "cache" => vec![cache_bench::main(&cache_bench::CacheConfig::from_args(&args)?).await?],
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            return Ok(ExitCode::SUCCESS);
        }
        other => anyhow::bail!("unknown scenario {other:?}\n\n{USAGE}"),
    };
    Ok(finish(&sections))
}

/// Prints the sections and turns their violations into the exit status.
fn finish(sections: &[Section]) -> ExitCode {
    let mut broken = false;
    for section in sections {
        println!("{}", section.render());
        broken |= !section.violations.is_empty();
    }
    if broken {
        println!("INVARIANT BROKEN (see above)");
        ExitCode::from(1)
    } else {
        println!("all invariants held");
        ExitCode::SUCCESS
    }
}

fn stores_arg(args: &Args) -> anyhow::Result<Vec<StoreKind>> {
    let name = args
        .get("store")
        .ok_or_else(|| anyhow::anyhow!("--store is required\n\n{USAGE}"))?;
    StoreKind::parse_list(name)
}
