//! `OnRunning::Wait` on a store that cannot notify: the engine hands each further wait of
//! the same caller the next [`Wait`], so a polling store backs off from 2 ms to 50 ms.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, MemoryStore, Record, StartOutcome, StartRequest,
    StoreError, Wait,
};
use orchestrix::{Flow, OnRunning, RunOptions, Status, StepError};

/// The memory store, seen as a store that cannot notify: it polls, and keeps every wait it
/// was handed.
#[derive(Debug, Default)]
struct Polling {
    inner: MemoryStore,
    waits: Mutex<Vec<Wait>>,
}

#[async_trait]
impl IdempotencyStore for Polling {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
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
    async fn wait_for_change(&self, _key: &str, wait: Wait) -> Result<(), StoreError> {
        if let Ok(mut waits) = self.waits.lock() {
            waits.push(wait);
        }
        tokio::time::sleep(wait.poll_interval()).await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiting_caller_polls_with_a_backoff_from_two_ms_to_the_cap() {
    let store = Arc::new(Polling::default());
    let (release_owner, owner_may_finish) = tokio::sync::oneshot::channel::<()>();
    let gate = Arc::new(tokio::sync::Mutex::new(Some(owner_may_finish)));
    let flow = Flow::<u32, ()>::builder("slow")
        .store(Arc::clone(&store) as Arc<dyn IdempotencyStore>)
        .step("work", move |_ctx| {
            let gate = Arc::clone(&gate);
            async move {
                if let Some(finish) = gate.lock().await.take() {
                    let _ = finish.await;
                }
                Ok::<_, StepError>(())
            }
        })
        .build()
        .expect("flow");
    let owner = tokio::spawn({
        let flow = flow.clone();
        async move { flow.run(7, RunOptions::key("k")).await }
    });
    tokio::task::yield_now().await;
    let waiter = tokio::spawn({
        let flow = flow.clone();
        let wait = OnRunning::Wait {
            timeout: Duration::from_secs(60),
        };
        async move { flow.run(7, RunOptions::key("k").on_running(wait)).await }
    });
    // Two seconds of paused time: the waiter polls through the whole backoff.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = release_owner.send(());
    let owned = owner.await.expect("owner task").expect("owner run");
    let waited = waiter.await.expect("waiter task").expect("waiter run");
    assert_eq!(owned.status, Status::Completed);
    assert!(waited.replayed);

    let waits = store.waits.lock().map(|w| w.clone()).unwrap_or_default();
    let attempts: Vec<u32> = waits.iter().map(Wait::attempt).collect();
    let expected: Vec<u32> = (0..u32::try_from(waits.len()).unwrap_or(0)).collect();
    assert_eq!(attempts, expected, "each wait is the caller's next");
    let intervals: Vec<u128> = waits
        .iter()
        .take(7)
        .map(|w| w.poll_interval().as_millis())
        .collect();
    assert_eq!(intervals, [2, 4, 8, 16, 32, 50, 50]);
    // About 2 s at 50 ms per poll once backed off, not 1000 polls at 2 ms.
    assert!(waits.len() < 60, "{} polls in 2 s", waits.len());
}
