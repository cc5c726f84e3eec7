//! The Redis store's record admin, against the real Redis at `REDIS_URL`: the shared admin
//! conformance suite (each test under a key prefix of its own), values the store did not
//! write, and the reads a listing makes of records larger than its first read.

mod common;

use std::collections::BTreeSet;

use orchestrix::store::{
    DurableStart, DurableStartOutcome, IdempotencyStore, ListRequest, Listed, RecordInfo,
    StartOutcome, StatusFilter, StoreError,
};
use orchestrix_conformance::admin::undecodable_records_are_reported_not_skipped;
use orchestrix_conformance::{LONG, request, unique_key};
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::AsyncCommands;

orchestrix_conformance::admin_conformance_tests!(common::store("admin"));
orchestrix_conformance::admin_journal_conformance_tests!(common::store("admin-journal"));

const GOOD_TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Values other programs might leave under the store's keys: another Redis type, a string
/// that is not a record, another schema version, a durable record's header cut short.
#[tokio::test]
async fn undecodable_values_are_reported_not_skipped() {
    let garbage = [
        "not a record".to_owned(),
        format!("9c{GOOD_TOKEN}ffff-"),
        format!("1C{GOOD_TOKEN}0000000"),
        format!("1c{GOOD_TOKEN}ffff-trailing"),
    ];
    for value in garbage {
        let prefix = common::unique_prefix("admin-garbage");
        let store = common::store_with_prefix(&prefix).await;
        undecodable_records_are_reported_not_skipped(&store, |key| async move {
            let mut raw = common::raw().await;
            let _: () = raw.set(format!("{prefix}{key}"), value).await.unwrap();
        })
        .await;
    }
    let prefix = common::unique_prefix("admin-hash");
    let store = common::store_with_prefix(&prefix).await;
    undecodable_records_are_reported_not_skipped(&store, |key| async move {
        let mut raw = common::raw().await;
        let _: () = raw
            .hset(format!("{prefix}{key}"), "status", "completed")
            .await
            .unwrap();
    })
    .await;
}

/// Every record under the store's prefix, through the admin's pages.
async fn list_everything(store: &RedisStore) -> Vec<RecordInfo> {
    let admin = store.admin().expect("the Redis store offers an admin");
    let mut records = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100_000 {
        let page = admin
            .list(ListRequest::new("").limit(5).cursor(cursor.as_deref()))
            .await
            .expect("list");
        for listed in page.records {
            match listed {
                Listed::Record(info) => records.push(info),
                other => panic!("only records are under this prefix, got {other:?}"),
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return records,
        }
    }
    panic!("the listing did not end");
}

/// Results and fingerprints longer than the listing's first read of each value are
/// measured, not read: a listing shows the same sizes and fingerprints as `inspect`.
#[tokio::test]
async fn records_longer_than_the_first_read_list_as_they_inspect() {
    let store = common::store("admin-long").await;
    let long_fp = "f".repeat(3000);
    let big = vec![b'x'; 5000];
    let mut expected = Vec::new();
    for (i, fp) in [None, Some("fp"), Some(long_fp.as_str())]
        .into_iter()
        .enumerate()
    {
        for (j, result) in [None, Some(&b""[..]), Some(&big[..])]
            .into_iter()
            .enumerate()
        {
            let key = format!("plain:{i}:{j}");
            let started = store.start(request(&key, fp)).await;
            let Ok(StartOutcome::Acquired(token)) = started else {
                panic!("acquire {key}: {started:?}");
            };
            if let Some(result) = result {
                store
                    .complete(&key, token, result, None)
                    .await
                    .expect("complete");
            }
            expected.push(key);
            let key = format!("durable:{i}:{j}");
            let journal = store.journal_store().expect("journals");
            let started = journal
                .start_durable(DurableStart {
                    key: &key,
                    fingerprint: fp,
                    lease: LONG,
                    rerun_failed: false,
                    input: &big,
                    retain: None,
                })
                .await;
            let Ok(DurableStartOutcome::Acquired { token, .. }) = started else {
                panic!("acquire {key}: {started:?}");
            };
            journal.append(&key, token, b"entry").await.expect("append");
            if let Some(result) = result {
                store.fail(&key, token, result, None).await.expect("fail");
            }
            expected.push(key);
        }
    }
    let listed = list_everything(&store).await;
    let listed_keys: BTreeSet<&str> = listed.iter().map(|info| info.key.as_str()).collect();
    assert_eq!(listed_keys, expected.iter().map(String::as_str).collect());
    let admin = store.admin().expect("admin");
    for info in listed {
        let inspected = admin.inspect(&info.key).await.expect("inspect");
        let inspected = inspected.expect("the listed record is there");
        assert_eq!(
            (
                &info.fingerprint,
                info.result_bytes,
                info.status,
                info.durable
            ),
            (
                &inspected.fingerprint,
                inspected.result_bytes,
                inspected.status,
                inspected.durable
            ),
            "{}",
            info.key
        );
    }
}

/// The lease index of durable records lives under the store's prefix; it is never listed.
#[tokio::test]
async fn the_lease_index_is_not_a_record() {
    let store = common::store("admin-index").await;
    let key = unique_key("durable");
    let journal = store.journal_store().expect("journals");
    let started = journal
        .start_durable(orchestrix_conformance::journal::durable(&key, None, b"in"))
        .await;
    assert!(matches!(started, Ok(DurableStartOutcome::Acquired { .. })));
    let listed = list_everything(&store).await;
    assert_eq!(
        listed.into_iter().map(|info| info.key).collect::<Vec<_>>(),
        vec![key]
    );
}

/// Glob characters in a listing's prefix match themselves.
#[tokio::test]
async fn glob_characters_in_a_prefix_match_themselves() {
    let store = common::store("admin-glob").await;
    for key in ["a*b:1", "a*b:2", "axb:3", "a?c:4", "a[b]:5"] {
        let started = store.start(request(key, None)).await;
        assert!(matches!(started, Ok(StartOutcome::Acquired(_))));
    }
    let admin = store.admin().expect("admin");
    for (prefix, expected) in [
        ("a*b", vec!["a*b:1", "a*b:2"]),
        ("a?", vec!["a?c:4"]),
        ("a[b]", vec!["a[b]:5"]),
    ] {
        let page = admin
            .list(
                ListRequest::new(prefix)
                    .limit(100)
                    .filter(StatusFilter::Running),
            )
            .await
            .expect("list");
        let mut keys: Vec<&str> = page.records.iter().map(Listed::key).collect();
        keys.sort_unstable();
        assert_eq!(keys, expected, "{prefix}");
    }
}

#[tokio::test]
async fn a_cursor_redis_did_not_give_is_an_error() {
    let store = common::store("admin-cursor").await;
    let admin = store.admin().expect("admin");
    let listed = admin
        .list(ListRequest::new("").cursor(Some("not a cursor")))
        .await;
    assert!(matches!(listed, Err(StoreError::Backend(_))), "{listed:?}");
}
