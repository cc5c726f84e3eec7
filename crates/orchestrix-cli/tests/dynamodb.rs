//! The command line against the local DynamoDB-compatible server (`DYNAMODB_ENDPOINT`):
//! every behaviour but those of durable runs, which this store does not keep yet.

mod common;

cli_tests!(common::dynamodb());

/// `abandoned` on a store without journals says so, and lists nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_says_the_store_keeps_no_journals() {
    let backend = common::dynamodb().await;
    let run = backend.cli(&["abandoned"]).await;
    assert_eq!(run.ok(), "");
    assert!(run.stderr.contains("keeps no journals"), "{run:?}");
}
