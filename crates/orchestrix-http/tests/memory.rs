//! The layer's behaviour on the in-memory store, over real HTTP on 127.0.0.1.

mod behaviour;
mod common;

use std::sync::Arc;
use std::time::Duration;

use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, MemoryStore, Record, StartOutcome, StartRequest,
    StoreError,
};

async fn memory_store() -> Arc<dyn IdempotencyStore> {
    Arc::new(MemoryStore::new())
}

all_behaviours!(memory_store);

/// A store whose backend is down: every operation fails as an unreachable backend does.
#[derive(Debug)]
struct UnreachableStore;

fn down() -> StoreError {
    StoreError::backend_msg("connection refused")
}

#[async_trait::async_trait]
impl IdempotencyStore for UnreachableStore {
    async fn get(&self, _: &str) -> Result<Option<Record>, StoreError> {
        Err(down())
    }
    async fn start(&self, _: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        Err(down())
    }
    async fn finish(
        &self,
        _: &str,
        _: FencingToken,
        _: FinalStatus,
        _: &[u8],
        _: Option<Duration>,
    ) -> Result<(), StoreError> {
        Err(down())
    }
    async fn renew(&self, _: &str, _: FencingToken, _: Duration) -> Result<(), StoreError> {
        Err(down())
    }
    async fn release(&self, _: &str, _: FencingToken) -> Result<(), StoreError> {
        Err(down())
    }
    async fn delete(&self, _: &str) -> Result<(), StoreError> {
        Err(down())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_is_503_and_nothing_runs() {
    behaviour::unreachable_store_is_503_and_nothing_runs(Arc::new(UnreachableStore)).await;
}
