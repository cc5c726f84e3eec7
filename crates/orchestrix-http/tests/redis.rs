//! The layer's behaviour on the Redis store, over real HTTP on 127.0.0.1, against the
//! Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`). Every test uses its own key
//! prefix.

mod behaviour;
mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use orchestrix::store::IdempotencyStore;
use orchestrix_http::IdempotencyLayer;
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::AsyncCommands;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn unique_prefix() -> String {
    common::unique_key("orchestrix-http-test") + ":"
}

async fn connect(prefix: &str) -> RedisStore {
    RedisStore::builder(redis_url())
        .key_prefix(prefix)
        .connect()
        .await
        .expect("Redis must answer at REDIS_URL")
}

async fn redis_store() -> Arc<dyn IdempotencyStore> {
    Arc::new(connect(&unique_prefix()).await)
}

all_behaviours!(redis_store);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_503_and_nothing_runs() {
    let store = RedisStore::builder("redis://127.0.0.1:1")
        .connect_lazy()
        .expect("valid settings");
    behaviour::unreachable_store_is_503_and_nothing_runs(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_under_the_key_in_redis_is_503_and_nothing_runs() {
    let prefix = unique_prefix();
    let store: Arc<dyn IdempotencyStore> = Arc::new(connect(&prefix).await);
    let key = common::unique_key("garbage");
    let mut raw = orchestrix_redis::redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let layer = IdempotencyLayer::new(store);
    let redis_key = format!("{prefix}{}", behaviour::store_key_of(&layer, &key));
    let () = raw.set_ex(&redis_key, "not a record", 60).await.unwrap();

    let (router, probe) = common::app(layer);
    let http = common::Http::new(common::serve(router).await);
    let detail = http
        .post("/orders", Some(&key), "{}")
        .await
        .problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(detail.contains("could not be decoded"), "{detail}");
    assert_eq!(probe.runs(), 0);
    let still: String = raw.get(&redis_key).await.unwrap();
    assert_eq!(
        still, "not a record",
        "the layer never overwrites what it cannot read"
    );
}
