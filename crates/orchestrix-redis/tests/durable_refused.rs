//! Durable results the Redis server refuses, and durable finishes retried after their reply
//! was lost, against private `redis-server`s started with the limits under test (the shared
//! Redis is never reconfigured). The rule is the plain records' one: a finish whose result
//! Redis refuses still finishes the record, without its result (and with its journal), so
//! the run never runs again.

mod common;

use std::future::Future;
use std::time::Duration;

use orchestrix::store::{
    DurableStartOutcome, FencingToken, IdempotencyStore, JournalStore, RecordStatus, StoreError,
};
use orchestrix_conformance::journal::durable;
use orchestrix_conformance::unique_key;
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::{self, AsyncCommands};

/// Every wait in these tests is bounded: a regression fails, it never hangs.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

/// A durable run under `key` with one journal entry.
async fn acquire(store: &RedisStore, key: &str) -> FencingToken {
    let token = match bounded("start", store.start_durable(durable(key, None, b"in"))).await {
        Ok(DurableStartOutcome::Acquired { token, .. }) => token,
        other => panic!("a fresh key must be acquired: {other:?}"),
    };
    bounded("append", store.append(key, token, b"step"))
        .await
        .expect("append");
    token
}

/// After a refused finish: the record is finished with `status`, no result, its journal
/// kept, and a new durable start does not acquire the key.
async fn assert_finished_without_result(store: &RedisStore, key: &str, status: RecordStatus) {
    let record = bounded("get", store.get(key)).await;
    let record = record.expect("get").expect("the record must be kept");
    assert_eq!((record.status, record.result), (status, None));
    let journal = bounded("read_journal", store.read_journal(key)).await;
    let entries = journal.expect("read_journal").map(|j| j.entries);
    assert_eq!(entries, Some(vec![b"step".to_vec()]));
    // Redis may still be out of memory for a moment after refusing the result: a refused
    // start acquires nothing either, so ask again until it answers.
    let started = async {
        loop {
            match store.start_durable(durable(key, None, b"in")).await {
                Err(StoreError::Backend(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    };
    match bounded("start", started).await {
        Ok(DurableStartOutcome::Existing(record)) => assert_eq!(record.status, status),
        other => panic!("the run must never run again: {other:?}"),
    }
}

fn assert_refused(size: usize, finished: &Result<(), StoreError>) {
    assert!(
        matches!(finished, Err(StoreError::ResultRefused { size: s, .. }) if *s == size),
        "expected ResultRefused of {size} bytes, got {finished:?}"
    );
}

#[tokio::test]
async fn a_durable_result_over_proto_max_bulk_len_finishes_the_record_without_it() {
    let redis = common::PrivateRedis::start(&["--proto-max-bulk-len", "1mb"]).await;
    let store = redis.store().await;
    let key = unique_key("bulk");
    let token = acquire(&store, &key).await;
    let result = vec![7u8; 2 << 20];
    let completed = bounded("complete", store.complete(&key, token, &result, None)).await;
    assert_refused(result.len(), &completed);
    assert_finished_without_result(&store, &key, RecordStatus::Completed).await;
}

#[tokio::test]
async fn a_durable_result_that_makes_redis_drop_the_connection_finishes_the_record_without_it() {
    let redis = common::PrivateRedis::start(&["--proto-max-bulk-len", "1mb"]).await;
    let store = redis.store().await;
    let key = unique_key("reset");
    let token = acquire(&store, &key).await;
    let result = vec![7u8; 16 << 20];
    let completed = bounded("complete", store.complete(&key, token, &result, None)).await;
    assert_refused(result.len(), &completed);
    assert_finished_without_result(&store, &key, RecordStatus::Completed).await;
}

#[tokio::test]
async fn a_durable_failure_refused_for_memory_finishes_the_record_failed_without_it() {
    let redis =
        common::PrivateRedis::start(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
            .await;
    let store = redis.store().await;
    let key = unique_key("oom");
    let token = acquire(&store, &key).await;
    let failure = vec![7u8; 3 << 20];
    let failed = bounded("fail", store.fail(&key, token, &failure, None)).await;
    assert_refused(failure.len(), &failed);
    assert_finished_without_result(&store, &key, RecordStatus::Failed).await;
}

/// `CLIENT PAUSE … WRITE` holds the finish in the server past the client's response
/// timeout; the server applies it afterwards. The retry must see its own write.
#[tokio::test]
async fn a_durable_finish_retried_after_its_reply_was_lost_is_ok() {
    let redis = common::PrivateRedis::start(&[]).await;
    let prefix = common::unique_prefix("durable-lost-reply");
    let store = RedisStore::builder(redis.url())
        .key_prefix(&prefix)
        .response_timeout(Duration::from_millis(200))
        .connect()
        .await
        .expect("connect");
    // Load the scripts first: a paused server would hold `SCRIPT LOAD` as well.
    let warm_up = unique_key("warm-up");
    let warm_token = acquire(&store, &warm_up).await;
    let warmed = bounded("complete", store.complete(&warm_up, warm_token, b"x", None)).await;
    warmed.expect("complete before the pause");
    let key = unique_key("lost-reply");
    let token = acquire(&store, &key).await;
    let mut raw = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection");
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "1000", "WRITE"])
        .query_async(&mut raw)
        .await
        .expect("CLIENT PAUSE");
    let first = bounded("complete", store.complete(&key, token, b"receipt", None)).await;
    assert!(matches!(first, Err(StoreError::Backend(_))), "{first:?}");
    let applied = async {
        loop {
            let value: Option<Vec<u8>> = raw.get(format!("{prefix}{key}")).await.expect("GET");
            if value.is_some_and(|v| v.starts_with(b"1C")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    bounded("the paused finish to be applied", applied).await;
    let retried = bounded(
        "retried complete",
        store.complete(&key, token, b"receipt", None),
    )
    .await;
    assert!(
        retried.is_ok(),
        "the retry must recognise its own write: {retried:?}"
    );
    let record = bounded("get", store.get(&key))
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.result.as_deref(), Some(&b"receipt"[..]));
}

/// A durable finish repeated after it was applied answers `Ok` and changes nothing; a
/// `fail` by the same token, or a `complete` with another result, is still stale.
#[tokio::test]
async fn a_repeated_durable_finish_is_ok_and_any_other_is_stale() {
    let store = common::store("durable-repeated-finish").await;
    let key = unique_key("repeated");
    let token = acquire(&store, &key).await;
    let result = b"receipt-42";
    store
        .complete(&key, token, result, None)
        .await
        .expect("complete");
    let again = store.complete(&key, token, result, None).await;
    assert!(again.is_ok(), "{again:?}");
    let other = store.complete(&key, token, b"other", None).await;
    assert!(matches!(other, Err(StoreError::StaleToken)), "{other:?}");
    let failed = store.fail(&key, token, result, None).await;
    assert!(matches!(failed, Err(StoreError::StaleToken)), "{failed:?}");
    let record = store.get(&key).await.expect("get").expect("record");
    assert_eq!(record.result.as_deref(), Some(&result[..]));
    let entries = store
        .read_journal(&key)
        .await
        .expect("journal")
        .map(|j| j.entries);
    assert_eq!(entries, Some(vec![b"step".to_vec()]));
}

/// Finishing with the result after an earlier attempt finished without it stores nothing
/// (a finished record is never rewritten) and says the result was refused; the fallback
/// without the result that finds the result stored answers `Ok`.
#[tokio::test]
async fn a_durable_finish_tells_an_earlier_write_with_or_without_its_result() {
    let prefix = common::unique_prefix("durable-with-without");
    let store = common::store_with_prefix(&prefix).await;
    let small_limit = RedisStore::builder(common::redis_url())
        .key_prefix(&prefix)
        .max_result_size(4)
        .connect()
        .await
        .expect("connect");
    let result = b"receipt-42";

    let key = unique_key("without-first");
    let token = acquire(&store, &key).await;
    let first = small_limit.complete(&key, token, result, None).await;
    assert!(
        matches!(first, Err(StoreError::TooLarge { .. })),
        "{first:?}"
    );
    let again = store.complete(&key, token, result, None).await;
    assert!(
        matches!(again, Err(StoreError::ResultRefused { size: 10, .. })),
        "{again:?}"
    );
    let record = store.get(&key).await.expect("get").expect("record");
    assert_eq!(
        (record.status, record.result),
        (RecordStatus::Completed, None)
    );

    let key = unique_key("with-first");
    let token = acquire(&store, &key).await;
    store
        .complete(&key, token, result, None)
        .await
        .expect("complete");
    let again = small_limit.complete(&key, token, result, None).await;
    assert!(again.is_ok(), "{again:?}");
    let record = store.get(&key).await.expect("get").expect("record");
    assert_eq!(record.result.as_deref(), Some(&result[..]));
}
