//! The webhook receiver: a router that processes each payment event once per sender,
//! however often the sender delivers it. Shared by `main.rs` and the crate's tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use orchestrix::OnRunning;
use orchestrix::store::IdempotencyStore;
use orchestrix_http::{ConfigError, IdempotencyLayer, LeaseLost, RequestKey};
use serde::{Deserialize, Serialize};

/// The senders this receiver accepts, and the bearer token each signs in with.
pub const SENDERS: [(&str, &str); 2] = [("acme-pay", "acme-secret"), ("globex", "globex-secret")];

/// A payment event as the payment provider sends it.
#[derive(Debug, Deserialize)]
pub struct PaymentEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub amount: i64,
}

/// The sender of a delivery, once its token has been checked.
#[derive(Debug, Clone)]
pub struct Sender(pub &'static str);

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
/// `POST /webhooks/payments` needs a sender's token (`Authorization: Bearer …`, see
/// [`SENDERS`]) and is idempotent on the `Idempotency-Key` header (the sender uses the
/// event id). Keys are scoped by the verified sender rather than by its token (which it
/// may rotate): two senders may use the same event id without meeting. A redelivery
/// replays the first answer and is not processed again; one that arrives while the first
/// is still processing waits for it.
pub fn router(store: Arc<dyn IdempotencyStore>) -> Result<(Router, Arc<Ledger>), ConfigError> {
    let ledger = Arc::new(Ledger::default());
    let idempotent = IdempotencyLayer::builder(store)
        .methods([Method::POST])
        .key_prefix("webhooks:")
        .scope(|parts| Some(parts.extensions.get::<Sender>()?.0.to_owned()))
        .ttl(Duration::from_secs(7 * 24 * 3600))
        .on_running(OnRunning::Wait {
            timeout: Duration::from_secs(10),
        })
        .build()?;
    let router = Router::new()
        .route("/webhooks/payments", post(receive_payment))
        // Layers run bottom-up: the sender is verified before the idempotency layer reads it.
        .layer(idempotent)
        .layer(middleware::from_fn(verify_sender))
        .route("/stats", get(stats))
        .with_state(Arc::clone(&ledger));
    Ok((router, ledger))
}

/// Lets a delivery through only with a known sender's token, and records who sent it.
async fn verify_sender(mut request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let sender = token.and_then(|token| {
        SENDERS
            .iter()
            .find(|(_, secret)| same_secret(secret.as_bytes(), token.as_bytes()))
    });
    match sender {
        Some((name, _)) => {
            request.extensions_mut().insert(Sender(name));
            next.run(request).await
        }
        None => (StatusCode::UNAUTHORIZED, "unknown sender").into_response(),
    }
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

async fn receive_payment(
    State(ledger): State<Arc<Ledger>>,
    Extension(Sender(sender)): Extension<Sender>,
    Extension(key): Extension<RequestKey>,
    Extension(lease): Extension<LeaseLost>,
    Json(event): Json<PaymentEvent>,
) -> Response {
    // A real receiver would forward the event to its ledger service here, with
    // `key.for_step("ledger")` as that call's idempotency key. If the store was
    // unreachable long enough for this request to lose the event's key, another delivery
    // may be processing it now: stop before the side effect, and let the sender retry.
    if lease.is_lost() {
        return (StatusCode::SERVICE_UNAVAILABLE, "retry later").into_response();
    }
    let delta = match event.kind.as_str() {
        "payment.refunded" => -event.amount,
        _ => event.amount,
    };
    ledger.balance.fetch_add(delta, Ordering::SeqCst);
    let processed = ledger.processed.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(sender, event = %event.id, kind = %event.kind, amount = event.amount, request_key = %key, "processed payment event");
    Json(serde_json::json!({
        "sender": sender,
        "event": event.id,
        "status": "processed",
        "sequence": processed,
        "ledger_key": key.for_step("ledger").as_str(),
    }))
    .into_response()
}

async fn stats(State(ledger): State<Arc<Ledger>>) -> Json<Stats> {
    Json(ledger.stats())
}
