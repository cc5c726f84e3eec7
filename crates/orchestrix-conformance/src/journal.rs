//! The journal conformance suite: what every [`JournalStore`] must show (see the guarantees
//! in `orchestrix::store::JournalStore`'s module). A backend's test file calls
//! [`journal_conformance_tests!`](crate::journal_conformance_tests) with an expression
//! building its store, and [`oversize_append_is_refused_and_appends_nothing`] with a store
//! configured with a small journal limit.

use std::time::Duration;

use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, IdempotencyStore, Journal, JournalStore,
    RecordStatus, Redrive, StoreError,
};

use crate::{LONG, PAST_SHORT, SHORT, unique_key};

/// The store's journal, or a failed test: every store under this suite keeps journals.
fn journal(store: &(impl IdempotencyStore + ?Sized)) -> &dyn JournalStore {
    match store.journal_store() {
        Some(journal) => journal,
        None => panic!("the store under test does not keep journals"),
    }
}

/// A durable start of `key` with a long lease, kept for a long retention.
pub fn durable<'a>(
    key: &'a str,
    fingerprint: Option<&'a str>,
    input: &'a [u8],
) -> DurableStart<'a> {
    DurableStart {
        key,
        fingerprint,
        lease: LONG,
        rerun_failed: false,
        input,
        retain: Some(LONG),
    }
}

async fn acquire(
    store: &(impl IdempotencyStore + ?Sized),
    req: DurableStart<'_>,
) -> (FencingToken, Option<Journal>) {
    match journal(store).start_durable(req).await {
        Ok(DurableStartOutcome::Acquired { token, resumed }) => (token, resumed),
        other => panic!("expected to acquire {:?}, got {other:?}", req.key),
    }
}

async fn append(
    store: &(impl IdempotencyStore + ?Sized),
    key: &str,
    token: FencingToken,
    entry: &[u8],
) {
    let appended = journal(store).append(key, token, entry).await;
    assert!(appended.is_ok(), "the owner's append failed: {appended:?}");
}

async fn read(store: &(impl IdempotencyStore + ?Sized), key: &str) -> Option<Journal> {
    match journal(store).read_journal(key).await {
        Ok(journal) => journal,
        Err(e) => panic!("read_journal({key:?}) failed: {e}"),
    }
}

fn assert_stale<T: std::fmt::Debug>(what: &str, r: Result<T, StoreError>) {
    assert!(
        matches!(r, Err(StoreError::StaleToken)),
        "{what} must be StaleToken, got {r:?}"
    );
}

/// A short lease (it lapses within [`PAST_SHORT`]), kept long after.
fn short<'a>(key: &'a str, fingerprint: Option<&'a str>, input: &'a [u8]) -> DurableStart<'a> {
    DurableStart {
        lease: SHORT,
        ..durable(key, fingerprint, input)
    }
}

/// A free key is acquired with a fresh journal that holds the input; the record reads back
/// as running under the new token.
pub async fn durable_start_acquires_a_free_key_with_a_fresh_journal(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("durable-free");
    let (token, resumed) = acquire(store, durable(&key, Some("fp"), b"input-1")).await;
    assert_eq!(resumed, None);
    let journal = read(store, &key).await;
    assert_eq!(
        journal,
        Some(Journal {
            input: b"input-1".to_vec(),
            entries: vec![]
        })
    );
    let record = store.get(&key).await.ok().flatten();
    assert_eq!(
        record.map(|r| (r.status, r.token, r.fingerprint)),
        Some((RecordStatus::Running, token, Some("fp".to_owned())))
    );
}

