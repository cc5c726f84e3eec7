//! The webhook receiver: a router that processes each payment event once, however often
//! the sender delivers it. Shared by `main.rs` and the crate's tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use http::Method;
use orchestrix::OnRunning;
use orchestrix::store::IdempotencyStore;
use orchestrix_http::{ConfigError, IdempotencyLayer};
use serde::{Deserialize, Serialize};

/// A payment event as the payment provider sends it.
#[derive(Debug, Deserialize)]
pub struct PaymentEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub amount: i64,
}

/// What the receiver has done so far.
#[derive(Debug, Default)]
pub struct Ledger {
    processed: AtomicU64,
    balance: AtomicI64,
}

/// `GET /stats`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub processed: u64,
    pub balance: i64,
}

impl Ledger {
    pub fn stats(&self) -> Stats {
        Stats {
            processed: self.processed.load(Ordering::SeqCst),
            balance: self.balance.load(Ordering::SeqCst),
        }
    }
}

/// The receiver's router and its ledger.
///
/// `POST /webhooks/payments` is idempotent on the `Idempotency-Key` header (the sender
/// uses the event id): a redelivery replays the first answer and is not processed again;
/// a redelivery that arrives while the first is still processing waits for it.
pub fn router(store: Arc<dyn IdempotencyStore>) -> Result<(Router, Arc<Ledger>), ConfigError> {
    let ledger = Arc::new(Ledger::default());
    let idempotent = IdempotencyLayer::builder(store)
        .methods([Method::POST])
        .key_prefix("webhooks:")
        .ttl(Duration::from_secs(7 * 24 * 3600))
        .on_running(OnRunning::Wait {
            timeout: Duration::from_secs(10),
        })
        .build()?;
    let router = Router::new()
        .route("/webhooks/payments", post(receive_payment))
        .layer(idempotent)
        .route("/stats", get(stats))
        .with_state(Arc::clone(&ledger));
    Ok((router, ledger))
}

async fn receive_payment(
    State(ledger): State<Arc<Ledger>>,
    Json(event): Json<PaymentEvent>,
) -> Json<serde_json::Value> {
    let delta = match event.kind.as_str() {
        "payment.refunded" => -event.amount,
        _ => event.amount,
    };
    ledger.balance.fetch_add(delta, Ordering::SeqCst);
    let processed = ledger.processed.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(event = %event.id, kind = %event.kind, amount = event.amount, "processed payment event");
    Json(serde_json::json!({ "event": event.id, "status": "processed", "sequence": processed }))
}

async fn stats(State(ledger): State<Arc<Ledger>>) -> Json<Stats> {
    Json(ledger.stats())
}
