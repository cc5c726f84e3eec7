//! The path of one request through the layer, in order:
//! key (scoped to the client) → body → fingerprint, in the caller's task; then, in a task
//! of the request's own, admit (the store decides) → run and persist, or replay, or
//! refuse.

use std::any::Any;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum_core::body::Body;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use orchestrix::IdempotencyError;
use orchestrix::idempotency::{Admission, AdmitRequest, Ownership, Settlement, admit};
use orchestrix::store::{Record, StoreError};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::config::{Config, IDEMPOTENCY_REPLAYED};
use crate::extensions::{LeaseLost, RequestKey};
use crate::key::{client_key, store_key};
use crate::problem::Problem;
use crate::request::{fingerprint, read_body};
use crate::stored::Stored;
use crate::tee::{self, Kept};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The service produced by [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// It answers with `Response<axum::body::Body>` and passes the inner service's errors
/// through unchanged.
///
/// It must be polled inside a Tokio runtime (as every axum server is): from admission on,
/// an idempotent request runs in a task of its own.
///
/// # Cancel safety
/// Dropping the response future (the client hung up) never leaves the key locked with
/// nobody running it: an admission already sent to the store is completed in the task,
/// and if the handler has not started yet, the key is freed at once. A handler that has
/// started runs to its end, and its response is kept for the retry.
///
/// # Panics
/// Never on its own. A panic of the inner service is resumed in the caller's task, after
/// the key has been freed (the request did not complete, so a retry may run it).
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }
}

impl<S: Clone> Clone for IdempotencyService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready answers this request; a clone waits for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(Arc::clone(&self.config), inner, request))
    }
}

async fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    request: Request<ReqBody>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    if !config.methods.contains(request.method()) {
        return pass_through(inner, request).await;
    }
    let (parts, body) = request.into_parts();
    let key = match client_key(&parts.headers, &config.key_header) {
        Ok(Some(key)) => store_key(&config.key_prefix, &config.scope, &parts, &key),
        Ok(None) if !config.require_key => {
            return pass_through(inner, Request::from_parts(parts, body)).await;
        }
        Ok(None) => {
            return Ok(Problem::MissingKey {
                header: config.key_header.to_string(),
            }
            .into_response());
        }
        Err(problem) => return Ok(problem.into_response()),
    };
    let body = match read_body(&parts.headers, body, config.body_limit).await {
        Ok(body) => body,
        Err(problem) => return Ok(problem.into_response()),
    };
    let fingerprint = fingerprint(&parts, &body);
    // From here on the store is involved, so the rest runs in a task of its own: a client
    // that hangs up can neither leave the key locked with nobody running it (an admission
    // that went through is completed, then undone) nor cut a handler off halfway (it runs
    // to its end, and its response is kept for the retry).
    let (answer, answered) = oneshot::channel();
    let request = Request::from_parts(parts, Body::from(body));
    tokio::spawn(admit_and_run(
        config,
        inner,
        key,
        fingerprint,
        request,
        answer,
    ));
    match answered.await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Ok(Problem::Aborted.into_response()),
    }
}

/// What the task of an idempotent request sends back: the response or the inner
/// service's error, or the handler's panic to resume in the caller's task.
type Answer<E> = Result<Result<Response<Body>, E>, Box<dyn Any + Send>>;

/// Asks the store whether this request runs, then runs it, replays what is stored, or
/// refuses; sends the outcome to `answer`.
async fn admit_and_run<S, ResBody>(
    config: Arc<Config>,
    inner: S,
    key: String,
    fingerprint: String,
    request: Request<Body>,
    answer: oneshot::Sender<Answer<S::Error>>,
) where
    S: Service<Request<Body>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let admission = admit(
        &config.store,
        AdmitRequest {
            key: &key,
            fingerprint: Some(&fingerprint),
            lease: config.lease,
            cache_result: true,
            on_running: config.on_running,
        },
    )
    .await;
    let refusal = match admission {
        Ok(Admission::Acquired(ownership)) if answer.is_closed() => {
            tracing::debug!(
                key,
                "the client hung up before its handler started; freeing the key"
            );
            settle(ownership, Settlement::Release, None).await;
            return;
        }
        Ok(Admission::Acquired(ownership)) => {
            run(&config, inner, ownership, request, answer).await;
            return;
        }
        Ok(Admission::Finished(record)) => {
            let _ = answer.send(Ok(Ok(replay(record))));
            return;
        }
        Ok(Admission::Running) => {
            tracing::debug!(key, "idempotent request already in flight");
            Problem::InFlight
        }
        Ok(_) => Problem::Misconfigured,
        Err(error) => refused(&key, error),
    };
    let _ = answer.send(Ok(Ok(refusal.into_response())));
}

async fn pass_through<S, ReqBody, ResBody>(
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let response = inner.call(request.map(Body::new)).await?;
    Ok(response.map(Body::new))
}