/// Entries are kept in append order, byte for byte; the run that takes over an abandoned
/// record gets them, and the original input, in the same operation.
pub async fn an_abandoned_run_is_taken_over_with_its_journal(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("durable-resume");
    let (old, _) = acquire(store, short(&key, Some("fp"), b"first input")).await;
    let binary: Vec<u8> = (0..=255u8).collect();
    append(store, &key, old, b"step 0").await;
    append(store, &key, old, &binary).await;
    tokio::time::sleep(PAST_SHORT).await;
    let (new, resumed) = acquire(store, durable(&key, Some("fp"), b"ignored")).await;
    assert_ne!(new, old);
    assert_eq!(
        resumed,
        Some(Journal {
            input: b"first input".to_vec(),
            entries: vec![b"step 0".to_vec(), binary],
        })
    );
    let record = store.get(&key).await.ok().flatten();
    assert_eq!(record.map(|r| r.token), Some(new));
}

/// Once another owner took over, the stale owner's appends, renewals, finishes and
/// releases are refused, and the journal is what the new owner acts on.
pub async fn a_stale_owner_cannot_change_the_journal(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("durable-stale");
    let (old, _) = acquire(store, short(&key, None, b"in")).await;
    append(store, &key, old, b"a").await;
    tokio::time::sleep(PAST_SHORT).await;
    let (new, _) = acquire(store, durable(&key, None, b"in")).await;
    assert_stale(
        "a stale append",
        journal(store).append(&key, old, b"stale").await,
    );
    assert_stale("a stale renew", store.renew(&key, old, LONG).await);
    assert_stale(
        "a stale complete",
        store.complete(&key, old, b"x", None).await,
    );
    assert_stale("a stale suspend", journal(store).suspend(&key, old).await);
    assert_stale("a stale release", store.release(&key, old).await);
    append(store, &key, new, b"b").await;
    let entries = read(store, &key).await.map(|j| j.entries);
    assert_eq!(entries, Some(vec![b"a".to_vec(), b"b".to_vec()]));
}

/// An append after the owner's lease lapsed is refused even before anyone took over.
pub async fn an_append_after_the_lease_lapsed_is_refused(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("durable-lapsed");
    let (token, _) = acquire(store, short(&key, None, b"in")).await;
    tokio::time::sleep(PAST_SHORT).await;
    assert_stale(
        "an append past the lease",
        journal(store).append(&key, token, b"late").await,
    );
    assert_stale(
        "a finish past the lease",
        store.complete(&key, token, b"x", None).await,
    );
    assert_eq!(read(store, &key).await.map(|j| j.entries.len()), Some(0));
}

/// A renewed lease keeps a durable run owned; one renewed with a short lease still lapses.
pub async fn a_durable_lease_is_renewed_and_then_lapses(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("durable-renew");
    let (token, _) = acquire(store, short(&key, None, b"in")).await;
    for _ in 0..4 {
        tokio::time::sleep(SHORT / 3).await;
        let renewed = store.renew(&key, token, SHORT).await;
        assert!(renewed.is_ok(), "renew in time must succeed: {renewed:?}");
    }
    append(store, &key, token, b"still mine").await;
    tokio::time::sleep(PAST_SHORT).await;
    let (new, resumed) = acquire(store, durable(&key, None, b"in")).await;
    assert_ne!(new, token);
    assert_eq!(
        resumed.map(|j| j.entries),
        Some(vec![b"still mine".to_vec()])
    );
}

/// While the owner's lease is alive, a durable start reports the record.
pub async fn a_live_durable_run_is_reported_not_taken_over(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("durable-live");
    let (token, _) = acquire(store, durable(&key, Some("fp"), b"in")).await;
    match journal(store)
        .start_durable(durable(&key, Some("fp"), b"in"))
        .await
    {
        Ok(DurableStartOutcome::Existing(record)) => {
            assert_eq!(
                (record.status, record.token),
                (RecordStatus::Running, token)
            );
        }
        other => panic!("expected the running record, got {other:?}"),
    }
}

