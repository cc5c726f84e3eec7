//! What the layer is configured with: its constants, its [`Config`] and the checks
//! [`IdempotencyLayerBuilder::build`](crate::IdempotencyLayerBuilder::build) makes.
//!
//! This module sits below everything else in the crate: the builder fills a [`Config`],
//! the service reads it, and neither is known here.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, header, request};
use orchestrix::idempotency::{OptionError, validate_lease, validate_on_running, validate_ttl};
use orchestrix::store::IdempotencyStore;
use orchestrix::{KeyError, OnRunning};

/// The header that carries the key unless [`key_header`](crate::IdempotencyLayerBuilder::key_header)
/// names another.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The header set on every replayed response.
pub const IDEMPOTENCY_REPLAYED: HeaderName = HeaderName::from_static("idempotency-replayed");

/// Longest key accepted in the header, in characters.
pub const MAX_KEY_CHARS: usize = 255;

/// Default limit of a request body (and of a response body kept for replay): 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// Default of how long the layer reads a response body to keep it, from the response's
/// head to the body's end: 30 seconds.
pub const DEFAULT_RESPONSE_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time a response is kept for replay: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Default lease of a request being processed: the core's default (30 seconds), renewed
/// while it runs.
pub use orchestrix::idempotency::DEFAULT_LEASE;

/// Default prefix of every key in the store, so HTTP keys never collide with flow keys.
pub const DEFAULT_KEY_PREFIX: &str = "http:";

const MAX_KEY_PREFIX_BYTES: usize = 256;

/// Why a configuration was refused by
/// [`IdempotencyLayerBuilder::build`](crate::IdempotencyLayerBuilder::build).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TTL, lease, wait timeout or response body timeout is zero or out of range.
    #[error(transparent)]
    Duration(#[from] OptionError),
    /// The key prefix is too long or contains control characters.
    #[error("invalid key prefix: {0}")]
    KeyPrefix(KeyError),
    /// No method was configured, so the layer would never apply.
    #[error("no HTTP method configured")]
    NoMethods,
    /// A status listed as a final client error is not a 4xx status.
    #[error("{0} is not a client error (4xx); only 4xx statuses can be listed as final")]
    NotAClientError(StatusCode),
}

/// A function of the request that names its client (see
/// [`scope`](crate::IdempotencyLayerBuilder::scope)).
pub(crate) type ScopeFn = dyn Fn(&request::Parts) -> Option<String> + Send + Sync;

/// Whose keys a request's key is among: part of the key in the store.
#[derive(Clone)]
pub(crate) enum Scope {
    /// The request's `Authorization` header, else its `Cookie` header, else no client.
    Credentials,
    /// What the function names; `None` is no client.
    Custom(Arc<ScopeFn>),
    /// No client: every request shares one key space.
    Unscoped,
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Credentials => "Credentials",
            Self::Custom(_) => "Custom",
            Self::Unscoped => "Unscoped",
        })
    }
}

/// Everything a request needs, shared by all clones of the service.
pub(crate) struct Config {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) methods: Vec<Method>,
    pub(crate) key_header: HeaderName,
    pub(crate) require_key: bool,
    pub(crate) scope: Scope,
    pub(crate) final_client_errors: Vec<StatusCode>,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) on_running: OnRunning,
    pub(crate) body_limit: usize,
    pub(crate) response_body_timeout: Duration,
    pub(crate) stored_headers: Vec<HeaderName>,
    pub(crate) key_prefix: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("store", &self.store)
            .field("methods", &self.methods)
            .field("key_header", &self.key_header)
            .field("require_key", &self.require_key)
            .field("final_client_errors", &self.final_client_errors)
            .field("scope", &self.scope)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("on_running", &self.on_running)
            .field("body_limit", &self.body_limit)
            .field("response_body_timeout", &self.response_body_timeout)
            .field("stored_headers", &self.stored_headers)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// 1 ms to 24 h, like a lease: long enough for any body worth keeping, short enough
/// that a stuck one does not hold a task for long.
fn validate_response_body_timeout(timeout: Duration) -> Result<(), OptionError> {
    const MAX: Duration = Duration::from_secs(24 * 3600);
    if timeout.is_zero() || timeout > MAX {
        return Err(OptionError {
            option: "response body timeout",
            value: timeout,
            allowed: "1 ms to 24 h",
        });
    }
    Ok(())
}

impl Config {
    /// Every default, on `store`.
    pub(crate) fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Self {
            store,
            methods: vec![Method::POST, Method::PATCH],
            key_header: IDEMPOTENCY_KEY,
            require_key: true,
            scope: Scope::Credentials,
            final_client_errors: Vec::new(),
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            on_running: OnRunning::ReturnRunning,
            body_limit: DEFAULT_BODY_LIMIT,
            response_body_timeout: DEFAULT_RESPONSE_BODY_TIMEOUT,
            stored_headers: vec![
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
                header::CONTENT_LANGUAGE,
                header::CONTENT_LOCATION,
                header::LOCATION,
                header::ETAG,
                header::LAST_MODIFIED,
                header::LINK,
            ],
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
        }
    }

    /// Refuses what the core would refuse later, or what would make the layer useless.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        validate_ttl(self.ttl)?;
        validate_lease(self.lease)?;
        validate_on_running(self.on_running)?;
        validate_response_body_timeout(self.response_body_timeout)?;
        if self.key_prefix.len() > MAX_KEY_PREFIX_BYTES {
            return Err(ConfigError::KeyPrefix(KeyError::TooLong {
                len: self.key_prefix.len(),
            }));
        }
        if let Some((at, _)) = self
            .key_prefix
            .char_indices()
            .find(|(_, ch)| ch.is_control())
        {
            return Err(ConfigError::KeyPrefix(KeyError::ControlCharacter { at }));
        }
        if self.methods.is_empty() {
            return Err(ConfigError::NoMethods);
        }
        if let Some(status) = self
            .final_client_errors
            .iter()
            .find(|status| !status.is_client_error())
        {
            return Err(ConfigError::NotAClientError(*status));
        }
        Ok(())
    }

    /// Whether a response with `status` is the operation's final answer, kept for
    /// replay: 2xx, 3xx and the listed 4xx. Anything else (a request the handler or an
    /// extractor refused, 409, 429, 5xx) frees the key, so a retry runs again.
    pub(crate) fn keeps(&self, status: StatusCode) -> bool {
        status.is_success() || status.is_redirection() || self.final_client_errors.contains(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_2xx_3xx_and_listed_client_errors_are_kept() {
        let mut config = Config::new(Arc::new(orchestrix::store::MemoryStore::new()));
        config.final_client_errors = vec![StatusCode::PAYMENT_REQUIRED];
        for kept in [200, 201, 204, 303, 304, 402] {
            assert!(config.keeps(StatusCode::from_u16(kept).unwrap()), "{kept}");
        }
        for freed in [101, 400, 404, 409, 415, 422, 429, 500, 502, 503] {
            assert!(
                !config.keeps(StatusCode::from_u16(freed).unwrap()),
                "{freed}"
            );
        }
    }
}
