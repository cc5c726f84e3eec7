//! A durable flow's keyed run: validate → acquire (taking over an abandoned run with its
//! journal) → restore → execute, journaling every step → persist → notify; and the ways
//! in without a fresh caller: [`resume`](Flow::resume), [`recover`](Flow::recover),
//! [`redrive`](Flow::redrive).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::Durability;
use super::entry::{JournalError, Resume, Settings, decode_input, encode_input};
use super::journaling::Journaling;
use crate::context::RunIdentity;
use crate::execute::Track;
use crate::flow::Flow;
use crate::idempotency::{
    AdmitRequest, Decided, IdempotencyError, KeyError, Ownership, RunOptions, Settlement,
    admit_durable,
};
use crate::result::FlowResult;
use crate::run::{IfDropped, RunError, Unsettled};
use crate::step::panic_message;
use crate::store::{Journal, JournalStore, Redrive};

/// How many abandoned runs [`Flow::recover`] asks the store for at a time.
const RECOVERY_PAGE: usize = 100;

/// One abandoned run that [`Flow::recover`] resumed, and how it ended.
#[derive(Debug)]
pub struct Recovered<O> {
    /// The run's key, as given to [`RunOptions::key`] (not scoped).
    pub key: String,
    /// The resumed run's result, as [`Flow::run`] returns it.
    pub outcome: Result<FlowResult<O>, RunError<O>>,
}

