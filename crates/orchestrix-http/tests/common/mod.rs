//! A real HTTP server on 127.0.0.1 and a real HTTP client, for the behaviour tests.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use orchestrix_http::{IdempotencyLayer, LeaseLost, RequestKey};
use tokio::sync::watch;

/// Serves `router` on an ephemeral port of 127.0.0.1 until the test's runtime ends.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// What a handler of the test app observed.
#[derive(Debug)]
pub struct Probe {
    runs: AtomicUsize,
    gate: watch::Sender<bool>,
    live_bodies: Arc<AtomicUsize>,
}

/// Counts a response body of the test app while it exists.
#[derive(Debug)]
pub struct LiveBody(Arc<AtomicUsize>);

impl Drop for LiveBody {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Probe {
    /// How many times a handler ran.
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Lets every `/slow` handler finish.
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// Waits until handlers have run `n` times.
    pub async fn wait_for_runs(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.runs() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("handler did not run in time");
    }

    fn ran(&self) -> usize {
        self.runs.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many response bodies of `/endless` and `/trickle` exist right now (held by
    /// whoever is streaming or collecting them).
    pub fn live_bodies(&self) -> usize {
        self.live_bodies.load(Ordering::SeqCst)
    }

    /// Waits until no response body of the app is alive any more.
    pub async fn wait_for_no_live_bodies(&self, bound: Duration) {
        tokio::time::timeout(bound, async {
            while self.live_bodies() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("a response body outlived its request");
    }

    fn live_body(&self) -> LiveBody {
        self.live_bodies.fetch_add(1, Ordering::SeqCst);
        LiveBody(Arc::clone(&self.live_bodies))
    }
}

/// The first chunk of the streamed test responses.
pub const FIRST_CHUNK: &str = "first chunk;";
/// The last chunk of `/trickle`.
pub const LAST_CHUNK: &str = "last chunk";

/// A JSON order, as `/json` expects it.
#[derive(Debug, serde::Deserialize)]
pub struct Order {
    pub amount: i64,
}

/// The size of the `/big` response body.
pub const BIG_RESPONSE: usize = 64 * 1024;

/// A test app behind `layer`:
/// - `POST /orders`: 201 with a JSON body, `location`, `etag`, and an `x-run` header that
///   is not kept for replay;
/// - `POST /invalid`: 400;
/// - `POST /flaky`: 503 on its first run, 201 afterwards;
/// - `POST /slow`: 201 once the probe's gate opens;
/// - `POST /panics`: panics on its first run, 201 afterwards;
/// - `POST /big`: 200 with a [`BIG_RESPONSE`]-byte body;
/// - `POST /json`: 201 for a JSON [`Order`] (axum's `Json` extractor answers 415 without
///   a JSON content type and 422 for a body that is not an order, before the handler);
/// - `POST /declined`: 402, a deliberate final answer;
/// - `POST /broken`: 201 whose body fails after its [`FIRST_CHUNK`];
/// - `POST /trickle`: 201 whose body sends [`FIRST_CHUNK`], then [`LAST_CHUNK`] once the
///   probe's gate opens;
/// - `POST /endless`: 201 whose body sends [`FIRST_CHUNK`] and never ends;
/// - `POST /keyed`: the handler's [`RequestKey`] and its `for_step("charge")` as the
///   body, 503 on its first run and 201 afterwards;
/// - `POST /lease`: waits (up to 10 s) for its [`LeaseLost`] to fire, then answers 200
///   `lease lost`, or 500 if it never fired;
/// - `GET /orders`: 200, never idempotent.
pub fn app(layer: IdempotencyLayer) -> (Router, Arc<Probe>) {
    let probe = Arc::new(Probe {
        runs: AtomicUsize::new(0),
        gate: watch::channel(false).0,
        live_bodies: Arc::new(AtomicUsize::new(0)),
    });
    let p = Arc::clone(&probe);
    let orders = move |body: Bytes| {
        let run = p.ran();
        async move { created(run, &body) }
    };
    let p = Arc::clone(&probe);
    let invalid = move || {
        p.ran();
        async move { (StatusCode::BAD_REQUEST, "amount must be positive") }
    };
    let p = Arc::clone(&probe);
    let flaky = move |body: Bytes| {
        let run = p.ran();
        async move {
            if run == 1 {
                (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response()
            } else {
                created(run, &body)
            }
        }
    };
    let p = Arc::clone(&probe);
    let slow = move |body: Bytes| {
        let run = p.ran();
        let mut gate = p.gate.subscribe();
        async move {
            gate.wait_for(|open| *open).await.unwrap();
            created(run, &body)
        }
    };
    let p = Arc::clone(&probe);
    let panics = move |body: Bytes| {
        let run = p.ran();
        async move {
            assert!(run > 1, "the handler panics on its first run");
            created(run, &body)
        }
    };
    let p = Arc::clone(&probe);
    let big = move || {
        p.ran();
        async move { vec![b'x'; BIG_RESPONSE] }
    };
    let p = Arc::clone(&probe);
    let list = move || {
        p.ran();
        async move { "[]" }
    };
    let p = Arc::clone(&probe);
    let json = move |Json(order): Json<Order>| {
        let run = p.ran();
        async move { created(run, format!("{{\"amount\":{}}}", order.amount).as_bytes()) }
    };
    let p = Arc::clone(&probe);
    let declined = move || {
        p.ran();
        async move { (StatusCode::PAYMENT_REQUIRED, "card declined") }
    };
    let p = Arc::clone(&probe);
    let broken = move || {
        p.ran();
        async move {
            let frames = stream::iter([
                Ok(Bytes::from_static(FIRST_CHUNK.as_bytes())),
                Err(std::io::Error::other("the database went away mid-body")),
            ]);
            (StatusCode::CREATED, Body::from_stream(frames))
        }
    };
    let p = Arc::clone(&probe);
    let trickle = move || {
        p.ran();
        let live = p.live_body();
        let mut gate = p.gate.subscribe();
        async move {
            let last = async move {
                let _ = gate.wait_for(|open| *open).await;
                drop(live);
                Ok::<_, Infallible>(Bytes::from_static(LAST_CHUNK.as_bytes()))
            };
            let frames = stream::once(async { Ok(Bytes::from_static(FIRST_CHUNK.as_bytes())) })
                .chain(stream::once(last));
            (StatusCode::CREATED, Body::from_stream(frames))
        }
    };
    let p = Arc::clone(&probe);
    let endless = move || {
        p.ran();
        let live = p.live_body();
        async move {
            let frames = stream::once(async { Ok(Bytes::from_static(FIRST_CHUNK.as_bytes())) })
                .chain(stream::pending())
                .map(move |frame: Result<Bytes, Infallible>| {
                    let _alive = &live;
                    frame
                });
            (StatusCode::CREATED, Body::from_stream(frames))
        }
    };
    let p = Arc::clone(&probe);
    let keyed = move |Extension(key): Extension<RequestKey>| {
        let run = p.ran();
        async move {
            let status = if run == 1 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::CREATED
            };
            (status, format!("{key} {}", key.for_step("charge")))
        }
    };
    let p = Arc::clone(&probe);
    let lease = move |Extension(lease): Extension<LeaseLost>| {
        p.ran();
        async move {
            match tokio::time::timeout(Duration::from_secs(10), lease.lost()).await {
                Ok(()) => (StatusCode::OK, "lease lost"),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the lease was never lost",
                ),
            }
        }
    };
    let router = Router::new()
        .route("/orders", post(orders).get(list))
        .route("/keyed", post(keyed))
        .route("/lease", post(lease))
        .route("/json", post(json))
        .route("/declined", post(declined))
        .route("/broken", post(broken))
        .route("/trickle", post(trickle))
        .route("/endless", post(endless))
        .route("/invalid", post(invalid))
        .route("/flaky", post(flaky))
        .route("/slow", post(slow))
        .route("/big", post(big))
        .route("/panics", post(panics))
        .layer(layer);
    (router, probe)
}

fn created(run: usize, body: &[u8]) -> Response {
    let mut response = (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::LOCATION, format!("/orders/{run}")),
            (header::ETAG, format!("\"v{run}\"")),
        ],
        format!(
            "{{\"order\":{run},\"echo\":{:?}}}",
            String::from_utf8_lossy(body)
        ),
    )
        .into_response();
    response
        .headers_mut()
        .insert("x-run", HeaderValue::from(run));
    response
}

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn replayed(&self) -> bool {
        self.header("idempotency-replayed") == Some("true")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// Asserts a problem document of `status` and returns its `detail`.
    pub fn problem(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let doc = self.json();
        assert_eq!(doc["status"], status.as_u16());
        assert!(doc["type"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(doc["title"].as_str().is_some_and(|t| !t.is_empty()));
        let detail = doc["detail"].as_str().expect("detail").to_owned();
        assert!(!detail.is_empty());
        detail
    }
}

/// A real HTTP/1.1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, BoxBody<Bytes, Infallible>>,
    addr: SocketAddr,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addr,
        }
    }

