//! Metrics with a Prometheus exporter. Run it with `cargo run --example metrics`.
//!
//! Orchestrix records through the `metrics` facade only; the service picks the exporter.
//! Here `metrics-exporter-prometheus` is installed as the global recorder (before any flow
//! is built: flows register their metric handles when built), a few keyed runs go
//! through, and the text a Prometheus scrape would get is printed.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;
use orchestrix::store::MemoryStore;
use orchestrix::{Flow, RunOptions, StepError};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A real service would serve this on /metrics (the exporter's `http-listener` feature,
    // or its handle rendered by your own route).
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let flow = Flow::<u64, String>::builder("billing")
        .store(Arc::new(MemoryStore::new()))
        .step("charge", |ctx| async move {
            if *ctx.input() == 0 {
                return Err(StepError::msg("card declined"));
            }
            ctx.set("receipt", format!("rcpt-{}", ctx.input()))?;
            Ok(())
        })
        .output(|ctx| Ok(ctx.get::<String>("receipt")?.unwrap_or_default()))
        .build()?;

    flow.run(4200, RunOptions::key("order-1")).await?; // executed
    flow.run(4200, RunOptions::key("order-1")).await?; // replayed
    let _ = flow.run(9900, RunOptions::key("order-1")).await; // key reused
    flow.run(0, RunOptions::key("order-2")).await?; // executed, failed

    // Only the orchestrix lines, without the histogram buckets, to keep the output short.
    for line in prometheus.render().lines() {
        let interesting = line.contains("orchestrix_runs_total")
            || line.contains("_seconds_count")
            || line.contains("orchestrix_step_attempts_total");
        if interesting && !line.starts_with("# ") {
            println!("{line}");
        }
    }
    Ok(())
}