/// Runs the handler as the key's owner (with a [`LeaseLost`] and a [`RequestKey`] in its
/// request's extensions), sends its response to `answer` as soon as its
/// head is ready, keeps a copy of its body, and stores the outcome or frees the key.
async fn run<S, ResBody>(
    config: &Config,
    mut inner: S,
    ownership: Ownership,
    mut request: Request<Body>,
    answer: oneshot::Sender<Answer<S::Error>>,
) where
    S: Service<Request<Body>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let lease_lost = CancellationToken::new();
    let extensions = request.extensions_mut();
    extensions.insert(LeaseLost::new(lease_lost.clone()));
    extensions.insert(RequestKey::of_store_key(ownership.key()));
    let called = AssertUnwindSafe(ownership.hold(&lease_lost, inner.call(request)))
        .catch_unwind()
        .await;
    let response = match called {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            settle(ownership, Settlement::Release, None).await;
            let _ = answer.send(Ok(Err(error)));
            return;
        }
        Err(panic) => {
            settle(ownership, Settlement::Release, None).await;
            let _ = answer.send(Err(panic));
            return;
        }
    };
    let (parts, body) = response.into_parts();
    let status = parts.status;
    if !config.keeps(status) {
        settle(ownership, Settlement::Release, None).await;
        let _ = answer.send(Ok(Ok(Response::from_parts(parts, Body::new(body)))));
        return;
    }
    let headers = kept_headers(&parts.headers, &config.stored_headers);
    let (body, collector) = tee::split(body, config.body_limit);
    let _ = answer.send(Ok(Ok(Response::from_parts(parts, body))));
    let (kept, tail) = keep_copy(&ownership, &lease_lost, collector, config).await;
    persist(config, ownership, status, headers, kept).await;
    if let Some(tail) = tail {
        tail.send();
    }
}

/// Collects the copy of the response body, still holding the key.
async fn keep_copy<B>(
    ownership: &Ownership,
    lease_lost: &CancellationToken,
    collector: tee::Collector<B>,
    config: &Config,
) -> (Kept, Option<tee::Tail<B>>)
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let collecting = ownership.hold(lease_lost, collector.collect(config.response_body_timeout));
    match AssertUnwindSafe(collecting).catch_unwind().await {
        Ok((kept, tail)) => (kept, Some(tail)),
        Err(_) => {
            // The handler ran, so the key is kept; the client's side reports an error.
            tracing::error!(
                key = ownership.key(),
                "the response body panicked while being read"
            );
            (Kept::Broken, None)
        }
    }
}

/// Stores the response, or, when it was not kept whole, that the request was processed:
/// either way the handler never runs again under this key.
async fn persist(
    config: &Config,
    ownership: Ownership,
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    kept: Kept,
) {
    let stored = match kept {
        Kept::Whole(body) => Stored::Response {
            status,
            headers,
            body,
        },
        not_kept => {
            tracing::warn!(
                key = ownership.key(),
                %status,
                why = not_kept.reason(),
                "the response reaches its client but is not kept for replay; the key is marked processed"
            );
            Stored::NotKept { status }
        }
    };
    let bytes = stored.encode();
    settle(ownership, Settlement::Complete, Some((&bytes, config.ttl))).await;
}

/// Applies the settlement; a failure is logged, never returned, because the response must
/// still reach the client.
async fn settle(
    ownership: Ownership,
    settlement: Settlement,
    result: Option<(&[u8], std::time::Duration)>,
) {
    let key = ownership.key().to_owned();
    let (bytes, ttl) = result.map_or((&[][..], None), |(b, ttl)| (b, Some(ttl)));
    match ownership.settle(settlement, bytes, ttl).await {
        Ok(()) => tracing::debug!(key, ?settlement, "idempotent request settled"),
        Err(StoreError::StaleToken) => tracing::warn!(
            key,
            ?settlement,
            "the lease on the idempotency key was lost while the handler ran; another request owns it now"
        ),
        Err(error) if error.finished_without_result() => tracing::warn!(
            key,
            %error,
            "the store refused the response; the key is marked processed without a replayable response"
        ),
        Err(error) => tracing::error!(
            key,
            ?settlement,
            %error,
            "could not persist the idempotent request's outcome; the response is still returned"
        ),
    }
}

fn kept_headers(headers: &HeaderMap, names: &[HeaderName]) -> Vec<(HeaderName, HeaderValue)> {
    names
        .iter()
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                .map(move |value| (name.clone(), value.clone()))
        })
        .collect()
}

/// The stored response, byte for byte, marked as a replay.
fn replay(record: Record) -> Response<Body> {
    let key = record.key;
    let Some(bytes) = record.result else {
        return Problem::ResponseNotKept { status: None }.into_response();
    };
    match Stored::decode(&bytes) {
        Ok(Stored::Response {
            status,
            headers,
            body,
        }) => {
            tracing::debug!(key, %status, "replaying the stored response");
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            let map = response.headers_mut();
            for (name, value) in headers {
                map.append(name, value);
            }
            map.insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
            response
        }
        Ok(Stored::NotKept { status }) => Problem::ResponseNotKept {
            status: Some(status),
        }
        .into_response(),
        Err(error) => {
            tracing::error!(key, %error, "the stored response could not be decoded; refusing the request");
            Problem::StoredResponseUnreadable.into_response()
        }
    }
}

/// The answer when the store refused to admit the request.
fn refused(key: &str, error: IdempotencyError) -> Problem {
    match error {
        IdempotencyError::KeyReused { .. } => Problem::KeyReused,
        IdempotencyError::AlreadyRunning { .. } => Problem::InFlight,
        IdempotencyError::WaitTimedOut { waited, .. } => Problem::WaitTimedOut { waited },
        IdempotencyError::ResultNotStored { .. } => Problem::ResponseNotKept { status: None },
        IdempotencyError::Store(
            error @ (StoreError::Decode(_) | StoreError::UnsupportedVersion { .. }),
        ) => {
            tracing::error!(key, %error, "the idempotency record could not be decoded; refusing the request");
            Problem::StoredResponseUnreadable
        }
        IdempotencyError::Store(error) => {
            tracing::error!(key, %error, "the idempotency store failed; refusing the request (fail closed)");
            Problem::StoreUnavailable
        }
        other => {
            tracing::error!(key, error = %other, "the idempotency layer could not admit the request");
            Problem::Misconfigured
        }
    }
}
