//! The layer's behaviour over real HTTP, as generic async functions over a store; each
//! store's test file runs all of them with `all_behaviours!(make_store)`.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use http_body_util::BodyExt;
use orchestrix::OnRunning;
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, Record, StartOutcome, StartRequest, StoreError,
    Wait,
};
use orchestrix_http::{IdempotencyLayer, IdempotencyLayerBuilder};

use crate::common::{
    BIG_RESPONSE, FIRST_CHUNK, Http, LAST_CHUNK, Reply, app, chunked, full, serve, unique_key,
};

/// Generates one `#[tokio::test]` per behaviour, each with a fresh store from `$make`
/// (an async fn returning `Arc<dyn IdempotencyStore>`).
#[macro_export]
macro_rules! all_behaviours {
    ($make:path) => {
        $crate::all_behaviours!(@tests $make;
            replays_the_first_response_byte_for_byte,
            concurrent_duplicates_run_once_and_the_rest_get_409,
            concurrent_duplicates_in_wait_mode_all_get_the_response,
            same_key_with_a_different_body_is_422,
            same_key_on_a_different_path_is_422,
            missing_key_is_400_when_required,
            missing_key_passes_through_when_optional,
            malformed_keys_are_400_and_nothing_runs,
            oversize_body_is_413_and_nothing_runs,
            oversize_chunked_body_is_413_and_nothing_runs,
            server_error_frees_the_key_for_a_retry,
            client_errors_free_the_key,
            listed_client_errors_are_replayed,
            other_methods_pass_through,
            oversize_response_reaches_the_client_once_and_is_never_rerun,
            undecodable_stored_response_is_503_and_nothing_runs,
            distinct_keys_run_independently,
            a_client_that_hangs_up_still_gets_the_response_on_retry,
            a_panicking_handler_frees_the_key,
            clients_with_the_same_key_never_see_each_other,
            a_custom_scope_names_the_client,
            an_unscoped_layer_shares_keys_between_clients,
            a_key_of_255_emoji_is_accepted,
            quoted_and_bare_keys_are_the_same_key,
            malformed_quoting_is_400,
            a_client_that_hangs_up_during_admission_leaves_no_lock,
            a_request_rejected_before_the_handler_frees_the_key,
            content_type_is_part_of_the_request,
            a_response_body_that_fails_is_never_run_again,
            a_response_streams_to_the_client_as_it_arrives,
            an_endless_response_is_cut_off_and_never_run_again,
            a_slow_response_still_reaches_its_client_after_the_deadline,
            a_handler_gets_a_request_key_stable_across_retries,
            a_handler_learns_that_its_lease_was_lost,
        );
    };
    (@tests $make:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::behaviour::$name($make().await).await;
            }
        )*
    };
}

/// The layer with its defaults, but records that expire soon, so a shared Redis is not
/// left holding test data.
fn layer(store: &Arc<dyn IdempotencyStore>) -> IdempotencyLayerBuilder {
    IdempotencyLayer::builder(Arc::clone(store)).ttl(Duration::from_secs(120))
}

async fn start(builder: IdempotencyLayerBuilder) -> (Http, Arc<crate::common::Probe>) {
    let (router, probe) = app(builder.build().expect("valid layer"));
    (Http::new(serve(router).await), probe)
}