    /// POSTs `body` with `key` (if any).
    pub async fn post(&self, path: &str, key: Option<&str>, body: &str) -> Reply {
        self.send(Method::POST, path, key.map(str::as_bytes), full(body))
            .await
    }

    /// Sends a request with the key header's raw bytes (if any).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&[u8]>,
        body: BoxBody<Bytes, Infallible>,
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", HeaderValue::from_bytes(key).unwrap());
        }
        self.request(request.body(body).unwrap()).await
    }

    /// POSTs `body` with the key header's raw bytes (if any) and `headers` (no content
    /// type unless `headers` has one).
    pub async fn post_with(
        &self,
        path: &str,
        key: Option<&[u8]>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        self.request(self.post_request_with(path, key, headers, body))
            .await
    }

    /// The request [`post_with`](Self::post_with) sends.
    pub fn post_request_with(
        &self,
        path: &str,
        key: Option<&[u8]>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Request<BoxBody<Bytes, Infallible>> {
        let mut request = Request::post(format!("http://{}{path}", self.addr));
        if let Some(key) = key {
            request = request.header("idempotency-key", HeaderValue::from_bytes(key).unwrap());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(full(body)).unwrap()
    }

    /// Sends `request` and returns the response as soon as its head arrives, with its body
    /// still streaming.
    pub async fn open(
        &self,
        request: Request<BoxBody<Bytes, Infallible>>,
    ) -> hyper::Response<hyper::body::Incoming> {
        self.client.request(request).await.expect("HTTP exchange")
    }

    pub async fn request(&self, request: Request<BoxBody<Bytes, Infallible>>) -> Reply {
        self.try_request(request).await.expect("HTTP exchange")
    }

    /// The exchange, or the error when the server closed the connection without answering.
    pub async fn try_request(
        &self,
        request: Request<BoxBody<Bytes, Infallible>>,
    ) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        let response = self.client.request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// A POST with `key`, ready for [`try_request`](Self::try_request).
    pub fn post_request(
        &self,
        path: &str,
        key: &str,
        body: &str,
    ) -> Request<BoxBody<Bytes, Infallible>> {
        Request::post(format!("http://{}{path}", self.addr))
            .header("idempotency-key", key)
            .body(full(body))
            .unwrap()
    }
}

/// A body with a known length (sent with `content-length`).
pub fn full(body: &str) -> BoxBody<Bytes, Infallible> {
    Full::new(Bytes::copy_from_slice(body.as_bytes())).boxed()
}

/// A body of unknown length (sent chunked), in chunks of `chunk` bytes.
pub fn chunked(total: usize, chunk: usize) -> BoxBody<Bytes, Infallible> {
    let frames = (0..total.div_ceil(chunk)).map(move |i| {
        let len = chunk.min(total - i * chunk);
        Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'a'; len])))
    });
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

/// A key no other test uses.
pub fn unique_key(name: &str) -> String {
    format!("{name}-{:016x}", fastrand_u64())
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}
