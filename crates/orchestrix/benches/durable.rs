//! Durable runs on the in-memory store: a 5-step no-op flow run fresh under new keys,
//! durable (every step journaled) and not, alternating in slices; and the cost of one
//! journal append. One core (current-thread runtime).
//!
//! `cargo bench -p orchestrix --bench durable`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use orchestrix::store::{DurableStart, DurableStartOutcome, IdempotencyStore, MemoryStore};
use orchestrix::{Context, Flow, RunOptions, StepError};

const SLICES: usize = 5;

async fn noop(ctx: Context<u64>) -> Result<(), StepError> {
    black_box(ctx.input());
    Ok(())
}

fn flow(durable: bool) -> Result<Flow<u64>, orchestrix::BuildError> {
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::new());
    let mut builder = Flow::<u64>::builder(if durable { "durable" } else { "plain" }).store(store);
    if durable {
        builder = builder.durable();
    }
    for name in ["a", "b", "c", "d", "e"] {
        builder = builder.step(name, noop);
    }
    builder.build()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let full = std::env::args().any(|a| a == "--bench");
    let runs: u64 = if full { 100_000 } else { 500 };
    let (plain, durable) = (flow(false)?, flow(true)?);
    let mut rates = (Vec::new(), Vec::new());
    let mut next = 0u64;
    runtime.block_on(async {
        for _ in 0..SLICES {
            for (flow, out) in [(&plain, &mut rates.0), (&durable, &mut rates.1)] {
                let started = Instant::now();
                for _ in 0..runs {
                    next += 1;
                    let result = flow.run(next, RunOptions::key(next.to_string())).await;
                    black_box(&result);
                }
                out.push(runs as f64 / started.elapsed().as_secs_f64());
            }
        }
    });
    let (plain_rate, durable_rate) = (median(rates.0), median(rates.1));

    // Journal appends alone: ten to each of many held durable records.
    let store = MemoryStore::new();
    let records = runs;
    let appends = records * 10;
    let append_ns = runtime.block_on(async {
        let journal = store.journal_store().ok_or("no journal")?;
        let entry = [0u8; 24];
        let mut total = std::time::Duration::ZERO;
        for r in 0..records {
            let key = format!("bench-{r}");
            let start = DurableStart {
                key: &key,
                fingerprint: None,
                lease: std::time::Duration::from_secs(3600),
                rerun_failed: false,
                input: b"{}",
                retain: None,
            };
            let DurableStartOutcome::Acquired { token, .. } = journal.start_durable(start).await?
            else {
                return Err("not acquired".into());
            };
            let started = Instant::now();
            for _ in 0..10 {
                journal.append(&key, token, &entry).await?;
            }
            total += started.elapsed();
        }
        Ok::<_, Box<dyn std::error::Error>>(total.as_nanos() as f64 / appends as f64)
    })?;

    println!(
        "5-step no-op flow, fresh keyed runs on the memory store, median of {SLICES} slices x {runs} runs"
    );
    println!("  not durable        {:>10.0} runs/s", plain_rate);
    println!("  durable            {:>10.0} runs/s", durable_rate);
    println!("  durable / not      {:>10.2}", durable_rate / plain_rate);
    println!(
        "  one journal append {:>10.0} ns (of a 24-byte entry, {appends} appends)",
        append_ns
    );
    Ok(())
}