pub async fn replays_the_first_response_byte_for_byte(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("replay");
    let first = http.post("/orders", Some(&key), r#"{"amount":42}"#).await;
    let again = http.post("/orders", Some(&key), r#"{"amount":42}"#).await;

    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    assert_eq!(probe.runs(), 1, "the handler ran once");
    assert_eq!(again.status, first.status);
    assert_eq!(again.body, first.body);
    for name in ["content-type", "location", "etag", "content-length"] {
        assert_eq!(again.header(name), first.header(name), "{name}");
        assert!(first.header(name).is_some(), "{name}");
    }
    assert!(again.replayed());
    assert_eq!(first.header("x-run"), Some("1"));
    assert_eq!(
        again.header("x-run"),
        None,
        "headers outside the allow-list are not kept"
    );
}

pub async fn concurrent_duplicates_run_once_and_the_rest_get_409(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("storm");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Reply>();
    for _ in 0..50 {
        let (http, key, tx) = (http.clone(), key.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(http.post("/slow", Some(&key), "{}").await);
        });
    }
    // The handler is held until every duplicate has been answered.
    for _ in 0..49 {
        let reply = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("duplicates are answered while the first is in flight")
            .expect("reply");
        let detail = reply.problem(StatusCode::CONFLICT);
        assert!(detail.contains("still being processed"), "{detail}");
        assert!(reply.header("retry-after").is_some());
    }
    probe.open_gate();
    let owner = rx.recv().await.expect("reply");
    assert_eq!(owner.status, StatusCode::CREATED);
    assert_eq!(probe.runs(), 1, "the handler ran exactly once");
}

pub async fn concurrent_duplicates_in_wait_mode_all_get_the_response(
    store: Arc<dyn IdempotencyStore>,
) {
    let builder = layer(&store).on_running(OnRunning::Wait {
        timeout: Duration::from_secs(20),
    });
    let (http, probe) = start(builder).await;
    let key = unique_key("wait");
    let requests: Vec<_> = (0..50)
        .map(|_| {
            let (http, key) = (http.clone(), key.clone());
            tokio::spawn(async move { http.post("/slow", Some(&key), "{}").await })
        })
        .collect();
    probe.wait_for_runs(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    probe.open_gate();
    let mut replies = Vec::new();
    for request in requests {
        replies.push(request.await.expect("request task"));
    }
    assert_eq!(probe.runs(), 1, "the handler ran exactly once");
    let first = replies
        .iter()
        .find(|r| !r.replayed())
        .expect("the owner's reply");
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 49);
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.body, first.body);
        assert_eq!(reply.header("location"), first.header("location"));
    }
}

pub async fn same_key_with_a_different_body_is_422(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("reuse");
    let first = http.post("/orders", Some(&key), r#"{"amount":1}"#).await;
    let other = http.post("/orders", Some(&key), r#"{"amount":2}"#).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let detail = other.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("different request"), "{detail}");
    assert_eq!(probe.runs(), 1);
}

pub async fn same_key_on_a_different_path_is_422(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("path");
    assert_eq!(
        http.post("/orders", Some(&key), "{}").await.status,
        StatusCode::CREATED
    );
    http.post("/orders?dry_run=true", Some(&key), "{}")
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(probe.runs(), 1);
}

pub async fn missing_key_is_400_when_required(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let detail = http
        .post("/orders", None, "{}")
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(
        detail.contains("requires an `idempotency-key` header"),
        "{detail}"
    );
    assert_eq!(probe.runs(), 0);
}

pub async fn missing_key_passes_through_when_optional(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store).require_key(false)).await;
    let first = http.post("/orders", None, "{}").await;
    let second = http.post("/orders", None, "{}").await;
    assert_eq!(
        (first.status, second.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(!second.replayed());
    assert_eq!(probe.runs(), 2, "without a key, every request runs");
}

pub async fn malformed_keys_are_400_and_nothing_runs(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let too_long = "k".repeat(256);
    let cases: [(&[u8], &str); 4] = [
        (b"", "empty"),
        (too_long.as_bytes(), "256 characters"),
        (b"abc\tdef", "control character"),
        (b"\xff\xfe", "UTF-8"),
    ];
    for (key, why) in cases {
        let reply = http
            .send(Method::POST, "/orders", Some(key), full("{}"))
            .await;
        let detail = reply.problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains(why), "{why}: {detail}");
    }
    let longest = "k".repeat(255) + &unique_key("");
    let longest = &longest[longest.len() - 255..];
    assert_eq!(
        http.post("/orders", Some(longest), "{}").await.status,
        StatusCode::CREATED,
        "255 characters is accepted"
    );
    assert_eq!(probe.runs(), 1);
}

pub async fn oversize_body_is_413_and_nothing_runs(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store).body_limit(1024)).await;
    let key = unique_key("big-body");
    let body = "a".repeat(1025);
    let detail = http
        .post("/orders", Some(&key), &body)
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(detail.contains("1024-byte limit"), "{detail}");
    assert_eq!(probe.runs(), 0);
    assert_eq!(
        http.post("/orders", Some(&key), &body[..1024]).await.status,
        StatusCode::CREATED,
        "the key was not consumed"
    );
}

pub async fn oversize_chunked_body_is_413_and_nothing_runs(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store).body_limit(4096)).await;
    let key = unique_key("chunked");
    http.send(
        Method::POST,
        "/orders",
        Some(key.as_bytes()),
        chunked(10_000, 1000),
    )
    .await
    .problem(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(probe.runs(), 0);
}

