//! The journal writer of one durable run: what the engine calls as steps start, complete,
//! fail and are compensated.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::entry::{Entry, Resume};
use crate::idempotency::Ownership;
use crate::result::FlowError;
use crate::store::{JournalStore, StoreError};
use crate::telemetry;

/// How many times an entry is attempted while the store fails, before the run stops.
const WRITE_ATTEMPTS: u32 = 3;

/// One owned durable run's journal: where entries go, and what the journal already held.
pub(crate) struct Journaling<'a> {
    pub(crate) store: &'a dyn JournalStore,
    pub(crate) owner: &'a Ownership,
    /// The run's own token: fired when an append learns that ownership was lost.
    pub(crate) cancel: &'a CancellationToken,
    /// What earlier runs of the key did (empty for a fresh run).
    pub(crate) resume: Resume,
}

impl Journaling<'_> {
    /// Appends `entry` for `step`, retrying a failing store briefly. A refused append
    /// because another owner has the key cancels the run (it must stop: its work is no
    /// longer its own); any other failure stops it with a [`FlowError::JournalWrite`].
    pub(crate) async fn write(&self, step: &str, entry: &Entry) -> Result<(), FlowError> {
        let bytes = entry.encode();
        let mut attempt = 1;
        loop {
            let key = self.owner.key();
            let append = self.store.append(key, self.owner.token(), &bytes);
            match telemetry::observe(self.owner.store(), "append", append).await {
                Ok(()) => return Ok(()),
                Err(StoreError::StaleToken) => {
                    tracing::warn!(
                        key,
                        step,
                        "journal append refused: another owner has the key; stopping the run"
                    );
                    self.owner.lose(self.cancel);
                    return Err(FlowError::Cancelled);
                }
                Err(StoreError::Backend(e)) if attempt < WRITE_ATTEMPTS => {
                    tracing::warn!(key, step, error = %e, attempt, "journal append failed; retrying");
                    tokio::time::sleep(Duration::from_millis(25) * 4u32.pow(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(FlowError::JournalWrite {
                        step: step.to_owned(),
                        message: e.to_string(),
                    });
                }
            }
        }
    }

    /// Appends `entry` where losing it changes nothing but the record of it (a failure or
    /// a compensation being noted): an error is logged, and the run goes on.
    pub(crate) async fn note(&self, step: &str, entry: &Entry) {
        if let Err(e) = self.write(step, entry).await {
            tracing::warn!(key = %self.owner.key(), step, error = %e, "journal note not written");
        }
    }

    /// Whether the run lost its ownership, or cannot be sure it still has it (its lease
    /// lapsed by its own clock): then it must not compensate, since the run's next owner
    /// resumes from the journal and counts the journaled steps as done.
    pub(crate) fn lost(&self) -> bool {
        self.owner.lease_lost() || self.owner.lapsed()
    }

    /// Stops the run before it starts another step if its lease lapsed by its own clock:
    /// a run frozen past its lease (a paused VM, a stalled process) finds, when it goes
    /// on, that another owner may have resumed the key and run that very step. Its next
    /// fenced write would be refused, but only after the step's effect.
    pub(crate) fn stop_if_lapsed(&self, step: &str) -> Result<(), FlowError> {
        if !self.owner.lapsed() {
            return Ok(());
        }
        tracing::warn!(
            key = %self.owner.key(),
            step,
            "the lease lapsed before this step could start (the run was stalled); stopping the run"
        );
        self.owner.lose(self.cancel);
        Err(FlowError::Cancelled)
    }
}
