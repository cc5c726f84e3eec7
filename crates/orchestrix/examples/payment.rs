//! Idempotent payments on the embedded in-memory store. Run it with
//! `cargo run --example payment`. It shows, in order:
//!
//! 1. a first run that executes (the card is charged);
//! 2. an immediate duplicate that replays the stored result (no second charge);
//! 3. a concurrent duplicate that sees `Running`, and one that waits for the result;
//! 4. the same key with a different payload, rejected;
//! 5. a declined card: the failure is cached and replayed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use orchestrix::idempotency::IdempotencyError;
use orchestrix::store::MemoryStore;
use orchestrix::{Context, Flow, FlowResult, OnRunning, RunError, RunOptions, StepError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payment {
    order: String,
    cents: u64,
    card: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Receipt {
    charge_id: String,
    cents: u64,
}

fn show(label: &str, outcome: &Result<FlowResult<Receipt>, RunError<Receipt>>) {
    match outcome {
        Ok(r) => println!(
            "{label:<34} status={:<9} replayed={:<5} output={:?}{}",
            format!("{:?}", r.status),
            r.replayed,
            r.output,
            r.error
                .as_ref()
                .map(|e| format!(" error={e}"))
                .unwrap_or_default()
        ),
        Err(e) => println!("{label:<34} error: {e}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let charges = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&charges);
    let flow = Flow::<Payment, Receipt>::builder("billing")
        .store(Arc::new(MemoryStore::new()))
        .step("charge-card", move |ctx: Context<Payment>| {
            let counter = Arc::clone(&counter);
            async move {
                // The side effect we must not repeat.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if ctx.input().card == "4000-0000-0000-0002" {
                    return Err(StepError::msg("card declined"));
                }
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                ctx.set("charge_id", format!("ch_{n:04}"))?;
                Ok(())
            }
        })
        .output(|ctx| {
            Ok(Receipt {
                charge_id: ctx.get("charge_id")?.unwrap_or_default(),
                cents: ctx.input().cents,
            })
        })
        .build()?;

    let pay = |order: &str, cents: u64, card: &str| Payment {
        order: order.into(),
        cents,
        card: card.into(),
    };
    let key =
        |order: &str| RunOptions::key(format!("payment:{order}")).ttl(Duration::from_secs(3600));
    let good_card = "4242-4242-4242-4242";

    println!("— order_123 —");
    show(
        "1. first run",
        &flow
            .run(pay("order_123", 4200, good_card), key("order_123"))
            .await,
    );
    show(
        "2. immediate duplicate",
        &flow
            .run(pay("order_123", 4200, good_card), key("order_123"))
            .await,
    );

    println!("— order_456, three concurrent submissions —");
    let owner = tokio::spawn({
        let flow = flow.clone();
        async move {
            flow.run(pay("order_456", 990, good_card), key("order_456"))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiter = tokio::spawn({
        let flow = flow.clone();
        let wait = OnRunning::Wait {
            timeout: Duration::from_secs(5),
        };
        async move {
            flow.run(
                pay("order_456", 990, good_card),
                key("order_456").on_running(wait),
            )
            .await
        }
    });
    show(
        "3a. concurrent duplicate",
        &flow
            .run(pay("order_456", 990, good_card), key("order_456"))
            .await,
    );
    show("3b. owner", &owner.await?);
    show("3c. duplicate that waited", &waiter.await?);

    println!("— order_123 again, different amount —");
    let reused = flow
        .run(pay("order_123", 9900, good_card), key("order_123"))
        .await;
    show("4. same key, different payload", &reused);
    assert!(matches!(
        reused,
        Err(RunError::Idempotency(IdempotencyError::KeyReused { .. }))
    ));

    println!("— order_789, declined card —");
    let declined = "4000-0000-0000-0002";
    show(
        "5a. first run",
        &flow
            .run(pay("order_789", 1500, declined), key("order_789"))
            .await,
    );
    show(
        "5b. duplicate (cached failure)",
        &flow
            .run(pay("order_789", 1500, declined), key("order_789"))
            .await,
    );

    println!(
        "\ncards charged: {} (two orders succeeded, each charged once)",
        charges.load(Ordering::SeqCst)
    );
    Ok(())
}
