//! What the layer gives an admitted request's handler, in the request's extensions.
//!
//! Every request that the layer lets through to its handler as the owner of its key
//! carries a [`RequestKey`] and a [`LeaseLost`]. Requests the layer passes through
//! untouched (another method, or no key where the key is optional) carry neither, so on
//! such routes extract them as `Option<Extension<_>>`.
//!
//! ```
//! use axum::{Extension, Json, http::StatusCode};
//! use orchestrix_http::{LeaseLost, RequestKey};
//! use serde_json::{Value, json};
//!
//! async fn create_payment(
//!     Extension(key): Extension<RequestKey>,
//!     Extension(lease): Extension<LeaseLost>,
//!     Json(order): Json<Value>,
//! ) -> (StatusCode, Json<Value>) {
//!     // The same key on every retry of this request: the payment provider charges once.
//!     let charge_key = key.for_step("charge");
//!     # let _ = (&charge_key, &order);
//!     // ... call the provider with `Idempotency-Key: {charge_key}` ...
//!     if lease.is_lost() {
//!         // Another request owns the key now: stop before the next side effect.
//!         return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "retry": true })));
//!     }
//!     (StatusCode::CREATED, Json(json!({ "charged": true })))
//! }
//! ```

use std::fmt;

use sha2::{Digest, Sha256};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Fires when the request loses its claim on its key.
///
/// The layer holds the key under a lease that it renews while the handler runs. If the
/// store stays unreachable until the lease lapses, or another request takes the key over,
/// the lease is lost: from then on another request with the same key may run the handler
/// too. A handler with side effects still to come should stop; one that completes anyway
/// still answers its client, but its response is not kept.
#[derive(Debug, Clone)]
pub struct LeaseLost(CancellationToken);

impl LeaseLost {
    pub(crate) fn new(token: CancellationToken) -> Self {
        Self(token)
    }

    /// Whether the lease has been lost.
    pub fn is_lost(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once the lease is lost (never, if the request keeps it to the end).
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.0.cancelled()
    }

    /// The token that is cancelled when the lease is lost, to hand to code that takes a
    /// [`CancellationToken`] (an Orchestrix flow's `RunOptions::cancellation`, say).
    pub fn token(&self) -> &CancellationToken {
        &self.0
    }
}

/// A key of the operation a request asks for, the same on every retry of the request by
/// its client, for the handler to send as the idempotency key of the APIs it calls.
///
/// It is derived from the key in the store (so from the client's key, its
/// [scope](crate::IdempotencyLayerBuilder::scope) and the layer's prefix), and formatted
/// as a UUID (version 8), which most APIs accept as an idempotency key. It reveals neither
/// the client's key nor its credentials.
///
/// A handler that calls an API more than once per request takes one key per call with
/// [`for_step`](Self::for_step).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestKey(String);

impl RequestKey {
    pub(crate) fn of_store_key(store_key: &str) -> Self {
        Self(uuid_of(
            Sha256::new()
                .chain_update(b"orchestrix-http/request-key/1\0")
                .chain_update(store_key.as_bytes()),
        ))
    }

    /// The key for one step of the operation, `name`: stable like this key, and distinct
    /// for each name.
    pub fn for_step(&self, name: &str) -> RequestKey {
        Self(uuid_of(
            Sha256::new()
                .chain_update(b"orchestrix-http/step-key/1\0")
                .chain_update(self.0.as_bytes())
                .chain_update(b"\0")
                .chain_update(name.as_bytes()),
        ))
    }

    /// The key, as 36 characters (`8-4-4-4-12` hex digits).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The first 128 bits of the digest as an RFC 9562 version 8 UUID.
fn uuid_of(hasher: Sha256) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_keys_are_stable_uuids_and_steps_differ() {
        let key = RequestKey::of_store_key("http:abc");
        assert_eq!(key, RequestKey::of_store_key("http:abc"));
        assert_ne!(key, RequestKey::of_store_key("http:abd"));
        let s = key.as_str();
        assert_eq!(s.len(), 36);
        assert_eq!(s.as_bytes()[14], b'8', "version 8: {s}");
        assert!(
            matches!(s.as_bytes()[19], b'8' | b'9' | b'a' | b'b'),
            "variant: {s}"
        );
        assert_eq!(key.for_step("charge"), key.for_step("charge"));
        assert_ne!(key.for_step("charge"), key.for_step("ship"));
        assert_ne!(key.for_step("charge"), key);
        assert_eq!(key.to_string(), s);
    }

    #[test]
    fn lease_lost_follows_its_token() {
        let token = CancellationToken::new();
        let lease = LeaseLost::new(token.clone());
        assert!(!lease.is_lost());
        token.cancel();
        assert!(lease.is_lost());
        assert!(lease.token().is_cancelled());
    }
}
