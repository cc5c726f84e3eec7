//! The shared store conformance suite, against the local DynamoDB-compatible server.

mod common;

use aws_sdk_dynamodb::types::AttributeValue;

orchestrix_conformance::store_conformance_tests!(common::store());

/// The same suite with `CachedStore` in front of the store.
mod cached {
    use std::sync::Arc;

    use orchestrix::store::CachedStore;

    use super::common;

    orchestrix_conformance::store_conformance_tests!(async {
        CachedStore::new(Arc::new(common::store().await))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_record_is_a_typed_error() {
    let store = common::store().await;
    let client = common::client();
    orchestrix_conformance::undecodable_record_is_a_typed_error(&store, |key| async move {
        client
            .put_item()
            .table_name(common::shared_table())
            .item("key", AttributeValue::S(key))
            .item("junk", AttributeValue::S("written by someone else".into()))
            .send()
            .await
            .expect("raw PutItem");
    })
    .await;
}
