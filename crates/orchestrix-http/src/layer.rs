//! The layer, its builder and its configuration.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, header};
use orchestrix::idempotency::{OptionError, validate_lease, validate_on_running, validate_ttl};
use orchestrix::store::IdempotencyStore;
use orchestrix::{KeyError, OnRunning};
use tower::Layer;

use crate::service::IdempotencyService;

/// The header that carries the key unless [`key_header`](IdempotencyLayerBuilder::key_header)
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

/// The default of [`cache_status`](IdempotencyLayerBuilder::cache_status): every final
/// status below 500 except 409 Conflict and 429 Too Many Requests.
///
/// A 2xx/3xx/4xx answer is the outcome of the operation and must be replayed; 5xx, 409
/// and 429 say "not now", so the key is freed and a retry runs the handler again.
pub fn default_cache_status(status: StatusCode) -> bool {
    !status.is_server_error()
        && status != StatusCode::CONFLICT
        && status != StatusCode::TOO_MANY_REQUESTS
}

/// Why a configuration was refused by [`IdempotencyLayerBuilder::build`].
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

/// Everything a request needs, shared by all clones of the service.
pub(crate) struct Config {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) methods: Vec<Method>,
    pub(crate) key_header: HeaderName,
    pub(crate) require_key: bool,
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
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("on_running", &self.on_running)
            .field("body_limit", &self.body_limit)
            .field("stored_headers", &self.stored_headers)
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

/// A [`tower::Layer`] that makes POST and PATCH handlers idempotent with the
/// `Idempotency-Key` header, on any [`IdempotencyStore`].
///
/// See the [crate documentation](crate) for the behaviour and an example.
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl IdempotencyLayer {
    /// The layer with every default: POST and PATCH, key required, responses kept 24 h,
    /// 409 for a concurrent duplicate, 1 MiB body limit.
    pub fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Self {
            config: Arc::new(IdempotencyLayerBuilder::new(store).into_config()),
        }
    }

    /// A builder to change the defaults.
    pub fn builder(store: Arc<dyn IdempotencyStore>) -> IdempotencyLayerBuilder {
        IdempotencyLayerBuilder::new(store)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::new(inner, Arc::clone(&self.config))
    }
}

/// Builds an [`IdempotencyLayer`]; every setting has a default.
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use http::{Method, StatusCode};
/// use orchestrix::{OnRunning, store::MemoryStore};
/// use orchestrix_http::IdempotencyLayer;
///
/// let layer = IdempotencyLayer::builder(Arc::new(MemoryStore::new()))
///     .methods([Method::POST])
///     .key_prefix("payments:")
///     .ttl(Duration::from_secs(3600))
///     .on_running(OnRunning::Wait { timeout: Duration::from_secs(10) })
///     .cache_status(|status| status.is_success())
///     .build()?;
/// # Ok::<(), orchestrix_http::ConfigError>(())
/// ```
pub struct IdempotencyLayerBuilder {
    config: Config,
}

impl fmt::Debug for IdempotencyLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyLayerBuilder")
            .field(&self.config)
            .finish()
    }
}