/// An abandoned run is taken over only by the same input: another fingerprint is shown the
/// record (the engine calls that a reused key) and the journal stays as it is.
pub async fn an_abandoned_run_with_another_fingerprint_is_not_taken_over(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("durable-fp");
    let (token, _) = acquire(store, short(&key, Some("fp-a"), b"a")).await;
    append(store, &key, token, b"done").await;
    tokio::time::sleep(PAST_SHORT).await;
    match journal(store)
        .start_durable(durable(&key, Some("fp-b"), b"b"))
        .await
    {
        Ok(DurableStartOutcome::Existing(record)) => {
            assert_eq!(record.fingerprint.as_deref(), Some("fp-a"));
        }
        other => panic!("expected the abandoned record, got {other:?}"),
    }
    let (_, resumed) = acquire(store, durable(&key, Some("fp-a"), b"a")).await;
    assert_eq!(resumed.map(|j| j.entries), Some(vec![b"done".to_vec()]));
}

/// Of many concurrent starts on an abandoned record, exactly one takes it over.
pub async fn concurrent_takeovers_resume_exactly_once(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("durable-storm");
    let (token, _) = acquire(store, short(&key, None, b"in")).await;
    append(store, &key, token, b"e").await;
    tokio::time::sleep(PAST_SHORT).await;
    let calls = (0..16).map(|_| journal(store).start_durable(durable(&key, None, b"in")));
    let outcomes = futures_util::future::join_all(calls).await;
    let mut resumed = 0;
    for outcome in outcomes {
        match outcome {
            Ok(DurableStartOutcome::Acquired {
                resumed: Some(j), ..
            }) => {
                assert_eq!(j.entries, vec![b"e".to_vec()]);
                resumed += 1;
            }
            Ok(DurableStartOutcome::Existing(r)) => assert_eq!(r.status, RecordStatus::Running),
            other => panic!("unexpected outcome under contention: {other:?}"),
        }
    }
    assert_eq!(resumed, 1, "exactly one caller must take the run over");
}

/// A finished durable record keeps its journal and blocks new starts like any record.
pub async fn finish_keeps_the_journal(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("durable-finish");
    let (token, _) = acquire(store, durable(&key, None, b"in")).await;
    append(store, &key, token, b"e").await;
    assert!(store.complete(&key, token, b"result", None).await.is_ok());
    assert_eq!(
        read(store, &key).await.map(|j| j.entries),
        Some(vec![b"e".to_vec()])
    );
    match journal(store)
        .start_durable(durable(&key, None, b"in"))
        .await
    {
        Ok(DurableStartOutcome::Existing(record)) => {
            assert_eq!(record.status, RecordStatus::Completed);
            assert_eq!(record.result.as_deref(), Some(&b"result"[..]));
        }
        other => panic!("expected the completed record, got {other:?}"),
    }
}

/// The journal goes with the record when its TTL lapses: the key starts afresh.
pub async fn the_journal_expires_with_the_records_ttl(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("durable-ttl");
    let (token, _) = acquire(store, durable(&key, None, b"old")).await;
    append(store, &key, token, b"e").await;
    assert!(store.complete(&key, token, b"r", Some(SHORT)).await.is_ok());
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(read(store, &key).await, None);
    let (_, resumed) = acquire(store, durable(&key, None, b"new")).await;
    assert_eq!(resumed, None);
    assert_eq!(
        read(store, &key).await.map(|j| j.input),
        Some(b"new".to_vec())
    );
}

/// An abandoned run is kept for its retention after the lease lapsed, then it is gone.
pub async fn an_abandoned_run_expires_after_its_retention(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("durable-retain");
    let req = DurableStart {
        retain: Some(SHORT),
        ..short(&key, None, b"old")
    };
    let (token, _) = acquire(store, req).await;
    append(store, &key, token, b"e").await;
    tokio::time::sleep(PAST_SHORT * 2).await;
    let (_, resumed) = acquire(store, durable(&key, None, b"new")).await;
    assert_eq!(
        resumed, None,
        "a run past its retention must not be resumed"
    );
}

