//! DynamoDB-specific behaviour of durable records, against the local DynamoDB-compatible
//! server: the item layout, the journal limits, items that do not decode, and requests
//! the SDK sends again after their response was lost.

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use common::LoseResponses;
use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, IdempotencyStore, Journal, JournalStore,
    RecordStatus, Redrive, StartOutcome, StoreError,
};
use orchestrix_conformance::journal::{durable, oversize_append_is_refused_and_appends_nothing};
use orchestrix_conformance::{LONG, PAST_SHORT, SHORT, request, unique_key};
use orchestrix_dynamodb::DynamoStore;

/// A store on the shared table that journals at most `limit` bytes per run.
async fn limited(limit: usize) -> DynamoStore {
    let _table_exists = common::store().await;
    DynamoStore::new(common::client(), common::options().max_journal_bytes(limit))
        .expect("valid options")
}

/// A store on the shared table whose responses `lose` can lose.
async fn losing(lose: &LoseResponses) -> DynamoStore {
    let _table_exists = common::store().await;
    DynamoStore::new(common::client_losing(lose), common::options()).expect("valid options")
}

async fn acquire(store: &DynamoStore, req: DurableStart<'_>) -> (FencingToken, Option<Journal>) {
    match store.start_durable(req).await {
        Ok(DurableStartOutcome::Acquired { token, resumed }) => (token, resumed),
        other => panic!("expected to acquire {:?}, got {other:?}", req.key),
    }
}

async fn entries(store: &DynamoStore, key: &str) -> Option<Vec<Vec<u8>>> {
    store
        .read_journal(key)
        .await
        .expect("read_journal")
        .map(|j| j.entries)
}

