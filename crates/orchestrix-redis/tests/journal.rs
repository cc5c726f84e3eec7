//! The shared journal conformance suite, against the real Redis at `REDIS_URL`.

mod common;

use orchestrix_redis::RedisStore;

orchestrix_conformance::journal_conformance_tests!(async { common::store("journal").await });

/// The journal limit the oversize check runs with.
const SMALL_LIMIT: usize = 4096;

#[tokio::test]
async fn oversize_append_is_refused_and_appends_nothing() {
    let store = RedisStore::builder(common::redis_url())
        .key_prefix(common::unique_prefix("journal-oversize"))
        .max_journal_bytes(SMALL_LIMIT)
        .connect()
        .await
        .expect("Redis must answer at REDIS_URL");
    orchestrix_conformance::journal::oversize_append_is_refused_and_appends_nothing(
        &store,
        SMALL_LIMIT,
    )
    .await;
}