/// `suspend` gives the run up at once, journal kept: the next start resumes it.
pub async fn suspend_lets_the_next_start_resume_at_once(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("durable-suspend");
    let (token, _) = acquire(store, durable(&key, None, b"in")).await;
    append(store, &key, token, b"e").await;
    assert!(journal(store).suspend(&key, token).await.is_ok());
    assert_stale(
        "an append after suspend",
        journal(store).append(&key, token, b"x").await,
    );
    let (new, resumed) = acquire(store, durable(&key, None, b"in")).await;
    assert_ne!(new, token);
    assert_eq!(resumed.map(|j| j.entries), Some(vec![b"e".to_vec()]));
}

/// `release` and `delete` remove the journal with the record.
pub async fn release_and_delete_remove_the_journal(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("durable-release");
    let (token, _) = acquire(store, durable(&key, None, b"in")).await;
    append(store, &key, token, b"e").await;
    assert!(store.release(&key, token).await.is_ok());
    assert_eq!(read(store, &key).await, None);
    let (token, resumed) = acquire(store, durable(&key, None, b"in")).await;
    assert_eq!(resumed, None);
    append(store, &key, token, b"e").await;
    assert!(store.delete(&key).await.is_ok());
    assert_eq!(read(store, &key).await, None);
    assert_eq!(store.get(&key).await.ok(), Some(None));
}

/// A failed durable run is redriven with its journal, under a new token; anything that is
/// not a failure is shown, and an absent key says so.
pub async fn redrive_reopens_a_failed_run_with_its_journal(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("durable-redrive");
    let (token, _) = acquire(store, durable(&key, Some("fp"), b"in")).await;
    append(store, &key, token, b"e").await;
    assert!(store.fail(&key, token, b"failure", None).await.is_ok());
    let redriven = journal(store).redrive(&key, LONG, Some(LONG)).await;
    let new = match redriven {
        Ok(Redrive::Acquired {
            token: new,
            journal,
        }) => {
            assert_eq!(journal.input, b"in".to_vec());
            assert_eq!(journal.entries, vec![b"e".to_vec()]);
            new
        }
        other => panic!("expected the failed run to be redriven, got {other:?}"),
    };
    assert_ne!(new, token);
    let record = store.get(&key).await.ok().flatten();
    assert_eq!(
        record.map(|r| (r.status, r.token, r.result)),
        Some((RecordStatus::Running, new, None))
    );
    assert!(matches!(
        journal(store).redrive(&key, LONG, None).await,
        Ok(Redrive::NotFailed(r)) if r.status == RecordStatus::Running
    ));
    append(store, &key, new, b"f").await;
    assert!(store.complete(&key, new, b"ok", None).await.is_ok());
    assert!(matches!(
        journal(store).redrive(&key, LONG, None).await,
        Ok(Redrive::NotFailed(r)) if r.status == RecordStatus::Completed
    ));
    let absent = unique_key("durable-redrive-absent");
    assert!(matches!(
        journal(store).redrive(&absent, LONG, None).await,
        Ok(Redrive::Absent)
    ));
}

/// Re-running a failure (`rerun_failed`) starts a fresh journal: it is a new run.
pub async fn rerunning_a_failed_durable_run_starts_a_fresh_journal(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("durable-rerun");
    let (token, _) = acquire(store, durable(&key, Some("fp"), b"old")).await;
    append(store, &key, token, b"e").await;
    assert!(store.fail(&key, token, b"failure", None).await.is_ok());
    let rerun = DurableStart {
        rerun_failed: true,
        ..durable(&key, Some("fp"), b"new")
    };
    let (_, resumed) = acquire(store, rerun).await;
    assert_eq!(resumed, None);
    assert_eq!(
        read(store, &key).await,
        Some(Journal {
            input: b"new".to_vec(),
            entries: vec![]
        })
    );
}