impl<I, O> Flow<I, O>
where
    I: Serialize + Send + Sync + 'static,
    O: Serialize + DeserializeOwned + Send + 'static,
{
    /// Stages 2 to 5 of a durable flow's keyed run (validation is done).
    pub(crate) async fn run_durable(
        &self,
        key: &str,
        input: I,
        options: &RunOptions,
        waited: &mut bool,
    ) -> Result<FlowResult<O>, RunError<O>> {
        let (durability, journal) = self.durable_parts()?;
        let journaled = journal_input(durability, &input, options)?;
        let fingerprint = self.fingerprint(&input)?;
        let request = AdmitRequest {
            key,
            fingerprint: fingerprint.as_ref().map(|f| f.as_str()),
            lease: options.lease,
            cache_result: options.cache_result,
            on_running: options.on_running,
        };
        let decided = admit_durable(
            &self.inner.store,
            journal,
            request,
            &journaled,
            options.ttl,
            |record| self.replay(record),
        )
        .await?;
        match decided {
            Decided::Acquired((owner, resumed)) => {
                self.own_durable(owner, Some(input), resumed, false, options)
                    .await
            }
            Decided::Finished(replay) => Ok(replay?),
            Decided::Waited(replay) => {
                *waited = true;
                Ok(replay?)
            }
            Decided::Running => Ok(self.running()),
        }
    }

    /// Runs the steps under an acquired durable key, from where `resumed` says an earlier
    /// run stopped (a redrive runs the failed step again), then stores the outcome.
    async fn own_durable(
        &self,
        owner: Ownership,
        input: Option<I>,
        resumed: Option<Journal>,
        redrive: bool,
        options: &RunOptions,
    ) -> Result<FlowResult<O>, RunError<O>> {
        let (durability, journal) = self.durable_parts()?;
        // Stage: restore.
        let restored = match (resumed, input) {
            (Some(journal), _) => self.restore(durability, owner.key(), &journal, redrive),
            (None, Some(input)) => Ok((input, self.fresh_plan())),
            (None, None) => Err(IdempotencyError::NoDurableRun {
                key: owner.key().to_owned(),
            }),
        };
        let (input, mut resume) = match restored {
            Ok(restored) => restored,
            Err(e) => {
                // This build cannot resume the run: give it back, journal kept, for one
                // that can.
                if let Err(given_back) = owner.settle(Settlement::Suspend, &[], None).await {
                    tracing::warn!(error = %given_back, "could not give back a durable run this build cannot resume");
                }
                return Err(e.into());
            }
        };
        let cancel = options.cancel_token();
        let run = RunIdentity::Key(Arc::from(owner.key()));
        let state = std::mem::take(&mut resume.state);
        let owner = Unsettled::new(owner, IfDropped::Suspend);
        let journaling = Journaling {
            store: journal,
            owner: owner.owner(),
            cancel: &cancel,
            resume,
        };
        let ctx = self.context(input, run, cancel.clone());
        ctx.restore(state);
        // Stage: execute, journaling each step.
        let execute = Box::pin(self.inner.plan.execute(ctx, Track::Journal(&journaling)));
        let result = owner.owner().hold(&cancel, execute).await;
        drop(journaling);
        // Stages: persist, notify.
        let persisted = self.persist(owner, &result, options).await;
        self.conclude(result, persisted)
    }

    /// The input and resume plan of an interrupted run, from its journal.
    fn restore(
        &self,
        durability: &Durability<I>,
        key: &str,
        journal: &Journal,
        redrive: bool,
    ) -> Result<(I, Resume), IdempotencyError> {
        let unreadable = |message: String| IdempotencyError::JournalUnreadable {
            key: key.to_owned(),
            message,
        };
        let (settings, json) =
            decode_input(&journal.input).map_err(|e| unreadable(e.to_string()))?;
        if settings.version != durability.version {
            return Err(IdempotencyError::JournalVersion {
                key: key.to_owned(),
                found: settings.version,
                expected: durability.version.clone(),
            });
        }
        let input = decode(durability, json).map_err(|e| unreadable(e.to_string()))?;
        let names = &self.inner.plan.step_names;
        let resume = Resume::plan(&journal.entries, names, redrive).map_err(|e| match e {
            JournalError::Mismatch {
                position,
                expected,
                found,
            } => IdempotencyError::JournalMismatch {
                key: key.to_owned(),
                position,
                expected,
                found,
            },
            other => unreadable(other.to_string()),
        })?;
        Ok((input, resume))
    }

    /// The plan of a run with nothing to resume.
    fn fresh_plan(&self) -> Resume {
        Resume::plan(&[], &self.inner.plan.step_names, false).unwrap_or_default()
    }

    /// Resumes the durable run under `options`' key, if its owner is gone: the journaled
    /// input is read back, and the run goes on from its first unfinished step under
    /// `options` (lease, TTL, what to do if it is still running). A run still owned is
    /// reported as for [`run`](Self::run) (`Running`, an error, or a wait, as `options`
    /// say); a finished one is replayed.
    ///
    /// # Errors
    /// [`IdempotencyError::NotDurable`] for a flow that is not durable,
    /// [`IdempotencyError::NoDurableRun`] when the key holds no journal, and what
    /// [`run`](Self::run) returns.
    pub async fn resume(&self, options: RunOptions) -> Result<FlowResult<O>, RunError<O>> {
        options.validate()?;
        let (durability, journal) = self.durable_parts()?;
        let key = self.key_of(&options)?;
        let Some(stored) = journal
            .read_journal(&key)
            .await
            .map_err(IdempotencyError::from)?
        else {
            return Err(IdempotencyError::NoDurableRun { key }.into());
        };
        let (_, json) = decode_input(&stored.input).map_err(|e| unreadable(&key, &e))?;
        let input = decode(durability, json).map_err(|e| unreadable(&key, &e))?;
        self.run(input, options).await
    }

    /// Resumes every durable run of this flow whose owner is gone (its lease lapsed), with
    /// the input and settings (TTL, lease, `cache_result`) its journal holds, so an order
    /// started by a crashed process finishes even if its client never retries. Callers
    /// waiting on such a key ([`OnRunning::Wait`](crate::OnRunning::Wait)) receive the
    /// recovered result. Runs are found through the store's index of lease deadlines
    /// ([`JournalStore::abandoned`]), a page at a time, and resumed one after another;
    /// only keys scoped by this flow are found (not [`KeyScope::Global`](crate::KeyScope)).
    ///
    /// # Errors
    /// [`IdempotencyError::NotDurable`] for a flow that is not durable, or the store's
    /// error when it cannot list the abandoned runs. Each run's own outcome (resumed,
    /// already taken by another recoverer, failed) is in its [`Recovered`].
    pub async fn recover(&self) -> Result<Vec<Recovered<O>>, IdempotencyError> {
        let (_, journal) = self.durable_parts()?;
        let prefix = &*self.inner.key_prefix;
        let mut recovered = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = journal
                .abandoned(prefix, after.as_deref(), RECOVERY_PAGE)
                .await?;
            for scoped in &page {
                let Some(key) = scoped.strip_prefix(prefix) else {
                    continue;
                };
                let outcome = self.recover_one(journal, scoped, key).await;
                recovered.push(Recovered {
                    key: key.to_owned(),
                    outcome,
                });
            }
            if page.len() < RECOVERY_PAGE {
                return Ok(recovered);
            }
            after = page.last().cloned();
        }
    }

    /// [`recover`](Self::recover) every `every`, until `shutdown` fires: a recovery worker
    /// to spawn beside a service. Errors are logged (`tracing`) and the next round tries
    /// again.
    pub async fn recover_every(&self, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.recover().await {
                Ok(recovered) => {
                    for run in recovered.iter().filter(|r| r.outcome.is_err()) {
                        if let Err(e) = &run.outcome {
                            tracing::warn!(flow = %self.inner.plan.name, key = %run.key, error = %e, "recovering a durable run failed");
                        }
                    }
                    if !recovered.is_empty() {
                        tracing::info!(flow = %self.inner.plan.name, runs = recovered.len(), "recovered abandoned durable runs");
                    }
                }
                Err(e) => {
                    tracing::warn!(flow = %self.inner.plan.name, error = %e, "listing abandoned durable runs failed");
                }
            }
        }
    }

    /// Resumes one abandoned run with the settings its journal holds.
    async fn recover_one(
        &self,
        journal: &dyn JournalStore,
        scoped: &str,
        key: &str,
    ) -> Result<FlowResult<O>, RunError<O>> {
        let stored = journal
            .read_journal(scoped)
            .await
            .map_err(IdempotencyError::from)?;
        let Some(stored) = stored else {
            return Err(IdempotencyError::NoDurableRun {
                key: scoped.to_owned(),
            }
            .into());
        };
        let (settings, _) = decode_input(&stored.input).map_err(|e| unreadable(scoped, &e))?;
        let mut options = RunOptions::key(key)
            .lease(settings.lease)
            .cache_result(settings.cache_result);
        if let Some(ttl) = settings.ttl {
            options = options.ttl(ttl);
        }
        self.resume(options).await
    }

    /// Re-opens the **failed** durable run under `options`' key at its failed step, with
    /// the state its journal holds (AWS Step Functions' redrive): steps that completed and
    /// were not compensated are not run again; the failed step is, and what follows it.
    /// Steps whose compensation ran when the run failed were undone, so they run again too.
    /// Fenced like any acquire: of concurrent redrives, one runs.
    ///
    /// # Errors
    /// [`IdempotencyError::NotDurable`] for a flow that is not durable,
    /// [`IdempotencyError::NoDurableRun`] when the key holds no record,
    /// [`IdempotencyError::NotFailed`] when its run did not fail, and what
    /// [`run`](Self::run) returns once it runs.
    pub async fn redrive(&self, options: RunOptions) -> Result<FlowResult<O>, RunError<O>> {
        options.validate()?;
        let (_, journal) = self.durable_parts()?;
        let key = self.key_of(&options)?;
        let sent = tokio::time::Instant::now();
        match journal
            .redrive(&key, options.lease, options.ttl)
            .await
            .map_err(IdempotencyError::from)?
        {
            Redrive::Acquired { token, journal } => {
                let owner = Ownership::new(&self.inner.store, &key, token, options.lease)
                    .keep_deadline(sent);
                self.own_durable(owner, None, Some(journal), true, &options)
                    .await
            }
            Redrive::NotFailed(record) => Err(IdempotencyError::NotFailed {
                key,
                status: record.status,
            }
            .into()),
            Redrive::Absent => Err(IdempotencyError::NoDurableRun { key }.into()),
        }
    }

    /// The flow's durability and its store's journal; errors for a flow that is not
    /// durable (a durable flow is only built on a store that keeps journals).
    fn durable_parts(&self) -> Result<(&Durability<I>, &dyn JournalStore), IdempotencyError> {
        let not_durable = || IdempotencyError::NotDurable {
            flow: self.inner.plan.name.to_string(),
        };
        let durability = self.inner.durable.as_ref().ok_or_else(not_durable)?;
        let journal = self.inner.store.journal_store().ok_or_else(not_durable)?;
        Ok((durability, journal))
    }

    /// The scoped key of `options`, which must have one.
    fn key_of(&self, options: &RunOptions) -> Result<String, IdempotencyError> {
        options
            .scoped_key(&self.inner.key_prefix)
            .ok_or(IdempotencyError::InvalidKey(KeyError::Empty))
    }
}

