//! # orchestrix-http
//!
//! The `Idempotency-Key` header for [`tower`] and axum, on any Orchestrix
//! [`IdempotencyStore`](orchestrix::store::IdempotencyStore): a client that retries a
//! POST or PATCH (a payment, an order, a webhook delivery) gets the first response again,
//! and the handler runs once.
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{Router, routing::post, http::StatusCode};
//! use orchestrix::store::MemoryStore;
//! use orchestrix_http::IdempotencyLayer;
//!
//! # async fn run() -> std::io::Result<()> {
//! async fn create_payment(body: String) -> (StatusCode, String) {
//!     // Charge the card: runs once per Idempotency-Key.
//!     (StatusCode::CREATED, body)
//! }
//!
//! let store = Arc::new(MemoryStore::new());
//! let app = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new(store));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! ## What a request gets
//!
//! For a configured method (POST and PATCH by default), the layer reads the key from the
//! header and the body (up to a limit), fingerprints the request (SHA-256 of method, path
//! and query, and body), and asks the store, in one atomic operation, what to do:
//!
//! | situation | answer |
//! | --- | --- |
//! | first request with this key | the handler runs under a renewed lease; its response (status, allow-listed headers, body) is stored, then returned |
//! | same key, same request, finished | the stored response, byte for byte, with `Idempotency-Replayed: true`; the handler does not run |
//! | same key, still running | 409 Conflict, or with [`OnRunning::Wait`] the first response once it is ready |
//! | same key, different method, path or body | 422 Unprocessable Content |
//! | key missing (required), repeated, empty, over 255 characters, control characters | 400 Bad Request |
//! | body over the limit | 413 Content Too Large; nothing runs |
//! | store unreachable or its record unreadable | 503 Service Unavailable; nothing runs (fail closed) |
//!
//! Responses whose status is not cached (by default 5xx, 409 and 429) free the key after
//! they are sent, so the client may retry. Every answer of the layer itself is an
//! RFC 9457 `application/problem+json` document with `type`, `title`, `status` and
//! `detail`.
//!
//! ## Guarantees
//!
//! * **Once.** Of any number of concurrent requests with one key, on any number of
//!   servers sharing the store, one runs the handler. A handler's lease is renewed while
//!   it runs; a crashed server frees the key after one lease.
//! * **The response always reaches the client**, even if storing it fails (logged with
//!   `tracing`). Once admitted, a handler runs to its end in its own task even if the
//!   client hangs up, so the retry finds its response.
//! * **Fail closed.** Without an answer from the store, no handler runs.
//! * **Stored bytes are typed.** The stored response has a versioned binary encoding; a
//!   record that does not decode is a 503, never a panic or a replay of garbage.
//!
//! Put compression and similar response-rewriting layers *outside* this one, so the
//! stored body is the handler's own.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod extensions;
mod key;
mod layer;
mod problem;
mod request;
mod service;
mod stored;
mod tee;

pub use config::{
    ConfigError, DEFAULT_BODY_LIMIT, DEFAULT_KEY_PREFIX, DEFAULT_LEASE,
    DEFAULT_RESPONSE_BODY_TIMEOUT, DEFAULT_TTL, IDEMPOTENCY_KEY, IDEMPOTENCY_REPLAYED,
    MAX_KEY_CHARS,
};
pub use extensions::{LeaseLost, RequestKey};
pub use layer::{IdempotencyLayer, IdempotencyLayerBuilder};
pub use orchestrix::OnRunning;
pub use service::IdempotencyService;

/// The README's example compiles.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