/// `abandoned` lists the lapsed running records under a prefix, in key order, paged; live,
/// finished and other prefixes' records are left out.
pub async fn abandoned_lists_lapsed_runs_by_prefix(store: &(impl IdempotencyStore + ?Sized)) {
    let prefix = unique_key("durable-abandoned");
    let key = |name: &str| format!("{prefix}:{name}");
    let (a, c, live, done) = (key("a"), key("c"), key("b-live"), key("d-done"));
    acquire(store, short(&a, None, b"in")).await;
    acquire(store, short(&c, None, b"in")).await;
    acquire(store, durable(&live, None, b"in")).await;
    let (token, _) = acquire(store, short(&done, None, b"in")).await;
    assert!(store.complete(&done, token, b"r", None).await.is_ok());
    let other = format!("{}-other:a", prefix);
    acquire(store, short(&other, None, b"in")).await;
    tokio::time::sleep(PAST_SHORT).await;
    let listed = journal(store)
        .abandoned(&format!("{prefix}:"), None, 10)
        .await;
    assert_eq!(listed.ok(), Some(vec![a.clone(), c.clone()]));
    let page = journal(store)
        .abandoned(&format!("{prefix}:"), Some(&a), 10)
        .await;
    assert_eq!(page.ok(), Some(vec![c]));
    let first = journal(store)
        .abandoned(&format!("{prefix}:"), None, 1)
        .await;
    assert_eq!(first.ok(), Some(vec![a]));
}

/// An entry that would make the journal larger than `limit` (the store's configured limit)
/// is `TooLarge` and appends nothing; the run can still append what fits.
pub async fn oversize_append_is_refused_and_appends_nothing(
    store: &(impl IdempotencyStore + ?Sized),
    limit: usize,
) {
    let key = unique_key("durable-oversize");
    let (token, _) = acquire(store, durable(&key, None, b"in")).await;
    append(store, &key, token, b"small").await;
    let huge = vec![b'x'; limit + 1];
    let refused = journal(store).append(&key, token, &huge).await;
    assert!(
        matches!(refused, Err(StoreError::TooLarge { .. })),
        "an oversize append must be TooLarge, got {refused:?}"
    );
    assert_eq!(
        read(store, &key).await.map(|j| j.entries),
        Some(vec![b"small".to_vec()])
    );
    append(store, &key, token, b"fits").await;
    assert!(store.complete(&key, token, b"r", None).await.is_ok());
}

/// How long [`journal_conformance_tests!`](crate::journal_conformance_tests) takes at most
/// per check: a regression is a named failure, not a hung test.
pub const CHECK_BOUND: Duration = Duration::from_secs(60);

/// Generates one `#[tokio::test]` per journal behaviour, each building its store with
/// `$make` (an expression evaluating to a future of the store).
#[macro_export]
macro_rules! journal_conformance_tests {
    ($make:expr) => {
        $crate::journal_conformance_tests!(@tests $make;
            durable_start_acquires_a_free_key_with_a_fresh_journal,
            an_abandoned_run_is_taken_over_with_its_journal,
            a_stale_owner_cannot_change_the_journal,
            an_append_after_the_lease_lapsed_is_refused,
            a_durable_lease_is_renewed_and_then_lapses,
            a_live_durable_run_is_reported_not_taken_over,
            an_abandoned_run_with_another_fingerprint_is_not_taken_over,
            concurrent_takeovers_resume_exactly_once,
            finish_keeps_the_journal,
            the_journal_expires_with_the_records_ttl,
            an_abandoned_run_expires_after_its_retention,
            suspend_lets_the_next_start_resume_at_once,
            release_and_delete_remove_the_journal,
            redrive_reopens_a_failed_run_with_its_journal,
            rerunning_a_failed_durable_run_starts_a_fresh_journal,
            abandoned_lists_lapsed_runs_by_prefix,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $make.await;
                let check = $crate::journal::$name(&store);
                if tokio::time::timeout($crate::journal::CHECK_BOUND, check).await.is_err() {
                    panic!("{} did not finish within {:?}", stringify!($name), $crate::journal::CHECK_BOUND);
                }
            }
        )*
    };
}
