//! `CachedStore`: finished records replayed from this process, with no round trip.
#![cfg(feature = "cache")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    CachedStore, FencingToken, FinalStatus, IdempotencyStore, MemoryStore, Record, RecordStatus,
    StartOutcome, StartRequest, StoreError,
};

orchestrix_conformance::store_conformance_tests!(async {
    CachedStore::new(Arc::new(MemoryStore::new()))
});

/// The memory store, counting the reads (`start` and `get`) that reach it.
#[derive(Debug, Default)]
struct Counted {
    inner: MemoryStore,
    reads: AtomicUsize,
}

#[async_trait]
impl IdempotencyStore for Counted {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key).await
    }
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.start(req).await
    }
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.inner.finish(key, token, status, result, ttl).await
    }
    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}

impl Counted {
    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

fn cached() -> (Arc<Counted>, CachedStore) {
    let inner = Arc::new(Counted::default());
    let store = CachedStore::new(Arc::clone(&inner) as Arc<dyn IdempotencyStore>)
        .max_age(Duration::from_secs(3600));
    (inner, store)
}

fn request(key: &str) -> StartRequest<'_> {
    StartRequest {
        key,
        fingerprint: Some("fp"),
        lease: Duration::from_secs(30),
        rerun_failed: false,
    }
}

async fn acquire(store: &CachedStore, req: StartRequest<'_>) -> FencingToken {
    match store.start(req).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("expected an acquire, got {other:?}"),
    }
}

async fn existing(store: &CachedStore, req: StartRequest<'_>) -> Record {
    match store.start(req).await {
        Ok(StartOutcome::Existing(record)) => record,
        other => panic!("expected an existing record, got {other:?}"),
    }
}

#[tokio::test]
async fn replays_of_a_record_finished_here_make_no_round_trip_after_the_first() {
    let (inner, store) = cached();
    let token = acquire(&store, request("k")).await;
    assert!(store.complete("k", token, b"done", None).await.is_ok());
    let first = existing(&store, request("k")).await;
    let reads = inner.reads();
    for _ in 0..10 {
        assert_eq!(existing(&store, request("k")).await, first);
        assert_eq!(store.get("k").await.ok().flatten(), Some(first.clone()));
    }
    assert_eq!(inner.reads(), reads, "replays reached the inner store");
    assert_eq!(first.status, RecordStatus::Completed);
    assert_eq!(first.fingerprint.as_deref(), Some("fp"));
    assert_eq!(first.result.as_deref(), Some(&b"done"[..]));
}

#[tokio::test]
async fn running_records_are_never_cached() {
    let (inner, store) = cached();
    let _token = acquire(&store, request("k")).await;
    let before = inner.reads();
    for _ in 0..3 {
        let record = existing(&store, request("k")).await;
        assert_eq!(record.status, RecordStatus::Running);
    }
    assert_eq!(inner.reads(), before + 3);
}

#[tokio::test]
async fn a_record_finished_by_another_handle_is_not_cached() {
    let (inner, store) = cached();
    let token = match inner.start(request("k")).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("expected an acquire, got {other:?}"),
    };
    assert!(inner.complete("k", token, b"elsewhere", None).await.is_ok());
    let before = inner.reads();
    for _ in 0..3 {
        existing(&store, request("k")).await;
    }
    assert_eq!(inner.reads(), before + 3);
}

#[tokio::test]
async fn a_local_delete_or_release_invalidates_the_entry() {
    let (_inner, store) = cached();
    let token = acquire(&store, request("k")).await;
    assert!(store.complete("k", token, b"done", None).await.is_ok());
    existing(&store, request("k")).await;
    assert!(store.delete("k").await.is_ok());
    let token = acquire(&store, request("k")).await;
    assert!(store.release("k", token).await.is_ok());
    assert!(matches!(store.get("k").await, Ok(None)));
}

#[tokio::test]
async fn a_cached_failure_is_replayed_but_re_run_when_asked() {
    let (inner, store) = cached();
    let token = acquire(&store, request("k")).await;
    assert!(store.fail("k", token, b"boom", None).await.is_ok());
    assert_eq!(
        existing(&store, request("k")).await.status,
        RecordStatus::Failed
    );
    let before = inner.reads();
    assert_eq!(
        existing(&store, request("k")).await.status,
        RecordStatus::Failed
    );
    assert_eq!(inner.reads(), before);
    let rerun = StartRequest {
        rerun_failed: true,
        ..request("k")
    };
    acquire(&store, rerun).await;
    assert_eq!(inner.reads(), before + 1);
    // The re-run owns the key now: its running record is what start sees.
    assert_eq!(
        existing(&store, request("k")).await.status,
        RecordStatus::Running
    );
}

#[tokio::test(start_paused = true)]
async fn an_entry_never_outlives_its_records_ttl() {
    let (_inner, store) = cached();
    let token = acquire(&store, request("k")).await;
    let ttl = Duration::from_secs(5);
    assert!(store.complete("k", token, b"done", Some(ttl)).await.is_ok());
    existing(&store, request("k")).await;
    tokio::time::advance(ttl).await;
    acquire(&store, request("k")).await;
}

#[tokio::test(start_paused = true)]
async fn a_delete_through_another_handle_is_seen_after_max_age() {
    let inner = Arc::new(MemoryStore::new());
    let max_age = Duration::from_secs(2);
    let store = CachedStore::new(Arc::clone(&inner) as Arc<dyn IdempotencyStore>).max_age(max_age);
    let token = acquire(&store, request("k")).await;
    assert!(store.complete("k", token, b"done", None).await.is_ok());
    existing(&store, request("k")).await;
    assert!(inner.delete("k").await.is_ok());
    // Within max_age the cache still replays the deleted record: the documented staleness.
    assert_eq!(
        existing(&store, request("k")).await.status,
        RecordStatus::Completed
    );
    tokio::time::advance(max_age).await;
    acquire(&store, request("k")).await;
}
