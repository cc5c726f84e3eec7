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

/// Default time a response is kept for replay: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Default lease of a request being processed: the core's default (30 seconds), renewed
/// while it runs.
pub use orchestrix::idempotency::DEFAULT_LEASE;

/// Default prefix of every key in the store, so HTTP keys never collide with flow keys.
pub const DEFAULT_KEY_PREFIX: &str = "http:";

const MAX_KEY_PREFIX_BYTES: usize = 256;

/// The default of [`cache_status`](crate::IdempotencyLayerBuilder::cache_status): every final
/// status below 500 except 409 Conflict and 429 Too Many Requests.
///
/// A 2xx/3xx/4xx answer is the outcome of the operation and must be replayed; 5xx, 409
/// and 429 say "not now", so the key is freed and a retry runs the handler again.
pub fn default_cache_status(status: StatusCode) -> bool {
    !status.is_server_error()
        && status != StatusCode::CONFLICT
        && status != StatusCode::TOO_MANY_REQUESTS
}

/// Why a configuration was refused by
/// [`IdempotencyLayerBuilder::build`](crate::IdempotencyLayerBuilder::build).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TTL, lease or wait timeout is zero or out of range.
    #[error(transparent)]
    Duration(#[from] OptionError),
    /// The key prefix is too long or contains control characters.
    #[error("invalid key prefix: {0}")]
    KeyPrefix(KeyError),
    /// No method was configured, so the layer would never apply.
    #[error("no HTTP method configured")]
    NoMethods,
}

pub(crate) type CacheStatus = dyn Fn(StatusCode) -> bool + Send + Sync;

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
    pub(crate) cache_status: Arc<CacheStatus>,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) on_running: OnRunning,
    pub(crate) body_limit: usize,
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
            .field("scope", &self.scope)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("on_running", &self.on_running)
            .field("body_limit", &self.body_limit)
            .field("stored_headers", &self.stored_headers)
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
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
            cache_status: Arc::new(default_cache_status),
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            on_running: OnRunning::ReturnRunning,
            body_limit: DEFAULT_BODY_LIMIT,
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cache_status_keeps_outcomes_and_frees_transient_answers() {
        for kept in [200, 201, 204, 303, 400, 404, 422] {
            assert!(
                default_cache_status(StatusCode::from_u16(kept).unwrap()),
                "{kept}"
            );
        }
        for freed in [409, 429, 500, 502, 503] {
            assert!(
                !default_cache_status(StatusCode::from_u16(freed).unwrap()),
                "{freed}"
            );
        }
    }
}
