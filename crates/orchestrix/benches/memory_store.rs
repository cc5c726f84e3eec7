//! Idempotent runs on the in-memory store: fresh runs/s and replays/s of a 3-step no-op
//! flow with 1k, 100k and 1M records already stored; memory per stored record; and the
//! cost of an idempotent run relative to a plain run. One core (current-thread runtime).
//!
//! `cargo bench -p orchestrix --bench memory_store`
//!
//! Each size runs in a child process of its own, so that the memory one size frees does
//! not hide the next size's growth, and one size's heap does not slow the next.
//!
//! Replays are measured twice: of **random** stored keys (every lookup lands on a record
//! that is not in any CPU cache: the worst case, bound by memory latency once the store
//! outgrows the caches) and of **recent** keys (the last 1,000 written: a client retrying
//! soon after its first request, the common case). Beside them the benchmark measures one
//! random memory access over a buffer as large as the store (a pointer chase), which is
//! the floor of any lookup into memory that size on this machine.

use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrix::store::MemoryStore;
use orchestrix::{Context, Flow, RunOptions, StepError};

/// Each measured phase runs as this many slices, alternating between phases, and reports
/// its median slice and its best: noise from the shared machine falls on every phase alike,
/// and the best slice shows the rate when the host left this core alone.
const SLICES: usize = 5;

async fn noop(ctx: Context<u64>) -> Result<(), StepError> {
    black_box(ctx.input());
    Ok(())
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The median and the best of the slices' rates.
fn summary(mut rates: Vec<f64>) -> (f64, f64) {
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    (median, rates.last().copied().unwrap_or(0.0))
}

/// A rate for the table: `412k` or `1.07M`.
fn rate(per_second: f64) -> String {
    if per_second >= 1e6 {
        format!("{:.2}M", per_second / 1e6)
    } else {
        format!("{:.0}k", per_second / 1e3)
    }
}

/// Nanoseconds per random memory access over `bytes` of memory: a walk along one random
/// cycle through 64-byte lines, each load depending on the one before.
fn random_access_ns(bytes: u64) -> f64 {
    const LINE: usize = 8; // u64s per 64-byte line
    let lines = usize::try_from(bytes / 64).unwrap_or(usize::MAX).max(1024);
    // Sattolo's shuffle: one cycle through every line.
    let mut order: Vec<usize> = (0..lines).collect();
    for i in (1..lines).rev() {
        order.swap(i, fastrand::usize(..i));
    }
    let mut next = vec![0u64; lines * LINE];
    for (i, &line) in order.iter().enumerate() {
        let to = order[(i + 1) % lines];
        next[line * LINE] = (to * LINE) as u64;
    }
    let steps = 2_000_000;
    let mut at = 0usize;
    let started = Instant::now();
    for _ in 0..steps {
        at = next[at] as usize;
    }
    black_box(at);
    started.elapsed().as_nanos() as f64 / f64::from(steps)
}

/// One size, in this process. Prints one line: records; fresh runs/s, random replays/s and
/// recent replays/s (each median, then best); bytes/record; random-access ns; plain-run ns;
/// fresh-run ns (at the median).
fn measure(records: u64, sample: u64) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ttl = Duration::from_secs(3600);
    runtime.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let flow = Flow::<u64>::builder("bench")
            .store(store.clone())
            .step("a", noop)
            .step("b", noop)
            .step("c", noop)
            .build()?;
        let run = |i: u64| flow.run(i, RunOptions::key(format!("order-{i}")).ttl(ttl));
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
            run(i).await?;
        }
        let grown = rss_bytes().unwrap_or(0).saturating_sub(before);
        let per_record = grown as f64 / records as f64;

        let slice = sample / SLICES as u64;
        let mut next_fresh = records;
        let mut replayed = 0u64;
        let (mut fresh, mut random, mut recent) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..SLICES {
            let started = Instant::now();
            for i in next_fresh..next_fresh + slice {
                black_box(&run(i).await?);
            }
            fresh.push(slice as f64 / started.elapsed().as_secs_f64());
            next_fresh += slice;

            let started = Instant::now();
            for _ in 0..slice {
                let i = (replayed * 7919) % records;
                replayed += 1;
                let r = run(i).await?;
                debug_assert!(r.replayed);
                black_box(&r);
            }
            random.push(slice as f64 / started.elapsed().as_secs_f64());

            let newest = next_fresh.saturating_sub(1_000);
            let started = Instant::now();
            for n in 0..slice {
                let r = run(newest + n % 1_000).await?;
                debug_assert!(r.replayed);
                black_box(&r);
            }
            recent.push(slice as f64 / started.elapsed().as_secs_f64());
        }
        let (fresh, fresh_best) = summary(fresh);
        let (random, random_best) = summary(random);
        let (recent, recent_best) = summary(recent);

        let started = Instant::now();
        for i in 0..slice {
            black_box(flow.run(i, RunOptions::new()).await?);
        }
        let plain_ns = started.elapsed().as_nanos() as f64 / slice as f64;
        let access_ns = random_access_ns(grown.max(1 << 20));
        println!(
            "{records} {fresh} {fresh_best} {random} {random_best} {recent} {recent_best} \
             {per_record} {access_ns} {plain_ns} {}",
            1e9 / fresh,
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // BENCH_QUICK=1: one small size, for profiling under valgrind.
    // `cargo bench` passes `--bench`; under `cargo test` this is a quick smoke run.
    let quick =
        std::env::var_os("BENCH_QUICK").is_some() || !std::env::args().any(|a| a == "--bench");
    let sample: u64 = if quick { 20_000 } else { 500_000 };
    if let Some(records) = std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        return measure(records, sample);
    }
    let sizes: &[u64] = if quick {
        &[1_000]
    } else {
        &[1_000, 100_000, 1_000_000]
    };
    println!("in-memory store, 3-step no-op flow, one core; keys `order-<n>`, TTL 1 h");
    println!("rates: median / best of {SLICES} interleaved slices; each size in its own process");
    println!(
        "{:>10} {:>15} {:>17} {:>17} {:>13} {:>14}",
        "records",
        "fresh runs/s",
        "replays/s random",
        "replays/s recent",
        "bytes/record",
        "memory access"
    );
    let mut ratio = None;
    for &records in sizes {
        let out = Command::new(std::env::current_exe()?)
            .args(std::env::args().skip(1))
            .env("BENCH_RECORDS", records.to_string())
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "the {records}-record run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = line
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let [
            _,
            fresh,
            fresh_best,
            random,
            random_best,
            recent,
            recent_best,
            bytes,
            access,
            plain,
            fresh_ns,
        ] = f[..]
        else {
            return Err(format!("unexpected output from the {records}-record run: {line}").into());
        };
        let pair = |median, best| format!("{} / {}", rate(median), rate(best));
        println!(
            "{records:>10} {:>15} {:>17} {:>17} {bytes:>13.0} {access:>11.0} ns",
            pair(fresh, fresh_best),
            pair(random, random_best),
            pair(recent, recent_best),
        );
        ratio.get_or_insert((plain, fresh_ns));
    }
    if let Some((plain, fresh)) = ratio {
        println!(
            "plain run {plain:.0} ns, fresh idempotent run {fresh:.0} ns: idempotent / plain = {:.1}x",
            fresh / plain
        );
    }
    println!("memory access: one random read over a buffer the size of the store (pointer chase)");
    Ok(())
}
