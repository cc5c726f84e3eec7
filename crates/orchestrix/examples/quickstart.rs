//! A small order flow: reserve stock, charge the card (retried with backoff), then send
//! the confirmation and update analytics in parallel. Run it with
//! `cargo run --example quickstart`.

use std::time::Duration;

use orchestrix::hooks::{ConsoleLogger, LogLevel};
use orchestrix::validation::Issue;
use orchestrix::{Context, Flow, Parallel, RetryPolicy, RunOptions, StateKey, Step, StepError};
use serde::{Deserialize, Serialize};

/// The state the steps share, named and typed once.
const RESERVATION: StateKey<String> = StateKey::new("reservation");
const CHARGE: StateKey<String> = StateKey::new("charge");
const CHARGE_ATTEMPTS: StateKey<u32> = StateKey::new("charge_attempts");

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: String,
    sku: String,
    quantity: u32,
    cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Confirmation {
    order: String,
    reservation: String,
    charge: String,
}

async fn reserve_stock(ctx: Context<Order>) -> Result<(), StepError> {
    let order = ctx.input();
    ctx.put(RESERVATION, format!("rsv_{}_{}", order.sku, order.quantity))?;
    Ok(())
}

async fn release_stock(ctx: Context<Order>) -> Result<(), StepError> {
    println!("  (compensation) releasing {:?}", ctx.get(RESERVATION)?);
    Ok(())
}

/// Fails its first attempt, like a payment gateway having a bad second.
async fn charge_card(ctx: Context<Order>) -> Result<(), StepError> {
    let attempts = ctx.get(CHARGE_ATTEMPTS)?.unwrap_or(0) + 1;
    ctx.put(CHARGE_ATTEMPTS, attempts)?;
    if attempts == 1 {
        return Err(StepError::msg("gateway timeout"));
    }
    ctx.put(
        CHARGE,
        format!("ch_{}_{}", ctx.input().id, ctx.input().cents),
    )?;
    Ok(())
}

async fn send_confirmation(_ctx: Context<Order>) -> Result<(), StepError> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    Ok(())
}

async fn update_analytics(_ctx: Context<Order>) -> Result<(), StepError> {
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let flow = Flow::<Order, Confirmation>::builder("checkout")
        .then(Step::new("reserve-stock", reserve_stock).compensate(release_stock))
        .then(
            Step::new("charge-card", charge_card)
                .retry(
                    RetryPolicy::retries(3)
                        .exponential(Duration::from_millis(20))
                        .with_jitter(),
                )
                .timeout(Duration::from_secs(2)),
        )
        .parallel(
            Parallel::new()
                .step("send-confirmation", send_confirmation)
                .step("update-analytics", update_analytics),
        )
        .validate(|order: &Order| {
            let mut issues = Vec::new();
            if order.quantity == 0 {
                issues.push(Issue::at("quantity", "must be at least 1"));
            }
            if order.cents == 0 {
                issues.push(Issue::at("cents", "must be positive"));
            }
            if issues.is_empty() {
                Ok(())
            } else {
                Err(issues)
            }
        })
        .output(|ctx| {
            Ok(Confirmation {
                order: ctx.input().id.clone(),
                reservation: ctx.get(RESERVATION)?.unwrap_or_default(),
                charge: ctx.get(CHARGE)?.unwrap_or_default(),
            })
        })
        .plugin(
            ConsoleLogger::stdout()
                .prefix("[checkout]")
                .level(LogLevel::Info),
        )
        .build()?;

    let order = Order {
        id: "ord_1001".into(),
        sku: "TEE-M".into(),
        quantity: 2,
        cents: 4_200,
    };
    let result = flow.run(order, RunOptions::new()).await?;
    println!("\nstatus: {:?} in {:?}", result.status, result.duration);
    for step in &result.steps {
        println!(
            "  {:<18} {:?} after {} attempt(s)",
            step.name, step.status, step.attempts
        );
    }
    println!("output: {:?}", result.output);

    let invalid = Order {
        id: "ord_1002".into(),
        sku: "TEE-M".into(),
        quantity: 0,
        cents: 0,
    };
    let rejected = flow.run(invalid, RunOptions::new()).await?;
    println!(
        "\ninvalid order: {:?}: {}",
        rejected.status,
        rejected.error.map(|e| e.to_string()).unwrap_or_default()
    );
    Ok(())
}
