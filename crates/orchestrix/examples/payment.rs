//! Idempotent payments on the embedded in-memory store. Run it with
//! `cargo run --example payment`. It shows, in order:
//!
//! 1. a first run that executes (the card is charged);
//! 2. an immediate duplicate that replays the stored result (no second charge);
//! 3. a concurrent duplicate that sees `Running`, and one that waits for the result;
//! 4. the same key with a different payload, rejected;
//! 5. a declined card: the failure is cached and replayed; the first caller matches on
//!    the step's own error type (`PaymentError::Declined`), the replay has its message;
//! 6. the record of a key, read and deleted by the caller's key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use orchestrix::idempotency::IdempotencyError;
use orchestrix::store::MemoryStore;
use orchestrix::{Flow, FlowError, FlowResult, OnRunning, RunError, RunOptions, StateKey};
use serde::{Deserialize, Serialize};

/// The charge's id, passed from the step to the output.
const CHARGE_ID: StateKey<String> = StateKey::new("charge_id");

/// What the card network answers, as the step's own error type.
#[derive(Debug, PartialEq, thiserror::Error)]
enum PaymentError {
    #[error("card declined")]
    Declined,
}

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
        .step("charge-card", move |ctx| {
            let counter = Arc::clone(&counter);
            async move {
                // The side effect we must not repeat.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if ctx.input().card == "4000-0000-0000-0002" {
                    Err(PaymentError::Declined)?;
                }
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                ctx.put(CHARGE_ID, format!("ch_{n:04}"))?;
                Ok(())
            }
        })
        .output(|ctx| {
            Ok(Receipt {
                charge_id: ctx.get(CHARGE_ID)?.unwrap_or_default(),
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
    let first = flow
        .run(pay("order_789", 1500, declined), key("order_789"))
        .await;
    show("5a. first run", &first);
    let declined_error = |outcome: &Result<FlowResult<Receipt>, _>| {
        let error = outcome.as_ref().ok().and_then(|r| r.error.as_ref());
        error.and_then(FlowError::step_error::<PaymentError>) == Some(&PaymentError::Declined)
    };
    println!(
        "    its error is PaymentError::Declined: {}",
        declined_error(&first)
    );
    let replay = flow
        .run(pay("order_789", 1500, declined), key("order_789"))
        .await;
    show("5b. duplicate (cached failure)", &replay);
    println!(
        "    its error is PaymentError::Declined: {} (a replay keeps the message, not the type)",
        declined_error(&replay)
    );

    println!("— the record of order_123, by its key —");
    if let Some(record) = flow.record("payment:order_123").await? {
        let charge = record
            .replay
            .and_then(Result::ok)
            .and_then(|r| r.output)
            .map(|receipt| receipt.charge_id);
        println!(
            "6a. {} is {}, charge {charge:?}",
            record.stored_key, record.status
        );
    }
    flow.forget("payment:order_789").await?;
    println!(
        "6b. order_789 forgotten: its next run charges again (record: {:?})",
        flow.record("payment:order_789").await?.map(|r| r.status)
    );

    println!(
        "\ncards charged: {} (two orders succeeded, each charged once)",
        charges.load(Ordering::SeqCst)
    );
    Ok(())
}
