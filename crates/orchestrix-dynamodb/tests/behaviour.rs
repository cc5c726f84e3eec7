//! DynamoDB-specific behaviour, against the local DynamoDB-compatible server: table and
//! attribute layout, records written by someone else, the item size limit, the clock-skew
//! allowance, and an unreachable endpoint.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, TimeToLiveStatus};
use orchestrix::store::{
    FencingToken, IdempotencyStore, RecordStatus, StartOutcome, StartRequest, StoreError,
};
use orchestrix::{Flow, IdempotencyError, RunError, RunOptions, Status};
use orchestrix_conformance::{request, unique_key};
use orchestrix_dynamodb::{DynamoOptions, DynamoStore};

async fn acquire(store: &DynamoStore, req: StartRequest<'_>) -> FencingToken {
    match store.start(req).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

/// Writes a raw item under `key` in the shared table.
async fn put_raw(key: &str, attributes: &[(&str, AttributeValue)]) {
    let mut put = common::client()
        .put_item()
        .table_name(common::shared_table())
        .item("key", AttributeValue::S(key.to_owned()));
    for (name, value) in attributes {
        put = put.item(*name, value.clone());
    }
    put.send().await.expect("raw PutItem");
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A record as the store writes it, finished and kept forever.
fn valid_attributes() -> Vec<(&'static str, AttributeValue)> {
    vec![
        ("version", n(1)),
        ("status", s("completed")),
        ("token", s(&FencingToken::generate().to_string())),
    ]
}

async fn assert_decode_error_for_get_and_start(store: &DynamoStore, key: &str) {
    let got = store.get(key).await;
    assert!(matches!(got, Err(StoreError::Decode(_))), "get: {got:?}");
    let started = store.start(request(key, None)).await;
    assert!(
        matches!(started, Err(StoreError::Decode(_))),
        "start: {started:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_with_a_missing_attribute_is_a_decode_error() {
    let store = common::store().await;
    let key = unique_key("missing-attribute");
    let mut attributes = valid_attributes();
    attributes.retain(|(name, _)| *name != "token");
    put_raw(&key, &attributes).await;
    assert_decode_error_for_get_and_start(&store, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_with_a_malformed_attribute_is_a_decode_error() {
    let store = common::store().await;
    for (name, bad) in [
        ("token", s("not-a-token")),
        ("status", s("done")),
        ("status", n(3)),
        ("result", s("text, not bytes")),
    ] {
        let key = unique_key("malformed-attribute");
        let mut attributes = valid_attributes();
        attributes.retain(|(n, _)| *n != name);
        attributes.push((name, bad));
        put_raw(&key, &attributes).await;
        assert_decode_error_for_get_and_start(&store, &key).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_expiry_is_a_decode_error_and_never_free() {
    let store = common::store().await;
    let key = unique_key("malformed-expiry");
    let mut attributes = valid_attributes();
    attributes.push(("status", s("running")));
    attributes.push(("expires_at_ms", s("soon")));
    put_raw(&key, &attributes).await;
    assert_decode_error_for_get_and_start(&store, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_record_of_another_schema_version_is_refused_not_taken_over() {
    let store = common::store().await;
    let key = unique_key("other-version");
    put_raw(
        &key,
        &[
            ("version", n(2)),
            ("status", s("running")),
            ("expires_at_ms", n(1)),
        ],
    )
    .await;
    let started = store.start(request(&key, None)).await;
    assert!(
        matches!(started, Err(StoreError::UnsupportedVersion { found: 2 })),
        "{started:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_table_and_attribute_names_are_used() {
    let table = common::unique_table("custom");
    let client = common::client();
    let options = DynamoOptions::new(&table)
        .key_attribute("pk")
        .ttl_attribute("expires_at")
        .clock_skew(Duration::from_millis(100));
    let store = DynamoStore::new(client.clone(), options).expect("valid options");
    store.create_table_if_missing().await.expect("create table");
    store
        .create_table_if_missing()
        .await
        .expect("creating an existing table is a no-op");

    let key = unique_key("custom");
    let token = acquire(&store, request(&key, Some("fp"))).await;
    store
        .complete(&key, token, b"done", Some(Duration::from_secs(3600)))
        .await
        .expect("complete");

    let raw = client
        .get_item()
        .table_name(&table)
        .key("pk", s(&key))
        .consistent_read(true)
        .send()
        .await
        .expect("raw GetItem");
    let item: &HashMap<String, AttributeValue> = raw.item().expect("item under pk");
    assert_eq!(item.get("pk"), Some(&s(&key)));
    assert!(matches!(item.get("expires_at"), Some(AttributeValue::N(_))));
    assert!(!item.contains_key("key") && !item.contains_key("ttl"));

    let ttl = client
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .expect("DescribeTimeToLive");
    let ttl = ttl.time_to_live_description().expect("TTL description");
    assert_eq!(ttl.attribute_name(), Some("expires_at"));
    assert_eq!(ttl.time_to_live_status(), Some(&TimeToLiveStatus::Enabled));

    let record = store.get(&key).await.expect("get").expect("record");
    assert_eq!(record.status, RecordStatus::Completed);
    client
        .delete_table()
        .table_name(&table)
        .send()
        .await
        .expect("drop the custom table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_attribute_holds_epoch_seconds_no_earlier_than_expiry_plus_skew() {
    let store = common::store().await;
    let key = unique_key("ttl-seconds");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    let token = acquire(&store, request(&key, None)).await;
    store
        .complete(&key, token, b"x", Some(Duration::from_secs(60)))
        .await
        .expect("complete");
    let raw = common::client()
        .get_item()
        .table_name(common::shared_table())
        .key("key", s(&key))
        .send()
        .await
        .expect("raw GetItem");
    let item = raw.item().expect("item");
    let ttl: u64 = match item.get("ttl") {
        Some(AttributeValue::N(v)) => v.parse().expect("numeric ttl"),
        other => panic!("ttl attribute: {other:?}"),
    };
    let expiry_ms: u64 = match item.get("expires_at_ms") {
        Some(AttributeValue::N(v)) => v.parse().expect("numeric expiry"),
        other => panic!("expires_at_ms attribute: {other:?}"),
    };
    assert!(expiry_ms >= before.as_millis() as u64 + 60_000);
    assert!(
        ttl * 1000 >= expiry_ms + 100,
        "ttl {ttl}, expiry {expiry_ms}"
    );
    assert!(ttl <= before.as_secs() + 62);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_over_the_item_limit_leaves_the_record_finished_without_it() {
    let store = common::store().await;
    let key = unique_key("too-large");
    let token = acquire(&store, request(&key, Some("fp"))).await;
    let result = vec![7u8; 500 * 1024];
    let completed = store.complete(&key, token, &result, None).await;
    assert!(
        matches!(completed, Err(StoreError::TooLarge { size, limit }) if size == result.len() && limit < size),
        "{completed:?}"
    );
    let record = store.get(&key).await.expect("get").expect("record kept");
    assert_eq!(record.status, RecordStatus::Completed);
    assert_eq!(record.result, None);
    let again = store.start(request(&key, Some("fp"))).await;
    assert!(
        matches!(&again, Ok(StartOutcome::Existing(r)) if r.status == RecordStatus::Completed),
        "the operation must never run again: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_refused_by_the_server_still_finishes_the_record() {
    // The fingerprint is not known to `fail`, so only DynamoDB sees that this item is too
    // large: the store learns it from the refused write and stores the status alone.
    let store = common::store().await;
    let key = unique_key("refused");
    let fingerprint = "f".repeat(120 * 1024);
    let token = acquire(&store, request(&key, Some(&fingerprint))).await;
    let result = vec![1u8; 300 * 1024];
    let failed = store.fail(&key, token, &result, None).await;
    assert!(
        matches!(failed, Err(StoreError::TooLarge { size, .. }) if size == result.len()),
        "{failed:?}"
    );
    let record = store.get(&key).await.expect("get").expect("record kept");
    assert_eq!(record.status, RecordStatus::Failed);
    assert_eq!(record.result, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_is_not_taken_over_within_the_clock_skew_allowance() {
    let client = common::client();
    let store = common::store().await;
    let cautious = DynamoStore::new(
        client,
        DynamoOptions::new(common::shared_table()).clock_skew(Duration::from_secs(2)),
    )
    .expect("valid options");
    let key = unique_key("skew");
    let short = StartRequest {
        lease: Duration::from_millis(300),
        ..request(&key, None)
    };
    let owner = acquire(&cautious, short).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    match cautious.start(request(&key, None)).await {
        Ok(StartOutcome::Existing(record)) => assert_eq!(record.token, owner),
        other => panic!("lease end + skew has not passed yet: {other:?}"),
    }
    assert!(
        cautious
            .renew(&key, owner, Duration::from_secs(30))
            .await
            .is_ok()
    );
    // The renewal moved the lease end: even a store allowing less skew sees it held.
    assert!(matches!(
        store.start(request(&key, None)).await,
        Ok(StartOutcome::Existing(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_backend_error_in_bounded_time() {
    let store = DynamoStore::new(
        common::client_for("http://127.0.0.1:1"),
        DynamoOptions::new("unreachable"),
    )
    .expect("valid options");
    let began = Instant::now();
    let got = store.get("k").await;
    assert!(matches!(got, Err(StoreError::Backend(_))), "{got:?}");
    let started = store.start(request("k", None)).await;
    assert!(
        matches!(started, Err(StoreError::Backend(_))),
        "no step may run without an acquired record: {started:?}"
    );
    let completed = store
        .complete("k", FencingToken::generate(), b"x", None)
        .await;
    assert!(
        matches!(completed, Err(StoreError::Backend(_))),
        "{completed:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "took {:?}",
        began.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_the_run_before_any_step() {
    let store = DynamoStore::new(
        common::client_for("http://127.0.0.1:1"),
        DynamoOptions::new("unreachable"),
    )
    .expect("valid options");
    let steps = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&steps);
    let flow = Flow::<u32>::builder("unreachable")
        .store(Arc::new(store))
        .step("effect", move |_| {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .expect("flow");
    let run = flow.run(1, RunOptions::key("k")).await;
    assert!(
        matches!(
            run,
            Err(RunError::Idempotency(IdempotencyError::Store(
                StoreError::Backend(_)
            )))
        ),
        "{run:?}"
    );
    assert_eq!(steps.load(Ordering::SeqCst), 0, "no step may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_output_still_reaches_the_caller_and_never_runs_again() {
    let store = Arc::new(common::store().await);
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let flow = Flow::<u32, Vec<u8>>::builder("large-output")
        .store(store)
        .step("effect", move |_| {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .output(|_| Ok(vec![9u8; 450 * 1024]))
        .build()
        .expect("flow");
    let key = unique_key("large-output");
    let first = flow.run(1, RunOptions::key(&key)).await;
    let result = match first {
        Err(RunError::NotPersisted { result, source }) => {
            assert!(matches!(source, StoreError::TooLarge { .. }), "{source:?}");
            result
        }
        other => panic!("expected the result with a TooLarge error, got {other:?}"),
    };
    assert_eq!(result.status, Status::Completed);
    assert_eq!(result.output.map(|o| o.len()), Some(450 * 1024));
    let _ = flow.run(1, RunOptions::key(&key)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
}

/// The SDK retries a request whose response it lost; a retried `release` must recognise
/// its own applied release instead of reporting a lost lease. The second call here is that
/// retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_sent_twice_is_ok() {
    let store = common::store().await;
    let key = unique_key("release-twice");
    let token = acquire(&store, request(&key, None)).await;
    store.release(&key, token).await.expect("release");
    let retried = store.release(&key, token).await;
    assert!(retried.is_ok(), "a retried release must be Ok: {retried:?}");
    assert_eq!(store.get(&key).await.expect("get"), None);
    let again = acquire(&store, request(&key, None)).await;
    assert_ne!(again, token);
}

/// After a release the key's item is what builds without release tombstones read as a
/// running record whose lease ended at the epoch: absent to `get`, free to `start`, and
/// deleted by native TTL. A release by another token is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_record_is_an_expired_lease_to_every_build() {
    let store = common::store().await;
    let key = unique_key("tombstone");
    let token = acquire(&store, request(&key, None)).await;
    store.release(&key, token).await.expect("release");
    let raw = common::client()
        .get_item()
        .table_name(common::shared_table())
        .key("key", s(&key))
        .consistent_read(true)
        .send()
        .await
        .expect("raw GetItem");
    let item = raw.item().expect("the tombstone item");
    assert_eq!(item.get("status"), Some(&s("running")));
    assert_eq!(item.get("token"), Some(&s(&token.to_string())));
    assert_eq!(item.get("expires_at_ms"), Some(&n(0)));
    assert!(matches!(item.get("ttl"), Some(AttributeValue::N(_))));
    let stale = store.release(&key, FencingToken::generate()).await;
    assert!(matches!(stale, Err(StoreError::StaleToken)), "{stale:?}");
    let renewed = store.renew(&key, token, Duration::from_secs(30)).await;
    assert!(
        matches!(renewed, Err(StoreError::StaleToken)),
        "{renewed:?}"
    );
}

/// `TooLarge` quotes the room the result really had: the item's own attributes, its
/// fingerprint included, leave less than 400 KB. Here DynamoDB alone sees the item is too
/// large (the fingerprint is not known to `fail`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_quotes_the_room_left_by_the_fingerprint_when_dynamodb_refuses() {
    let store = common::store().await;
    let key = unique_key("room-refused");
    let fingerprint = "f".repeat(120 * 1024);
    let token = acquire(&store, request(&key, Some(&fingerprint))).await;
    let result = vec![1u8; 300 * 1024];
    let failed = store.fail(&key, token, &result, None).await;
    let Err(StoreError::TooLarge { limit, .. }) = failed else {
        panic!("expected TooLarge, got {failed:?}");
    };
    assert!(
        limit <= 400 * 1024 - fingerprint.len(),
        "the quoted limit {limit} leaves out the {}-byte fingerprint",
        fingerprint.len()
    );
    assert!(limit > 400 * 1024 - fingerprint.len() - 1024, "{limit}");
}

/// The same when the result cannot fit by its size alone and is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_quotes_the_room_left_by_the_fingerprint_when_never_sent() {
    let store = common::store().await;
    let key = unique_key("room-unsent");
    let fingerprint = "f".repeat(120 * 1024);
    let token = acquire(&store, request(&key, Some(&fingerprint))).await;
    let result = vec![1u8; 450 * 1024];
    let completed = store.complete(&key, token, &result, None).await;
    let Err(StoreError::TooLarge { limit, .. }) = completed else {
        panic!("expected TooLarge, got {completed:?}");
    };
    assert!(
        limit <= 400 * 1024 - fingerprint.len(),
        "the quoted limit {limit} leaves out the {}-byte fingerprint",
        fingerprint.len()
    );
    let record = store.get(&key).await.expect("get").expect("record kept");
    assert_eq!(
        (record.status, record.result),
        (RecordStatus::Completed, None)
    );
}

/// The status-only write after a result DynamoDB refused, when the result was in fact
/// stored by an earlier attempt (its response lost): it finds the caller's result and
/// answers `Ok`. Shown with a result so large it is never sent, after a small one was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_without_result_that_finds_a_result_stored_is_ok() {
    let store = common::store().await;
    let key = unique_key("stored-already");
    let token = acquire(&store, request(&key, None)).await;
    store
        .complete(&key, token, b"receipt-42", None)
        .await
        .expect("complete");
    let again = store
        .complete(&key, token, &vec![7u8; 450 * 1024], None)
        .await;
    assert!(again.is_ok(), "{again:?}");
    let record = store.get(&key).await.expect("get").expect("record");
    assert_eq!(record.result.as_deref(), Some(&b"receipt-42"[..]));
}

/// A finish with its result that finds the record already finished by the caller without
/// one (an earlier attempt stored the status alone) rewrites nothing and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_that_finds_the_record_finished_without_result_reports_it_refused() {
    let store = common::store().await;
    let key = unique_key("without-already");
    let token = acquire(&store, request(&key, None)).await;
    let first = store
        .complete(&key, token, &vec![7u8; 450 * 1024], None)
        .await;
    assert!(
        matches!(first, Err(StoreError::TooLarge { .. })),
        "{first:?}"
    );
    let again = store.complete(&key, token, b"receipt-42", None).await;
    assert!(
        matches!(again, Err(StoreError::ResultRefused { size: 10, .. })),
        "{again:?}"
    );
    let record = store.get(&key).await.expect("get").expect("record");
    assert_eq!(
        (record.status, record.result),
        (RecordStatus::Completed, None)
    );
}
