//! The DynamoDB store's record admin, against the local DynamoDB-compatible server
//! (`DYNAMODB_ENDPOINT`): the shared admin conformance suite, durable records included, and
//! items the store did not write.

mod common;

use aws_sdk_dynamodb::types::AttributeValue;
use orchestrix::store::{IdempotencyStore, ListRequest, StartOutcome};
use orchestrix_conformance::admin::undecodable_records_are_reported_not_skipped;
use orchestrix_conformance::{request, unique_key};

orchestrix_conformance::admin_conformance_tests!(common::store());
orchestrix_conformance::admin_journal_conformance_tests!(common::store());

/// Items that are not records: no schema version, a running record whose token is not
/// one, another schema version. Each is inspected as a decode error and listed as
/// undecodable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_items_are_reported_not_skipped() {
    let store = common::store().await;
    let items: [&[(&str, AttributeValue)]; 3] = [
        &[("junk", AttributeValue::S("written by someone else".into()))],
        &[
            ("version", AttributeValue::N("1".into())),
            ("status", AttributeValue::S("running".into())),
            ("token", AttributeValue::S("not-a-token".into())),
            ("expires_at_ms", AttributeValue::N("99999999999999".into())),
        ],
        &[
            ("version", AttributeValue::N("7".into())),
            ("status", AttributeValue::S("completed".into())),
        ],
    ];
    for attributes in items {
        undecodable_records_are_reported_not_skipped(&store, |key| async move {
            let mut put = common::client()
                .put_item()
                .table_name(common::shared_table())
                .item("key", AttributeValue::S(key));
            for (name, value) in attributes {
                put = put.item(*name, value.clone());
            }
            put.send().await.expect("raw PutItem");
        })
        .await;
    }
}

/// A page never holds more records than asked: each `Scan` evaluates no more items than
/// the page lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_hold_at_most_the_records_asked_for() {
    let store = common::store().await;
    let prefix = unique_key("admin-limit");
    for i in 0..5 {
        let key = format!("{prefix}:{i}");
        let started = store.start(request(&key, None)).await;
        assert!(matches!(started, Ok(StartOutcome::Acquired(_))));
    }
    let admin = store.admin().expect("admin");
    let mut seen = 0;
    let mut cursor: Option<String> = None;
    for _ in 0..100_000 {
        let page = admin
            .list(ListRequest::new(&prefix).limit(2).cursor(cursor.as_deref()))
            .await
            .expect("list");
        assert!(page.records.len() <= 2, "{}", page.records.len());
        seen += page.records.len();
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, 5);
}
