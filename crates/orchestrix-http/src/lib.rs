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
//! header (bare, or the draft's structured-field string `"..."`), scopes it to the client
//! who sent it, reads the body (up to a limit), fingerprints the request (SHA-256 of
//! method, path and query, media type, and body), and asks the store, in one atomic
//! operation, what to do:
//!
//! | situation | answer |
//! | --- | --- |
//! | first request with this key from this client | the handler runs under a renewed lease; its response streams to the client, and a kept status (2xx, 3xx, [listed](IdempotencyLayerBuilder::final_client_errors) 4xx) is stored with its allow-listed headers and body |
//! | same key and client, same request, finished | the stored response, byte for byte, with `Idempotency-Replayed: true`; the handler does not run |
//! | same key and client, still running | 409 Conflict, or with [`OnRunning::Wait`] the first response once it is ready |
//! | same key and client, different method, path, content type or body | 422 Unprocessable Content |
//! | same key, another client | that client's own request: nothing is shared |
//! | key missing (required), repeated, empty, over 255 characters, badly quoted, control characters | 400 Bad Request |
//! | body over the limit | 413 Content Too Large; nothing runs |
//! | store unreachable or its record unreadable | 503 Service Unavailable; nothing runs (fail closed) |
//!
//! Any other response (a 400, 415 or 422 from an extractor that refused the request, 409,
//! 429, 5xx) frees the key after it is sent, so the client may retry. A kept response
//! whose body is over the size limit, outlasts the
//! [response body timeout](IdempotencyLayerBuilder::response_body_timeout) or fails
//! still reaches its client, but the key is marked processed without it: a retry gets a
//! 409 saying so, and the handler never runs twice. Every answer of the layer itself is
//! an RFC 9457 `application/problem+json` document with `type`, `title`, `status` and
//! `detail`.
//!
//! Keys are scoped per client by default (the `Authorization` header, else the `Cookie`
//! header); [`scope`](IdempotencyLayerBuilder::scope) names the client from the request
//! instead, and [`unscoped`](IdempotencyLayerBuilder::unscoped) shares one key space.
//! The handler finds a [`RequestKey`] for the APIs it calls and a [`LeaseLost`] signal in
//! its request's extensions.
//!
//! ## Guarantees
//!
//! * **Once.** Of any number of concurrent requests with one key from one client, on any
//!   number of servers sharing the store, one runs the handler. A handler's lease is
//!   renewed while it runs; a crashed server frees the key after one lease.
//! * **Per client.** A client never sees, nor learns of, another client's key.
//! * **The response always reaches the client**, as it arrives, even if storing it fails
//!   (logged with `tracing`). Once admitted, a handler runs to its end in its own task
//!   even if the client hangs up, so the retry finds its response; a client that hangs up
//!   before that never leaves its key locked.
//! * **Bounded.** The layer's task for a request ends at most the response body timeout
//!   after the response's head.
//! * **Fail closed.** Without an answer from the store, no handler runs.
//! * **Stored bytes are typed.** The stored response has a versioned binary encoding; a
//!   record that does not decode is a 503, never a panic or a replay of garbage.
//!
//! Put authentication in front of this layer (so a scope can read the principal), and
//! compression and similar response-rewriting layers *outside* it, so the stored body is
//! the handler's own.
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
