//! `report`: every scenario at moderate sizes, written to `BENCHMARKS.md`.
//!
//! Bounded: each scenario has its own time limit, and a store whose service does not
//! answer is skipped with a line saying so.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::args::Args;
use crate::big_results::{BigResultsConfig, Limit};
use crate::cache_bench::CacheConfig;
use crate::crash::CrashConfig;
use crate::durable_bench::DurableBenchConfig;
use crate::durable_crash::{DurableCrashConfig, Point};
use crate::machine;
use crate::outage::OutageConfig;
use crate::section::{Section, Table};
use crate::stores::{Backend, StoreKind};
use crate::storm::{Race, StormSize};
use crate::throughput::ThroughputConfig;
use crate::wake::WakeConfig;

/// The bound on one scenario of the report.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(240);

const SHARED: [StoreKind; 4] = [
    StoreKind::Redis,
    StoreKind::Postgres,
    StoreKind::Sqlite,
    StoreKind::Dynamodb,
];

/// The lease of the takeover storms' runs (and of their dead owner).
const TAKEOVER_LEASE: Duration = Duration::from_secs(2);

/// Where the hand-written section of `BENCHMARKS.md` begins; the report keeps it.
const KEPT_SECTION: &str = "\n## Engine overhead and the in-memory store (`cargo bench`)";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub async fn main(args: &Args) -> anyhow::Result<ExitCode> {
    let output = args
        .get("output")
        .map_or_else(|| workspace().join("BENCHMARKS.md"), PathBuf::from);
    let phase = args.seconds("seconds", Duration::from_secs(2))?;
    let started = Instant::now();
    let services = services().await;

    let mut sections = Vec::new();
    // The memory store first, while this process's heap is fresh (its bytes/record figure
    // is a resident-memory delta).
    let memory = ThroughputConfig {
        phase,
        records: vec![1_000, 100_000, 1_000_000],
    };
    sections.extend(
        bounded(
            "throughput (memory)",
            crate::throughput::main(&[StoreKind::Memory], &memory),
        )
        .await,
    );
    let shared = ThroughputConfig {
        phase,
        records: Vec::new(),
    };
    sections.extend(bounded("throughput", crate::throughput::main(&SHARED, &shared)).await);
    let wake = WakeConfig { samples: 60 };
    sections.extend(
        bounded("wake", async {
            Ok(vec![crate::wake::main(&StoreKind::ALL, &wake).await?])
        })
        .await,
    );
    let cache = CacheConfig { phase };
    sections.extend(
        bounded("cache", async {
            Ok(vec![crate::cache_bench::main(&cache).await?])
        })
        .await,
    );
    let durable = DurableBenchConfig { phase };
    sections.extend(
        bounded("durable", async {
            Ok(vec![
                crate::durable_bench::main(&StoreKind::ALL, &durable).await?,
            ])
        })
        .await,
    );
    let storm_size = |kind: StoreKind| match kind {
        StoreKind::Memory => StormSize {
            processes: 1,
            callers: 20,
            keys: 500,
        },
        // The local DynamoDB-compatible server answers a few hundred requests per second.
        StoreKind::Dynamodb => StormSize {
            processes: 2,
            callers: 4,
            keys: 100,
        },
        _ => StormSize {
            processes: 4,
            callers: 5,
            keys: 500,
        },
    };
    let all = StoreKind::ALL;
    sections.extend(
        bounded("storm", async {
            Ok(vec![crate::storm::main(&all, &storm_size).await?])
        })
        .await,
    );
    // The same sizes, over keys that must be taken over; a lease of 2 s leaves the dead
    // owner's heartbeats (K renewals every 2/3 s) within every store's rate.
    for race in [Race::ExpiredLease, Race::FailedRecord] {
        let name = format!("storm ({} race)", race.name());
        sections.extend(
            bounded(&name, async {
                Ok(vec![
                    crate::takeover::main(&all, race, &storm_size, TAKEOVER_LEASE).await?,
                ])
            })
            .await,
        );
    }
    let crash = CrashConfig {
        lease: Duration::from_secs(1),
        rounds: 2,
    };
    sections.extend(
        bounded("crash", async {
            Ok(vec![crate::crash::main(&SHARED, &crash).await?])
        })
        .await,
    );
    let durable_crash = DurableCrashConfig {
        lease: Duration::from_secs(1),
        rounds: 1,
        points: Point::all(),
        chaos_keys: 16,
    };
    sections.extend(
        bounded("durable crash", async {
            Ok(vec![
                crate::durable_crash::main(&StoreKind::ALL, &durable_crash).await?,
            ])
        })
        .await,
    );
    for (name, outage) in [
        ("outage", OutageConfig::KILL),
        ("outage (hang)", OutageConfig::STOP),
    ] {
        sections.extend(
            bounded(name, async {
                Ok(vec![crate::outage::main(&outage).await?])
            })
            .await,
        );
    }

    let big_results = BigResultsConfig {
        limits: Limit::ALL.to_vec(),
        keys: 20,
        callers: 4,
        lease: Duration::from_secs(1),
    };
    sections.extend(
        bounded("big results", async {
            Ok(vec![crate::big_results::main(&big_results).await?])
        })
        .await,
    );

    let cluster = crate::cluster::ClusterBenchConfig { phase };
    sections.extend(bounded("cluster", crate::cluster::main(&cluster)).await);

    let mut document = render(&sections, &services, started.elapsed());
    // The core crate's `cargo bench` figures are written by hand at the end: keep them.
    if let Ok(old) = std::fs::read_to_string(&output)
        && let Some(kept) = old.find(KEPT_SECTION).and_then(|at| old.get(at..))
    {
        document.push_str(kept);
    }
    std::fs::write(&output, &document).with_context(|| format!("writing {}", output.display()))?;
    println!("{document}");
    println!("written to {}", output.display());
    let broken = sections.iter().any(|s| !s.violations.is_empty());
    Ok(if broken {
        println!("INVARIANT BROKEN (see above)");
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs one scenario under [`SCENARIO_TIMEOUT`]; a failure becomes a section saying so.
async fn bounded(
    name: &str,
    scenario: impl Future<Output = anyhow::Result<Vec<Section>>>,
) -> Vec<Section> {
    eprintln!("[report] {name} …");
    let started = Instant::now();
    let sections = match tokio::time::timeout(SCENARIO_TIMEOUT, scenario).await {
        Ok(Ok(sections)) => sections,
        Ok(Err(e)) => {
            let mut section = Section::new(format!("{name}: not run"));
            section.note(format!("{e:#}"));
            vec![section]
        }
        Err(_) => {
            let mut section = Section::new(format!("{name}: timed out"));
            section.violation(format!(
                "the scenario did not finish within {SCENARIO_TIMEOUT:?}"
            ));
            vec![section]
        }
    };
    eprintln!(
        "[report] {name} done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    sections
}

/// Each service's version, or why it is not available.
async fn services() -> Vec<(StoreKind, String)> {
    let mut found = Vec::new();
    let dir = tempfile::tempdir().ok();
    for kind in StoreKind::ALL {
        let name = match kind {
            StoreKind::Sqlite => match &dir {
                Some(dir) => dir.path().join("probe.db").display().to_string(),
                None => continue,
            },
            StoreKind::Postgres => "orchestrix_bench_probe".to_owned(),
            StoreKind::Dynamodb => "orchestrix-bench-probe".to_owned(),
            _ => "orchestrix-bench:probe:".to_owned(),
        };
        let version = match tokio::time::timeout(
            Duration::from_secs(10),
            Backend::open(kind, &name, 1),
        )
        .await
        {
            Ok(Ok(backend)) => backend.service_version().await,
            Ok(Err(e)) => format!("unavailable: {e:#}"),
            Err(_) => "unavailable: no answer within 10 s".to_owned(),
        };
        found.push((kind, version));
    }
    found
}

fn render(sections: &[Section], services: &[(StoreKind, String)], took: Duration) -> String {
    let mut machine_table = Table::new(["", ""]);
    machine_table.row(["CPU".to_owned(), machine::cpu_model()]);
    machine_table.row(["cores".to_owned(), machine::cores()]);
    machine_table.row(["memory".to_owned(), machine::memory_total()]);
    machine_table.row(["kernel".to_owned(), machine::kernel()]);
    machine_table.row(["rustc".to_owned(), machine::rustc()]);
    machine_table.row(["date".to_owned(), machine::now_utc()]);
    machine_table.row(["commit".to_owned(), machine::commit(&workspace())]);
    for (kind, version) in services {
        machine_table.row([format!("{} service", kind.name()), version.clone()]);
    }
    machine_table.row([
        "report took".to_owned(),
        format!("{:.0} s", took.as_secs_f64()),
    ]);
    let mut out = String::from(
        "# Benchmarks\n\n\
         Generated by `cargo run --release -p orchestrix-bench -- report` (the harness in \
         `crates/orchestrix-bench`); do not edit by hand, except the last section (the core \
         crate's `cargo bench` figures), which the report keeps as it finds it. Every figure \
         comes from real flows \
         (`Flow::run` with an idempotency key) against real services on 127.0.0.1. Run one \
         scenario alone with `cargo run --release -p orchestrix-bench -- <scenario> --store <store>` \
         (`storm`, `crash`, `durable-crash`, `outage`, `big-results`, `throughput`, `durable`, \
         `wake`, `cache`; \
         `--help` lists the options).\n\n\
         **Caveat:** measured on a shared 2-core virtual machine. The harness, its child \
         processes and the servers (Redis, PostgreSQL, the DynamoDB-compatible `moto`) share \
         those two cores, and other work on the host adds noise: read the figures as orders \
         of magnitude and as ratios measured in the same run (fresh/raw, replay/raw), not as \
         absolute capacity. The DynamoDB figures measure a local `moto` server (a few hundred \
         requests per second), not DynamoDB itself.\n\n## Machine\n\n",
    );
    out.push_str(&machine_table.render());
    out.push('\n');
    for section in sections {
        out.push_str(&section.render());
        out.push('\n');
    }
    out
}
