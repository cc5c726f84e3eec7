//! Durable operations after Redis forgot its scripts, against the real Redis at
//! `REDIS_URL`. A binary of its own: `SCRIPT FLUSH` would make the scripted operations of
//! tests running beside it in the same binary reload their scripts too.

mod common;

use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, IdempotencyStore, Journal, JournalStore,
    Redrive,
};
use orchestrix_conformance::journal::durable;
use orchestrix_conformance::{LONG, unique_key};
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis;

async fn acquire(store: &RedisStore, req: DurableStart<'_>) -> (FencingToken, Option<Journal>) {
    match store.start_durable(req).await {
        Ok(DurableStartOutcome::Acquired { token, resumed }) => (token, resumed),
        other => panic!("expected to acquire {:?}, got {other:?}", req.key),
    }
}

/// Redis forgets its scripts on a restart, a failover or `SCRIPT FLUSH`; every durable
/// operation loads its script again and succeeds.
#[tokio::test]
async fn durable_operations_work_after_the_server_forgets_its_scripts() {
    let store = common::store("durable-noscript").await;
    let mut raw = common::raw().await;
    let mut flush = async || {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut raw)
            .await
            .unwrap();
    };
    let prefix = unique_key("noscript");
    let key = format!("{prefix}:a");
    flush().await;
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    flush().await;
    store.append(&key, token, b"e").await.unwrap();
    flush().await;
    store.renew(&key, token, LONG).await.unwrap();
    flush().await;
    store.suspend(&key, token).await.unwrap();
    flush().await;
    assert_eq!(
        store.abandoned(&prefix, None, 10).await.unwrap(),
        vec![key.clone()]
    );
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    flush().await;
    store.fail(&key, token, b"boom", None).await.unwrap();
    flush().await;
    let Ok(Redrive::Acquired { token, .. }) = store.redrive(&key, LONG, None).await else {
        panic!("the failure must be redriven");
    };
    flush().await;
    store.release(&key, token).await.unwrap();
}
