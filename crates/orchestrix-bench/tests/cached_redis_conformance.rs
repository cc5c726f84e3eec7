//! The store conformance suite with `CachedStore` in front of the Redis store (at
//! `REDIS_URL`, default `redis://127.0.0.1:6379`, under a fresh key prefix per test).
//!
//! It lives here rather than in `orchestrix-redis` so that the Redis crate does not depend
//! on the core's `cache` feature; the other stores run the same suite from their own test
//! files.

use std::sync::Arc;

use orchestrix::store::CachedStore;
use orchestrix_redis::RedisStore;

async fn cached_redis() -> CachedStore {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!(
        "orchestrix-test:cached-conformance:{:016x}:",
        fastrand::u64(..)
    );
    let store = RedisStore::builder(url.as_str())
        .key_prefix(prefix)
        .connect()
        .await
        .expect("Redis must answer at REDIS_URL (scripts/test starts one)");
    CachedStore::new(Arc::new(store))
}

orchestrix_conformance::store_conformance_tests!(cached_redis());