/// The item under `key` in the shared table, as stored.
async fn raw(key: &str) -> HashMap<String, AttributeValue> {
    common::client()
        .get_item()
        .table_name(common::shared_table())
        .key("key", AttributeValue::S(key.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("raw GetItem")
        .item
        .expect("an item under the key")
}

fn num(item: &HashMap<String, AttributeValue>, name: &str) -> u64 {
    match item.get(name) {
        Some(AttributeValue::N(n)) => n.parse().expect("a whole number"),
        other => panic!("{name}: {other:?}"),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Writes `attributes` over the item under `key` (one `UpdateItem` of raw values).
async fn overwrite(key: &str, attributes: &[(&str, AttributeValue)]) {
    let mut update = common::client()
        .update_item()
        .table_name(common::shared_table())
        .key("key", AttributeValue::S(key.to_owned()));
    let mut set = Vec::new();
    for (at, (name, value)) in attributes.iter().enumerate() {
        set.push(format!("#a{at} = :v{at}"));
        update = update
            .expression_attribute_names(format!("#a{at}"), *name)
            .expression_attribute_values(format!(":v{at}"), value.clone());
    }
    update
        .update_expression(format!("SET {}", set.join(", ")))
        .send()
        .await
        .expect("raw UpdateItem");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_durable_item_keeps_its_lease_apart_from_its_retention() {
    let store = common::store().await;
    let key = unique_key("layout");
    let before = now_ms();
    let req = DurableStart {
        lease: Duration::from_secs(10),
        retain: Some(Duration::from_secs(3600)),
        ..durable(&key, Some("fp"), b"the input")
    };
    let (token, _) = acquire(&store, req).await;
    let item = raw(&key).await;
    let lease = num(&item, "lease_until_ms");
    assert!(
        (before + 10_000..=now_ms() + 10_000).contains(&lease),
        "{lease}"
    );
    assert_eq!(num(&item, "retain_ms"), 3_600_000);
    assert_eq!(num(&item, "retain_secs"), 3_600);
    // The record goes after the retention, not with the lease: every build reads the
    // abandoned run as held.
    assert_eq!(num(&item, "expires_at_ms"), lease + 3_600_000);
    assert!(num(&item, "ttl") * 1000 >= lease + 3_600_000 + 100);
    assert_eq!(
        item.get("input"),
        Some(&AttributeValue::B(Blob::new(&b"the input"[..])))
    );
    assert_eq!(item.get("journal"), Some(&AttributeValue::L(vec![])));
    assert_eq!(num(&item, "journal_bytes"), 9);

    // A renewal moves the lease and the retention end with it, in the same request.
    tokio::time::sleep(Duration::from_millis(50)).await;
    store
        .renew(&key, token, Duration::from_secs(20))
        .await
        .expect("renew");
    let renewed = raw(&key).await;
    let lease = num(&renewed, "lease_until_ms");
    assert!(lease >= before + 20_000, "{lease}");
    assert_eq!(num(&renewed, "expires_at_ms"), lease + 3_600_000);

    // Finished: the journal stays, the lease and retention go, the TTL decides.
    store.append(&key, token, b"entry").await.expect("append");
    store
        .complete(&key, token, b"done", Some(Duration::from_secs(60)))
        .await
        .expect("complete");
    let finished = raw(&key).await;
    for gone in ["lease_until_ms", "retain_ms", "retain_secs", "append_ids"] {
        assert!(!finished.contains_key(gone), "{gone} left on {finished:?}");
    }
    assert_eq!(num(&finished, "journal_bytes"), 14);
    assert!(num(&finished, "expires_at_ms") <= now_ms() + 60_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_run_kept_until_deleted_has_an_expiry_no_one_reaches() {
    let store = common::store().await;
    let key = unique_key("forever");
    let req = DurableStart {
        retain: None,
        ..durable(&key, None, b"in")
    };
    let (token, _) = acquire(&store, req).await;
    let item = raw(&key).await;
    let year_ms = 365 * 86_400_000;
    assert!(num(&item, "expires_at_ms") > now_ms() + 999 * year_ms);
    store.suspend(&key, token).await.expect("suspend");
    let suspended = raw(&key).await;
    assert_eq!(num(&suspended, "lease_until_ms"), 0);
    assert!(num(&suspended, "expires_at_ms") > now_ms() + 999 * year_ms);
    assert_eq!(
        store.abandoned(&key, None, 10).await.expect("abandoned"),
        vec![key.clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_durable_run_holds_the_key_for_a_plain_start() {
    let store = common::store().await;
    let key = unique_key("plain-over-durable");
    let req = DurableStart {
        lease: SHORT,
        ..durable(&key, None, b"in")
    };
    let (token, _) = acquire(&store, req).await;
    tokio::time::sleep(PAST_SHORT).await;
    match store.start(request(&key, None)).await {
        Ok(StartOutcome::Existing(record)) => {
            assert_eq!(
                (record.status, record.token),
                (RecordStatus::Running, token)
            );
        }
        other => panic!("an abandoned run is not free: {other:?}"),
    }
    let got = store.get(&key).await.expect("get").expect("the record");
    assert_eq!(got.status, RecordStatus::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_run_has_no_journal_to_append_to_or_suspend() {
    let store = common::store().await;
    let key = unique_key("plain-append");
    let token = match store.start(request(&key, None)).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("{other:?}"),
    };
    let appended = store.append(&key, token, b"e").await;
    assert!(
        matches!(appended, Err(StoreError::StaleToken)),
        "{appended:?}"
    );
    let suspended = store.suspend(&key, token).await;
    assert!(
        matches!(suspended, Err(StoreError::StaleToken)),
        "{suspended:?}"
    );
    assert_eq!(store.read_journal(&key).await.expect("read"), None);
    store.renew(&key, token, LONG).await.expect("still owned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_append_is_refused_under_a_configured_limit() {
    oversize_append_is_refused_and_appends_nothing(&limited(16 * 1024).await, 16 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_append_is_refused_under_the_item_limit() {
    let store = common::store().await;
    oversize_append_is_refused_and_appends_nothing(&store, 400 * 1024).await;
}

/// Entries that fit one by one are refused once their sum passes the configured limit:
/// the append's condition holds the stored journal size to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_that_together_pass_the_configured_limit_are_refused() {
    let store = limited(16 * 1024).await;
    let key = unique_key("journal-limit");
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    let entry = vec![7u8; 6 * 1024];
    store.append(&key, token, &entry).await.expect("first");
    store.append(&key, token, &entry).await.expect("second");
    let third = store.append(&key, token, &entry).await;
    assert!(
        matches!(third, Err(StoreError::TooLarge { size, limit }) if size == 2 + 3 * entry.len() && limit == 16 * 1024),
        "{third:?}"
    );
    assert_eq!(entries(&store, &key).await.map(|e| e.len()), Some(2));
    store
        .append(&key, token, b"fits")
        .await
        .expect("a small one");
}

/// Past the item limit DynamoDB refuses the append itself; the store says how large the
/// journal would have been and what the item had room for. (Where the item limit bites
/// depends on the server's accounting: moto counts an updated attribute's old and new
/// values together, so it refuses a journal from about 200 KB; hence appends until one is
/// refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_dynamodb_refuses_for_the_item_size_is_too_large() {
    let store = common::store().await;
    let key = unique_key("item-limit");
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    let entry = vec![1u8; 60 * 1024];
    let mut appended = 0;
    let refused = loop {
        assert!(appended < 8, "eight 60 KB entries cannot fit in one item");
        match store.append(&key, token, &entry).await {
            Ok(()) => appended += 1,
            Err(e) => break e,
        }
    };
    let StoreError::TooLarge { size, limit } = refused else {
        panic!("expected TooLarge, got {refused:?}");
    };
    assert!(appended >= 1, "one entry fits");
    assert_eq!(size, 2 + (appended + 1) * entry.len());
    assert!(
        limit < size && limit >= 2 + appended * entry.len(),
        "{limit}"
    );
    assert_eq!(entries(&store, &key).await.map(|e| e.len()), Some(appended));
    store
        .append(&key, token, b"fits")
        .await
        .expect("a small one");
    store
        .complete(&key, token, b"ok", None)
        .await
        .expect("complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_too_large_for_the_journal_is_refused_and_nothing_is_written() {
    let store = limited(1024).await;
    let key = unique_key("input-limit");
    let started = store
        .start_durable(durable(&key, None, &vec![0u8; 1025]))
        .await;
    assert!(
        matches!(
            started,
            Err(StoreError::TooLarge {
                size: 1025,
                limit: 1024
            })
        ),
        "{started:?}"
    );
    assert_eq!(store.get(&key).await.expect("get"), None);
}

/// An input that passes the journal limit but not, with the rest of the item, DynamoDB's
/// item limit: DynamoDB refuses the item, and the store quotes the room it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_dynamodb_refuses_for_the_item_size_is_too_large() {
    let store = common::store().await;
    let key = format!("{}:{}", unique_key("input-item-limit"), "k".repeat(600));
    let input = vec![0u8; 409_500];
    let started = store.start_durable(durable(&key, None, &input)).await;
    let Err(StoreError::TooLarge { size, limit }) = started else {
        panic!("expected TooLarge, got {started:?}");
    };
    assert_eq!(size, input.len());
    assert!(limit < size && limit > 400 * 1024 - 2048, "{limit}");
    assert_eq!(store.get(&key).await.expect("get"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_journal_is_a_decode_error_and_never_taken_over() {
    let store = common::store().await;
    for (name, bad) in [
        ("journal", AttributeValue::S("not a list".into())),
        (
            "journal",
            AttributeValue::L(vec![AttributeValue::S("not bytes".into())]),
        ),
        ("input", AttributeValue::S("not bytes".into())),
    ] {
        let key = unique_key("bad-journal");
        let req = DurableStart {
            lease: SHORT,
            ..durable(&key, Some("fp"), b"in")
        };
        let (token, _) = acquire(&store, req).await;
        overwrite(&key, &[(name, bad.clone())]).await;
        let read = store.read_journal(&key).await;
        assert!(
            matches!(read, Err(StoreError::Decode(_))),
            "{name}: {read:?}"
        );
        tokio::time::sleep(PAST_SHORT).await;
        let started = store.start_durable(durable(&key, Some("fp"), b"in")).await;
        assert!(
            matches!(started, Err(StoreError::Decode(_))),
            "{name} {bad:?}: {started:?}"
        );
        let item = raw(&key).await;
        assert_eq!(
            item.get("token"),
            Some(&AttributeValue::S(token.to_string())),
            "the record must stay as it was"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_attributes_on_a_plain_record_are_a_decode_error() {
    let store = common::store().await;
    let key = unique_key("stray-durable");
    let token = match store.start(request(&key, None)).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("{other:?}"),
    };
    store
        .complete(&key, token, b"r", None)
        .await
        .expect("complete");
    overwrite(&key, &[("journal", AttributeValue::L(vec![]))]).await;
    let got = store.get(&key).await;
    assert!(matches!(got, Err(StoreError::Decode(_))), "{got:?}");
    let started = store.start_durable(durable(&key, None, b"in")).await;
    assert!(matches!(started, Err(StoreError::Decode(_))), "{started:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_durable_record_without_its_lease_is_a_decode_error() {
    let store = common::store().await;
    let key = unique_key("no-lease");
    acquire(&store, durable(&key, None, b"in")).await;
    common::client()
        .update_item()
        .table_name(common::shared_table())
        .key("key", AttributeValue::S(key.clone()))
        .update_expression("REMOVE lease_until_ms")
        .send()
        .await
        .expect("raw UpdateItem");
    let got = store.get(&key).await;
    assert!(matches!(got, Err(StoreError::Decode(_))), "{got:?}");
    let listed = store.abandoned(&key, None, 10).await.expect("abandoned");
    assert!(listed.is_empty(), "{listed:?}");
}

/// A takeover is two requests: the `PutItem` that finds the abandoned run, then the
/// `UpdateItem` that takes it; anything else is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_takes_two_requests_and_everything_else_one() {
    let lose = LoseResponses::default();
    let store = losing(&lose).await;
    let key = unique_key("requests");
    let short = DurableStart {
        lease: SHORT,
        ..durable(&key, None, b"in")
    };
    lose.arm(0);
    let (old, _) = acquire(&store, short).await;
    assert_eq!(lose.seen(), 1, "a fresh start");
    lose.arm(0);
    store.append(&key, old, b"e").await.expect("append");
    assert_eq!(lose.seen(), 1, "an append");
    lose.arm(0);
    match store.start_durable(durable(&key, None, b"in")).await {
        Ok(DurableStartOutcome::Existing(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(lose.seen(), 1, "a start that finds a live run");
    tokio::time::sleep(PAST_SHORT).await;
    lose.arm(0);
    let (_, resumed) = acquire(&store, durable(&key, None, b"in")).await;
    assert_eq!(resumed.map(|j| j.entries), Some(vec![b"e".to_vec()]));
    assert_eq!(lose.seen(), 2, "a takeover");
    let item = raw(&key).await;
    assert!(
        !item.contains_key("append_ids"),
        "the old owner's append ids go with it"
    );
}

/// The SDK sends an append again when its response was lost: the append is in the
/// journal once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_response_was_lost_is_applied_once() {
    let lose = LoseResponses::default();
    let store = losing(&lose).await;
    let key = unique_key("lost-append");
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    store.append(&key, token, b"first").await.expect("append");
    lose.arm(1);
    let appended = store.append(&key, token, b"second").await;
    assert!(appended.is_ok(), "{appended:?}");
    assert!(lose.spent() && lose.seen() == 2, "the SDK sent it again");
    assert_eq!(
        entries(&store, &key).await,
        Some(vec![b"first".to_vec(), b"second".to_vec()])
    );
    store.append(&key, token, b"third").await.expect("append");
    assert_eq!(entries(&store, &key).await.map(|e| e.len()), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_whose_response_was_lost_is_still_the_callers() {
    let lose = LoseResponses::default();
    let store = losing(&lose).await;
    let key = unique_key("lost-takeover");
    let short = DurableStart {
        lease: SHORT,
        ..durable(&key, None, b"in")
    };
    let (old, _) = acquire(&store, short).await;
    store.append(&key, old, b"e").await.expect("append");
    tokio::time::sleep(PAST_SHORT).await;
    // The put's answer (the abandoned run) arrives; the takeover's is lost.
    lose.arm(2);
    let (token, resumed) = match store.start_durable(durable(&key, None, b"in")).await {
        Ok(DurableStartOutcome::Acquired { token, resumed }) => (token, resumed),
        other => panic!("expected the takeover, got {other:?}"),
    };
    assert!(
        lose.spent() && lose.seen() == 3,
        "the takeover's response was lost"
    );
    assert_eq!(resumed.map(|j| j.entries), Some(vec![b"e".to_vec()]));
    store
        .append(&key, token, b"f")
        .await
        .expect("the new owner appends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspend_a_redrive_and_a_release_whose_responses_were_lost_are_ok() {
    let lose = LoseResponses::default();
    let store = losing(&lose).await;
    let key = unique_key("lost-others");
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    store.append(&key, token, b"e").await.expect("append");
    lose.arm(1);
    assert!(store.suspend(&key, token).await.is_ok());
    assert!(lose.spent());

    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    lose.arm(1);
    assert!(store.fail(&key, token, b"failure", None).await.is_ok());
    assert!(lose.spent());
    lose.arm(1);
    let redriven = store.redrive(&key, LONG, Some(LONG)).await;
    let token = match redriven {
        Ok(Redrive::Acquired { token, journal }) => {
            assert_eq!(journal.entries, vec![b"e".to_vec()]);
            token
        }
        other => panic!("expected the redrive, got {other:?}"),
    };
    assert!(lose.spent());
    lose.arm(1);
    assert!(store.release(&key, token).await.is_ok());
    assert!(lose.spent());
    assert_eq!(store.read_journal(&key).await.expect("read"), None);
    assert_eq!(store.get(&key).await.expect("get"), None);
}

/// The journal and an owner's writes are fenced on the durable lease, and a suspended
/// run is free at once whatever the skew allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_run_is_resumed_at_once_even_with_a_large_skew_allowance() {
    let _table_exists = common::store().await;
    let cautious = DynamoStore::new(
        common::client(),
        common::options().clock_skew(Duration::from_secs(30)),
    )
    .expect("valid options");
    let key = unique_key("suspend-skew");
    let (token, _) = acquire(&cautious, durable(&key, None, b"in")).await;
    cautious.suspend(&key, token).await.expect("suspend");
    let (new, resumed) = acquire(&cautious, durable(&key, None, b"in")).await;
    assert_ne!(new, token);
    assert!(resumed.is_some());
}

/// A finished durable record holds its journal and its result in one item: a result that
/// does not fit beside the journal is left out, the record is finished without it (the
/// run never runs again), and the journal stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_does_not_fit_beside_the_journal_finishes_the_record_without_it() {
    let store = common::store().await;
    let key = unique_key("result-beside-journal");
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    let entry = vec![3u8; 100 * 1024];
    store.append(&key, token, &entry).await.expect("append");
    let result = vec![9u8; 350 * 1024];
    let completed = store.complete(&key, token, &result, None).await;
    assert!(
        matches!(completed, Err(StoreError::TooLarge { size, limit }) if size == result.len() && limit < 400 * 1024 - entry.len()),
        "{completed:?}"
    );
    let record = store.get(&key).await.expect("get").expect("record kept");
    assert_eq!(
        (record.status, record.result),
        (RecordStatus::Completed, None)
    );
    assert_eq!(entries(&store, &key).await, Some(vec![entry]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_plain_run_is_not_redriven() {
    let store = common::store().await;
    let key = unique_key("redrive-plain");
    let token = match store.start(request(&key, None)).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("{other:?}"),
    };
    store
        .fail(&key, token, b"failure", None)
        .await
        .expect("fail");
    match store.redrive(&key, LONG, None).await {
        Ok(Redrive::NotFailed(record)) => {
            assert_eq!((record.status, record.token), (RecordStatus::Failed, token));
        }
        other => panic!("a plain failure has no journal to redrive: {other:?}"),
    }
    let record = store.get(&key).await.expect("get").expect("record");
    assert_eq!(record.status, RecordStatus::Failed);
}
