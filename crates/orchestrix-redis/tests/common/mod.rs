//! Shared by the test binaries: the real Redis they talk to, and per-test isolation.
#![allow(dead_code)] // each test binary uses a different part

use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::aio::MultiplexedConnection;

/// `REDIS_URL`, or the machine's Redis on loopback.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("orchestrix-test:{test}:{:016x}:", fastrand::u64(..))
}

/// A connected store under `prefix`.
pub async fn store_with_prefix(prefix: &str) -> RedisStore {
    RedisStore::builder(redis_url())
        .key_prefix(prefix)
        .connect()
        .await
        .expect("Redis must answer at REDIS_URL (scripts/test starts one)")
}

/// A connected store under a fresh prefix.
pub async fn store(test: &str) -> RedisStore {
    store_with_prefix(&unique_prefix(test)).await
}

/// A plain connection, for writing what another program might and for looking at keys.
pub async fn raw() -> MultiplexedConnection {
    orchestrix_redis::redis::Client::open(redis_url())
        .expect("valid REDIS_URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must answer at REDIS_URL")
}
