//! `cache`: replays/s of hot keys on Redis, straight and through `CachedStore`, in the
//! same run, beside the raw `PING` rate of the same kind of connection.

use std::sync::Arc;
use std::time::Duration;

use orchestrix::store::{CachedStore, IdempotencyStore};
use orchestrix::{RunOptions, Status};

use crate::section::{Section, Table};
use crate::stores::{Namespace, StoreKind};
use crate::throughput::{Rate, measure, noop_flow, replay};

/// Concurrent callers in each phase.
const CONCURRENCY: u64 = 50;
/// Hot keys replayed.
const HOT_KEYS: u64 = 100;
/// The cache's longest entry life in this benchmark: longer than the whole scenario.
const MAX_AGE: Duration = Duration::from_secs(600);
const TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Length of each timed phase.
    pub phase: Duration,
}

impl CacheConfig {
    pub fn from_args(args: &crate::args::Args) -> anyhow::Result<Self> {
        Ok(Self {
            phase: args.seconds("seconds", Duration::from_secs(2))?,
        })
    }
}

pub async fn main(config: &CacheConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Replays of hot keys through `CachedStore` (Redis)");
    section.about(format!(
        "{HOT_KEYS} keys completed through a `CachedStore` in front of the Redis store, then \
         replayed by {CONCURRENCY} concurrent callers for {:.0} s per phase (a 3-step no-op \
         flow): once through the Redis store itself, once through the cache (whose first \
         replay of each key reads the record back once). Beside them, `PING`s/s through the \
         same kind of connection. Target: cached ≥ 10× uncached.",
        config.phase.as_secs_f64()
    ));
    let (namespace, backend) = Namespace::create(StoreKind::Redis, "cache", 8).await?;
    let outcome = async {
        let redis = backend.store();
        let cached: Arc<dyn IdempotencyStore> =
            Arc::new(CachedStore::new(Arc::clone(&redis)).max_age(MAX_AGE));
        let plain_flow = noop_flow(redis)?;
        let cached_flow = noop_flow(cached)?;
        let tag = "hot".to_owned();
        for i in 0..HOT_KEYS {
            let result = cached_flow
                .run(i, RunOptions::key(format!("{tag}-{i}")).ttl(TTL))
                .await?;
            if result.status != Status::Completed || result.replayed {
                anyhow::bail!("priming key {i} did not run fresh");
            }
        }
        let ping = {
            let backend = backend.clone();
            measure(CONCURRENCY, config.phase, 0, move |_| {
                let backend = backend.clone();
                async move { backend.round_trip().await.map(|()| true) }
            })
            .await
        };
        let plain = measure(
            CONCURRENCY,
            config.phase,
            0,
            replay(&plain_flow, tag.clone(), HOT_KEYS),
        )
        .await;
        let through_cache = measure(
            CONCURRENCY,
            config.phase,
            0,
            replay(&cached_flow, tag, HOT_KEYS),
        )
        .await;
        anyhow::Ok((ping, plain, through_cache))
    }
    .await;
    if let Some(note) = namespace.remove(&backend).await {
        section.note(note);
    }
    let (ping, plain, through_cache) = outcome?;
    let mut table = Table::new(["phase", "per second", "errors", "÷ uncached replays"]);
    let row = |table: &mut Table, name: &str, rate: &Rate| {
        table.row([
            name.to_owned(),
            format!("{:.0}", rate.per_sec()),
            rate.errors.to_string(),
            if plain.per_sec() > 0.0 {
                format!("{:.1}×", rate.per_sec() / plain.per_sec())
            } else {
                "-".to_owned()
            },
        ]);
    };
    row(&mut table, "PING (raw round trip)", &ping);
    row(&mut table, "replays, Redis store", &plain);
    row(&mut table, "replays, CachedStore over it", &through_cache);
    section.tables.push(table);
    for (name, rate) in [("uncached", &plain), ("cached", &through_cache)] {
        if rate.wrong > 0 || rate.errors > 0 {
            section.violation(format!(
                "{name} replays: {} not replayed, {} errors",
                rate.wrong, rate.errors
            ));
        }
    }
    Ok(section)
}