fn unreadable(key: &str, e: &dyn std::fmt::Display) -> IdempotencyError {
    IdempotencyError::JournalUnreadable {
        key: key.to_owned(),
        message: e.to_string(),
    }
}

/// The input as a journal holds it: the run's settings and its JSON, checked to read back
/// as an `I` (a resumed run must be able to), the user's serde panics caught.
fn journal_input<I: Serialize>(
    durability: &Durability<I>,
    input: &I,
    options: &RunOptions,
) -> Result<Vec<u8>, IdempotencyError> {
    let json = catch_unwind(AssertUnwindSafe(|| serde_json::to_vec(input)))
        .unwrap_or_else(|payload| Err(panicked("serializing the input", &*payload)))
        .map_err(IdempotencyError::InputNotJournaled)?;
    decode(durability, &json).map_err(IdempotencyError::InputNotJournaled)?;
    let settings = Settings {
        version: durability.version.clone(),
        ttl: options.ttl,
        lease: options.lease,
        cache_result: options.cache_result,
    };
    Ok(encode_input(&settings, &json))
}

/// The input from its journaled JSON, the user's `Deserialize` panics caught.
fn decode<I>(durability: &Durability<I>, json: &[u8]) -> Result<I, serde_json::Error> {
    catch_unwind(AssertUnwindSafe(|| (durability.decode)(json)))
        .unwrap_or_else(|payload| Err(panicked("decoding the input", &*payload)))
}

fn panicked(what: &str, payload: &(dyn std::any::Any + Send)) -> serde_json::Error {
    serde::de::Error::custom(format_args!("{what} panicked: {}", panic_message(payload)))
}