pub async fn server_error_frees_the_key_for_a_retry(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("flaky");
    let failed = http.post("/flaky", Some(&key), "{}").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    let retried = http.post("/flaky", Some(&key), "{}").await;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert!(!retried.replayed(), "the retry ran the handler");
    let replayed = http.post("/flaky", Some(&key), "{}").await;
    assert!(replayed.replayed());
    assert_eq!(replayed.body, retried.body);
    assert_eq!(probe.runs(), 2);
}

pub async fn client_errors_free_the_key(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("invalid");
    let first = http.post("/invalid", Some(&key), "{}").await;
    let again = http.post("/invalid", Some(&key), "{}").await;
    assert_eq!(first.status, StatusCode::BAD_REQUEST);
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert!(
        !again.replayed(),
        "a 400 is not kept: the retry ran the handler"
    );
    assert_eq!(probe.runs(), 2);
}

pub async fn listed_client_errors_are_replayed(store: Arc<dyn IdempotencyStore>) {
    let builder = layer(&store).final_client_errors([StatusCode::PAYMENT_REQUIRED]);
    let (http, probe) = start(builder).await;
    let key = unique_key("declined");
    let first = http.post("/declined", Some(&key), "{}").await;
    let again = http.post("/declined", Some(&key), "{}").await;
    assert_eq!(first.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!((again.status, &again.body), (first.status, &first.body));
    assert!(
        again.replayed(),
        "a declined card is the operation's final answer"
    );
    assert_eq!(probe.runs(), 1);
}

pub async fn other_methods_pass_through(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let reply = http.send(Method::GET, "/orders", None, full("")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let again = http.send(Method::GET, "/orders", None, full("")).await;
    assert!(!again.replayed());
    assert_eq!(probe.runs(), 2);
}

pub async fn oversize_response_reaches_the_client_once_and_is_never_rerun(
    store: Arc<dyn IdempotencyStore>,
) {
    let (http, probe) = start(layer(&store).body_limit(BIG_RESPONSE / 2)).await;
    let key = unique_key("big-response");
    let first = http.post("/big", Some(&key), "{}").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.body.len(),
        BIG_RESPONSE,
        "the whole response reached the client"
    );
    let detail = http
        .post("/big", Some(&key), "{}")
        .await
        .problem(StatusCode::CONFLICT);
    assert!(
        detail.contains("already processed (status 200)"),
        "{detail}"
    );
    assert_eq!(probe.runs(), 1);
}

pub async fn undecodable_stored_response_is_503_and_nothing_runs(store: Arc<dyn IdempotencyStore>) {
    let idempotency = layer(&store).build().expect("valid layer");
    let (router, probe) = app(idempotency.clone());
    let http = Http::new(serve(router).await);
    let key = unique_key("garbage");
    let scoped = store_key_of(&idempotency, &key);
    let StartOutcome::Acquired(token) = store
        .start(StartRequest {
            key: &scoped,
            fingerprint: None,
            lease: Duration::from_secs(10),
            rerun_failed: false,
        })
        .await
        .expect("store start")
    else {
        panic!("fresh key must be free");
    };
    store
        .complete(
            &scoped,
            token,
            b"\x00garbage\xff",
            Some(Duration::from_secs(60)),
        )
        .await
        .expect("store complete");
    let detail = http
        .post("/orders", Some(&key), "{}")
        .await
        .problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(detail.contains("could not be decoded"), "{detail}");
    assert_eq!(probe.runs(), 0);
}

pub async fn distinct_keys_run_independently(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let a = http.post("/orders", Some(&unique_key("a")), "{}").await;
    let b = http.post("/orders", Some(&unique_key("b")), "{}").await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_ne!(a.body, b.body);
    assert_eq!(probe.runs(), 2);
}

/// Any request, on a store that cannot be reached, is refused with 503 before the handler
/// runs. Called by each store's test file with a store that fails.
pub async fn unreachable_store_is_503_and_nothing_runs(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let reply = http.post("/orders", Some(&unique_key("down")), "{}").await;
    let detail = reply.problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(detail.contains("could not be reached"), "{detail}");
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(probe.runs(), 0);
}

pub async fn a_client_that_hangs_up_still_gets_the_response_on_retry(
    store: Arc<dyn IdempotencyStore>,
) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("hang-up");
    let hung_up = {
        let (http, key) = (http.clone(), key.clone());
        tokio::spawn(async move { http.post("/slow", Some(&key), "{}").await })
    };
    probe.wait_for_runs(1).await;
    hung_up.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    probe.open_gate();
    let retry = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let reply = http.post("/slow", Some(&key), "{}").await;
            if reply.status != StatusCode::CONFLICT {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the first request finished and was stored");
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "the handler finished after the hang-up");
    assert_eq!(probe.runs(), 1);
}

