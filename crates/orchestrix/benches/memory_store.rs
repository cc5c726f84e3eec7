//! Idempotent runs on the in-memory store: fresh runs/s and replays/s of a 3-step no-op
//! flow with 1k, 100k and 1M records already stored; memory per stored record; and the
//! cost of an idempotent run relative to a plain run. One core (current-thread runtime).
//!
//! `cargo bench -p orchestrix --bench memory_store`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrix::store::MemoryStore;
use orchestrix::{Context, Flow, RunOptions, StepError};

async fn noop(ctx: Context<u64>) -> Result<(), StepError> {
    black_box(ctx.input());
    Ok(())
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ttl = Duration::from_secs(3600);
    println!("in-memory store, 3-step no-op flow, one core; keys `order-<n>`, TTL 1 h");
    println!(
        "{:>10} {:>14} {:>14} {:>16}",
        "records", "fresh runs/s", "replays/s", "bytes/record"
    );
    let mut plain_ns = 0.0;
    let mut fresh_ns = 0.0;
    runtime.block_on(async {
        // BENCH_QUICK=1: one small size, for profiling under valgrind.
        // `cargo bench` passes `--bench`; under `cargo test` this is a quick smoke run.
        let quick =
            std::env::var_os("BENCH_QUICK").is_some() || !std::env::args().any(|a| a == "--bench");
        let sizes: &[u64] = if quick {
            &[1_000]
        } else {
            &[1_000, 100_000, 1_000_000]
        };
        let sample: u64 = if quick { 20_000 } else { 200_000 };
        for &records in sizes {
            let store = Arc::new(MemoryStore::new());
            let flow = Flow::<u64>::builder("bench")
                .store(store.clone())
                .step("a", noop)
                .step("b", noop)
                .step("c", noop)
                .build()?;
            // Warm up allocator and caches on keys outside the measured ranges.
            for i in 0..sample / 10 {
                let key = format!("warmup-{i}");
                black_box(
                    flow.run(u64::MAX - i, RunOptions::key(key.clone()).ttl(ttl))
                        .await?,
                );
                black_box(
                    flow.run(u64::MAX - i, RunOptions::key(key).ttl(ttl))
                        .await?,
                );
            }
            let before = rss_bytes().unwrap_or(0);
            for i in 0..records {
                flow.run(i, RunOptions::key(format!("order-{i}")).ttl(ttl))
                    .await?;
            }
            let per_record =
                rss_bytes().unwrap_or(0).saturating_sub(before) as f64 / records as f64;

            let started = Instant::now();
            for i in records..records + sample {
                let r = flow
                    .run(i, RunOptions::key(format!("order-{i}")).ttl(ttl))
                    .await?;
                black_box(&r);
            }
            let fresh = rate(sample, started.elapsed());

            let started = Instant::now();
            for n in 0..sample {
                let i = (n * 7919) % records;
                let r = flow
                    .run(i, RunOptions::key(format!("order-{i}")).ttl(ttl))
                    .await?;
                debug_assert!(r.replayed);
                black_box(&r);
            }
            let replays = rate(sample, started.elapsed());
            println!("{records:>10} {fresh:>14.0} {replays:>14.0} {per_record:>16.0}");

            if records == 1_000 {
                let started = Instant::now();
                for i in 0..sample {
                    black_box(flow.run(i, RunOptions::new()).await?);
                }
                plain_ns = started.elapsed().as_nanos() as f64 / sample as f64;
                fresh_ns = 1e9 / fresh;
            }
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    println!(
        "plain run {plain_ns:.0} ns, fresh idempotent run {fresh_ns:.0} ns: idempotent / plain = {:.1}x",
        fresh_ns / plain_ns
    );
    Ok(())
}
