//! The Redis store behind an observer: every acquisition `start` answered, until its owner
//! settles it, and how the store answered the settlement. Every call still goes to Redis.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, Record, StartOutcome, StartRequest, StoreError,
    Wait,
};
use orchestrix_redis::RedisStore;

/// One acquisition seen by the observer.
#[derive(Debug, Clone, Copy)]
pub struct Acquisition {
    pub token: FencingToken,
    /// When its `start` call began and returned.
    pub began: Instant,
    pub ended: Instant,
    claimed: bool,
}

/// How the store answered an owner's settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// A `finish` succeeded: the outcome is stored, the key is never run again.
    Kept,
    /// A `release` succeeded: the key is free again.
    Freed,
    /// Every `finish` or `release` failed: the record stays as the server has it (running
    /// until its lease lapses, or already gone).
    Refused,
}

#[derive(Debug, Default)]
struct State {
    /// Acquisitions not yet settled, by key.
    held: HashMap<String, Vec<Acquisition>>,
    /// Every settlement's answer, by token (a success wins over a failed attempt).
    settled: HashMap<FencingToken, Settled>,
}

/// Notes every acquisition until its owner settles it.
#[derive(Debug, Default)]
pub struct Held(Mutex<State>);

impl Held {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn acquired(&self, key: &str, token: FencingToken, began: Instant) {
        let acquisition = Acquisition {
            token,
            began,
            ended: Instant::now(),
            claimed: false,
        };
        self.lock()
            .held
            .entry(key.to_owned())
            .or_default()
            .push(acquisition);
    }

    /// The owner is settling: from now on no step runs under this acquisition.
    fn settling(&self, key: &str, token: FencingToken) {
        let mut state = self.lock();
        if let Some(list) = state.held.get_mut(key) {
            list.retain(|a| a.token != token);
            if list.is_empty() {
                state.held.remove(key);
            }
        }
    }

    fn answered(&self, token: FencingToken, settled: Settled) {
        let mut state = self.lock();
        let entry = state.settled.entry(token).or_insert(settled);
        if settled != Settled::Refused {
            *entry = settled;
        }
    }

    /// The unclaimed acquisition of `key` an executing step belongs to.
    pub fn claim(&self, key: &str) -> Option<Acquisition> {
        let mut state = self.lock();
        let acquisition = state
            .held
            .get_mut(key)?
            .iter_mut()
            .rev()
            .find(|a| !a.claimed)?;
        acquisition.claimed = true;
        Some(*acquisition)
    }

    /// How the acquisition under `token` was settled; `None`: its owner never tried.
    pub fn settlement(&self, token: FencingToken) -> Option<Settled> {
        self.lock().settled.get(&token).copied()
    }
}

/// The Redis store behind an observer of its acquisitions; every call goes to Redis.
#[derive(Debug)]
pub struct ObservedStore {
    pub inner: RedisStore,
    pub held: std::sync::Arc<Held>,
}

#[async_trait]
impl IdempotencyStore for ObservedStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        let began = Instant::now();
        let outcome = self.inner.start(req).await;
        if let Ok(StartOutcome::Acquired(token)) = &outcome {
            self.held.acquired(req.key, *token, began);
        }
        outcome
    }

    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.held.settling(key, token);
        let outcome = self.inner.finish(key, token, status, result, ttl).await;
        let settled = if outcome.is_ok() {
            Settled::Kept
        } else {
            Settled::Refused
        };
        self.held.answered(token, settled);
        outcome
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
        self.held.settling(key, token);
        let outcome = self.inner.release(key, token).await;
        let settled = if outcome.is_ok() {
            Settled::Freed
        } else {
            Settled::Refused
        };
        self.held.answered(token, settled);
        outcome
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }

    async fn wait_for_change(&self, key: &str, wait: Wait) -> Result<(), StoreError> {
        self.inner.wait_for_change(key, wait).await
    }
}