pub async fn a_panicking_handler_frees_the_key(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("panic");
    let crashed = http
        .try_request(http.post_request("/panics", &key, "{}"))
        .await;
    assert!(
        crashed.is_err(),
        "the panic reaches the server as it would without the layer"
    );
    let retry = http.post("/panics", Some(&key), "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(probe.runs(), 2);
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// Sends `path` with `key` (and `headers`) until the key is no longer in flight, and returns
/// that answer, or the error if the exchange broke.
async fn answer_once_settled(
    http: &Http,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let request = http.post_request_with(path, Some(key.as_bytes()), headers, "{}");
            match http.try_request(request).await {
                Ok(reply) if reply.status == StatusCode::CONFLICT && in_flight(&reply) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    })
    .await
    .expect("the first request settled its key")
}

fn in_flight(reply: &Reply) -> bool {
    reply.json()["type"]
        .as_str()
        .is_some_and(|t| t.ends_with("idempotency-key-in-flight"))
}

pub async fn clients_with_the_same_key_never_see_each_other(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("shared");
    let alice = &[("authorization", "Bearer alice-token"), JSON];
    let bob = &[("authorization", "Bearer bob-token"), JSON];
    let carol = &[("cookie", "session=carol"), JSON];
    let post = |who: &'static [(&'static str, &'static str)], body: &'static str| {
        let (http, key) = (http.clone(), key.clone());
        async move {
            http.post_with("/orders", Some(key.as_bytes()), who, body)
                .await
        }
    };

    let for_alice = post(alice, r#"{"amount":1}"#).await;
    let for_bob = post(bob, r#"{"amount":1}"#).await;
    let for_carol = post(carol, r#"{"amount":2}"#).await;
    for reply in [&for_alice, &for_bob, &for_carol] {
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        assert!(
            !reply.replayed(),
            "each client's first request runs its own handler"
        );
    }
    assert_ne!(
        for_bob.body, for_alice.body,
        "bob never sees alice's response"
    );
    assert_eq!(probe.runs(), 3);

    let alice_again = post(alice, r#"{"amount":1}"#).await;
    let bob_again = post(bob, r#"{"amount":1}"#).await;
    assert!(alice_again.replayed() && bob_again.replayed());
    assert_eq!(alice_again.body, for_alice.body);
    assert_eq!(bob_again.body, for_bob.body);
    assert_eq!(probe.runs(), 3);
}

/// What an authentication layer in front of the idempotency layer found out.
#[derive(Debug, Clone)]
struct Principal(String);

pub async fn a_custom_scope_names_the_client(store: Arc<dyn IdempotencyStore>) {
    let builder = layer(&store).scope(|parts| {
        let principal = parts.extensions.get::<Principal>()?;
        Some(principal.0.clone())
    });
    let (router, probe) = app(builder.build().expect("valid layer"));
    // The "authentication": the user named in `x-user`, whatever the credentials say.
    let router = router.layer(axum::middleware::from_fn(
        |mut request: axum::extract::Request, next: axum::middleware::Next| async move {
            let user = request
                .headers()
                .get("x-user")
                .and_then(|v| v.to_str().ok())
                .map(|user| Principal(user.to_owned()));
            if let Some(user) = user {
                request.extensions_mut().insert(user);
            }
            next.run(request).await
        },
    ));
    let http = Http::new(serve(router).await);
    let key = unique_key("principal");
    let key = Some(key.as_bytes());
    let alice = http
        .post_with(
            "/orders",
            key,
            &[("x-user", "alice"), ("authorization", "one")],
            "{}",
        )
        .await;
    let alice_elsewhere = http
        .post_with(
            "/orders",
            key,
            &[("x-user", "alice"), ("authorization", "two")],
            "{}",
        )
        .await;
    let bob = http
        .post_with(
            "/orders",
            key,
            &[("x-user", "bob"), ("authorization", "one")],
            "{}",
        )
        .await;
    assert_eq!(alice.status, StatusCode::CREATED);
    assert!(
        alice_elsewhere.replayed(),
        "the principal decides, not the credentials"
    );
    assert_eq!(alice_elsewhere.body, alice.body);
    assert_eq!(bob.status, StatusCode::CREATED);
    assert!(!bob.replayed());
    assert_eq!(probe.runs(), 2);
}

pub async fn an_unscoped_layer_shares_keys_between_clients(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store).unscoped()).await;
    let key = unique_key("unscoped");
    let key = Some(key.as_bytes());
    let first = http
        .post_with(
            "/orders",
            key,
            &[("authorization", "Bearer sender-a")],
            "{}",
        )
        .await;
    let other = http
        .post_with(
            "/orders",
            key,
            &[("authorization", "Bearer sender-b")],
            "{}",
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(other.replayed(), "one key space for every caller");
    assert_eq!(probe.runs(), 1);
}

pub async fn a_key_of_255_emoji_is_accepted(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    // Every test gets a fresh store (or key space), so this key is unused.
    let key = "😀".repeat(255);
    let first = http.post("/orders", Some(&key), "{}").await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(http.post("/orders", Some(&key), "{}").await.replayed());
    let detail = http
        .post("/orders", Some(&format!("{key}😀")), "{}")
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("256 characters"), "{detail}");
    assert_eq!(probe.runs(), 1);
}

/// The key under which `layer` keeps the record of a request with `key` and no credentials.
pub fn store_key_of(layer: &IdempotencyLayer, key: &str) -> String {
    let (parts, ()) = axum::http::Request::post("/")
        .header("idempotency-key", key)
        .body(())
        .expect("a valid request")
        .into_parts();
    layer.store_key(&parts).expect("a usable key")
}

pub async fn quoted_and_bare_keys_are_the_same_key(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("quoted");
    let first = http.post("/orders", Some(&key), "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let quoted = http
        .post("/orders", Some(&format!("\"{key}\"")), "{}")
        .await;
    assert!(quoted.replayed(), "{quoted:?}");
    assert_eq!(quoted.body, first.body);

    let escaped = format!(r#""{key}\"\\""#);
    let bare = format!(r#"{key}"\"#);
    let first = http.post("/orders", Some(&escaped), "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(http.post("/orders", Some(&bare), "{}").await.replayed());
    assert_eq!(probe.runs(), 2);
}

pub async fn malformed_quoting_is_400(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    for bad in [
        r#""abc"#,
        r#""ab"c""#,
        r#""a\bc""#,
        r#""abc"x"#,
        r#""abc\""#,
    ] {
        let detail = http
            .post("/orders", Some(bad), "{}")
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains("quot"), "{bad}: {detail}");
    }
    assert_eq!(probe.runs(), 0);
}

pub async fn a_request_rejected_before_the_handler_frees_the_key(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("json");
    let key = Some(key.as_bytes());
    let unsupported = http.post_with("/json", key, &[], r#"{"amount":5}"#).await;
    assert_eq!(unsupported.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let not_an_order = http
        .post_with("/json", key, &[JSON], r#"{"amount":"five"}"#)
        .await;
    assert_eq!(not_an_order.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_ne!(
        not_an_order.header("content-type"),
        Some("application/problem+json"),
        "axum's rejection, not the layer's 422: {not_an_order:?}"
    );
    let fixed = http
        .post_with("/json", key, &[JSON], r#"{"amount":5}"#)
        .await;
    assert_eq!(fixed.status, StatusCode::CREATED, "{fixed:?}");
    assert!(!fixed.replayed());
    assert_eq!(
        probe.runs(),
        1,
        "only the corrected request reached the handler"
    );
    let again = http
        .post_with("/json", key, &[JSON], r#"{"amount":5}"#)
        .await;
    assert!(again.replayed());
    assert_eq!(probe.runs(), 1);
}

pub async fn content_type_is_part_of_the_request(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("content-type");
    let key = Some(key.as_bytes());
    let text = http
        .post_with("/orders", key, &[("content-type", "text/plain")], "42")
        .await;
    assert_eq!(text.status, StatusCode::CREATED);
    let same = http
        .post_with(
            "/orders",
            key,
            &[("content-type", "Text/Plain; charset=utf-8")],
            "42",
        )
        .await;
    assert!(
        same.replayed(),
        "the media type decides, in any case, without parameters"
    );
    http.post_with("/orders", key, &[JSON], "42")
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(probe.runs(), 1);
}

/// A store that answers `start` slowly: the record is written at once, but the answer
/// reaches the caller only after [`DelayedStart::answer`] (as a network that loses the
/// reply would).
#[derive(Debug)]
struct DelayedStart {
    inner: Arc<dyn IdempotencyStore>,
    started: tokio::sync::Notify,
    answer: tokio::sync::watch::Sender<bool>,
}

#[async_trait::async_trait]
impl IdempotencyStore for DelayedStart {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        let outcome = self.inner.start(req).await;
        self.started.notify_one();
        let _ = self.answer.subscribe().wait_for(|go| *go).await;
        outcome
    }
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.inner.finish(key, token, status, result, ttl).await
    }
    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn wait_for_change(&self, key: &str, wait: Wait) -> Result<(), StoreError> {
        self.inner.wait_for_change(key, wait).await
    }
}

pub async fn a_client_that_hangs_up_during_admission_leaves_no_lock(
    store: Arc<dyn IdempotencyStore>,
) {
    let slow = Arc::new(DelayedStart {
        inner: store,
        started: tokio::sync::Notify::new(),
        answer: tokio::sync::watch::channel(false).0,
    });
    // A lease far longer than the test: only a release frees the key.
    let builder = IdempotencyLayer::builder(Arc::clone(&slow) as Arc<dyn IdempotencyStore>)
        .ttl(Duration::from_secs(120))
        .lease(Duration::from_secs(3600));
    let (router, probe) = app(builder.build().expect("valid layer"));
    let dropped = Arc::new(tokio::sync::Notify::new());
    let router = router.layer(axum::middleware::from_fn_with_state(
        Arc::clone(&dropped),
        notify_when_dropped,
    ));
    let http = Http::new(serve(router).await);
    let key = unique_key("admission");

    let hung_up = {
        let (http, key) = (http.clone(), key.clone());
        tokio::spawn(async move { http.post("/orders", Some(&key), "{}").await })
    };
    tokio::time::timeout(Duration::from_secs(10), slow.started.notified())
        .await
        .expect("the store received the start");
    hung_up.abort();
    tokio::time::timeout(Duration::from_secs(10), dropped.notified())
        .await
        .expect("the server dropped the request when the client hung up");
    slow.answer.send_replace(true);

    let retry = answer_once_settled(&http, "/orders", &key, &[JSON])
        .await
        .expect("the retry is answered");
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.replayed());
    assert_eq!(probe.runs(), 1, "only the retry ran the handler");
}

/// Notifies when a request's future is dropped before it answered.
async fn notify_when_dropped(
    axum::extract::State(dropped): axum::extract::State<Arc<tokio::sync::Notify>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    struct Guard(Option<Arc<tokio::sync::Notify>>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(dropped) = self.0.take() {
                dropped.notify_one();
            }
        }
    }
    let mut guard = Guard(Some(dropped));
    let response = next.run(request).await;
    guard.0 = None;
    response
}

pub async fn a_response_body_that_fails_is_never_run_again(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("broken");
    let first = http
        .try_request(http.post_request("/broken", &key, "{}"))
        .await;
    assert!(first.is_err(), "the client sees the body break: {first:?}");
    let retry = answer_once_settled(&http, "/broken", &key, &[])
        .await
        .expect("the retry is answered by the layer");
    let detail = retry.problem(StatusCode::CONFLICT);
    assert!(
        detail.contains("already processed (status 201)"),
        "{detail}"
    );
    assert_eq!(probe.runs(), 1, "the handler never runs twice");
}

pub async fn a_response_streams_to_the_client_as_it_arrives(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("trickle");
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        http.open(http.post_request("/trickle", &key, "{}")),
    )
    .await
    .expect("the head arrives while the body is still being written");
    assert_eq!(response.status(), StatusCode::CREATED);
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first chunk arrives while the body is still being written")
        .expect("a frame")
        .expect("data");
    assert_eq!(first.into_data().unwrap(), FIRST_CHUNK.as_bytes());
    probe.open_gate();
    let rest = body
        .collect()
        .await
        .expect("the rest of the body")
        .to_bytes();
    assert_eq!(rest, LAST_CHUNK.as_bytes());

    let replay = answer_once_settled(&http, "/trickle", &key, &[])
        .await
        .expect("replay");
    assert!(replay.replayed());
    assert_eq!(replay.body, format!("{FIRST_CHUNK}{LAST_CHUNK}").as_bytes());
    assert_eq!(probe.runs(), 1);
}

/// How long the tests that need it let a response body take.
const SHORT_RESPONSE_TIMEOUT: Duration = Duration::from_millis(200);

pub async fn an_endless_response_is_cut_off_and_never_run_again(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store).response_body_timeout(SHORT_RESPONSE_TIMEOUT)).await;
    let key = unique_key("endless");
    let hung_up = {
        let (http, key) = (http.clone(), key.clone());
        tokio::spawn(async move {
            let _ = http
                .try_request(http.post_request("/endless", &key, "{}"))
                .await;
        })
    };
    probe.wait_for_runs(1).await;
    hung_up.abort();
    // Whoever held the body (a collector, the connection) let go of it.
    probe.wait_for_no_live_bodies(Duration::from_secs(10)).await;
    let retry = answer_once_settled(&http, "/endless", &key, &[])
        .await
        .expect("the retry is answered by the layer");
    let detail = retry.problem(StatusCode::CONFLICT);
    assert!(
        detail.contains("already processed (status 201)"),
        "{detail}"
    );
    assert_eq!(probe.runs(), 1);
}

pub async fn a_slow_response_still_reaches_its_client_after_the_deadline(
    store: Arc<dyn IdempotencyStore>,
) {
    let (http, probe) = start(layer(&store).response_body_timeout(SHORT_RESPONSE_TIMEOUT)).await;
    let key = unique_key("slow-body");
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        http.open(http.post_request("/trickle", &key, "{}")),
    )
    .await
    .expect("the head arrives");
    let mut body = response.into_body();
    tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first chunk arrives")
        .expect("a frame")
        .expect("data");
    // Past the deadline, the key is settled while this client is still reading.
    let retry = answer_once_settled(&http, "/trickle", &key, &[])
        .await
        .expect("the retry is answered by the layer");
    let detail = retry.problem(StatusCode::CONFLICT);
    assert!(
        detail.contains("already processed (status 201)"),
        "{detail}"
    );
    probe.open_gate();
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the rest of the body arrives")
        .expect("the body completes")
        .to_bytes();
    assert_eq!(rest, LAST_CHUNK.as_bytes());
    assert_eq!(probe.runs(), 1);
}

pub async fn a_handler_gets_a_request_key_stable_across_retries(store: Arc<dyn IdempotencyStore>) {
    let (http, probe) = start(layer(&store)).await;
    let key = unique_key("request-key");
    let key = Some(key.as_bytes());
    let alice = &[("authorization", "Bearer alice")];
    let failed = http.post_with("/keyed", key, alice, "{}").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    let retried = http.post_with("/keyed", key, alice, "{}").await;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert!(!retried.replayed(), "the 503 freed the key: the retry ran");
    assert_eq!(retried.body, failed.body, "the same keys on the retry");

    let text = String::from_utf8(retried.body.to_vec()).unwrap();
    let (request_key, charge_key) = text.split_once(' ').unwrap();
    assert_eq!(request_key.len(), 36, "a UUID: {request_key}");
    assert_ne!(request_key, charge_key);
    assert!(
        !text.contains("request-key"),
        "the client's key is not shown: {text}"
    );

    let bob = http
        .post_with("/keyed", key, &[("authorization", "Bearer bob")], "{}")
        .await;
    assert_ne!(
        bob.body, failed.body,
        "another client's request has other keys"
    );
    assert_eq!(probe.runs(), 3);
}

pub async fn a_handler_learns_that_its_lease_was_lost(store: Arc<dyn IdempotencyStore>) {
    let idempotency = layer(&store)
        .lease(Duration::from_millis(60))
        .build()
        .expect("valid layer");
    let (router, probe) = app(idempotency.clone());
    let http = Http::new(serve(router).await);
    let key = unique_key("lease");
    let request = {
        let (http, key) = (http.clone(), key.clone());
        tokio::spawn(async move { http.post("/lease", Some(&key), "{}").await })
    };
    probe.wait_for_runs(1).await;
    // An operator (or an expiry) takes the record away: the next renewal finds it gone.
    store
        .delete(&store_key_of(&idempotency, &key))
        .await
        .expect("store delete");
    let reply = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .expect("the handler answered")
        .expect("request task");
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, "lease lost");
}