impl IdempotencyLayerBuilder {
    fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Self {
            config: Config {
                store,
                methods: vec![Method::POST, Method::PATCH],
                key_header: IDEMPOTENCY_KEY,
                require_key: true,
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
            },
        }
    }

    /// The methods the layer applies to (default: POST and PATCH). Requests with any other
    /// method pass through untouched.
    #[must_use]
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// The header that carries the key (default: `Idempotency-Key`). Webhook senders that
    /// follow Standard Webhooks put their delivery id in `webhook-id`, for example.
    #[must_use]
    pub fn key_header(mut self, header: HeaderName) -> Self {
        self.config.key_header = header;
        self
    }

    /// Whether a request without a key is refused with 400 (`true`, the default) or passed
    /// through to the handler untouched (`false`).
    #[must_use]
    pub fn require_key(mut self, required: bool) -> Self {
        self.config.require_key = required;
        self
    }

    /// Which response statuses are kept and replayed (default: [`default_cache_status`]).
    /// For any other status the key is freed after the response, so a retry runs the
    /// handler again.
    #[must_use]
    pub fn cache_status(
        mut self,
        cache: impl Fn(StatusCode) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.cache_status = Arc::new(cache);
        self
    }

    /// How long a response is kept for replay (default 24 h; 1 ms to 10 years).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// The lease of a request being processed (default 30 s; 10 ms to 24 h). It is renewed
    /// every third of its length while the handler runs; if the server dies, a retry can
    /// run after the lease lapses.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// What a duplicate gets while the first request is still being processed: 409
    /// Conflict (the default, and for [`OnRunning::ReturnRunning`] and
    /// [`OnRunning::Error`]) or, with [`OnRunning::Wait`], the first request's response
    /// once it is ready (409 if it is not ready within the timeout).
    #[must_use]
    pub fn on_running(mut self, on_running: OnRunning) -> Self {
        self.config.on_running = on_running;
        self
    }

    /// The largest request body read for fingerprinting (over it: 413, nothing runs), and
    /// the largest response body kept for replay (default 1 MiB). A larger response still
    /// reaches the client, and the key is marked processed without a replayable response.
    #[must_use]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// The response headers kept and replayed (default: `content-type`,
    /// `content-encoding`, `content-language`, `content-location`, `location`, `etag`,
    /// `last-modified`, `link`). Others — `set-cookie` for one — reach the first client
    /// only.
    #[must_use]
    pub fn stored_headers(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.stored_headers = headers.into_iter().collect();
        self
    }

    /// The prefix of every key in the store (default `http:`), so several APIs, or HTTP
    /// requests and flows, can share one store without colliding.
    #[must_use]
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = prefix.into();
        self
    }

    /// The layer.
    ///
    /// # Errors
    /// [`ConfigError`] for a zero or out-of-range duration, a key prefix that is over
    /// 256 bytes or contains control characters, or an empty method list.
    pub fn build(self) -> Result<IdempotencyLayer, ConfigError> {
        let c = &self.config;
        validate_ttl(c.ttl)?;
        validate_lease(c.lease)?;
        validate_on_running(c.on_running)?;
        if c.key_prefix.len() > MAX_KEY_PREFIX_BYTES {
            return Err(ConfigError::KeyPrefix(KeyError::TooLong {
                len: c.key_prefix.len(),
            }));
        }
        if let Some((at, _)) = c.key_prefix.char_indices().find(|(_, ch)| ch.is_control()) {
            return Err(ConfigError::KeyPrefix(KeyError::ControlCharacter { at }));
        }
        if c.methods.is_empty() {
            return Err(ConfigError::NoMethods);
        }
        Ok(IdempotencyLayer {
            config: Arc::new(self.into_config()),
        })
    }

    fn into_config(self) -> Config {
        self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrix::store::MemoryStore;

    fn builder() -> IdempotencyLayerBuilder {
        IdempotencyLayer::builder(Arc::new(MemoryStore::new()))
    }

    #[test]
    fn defaults_build() {
        assert!(builder().build().is_ok());
    }

    #[test]
    fn zero_durations_are_refused() {
        assert!(matches!(
            builder().ttl(Duration::ZERO).build(),
            Err(ConfigError::Duration(OptionError { option: "ttl", .. }))
        ));
        assert!(matches!(
            builder().lease(Duration::ZERO).build(),
            Err(ConfigError::Duration(OptionError {
                option: "lease",
                ..
            }))
        ));
        assert!(matches!(
            builder()
                .on_running(OnRunning::Wait {
                    timeout: Duration::ZERO
                })
                .build(),
            Err(ConfigError::Duration(OptionError {
                option: "wait timeout",
                ..
            }))
        ));
    }

    #[test]
    fn bad_prefixes_and_empty_methods_are_refused() {
        assert!(matches!(
            builder().key_prefix("a\nb").build(),
            Err(ConfigError::KeyPrefix(KeyError::ControlCharacter { at: 1 }))
        ));
        assert!(matches!(
            builder().key_prefix("p".repeat(300)).build(),
            Err(ConfigError::KeyPrefix(KeyError::TooLong { len: 300 }))
        ));
        assert_eq!(
            builder().methods([]).build().err(),
            Some(ConfigError::NoMethods)
        );
    }

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
