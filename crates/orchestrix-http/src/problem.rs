//! The answers the layer gives itself, as RFC 9457 `application/problem+json` documents.
//!
//! Each variant is one situation a client can act on; its `type` URI is stable, so clients
//! can branch on it rather than on the wording of `detail`.

use std::time::Duration;

use axum_core::body::Body;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

/// The RFC 9457 members, in the RFC's order.
#[derive(Serialize)]
struct Document {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
}

/// Why the layer answered instead of the handler.
#[derive(Debug)]
pub(crate) enum Problem {
    /// The key header is required on this method and absent.
    MissingKey { header: String },
    /// The key header is present but unusable.
    InvalidKey { header: String, reason: String },
    /// The request body is over the configured limit.
    PayloadTooLarge { limit: usize },
    /// The request body could not be read (the client went away mid-body).
    UnreadableBody,
    /// The key was used before with a different request.
    KeyReused,
    /// A request with this key is being processed right now.
    InFlight,
    /// Waited for the request holding the key, and it did not finish in time.
    WaitTimedOut { waited: Duration },
    /// The request was processed, but its response was not kept for replay (too large,
    /// too slow, broken, or refused by the store).
    ResponseNotKept { status: Option<StatusCode> },
    /// The store failed, so nothing was run (fail closed).
    StoreUnavailable,
    /// The stored response cannot be read back.
    StoredResponseUnreadable,
    /// The handler's task ended without an answer (runtime shutting down).
    Aborted,
    /// The layer's configuration was refused by the core (a bug, never the client's fault).
    Misconfigured,
}

impl Problem {
    fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey { .. } | Self::InvalidKey { .. } | Self::UnreadableBody => {
                StatusCode::BAD_REQUEST
            }
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight | Self::WaitTimedOut { .. } | Self::ResponseNotKept { .. } => {
                StatusCode::CONFLICT
            }
            Self::StoreUnavailable | Self::StoredResponseUnreadable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Aborted | Self::Misconfigured => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } => "idempotency-key-missing",
            Self::InvalidKey { .. } => "idempotency-key-invalid",
            Self::PayloadTooLarge { .. } => "payload-too-large",
            Self::UnreadableBody => "request-body-unreadable",
            Self::KeyReused => "idempotency-key-reused",
            Self::InFlight | Self::WaitTimedOut { .. } => "idempotency-key-in-flight",
            Self::ResponseNotKept { .. } => "idempotent-response-not-kept",
            Self::StoreUnavailable => "idempotency-store-unavailable",
            Self::StoredResponseUnreadable => "idempotent-response-unreadable",
            Self::Aborted => "handler-aborted",
            Self::Misconfigured => "idempotency-misconfigured",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } => "Idempotency key missing",
            Self::InvalidKey { .. } => "Invalid idempotency key",
            Self::PayloadTooLarge { .. } => "Request body too large",
            Self::UnreadableBody => "Request body unreadable",
            Self::KeyReused => "Idempotency key reused",
            Self::InFlight | Self::WaitTimedOut { .. } => "Request already in progress",
            Self::ResponseNotKept { .. } => "Response not available for replay",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::StoredResponseUnreadable => "Stored response unreadable",
            Self::Aborted => "Request aborted",
            Self::Misconfigured => "Idempotency misconfigured",
        }
    }

    fn detail(&self) -> String {
        match self {
            Self::MissingKey { header } => format!(
                "this endpoint requires an `{header}` header; send a unique value per logical operation and reuse it when retrying"
            ),
            Self::InvalidKey { header, reason } => {
                format!("the `{header}` header is invalid: {reason}")
            }
            Self::PayloadTooLarge { limit } => format!(
                "the request body is larger than the {limit}-byte limit for idempotent requests; nothing was processed"
            ),
            Self::UnreadableBody => {
                "the request body could not be read completely; nothing was processed".to_owned()
            }
            Self::KeyReused => "this idempotency key was already used with a different request (method, path, content type or body); use a new key for a new operation".to_owned(),
            Self::InFlight => "a request with this idempotency key is still being processed; retry later to receive its response".to_owned(),
            Self::WaitTimedOut { waited } => format!(
                "a request with this idempotency key is still being processed after waiting {} ms; retry later to receive its response",
                waited.as_millis()
            ),
            Self::ResponseNotKept { status: Some(status) } => format!(
                "a request with this idempotency key was already processed (status {}), but its response was not kept for replay (too large, too slow, or it failed while being sent); it will not be processed again",
                status.as_u16()
            ),
            Self::ResponseNotKept { status: None } => "a request with this idempotency key was already processed, but its response was not kept for replay (too large, too slow, or it failed while being sent); it will not be processed again".to_owned(),
            Self::StoreUnavailable => "the idempotency store could not be reached, so the request was not processed; retry later".to_owned(),
            Self::StoredResponseUnreadable => "the stored response for this idempotency key could not be decoded, so the request was not processed again".to_owned(),
            Self::Aborted => "the request's handler stopped before answering".to_owned(),
            Self::Misconfigured => "the idempotency layer's configuration was refused; nothing was processed".to_owned(),
        }
    }

    /// Whether the same request may succeed later unchanged.
    fn retry_after(&self) -> Option<&'static str> {
        match self {
            Self::InFlight | Self::WaitTimedOut { .. } | Self::StoreUnavailable => Some("1"),
            _ => None,
        }
    }

    /// The problem document as a response.
    pub(crate) fn into_response(self) -> Response<Body> {
        let status = self.status();
        let document = Document {
            kind: format!("urn:orchestrix:problem:{}", self.slug()),
            title: self.title(),
            status: status.as_u16(),
            detail: self.detail(),
        };
        // Serializing strings and a number cannot fail.
        let body = serde_json::to_vec(&document).unwrap_or_default();
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }
}
