//! Results the Redis server refuses, and fenced writes retried after their reply was lost,
//! against private `redis-server`s started with the limits under test (the shared Redis is
//! never reconfigured).
//!
//! The rule under test: a finish whose result Redis refuses for size or memory still
//! finishes the record, without its result, so the operation never runs again.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use orchestrix::store::{FencingToken, IdempotencyStore, RecordStatus, StartOutcome, StoreError};
use orchestrix::{Flow, RunError, RunOptions, StepError};
use orchestrix_conformance::{request, unique_key};
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::{self, AsyncCommands};

/// Every wait in these tests is bounded: a regression fails, it never hangs.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

async fn acquire(store: &RedisStore, key: &str) -> FencingToken {
    match bounded("start", store.start(request(key, None))).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("a fresh key must be acquired: {other:?}"),
    }
}

/// After a refused finish: the record is finished with `status` and no result, and a new
/// `start` does not acquire the key.
async fn assert_finished_without_result(store: &RedisStore, key: &str, status: RecordStatus) {
    let record = bounded("get", store.get(key)).await;
    let record = record.expect("get").expect("the record must be kept");
    assert_eq!((record.status, record.result), (status, None));
    // Redis may still be out of memory for a moment after refusing the result (it trims
    // the refused command's buffers lazily) and refuse the `start` too: that acquires
    // nothing either, so ask again until it answers.
    let started = async {
        loop {
            match store.start(request(key, None)).await {
                Err(StoreError::Backend(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    };
    match bounded("start", started).await {
        Ok(StartOutcome::Existing(record)) => assert_eq!(record.status, status),
        other => panic!("the operation must never run again: {other:?}"),
    }
}

fn assert_refused(size: usize, finished: &Result<(), StoreError>) {
    assert!(
        matches!(finished, Err(StoreError::ResultRefused { size: s, .. }) if *s == size),
        "expected ResultRefused of {size} bytes, got {finished:?}"
    );
}

/// Redis answers an argument over `proto-max-bulk-len` with a protocol error and closes
/// the connection.
#[tokio::test]
async fn a_result_over_proto_max_bulk_len_finishes_the_record_without_it() {
    let redis = common::PrivateRedis::start(&["--proto-max-bulk-len", "1mb"]).await;
    let store = redis.store().await;
    let key = unique_key("bulk");
    let token = acquire(&store, &key).await;
    let result = vec![7u8; 2 << 20];
    let completed = bounded("complete", store.complete(&key, token, &result, None)).await;
    assert_refused(result.len(), &completed);
    assert_finished_without_result(&store, &key, RecordStatus::Completed).await;
}

/// A much longer argument makes Redis reset the connection while it is still being sent:
/// the client sees only a dropped connection.
#[tokio::test]
async fn a_result_that_makes_redis_drop_the_connection_finishes_the_record_without_it() {
    let redis = common::PrivateRedis::start(&["--proto-max-bulk-len", "1mb"]).await;
    let store = redis.store().await;
    let key = unique_key("reset");
    let token = acquire(&store, &key).await;
    let result = vec![7u8; 16 << 20];
    let completed = bounded("complete", store.complete(&key, token, &result, None)).await;
    assert_refused(result.len(), &completed);
    assert_finished_without_result(&store, &key, RecordStatus::Completed).await;
}

/// `maxmemory` with `noeviction` (the policy the README recommends): Redis answers `OOM`.
#[tokio::test]
async fn a_result_refused_for_memory_finishes_the_record_without_it() {
    let redis =
        common::PrivateRedis::start(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
            .await;
    let store = redis.store().await;
    let key = unique_key("oom");
    let token = acquire(&store, &key).await;
    let result = vec![7u8; 3 << 20];
    let completed = bounded("complete", store.complete(&key, token, &result, None)).await;
    assert_refused(result.len(), &completed);
    assert_finished_without_result(&store, &key, RecordStatus::Completed).await;
}

#[tokio::test]
async fn a_failure_refused_for_memory_finishes_the_record_failed_without_it() {
    let redis =
        common::PrivateRedis::start(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
            .await;
    let store = redis.store().await;
    let key = unique_key("oom-fail");
    let token = acquire(&store, &key).await;
    let failure = vec![7u8; 3 << 20];
    let failed = bounded("fail", store.fail(&key, token, &failure, None)).await;
    assert_refused(failure.len(), &failed);
    assert_finished_without_result(&store, &key, RecordStatus::Failed).await;
}

/// Through the engine: the caller gets its result with the refusal, and a second call
/// with the same key runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_result_never_runs_the_flow_again() {
    let redis = common::PrivateRedis::start(&["--proto-max-bulk-len", "1mb"]).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let flow = Flow::<u32, Vec<u8>>::builder("big-output")
        .store(Arc::new(redis.store().await))
        .step("effect", move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, StepError>(()) }
        })
        .output(|_| Ok(vec![9u8; 2 << 20]))
        .build()
        .expect("flow");
    let key = unique_key("big-output");
    let first = bounded("first run", flow.run(1, RunOptions::key(&key))).await;
    match first {
        Err(RunError::NotPersisted { result, source }) => {
            assert!(source.finished_without_result(), "{source:?}");
            assert_eq!(result.output.map(|o| o.len()), Some(2 << 20));
        }
        other => panic!("expected the result with the refusal, got {other:?}"),
    }
    let _ = bounded("second run", flow.run(1, RunOptions::key(&key))).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the step must run once");
}

/// `CLIENT PAUSE … WRITE` holds the finish in the server past the client's response
/// timeout; the server applies it afterwards. The caller's retry must see its own write,
/// not a lost lease.
#[tokio::test]
async fn a_finish_retried_after_its_reply_was_lost_is_ok() {
    let redis = common::PrivateRedis::start(&[]).await;
    let prefix = common::unique_prefix("lost-reply");
    let store = RedisStore::builder(redis.url())
        .key_prefix(&prefix)
        .response_timeout(Duration::from_millis(200))
        .connect()
        .await
        .expect("connect");
    // Load the script first: a paused server would hold `SCRIPT LOAD` as well.
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
            if value.is_some_and(|v| v.starts_with(b"1c")) {
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

/// The fallback without the result after a refusal that was in fact applied (its reply
/// lost): it finds the caller's result stored and answers `Ok`. Shown with a second store
/// whose limit sends this same finish without its result.
#[tokio::test]
async fn a_finish_without_result_that_finds_the_result_stored_is_ok() {
    let prefix = common::unique_prefix("stored-already");
    let store = common::store_with_prefix(&prefix).await;
    let small_limit = RedisStore::builder(common::redis_url())
        .key_prefix(&prefix)
        .max_result_size(4)
        .connect()
        .await
        .expect("connect");
    let key = unique_key("stored-already");
    let token = acquire(&store, &key).await;
    let result = b"receipt-42";
    let stored = bounded("complete", store.complete(&key, token, result, None)).await;
    stored.expect("complete");
    let again = bounded("complete", small_limit.complete(&key, token, result, None)).await;
    assert!(again.is_ok(), "{again:?}");
    let record = bounded("get", store.get(&key))
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.result.as_deref(), Some(&result[..]));
}

/// Retrying with the result after an earlier attempt finished the record without it
/// stores nothing: a finished record is never rewritten. The record stays finished without
/// a result, and the retry says so.
#[tokio::test]
async fn a_finish_that_finds_the_record_finished_without_result_reports_it_refused() {
    let prefix = common::unique_prefix("without-already");
    let store = common::store_with_prefix(&prefix).await;
    let small_limit = RedisStore::builder(common::redis_url())
        .key_prefix(&prefix)
        .max_result_size(4)
        .connect()
        .await
        .expect("connect");
    let key = unique_key("without-already");
    let token = acquire(&store, &key).await;
    let result = b"receipt-42";
    let first = bounded("complete", small_limit.complete(&key, token, result, None)).await;
    assert!(
        matches!(first, Err(StoreError::TooLarge { .. })),
        "{first:?}"
    );
    let again = bounded("complete", store.complete(&key, token, result, None)).await;
    assert!(
        matches!(again, Err(StoreError::ResultRefused { size: 10, .. })),
        "{again:?}"
    );
    let record = bounded("get", store.get(&key))
        .await
        .expect("get")
        .expect("record");
    assert_eq!(
        (record.status, record.result),
        (RecordStatus::Completed, None)
    );
}
