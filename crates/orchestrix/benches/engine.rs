//! Engine overhead per run of a 3-step flow whose steps do nothing, against calling the
//! same three async closures directly, in the same process on one core; and the same flow
//! built with a metrics recorder installed (a Prometheus recorder, as a service would
//! install), to show what metrics cost when on, and that they cost nothing when off.
//!
//! `cargo bench -p orchestrix --bench engine`

use std::hint::black_box;
use std::time::{Duration, Instant};

use orchestrix::{Context, Flow, RunOptions, StepError};

async fn noop(ctx: Context<u64>) -> Result<(), StepError> {
    black_box(ctx.input());
    Ok(())
}

fn per_run(elapsed: Duration, runs: u64) -> f64 {
    elapsed.as_nanos() as f64 / runs as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let build = || {
        Flow::<u64>::builder("bench")
            .step("a", noop)
            .step("b", noop)
            .step("c", noop)
            .build()
    };
    let flow = build()?;
    // The same flow, its metric handles registered with a real recorder.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metered = {
        let _installed = metrics::set_default_local_recorder(&recorder);
        build()?
    };
    // `cargo bench` passes `--bench`; under `cargo test` this is a quick smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let runs: u64 = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1_000_000 } else { 1_000 });
    let (engine, direct, with_metrics) = runtime.block_on(async {
        // Warm up both paths.
        for i in 0..runs / 20 {
            let _ = flow.run(i, RunOptions::new()).await;
        }
        let mut best_engine = f64::MAX;
        let mut best_direct = f64::MAX;
        let mut best_metered = f64::MAX;
        for _ in 0..5 {
            let started = Instant::now();
            for i in 0..runs {
                let result = flow.run(i, RunOptions::new()).await;
                black_box(&result);
            }
            best_engine = best_engine.min(per_run(started.elapsed(), runs));

            let started = Instant::now();
            for i in 0..runs {
                let ctx = Context::new(i);
                let outcome = (
                    noop(ctx.clone()).await,
                    noop(ctx.clone()).await,
                    noop(ctx).await,
                );
                black_box(&outcome);
            }
            best_direct = best_direct.min(per_run(started.elapsed(), runs));

            let started = Instant::now();
            for i in 0..runs {
                let result = metered.run(i, RunOptions::new()).await;
                black_box(&result);
            }
            best_metered = best_metered.min(per_run(started.elapsed(), runs));
        }
        (best_engine, best_direct, best_metered)
    });
    println!("3-step no-op flow, current-thread runtime, best of 5 x {runs} runs");
    println!("  engine (flow.run, no key)   {engine:>8.1} ns/run");
    println!("  direct (3 awaited closures) {direct:>8.1} ns/run");
    println!(
        "  engine overhead             {:>8.1} ns/run",
        engine - direct
    );
    println!("  ratio engine / direct       {:>8.1}x", engine / direct);
    println!("  engine, metrics recorded    {with_metrics:>8.1} ns/run (Prometheus recorder)");
    println!(
        "  ratio metrics on / off      {:>8.2}x",
        with_metrics / engine
    );
    Ok(())
}
