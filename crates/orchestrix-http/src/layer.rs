//! The layer and its builder: how an application configures the idempotent service.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, request};
use orchestrix::OnRunning;
use orchestrix::store::IdempotencyStore;
use tower::Layer;

use crate::config::{Config, ConfigError, Scope};
use crate::key::{client_key, store_key};
use crate::service::IdempotencyService;

/// A [`tower::Layer`] that makes POST and PATCH handlers idempotent with the
/// `Idempotency-Key` header, on any [`IdempotencyStore`].
///
/// See the [crate documentation](crate) for the behaviour and an example.
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl IdempotencyLayer {
    /// The layer with every default, which are the safe choices: POST and PATCH, key
    /// required, keys scoped per client by their credentials (`Authorization`, else
    /// `Cookie`), only 2xx and 3xx responses kept, for 24 h, 409 for a concurrent
    /// duplicate, 1 MiB body limit, 30 s for a response body to be kept.
    pub fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Self {
            config: Arc::new(IdempotencyLayerBuilder::new(store).into_config()),
        }
    }

    /// A builder to change the defaults.
    pub fn builder(store: Arc<dyn IdempotencyStore>) -> IdempotencyLayerBuilder {
        IdempotencyLayerBuilder::new(store)
    }

    /// The key under which this layer keeps the record of a request with these `parts`
    /// (its key header and its client's [scope](IdempotencyLayerBuilder::scope)), or
    /// `None` if they carry no usable key.
    ///
    /// For operators, who reach records with the store's own API: deleting this key with
    /// [`IdempotencyStore::delete`] lets the client run the operation again.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use orchestrix::store::{IdempotencyStore, MemoryStore};
    /// use orchestrix_http::IdempotencyLayer;
    ///
    /// # async fn support_case() -> Result<(), orchestrix::store::StoreError> {
    /// let store = Arc::new(MemoryStore::new());
    /// let layer = IdempotencyLayer::new(store.clone());
    /// let (parts, ()) = http::Request::post("/payments")
    ///     .header("authorization", "Bearer a-client-token")
    ///     .header("idempotency-key", "order-123")
    ///     .body(())
    ///     .expect("a valid request")
    ///     .into_parts();
    /// if let Some(key) = layer.store_key(&parts) {
    ///     store.delete(&key).await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn store_key(&self, parts: &request::Parts) -> Option<String> {
        let config = &self.config;
        let key = client_key(&parts.headers, &config.key_header).ok()??;
        Some(store_key(&config.key_prefix, &config.scope, parts, &key))
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
///     .final_client_errors([StatusCode::PAYMENT_REQUIRED])
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
            config: Config::new(store),
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

    /// Names the client of a request, so that clients never share keys: the function's
    /// answer is part of the key in the store. Typically it reads the principal that an
    /// authentication layer in front of this one put into the request's extensions.
    ///
    /// `None` means the request has no client: it shares one key space with every other
    /// request without one, as with [`unscoped`](Self::unscoped).
    ///
    /// The default, without a call to `scope` or `unscoped`, is the request's credentials:
    /// its `Authorization` header, else its `Cookie` header, else no client.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use orchestrix::store::MemoryStore;
    /// use orchestrix_http::IdempotencyLayer;
    ///
    /// /// What the authentication layer puts into a request's extensions.
    /// #[derive(Clone)]
    /// struct Principal {
    ///     account_id: u64,
    /// }
    ///
    /// let layer = IdempotencyLayer::builder(Arc::new(MemoryStore::new()))
    ///     .scope(|parts| {
    ///         let principal = parts.extensions.get::<Principal>()?;
    ///         Some(principal.account_id.to_string())
    ///     })
    ///     .build()?;
    /// # Ok::<(), orchestrix_http::ConfigError>(())
    /// ```
    #[must_use]
    pub fn scope(
        mut self,
        scope: impl Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.config.scope = Scope::Custom(Arc::new(scope));
        self
    }

    /// Keys are not scoped by client: any request with a key can replay that key's
    /// response. Only for endpoints whose callers are verified another way and share one
    /// key space on purpose, such as a webhook whose sender puts a unique event id in the
    /// key and signs every delivery.
    #[must_use]
    pub fn unscoped(mut self) -> Self {
        self.config.scope = Scope::Unscoped;
        self
    }

    /// The client errors (4xx) that the handler returns on purpose as the final answer to
    /// an operation, to be kept and replayed like a success: 402 for a declined card,
    /// say. Default: none.
    ///
    /// Every 2xx and 3xx response is kept. Any other response frees the key, so that a
    /// retry runs the handler again: a 400, 415 or 422 from an extractor that refused the
    /// request before the handler ran, a 409 or 429 that says "not now", every 5xx.
    #[must_use]
    pub fn final_client_errors(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.config.final_client_errors = statuses.into_iter().collect();
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

    /// How long the layer reads a response body to keep it, from the response's head to
    /// the body's end (default 30 s; 1 ms to 24 h). The response streams to its client as
    /// it arrives either way; a body still going at the deadline goes on streaming, but
    /// the key is marked processed without a replayable response, and the layer's task
    /// for the request ends.
    #[must_use]
    pub fn response_body_timeout(mut self, timeout: Duration) -> Self {
        self.config.response_body_timeout = timeout;
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
    /// 256 bytes or contains control characters, an empty method list, or a final client
    /// error that is not a 4xx status.
    pub fn build(self) -> Result<IdempotencyLayer, ConfigError> {
        self.config.validate()?;
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
    use orchestrix::KeyError;
    use orchestrix::idempotency::OptionError;
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
        assert_eq!(
            builder()
                .final_client_errors([StatusCode::PAYMENT_REQUIRED, StatusCode::BAD_GATEWAY])
                .build()
                .err(),
            Some(ConfigError::NotAClientError(StatusCode::BAD_GATEWAY))
        );
    }
}
