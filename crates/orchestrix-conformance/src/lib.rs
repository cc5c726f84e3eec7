//! The store conformance suite: the behaviour every [`IdempotencyStore`] must show.
//!
//! Each check is a generic async function over any store; each picks fresh random keys,
//! so many checks can share one store (and one server) and run in parallel. A backend's
//! test file calls [`store_conformance_tests!`] with an expression that builds a store,
//! which generates one `#[tokio::test]` per behaviour:
//!
//! ```ignore
//! orchestrix_conformance::store_conformance_tests!(async { my_store().await });
//! ```
//!
//! The backend crate needs `tokio` (features `macros`, `rt-multi-thread`) as a
//! dev-dependency. Lease and TTL expiry use short real durations ([`SHORT`]) so they work
//! against servers whose clocks we do not control; the whole suite takes a few seconds.
//!
//! Checks that need backend-specific access (writing garbage under a key) take a closure:
//! [`undecodable_record_is_a_typed_error`].
//!
//! The multi-process duplicate storm, which re-runs the test binary as child processes,
//! lives in [`storm`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod journal;
pub mod storm;

use std::future::Future;
use std::time::Duration;

use orchestrix::store::{
    FencingToken, IdempotencyStore, Record, RecordStatus, StartOutcome, StartRequest, StartSeen,
    StoreError, Wait,
};

/// A lease or TTL short enough to watch expire in a test.
pub const SHORT: Duration = Duration::from_millis(300);
/// Long enough for [`SHORT`] to have lapsed on any backend's clock.
pub const PAST_SHORT: Duration = Duration::from_millis(800);
/// A lease that does not lapse during a check.
pub const LONG: Duration = Duration::from_secs(30);

/// A fresh key, unique across processes and runs.
pub fn unique_key(what: &str) -> String {
    format!("conformance:{what}:{:016x}", fastrand::u64(..))
}

/// A request for `key` with a long lease, fingerprint `fp`, not re-running failures.
pub fn request<'a>(key: &'a str, fingerprint: Option<&'a str>) -> StartRequest<'a> {
    StartRequest {
        key,
        fingerprint,
        lease: LONG,
        rerun_failed: false,
    }
}

/// How long a check that bounds its waits may take: a store that hangs fails the check by
/// name instead of stalling the run.
const CHECK_BOUND: Duration = Duration::from_secs(60);

async fn bounded<T>(check: &str, work: impl Future<Output = T>) -> T {
    tokio::time::timeout(CHECK_BOUND, work)
        .await
        .unwrap_or_else(|_| panic!("{check} did not finish within {CHECK_BOUND:?}"))
}

async fn acquire(store: &(impl IdempotencyStore + ?Sized), req: StartRequest<'_>) -> FencingToken {
    match store.start(req).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("expected to acquire {:?}, got {other:?}", req.key),
    }
}

async fn existing(store: &(impl IdempotencyStore + ?Sized), req: StartRequest<'_>) -> Record {
    match store.start(req).await {
        Ok(StartOutcome::Existing(record)) => record,
        other => panic!(
            "expected an existing record under {:?}, got {other:?}",
            req.key
        ),
    }
}

fn assert_stale<T: std::fmt::Debug>(what: &str, r: Result<T, StoreError>) {
    assert!(
        matches!(r, Err(StoreError::StaleToken)),
        "{what} with a stale token must be StaleToken, got {r:?}"
    );
}

/// `get` of a key never written is `None`.
pub async fn get_of_absent_key_is_none(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("absent");
    assert_eq!(store.get(&key).await.ok(), Some(None));
}

/// `start` on a free key acquires it; the record reads back as running with the
/// acquiring token and fingerprint.
pub async fn start_acquires_a_free_key(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("free");
    let token = acquire(store, request(&key, Some("fp-1"))).await;
    let record = store.get(&key).await.ok().flatten();
    let record = record.unwrap_or_else(|| panic!("record under {key:?} must exist"));
    assert_eq!(record.key, key);
    assert_eq!(record.status, RecordStatus::Running);
    assert_eq!(record.token, token);
    assert_eq!(record.fingerprint.as_deref(), Some("fp-1"));
    assert_eq!(record.result, None);
}

/// A second `start` while the lease is alive reports the running record and does not
/// change its owner.
pub async fn start_on_running_key_reports_the_owner(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("running");
    let token = acquire(store, request(&key, Some("fp"))).await;
    let record = existing(store, request(&key, Some("fp"))).await;
    assert_eq!(record.status, RecordStatus::Running);
    assert_eq!(record.token, token);
    // A different fingerprint is reported, not acquired: the engine decides what it means.
    let record = existing(store, request(&key, Some("other"))).await;
    assert_eq!(record.fingerprint.as_deref(), Some("fp"));
}

/// Of 64 concurrent `start` calls on one free key, exactly one acquires.
pub async fn concurrent_starts_acquire_exactly_once(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("storm");
    let calls = (0..64).map(|_| store.start(request(&key, Some("fp"))));
    let outcomes = futures_util::future::join_all(calls).await;
    let mut acquired = 0;
    for outcome in outcomes {
        match outcome {
            Ok(StartOutcome::Acquired(_)) => acquired += 1,
            Ok(StartOutcome::Existing(r)) => assert_eq!(r.status, RecordStatus::Running),
            Err(e) => panic!("start failed under contention: {e}"),
        }
    }
    assert_eq!(
        acquired, 1,
        "exactly one of 64 concurrent starts must acquire"
    );
}

/// Every acquire of a key hands out a different token, even after the key was freed.
pub async fn every_acquire_issues_a_fresh_token(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("tokens");
    let first = acquire(store, request(&key, None)).await;
    store.release(&key, first).await.ok();
    let second = acquire(store, request(&key, None)).await;
    assert_ne!(first, second);
}

/// `complete` stores the result; `get` and `start` both return it, byte for byte.
pub async fn complete_stores_the_result(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("complete");
    let token = acquire(store, request(&key, Some("fp"))).await;
    let result = br#"{"status":"completed","output":42}"#;
    store.complete(&key, token, result, None).await.ok();
    let record = existing(store, request(&key, Some("fp"))).await;
    assert_eq!(record.status, RecordStatus::Completed);
    assert_eq!(record.result.as_deref(), Some(&result[..]));
    let got = store.get(&key).await.ok().flatten();
    assert_eq!(got.map(|r| r.result), Some(Some(result.to_vec())));
}

/// `start_seen` decides as `start` does: a free key is acquired without calling the
/// visitor; a held key is shown to it exactly once, as the record `start` returns.
pub async fn start_seen_shows_what_start_returns(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("seen");
    let mut shown = Vec::new();
    let acquired = store
        .start_seen(request(&key, Some("fp")), &mut |r| {
            shown.push(r.to_record())
        })
        .await;
    let token = match acquired {
        Ok(StartSeen::Acquired(token)) => token,
        other => panic!("a free key was not acquired: {other:?}"),
    };
    assert!(
        shown.is_empty(),
        "an acquisition showed a record: {shown:?}"
    );
    let result = [0u8, 1, 2, 255];
    assert!(store.complete(&key, token, &result, None).await.is_ok());
    let seen = store
        .start_seen(request(&key, Some("fp")), &mut |r| {
            shown.push(r.to_record())
        })
        .await;
    assert!(matches!(seen, Ok(StartSeen::Existing)), "{seen:?}");
    let returned = existing(store, request(&key, Some("fp"))).await;
    assert_eq!(shown, vec![returned]);
    assert_eq!(shown[0].result.as_deref(), Some(&result[..]));
    assert_eq!(shown[0].token, token);
}

/// Results are opaque bytes: every byte value, NUL included, round-trips.
pub async fn binary_results_round_trip(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("binary");
    let token = acquire(store, request(&key, None)).await;
    let result: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let stored = store.complete(&key, token, &result, None).await;
    assert!(stored.is_ok(), "complete failed: {stored:?}");
    let got = store.get(&key).await.ok().flatten();
    assert_eq!(got.and_then(|r| r.result), Some(result));
}

/// `fail` stores the failure; by default a failed record is reported, not re-run.
pub async fn failed_record_is_kept(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("fail");
    let token = acquire(store, request(&key, Some("fp"))).await;
    store.fail(&key, token, b"boom", None).await.ok();
    let record = existing(store, request(&key, Some("fp"))).await;
    assert_eq!(record.status, RecordStatus::Failed);
    assert_eq!(record.result.as_deref(), Some(&b"boom"[..]));
}

/// With `rerun_failed`, a failed record with an agreeing fingerprint is taken over; a
/// disagreeing fingerprint is reported instead.
pub async fn failed_record_is_rerun_only_when_asked_and_fingerprint_agrees(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("rerun");
    let token = acquire(store, request(&key, Some("fp"))).await;
    store.fail(&key, token, b"boom", None).await.ok();
    let rerun = |fp| StartRequest {
        rerun_failed: true,
        ..request(&key, fp)
    };
    let record = existing(store, rerun(Some("different"))).await;
    assert_eq!(record.status, RecordStatus::Failed);
    let new_token = acquire(store, rerun(Some("fp"))).await;
    assert_ne!(new_token, token);
    // A completed record is never re-run.
    store.complete(&key, new_token, b"ok", None).await.ok();
    let record = existing(store, rerun(Some("fp"))).await;
    assert_eq!(record.status, RecordStatus::Completed);
}

/// A token that does not own the record can neither complete, fail, renew nor release it.
pub async fn stale_token_is_rejected_by_every_write(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("fenced");
    let owner = acquire(store, request(&key, None)).await;
    let stale = FencingToken::generate();
    assert_stale("complete", store.complete(&key, stale, b"x", None).await);
    assert_stale("fail", store.fail(&key, stale, b"x", None).await);
    assert_stale("renew", store.renew(&key, stale, LONG).await);
    assert_stale("release", store.release(&key, stale).await);
    let record = store.get(&key).await.ok().flatten();
    assert_eq!(
        record.map(|r| (r.status, r.token)),
        Some((RecordStatus::Running, owner))
    );
}

/// Writes on a key that holds no record are stale too: nothing is created by them.
pub async fn writes_on_absent_key_are_stale(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("nothing");
    let token = FencingToken::generate();
    assert_stale("complete", store.complete(&key, token, b"x", None).await);
    assert_stale("renew", store.renew(&key, token, LONG).await);
    assert_eq!(store.get(&key).await.ok(), Some(None));
}

/// Once finished, the owner's token cannot write again: a record completes once.
pub async fn finished_record_cannot_be_written_again(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("once");
    let token = acquire(store, request(&key, None)).await;
    assert!(store.complete(&key, token, b"first", None).await.is_ok());
    assert_stale(
        "second complete",
        store.complete(&key, token, b"second", None).await,
    );
    assert_stale(
        "fail after complete",
        store.fail(&key, token, b"x", None).await,
    );
    assert_stale("renew after complete", store.renew(&key, token, LONG).await);
    let got = store.get(&key).await.ok().flatten();
    assert_eq!(got.and_then(|r| r.result), Some(b"first".to_vec()));
}

/// `release` by the owner frees the key for the next caller.
pub async fn release_frees_the_key(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("release");
    let token = acquire(store, request(&key, None)).await;
    assert!(store.release(&key, token).await.is_ok());
    assert_eq!(store.get(&key).await.ok(), Some(None));
    acquire(store, request(&key, None)).await;
}

/// `delete` removes whatever record is there, owned or not.
pub async fn delete_removes_any_record(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("delete");
    let token = acquire(store, request(&key, None)).await;
    store.complete(&key, token, b"done", None).await.ok();
    assert!(store.delete(&key).await.is_ok());
    assert_eq!(store.get(&key).await.ok(), Some(None));
    assert!(
        store.delete(&key).await.is_ok(),
        "deleting an absent key is fine"
    );
}

/// After the lease lapses without renewal, another caller takes the key over with a new
/// token, and the old owner's writes are rejected.
pub async fn expired_lease_is_taken_over_and_old_owner_fenced(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("takeover");
    let short = StartRequest {
        lease: SHORT,
        ..request(&key, Some("fp"))
    };
    let old = acquire(store, short).await;
    tokio::time::sleep(PAST_SHORT).await;
    let new = acquire(store, request(&key, Some("fp"))).await;
    assert_ne!(old, new);
    assert_stale(
        "old owner's complete",
        store.complete(&key, old, b"late", None).await,
    );
    assert_stale("old owner's renew", store.renew(&key, old, LONG).await);
    assert_stale("old owner's release", store.release(&key, old).await);
    assert!(store.complete(&key, new, b"fresh", None).await.is_ok());
    let got = store.get(&key).await.ok().flatten();
    assert_eq!(got.and_then(|r| r.result), Some(b"fresh".to_vec()));
}

/// A lease renewed in time keeps the key owned past its original length.
pub async fn renewed_lease_stays_owned(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("renew");
    let short = StartRequest {
        lease: SHORT,
        ..request(&key, None)
    };
    let token = acquire(store, short).await;
    for _ in 0..6 {
        tokio::time::sleep(SHORT / 3).await;
        let renewed = store.renew(&key, token, SHORT).await;
        assert!(renewed.is_ok(), "renew in time must succeed: {renewed:?}");
    }
    let record = existing(store, request(&key, None)).await;
    assert_eq!(record.token, token);
}

/// A renewed lease ends too: renewed with a short lease and then left alone, the key is
/// taken over once that lease has lapsed, and the old owner is fenced. (A renew that wrote
/// a far longer lease than asked — a unit slip such as seconds for milliseconds — would
/// keep a crashed owner's key locked for hours after its last heartbeat.)
pub async fn renewed_lease_lapses_after_its_renewed_length(
    store: &(impl IdempotencyStore + ?Sized),
) {
    bounded("renewed_lease_lapses_after_its_renewed_length", async {
        let key = unique_key("renew-lapses");
        let short = StartRequest {
            lease: SHORT,
            ..request(&key, None)
        };
        let old = acquire(store, short).await;
        let renewed = store.renew(&key, old, SHORT).await;
        assert!(
            renewed.is_ok(),
            "renew by the owner must succeed: {renewed:?}"
        );
        tokio::time::sleep(PAST_SHORT).await;
        let new = acquire(store, request(&key, None)).await;
        assert_ne!(old, new);
        assert_stale("the old owner's renew", store.renew(&key, old, SHORT).await);
        let record = store.get(&key).await.ok().flatten();
        assert_eq!(record.map(|r| r.token), Some(new));
    })
    .await;
}

/// A finished record is gone once its TTL lapses; the key is free again.
pub async fn finished_record_expires_after_ttl(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("ttl");
    let token = acquire(store, request(&key, None)).await;
    store.complete(&key, token, b"done", Some(SHORT)).await.ok();
    assert!(store.get(&key).await.ok().flatten().is_some());
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.get(&key).await.ok(), Some(None));
    acquire(store, request(&key, None)).await;
}

/// Without a TTL a finished record stays (well past any short lease).
pub async fn finished_record_without_ttl_is_kept(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("keep");
    let short = StartRequest {
        lease: SHORT,
        ..request(&key, None)
    };
    let token = acquire(store, short).await;
    store.complete(&key, token, b"done", None).await.ok();
    tokio::time::sleep(PAST_SHORT).await;
    let record = existing(store, request(&key, None)).await;
    assert_eq!(record.status, RecordStatus::Completed);
}

/// Keys of the largest size the engine accepts, with any non-control Unicode, work.
pub async fn long_unicode_keys_work(store: &(impl IdempotencyStore + ?Sized)) {
    let mut key = unique_key("ключ-鍵-🔑");
    while key.len() < 1100 {
        key.push_str("é-€-𝄞 ");
    }
    let token = acquire(store, request(&key, Some("fp"))).await;
    assert!(store.complete(&key, token, b"ok", None).await.is_ok());
    let record = existing(store, request(&key, Some("fp"))).await;
    assert_eq!(record.key, key);
    assert_eq!(record.status, RecordStatus::Completed);
}

/// Keys that differ only in a suffix or by a separator are distinct records.
pub async fn similar_keys_are_distinct(store: &(impl IdempotencyStore + ?Sized)) {
    let base = unique_key("similar");
    let a = format!("{base}:a");
    let b = format!("{base}:a:");
    let ta = acquire(store, request(&a, None)).await;
    let tb = acquire(store, request(&b, None)).await;
    assert_ne!(ta, tb);
}

/// `wait_for_change` returns once the running record finishes (and never errs).
pub async fn wait_for_change_returns_after_finish(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("wait");
    let token = acquire(store, request(&key, None)).await;
    let waiter = store.wait_for_change(&key, Wait::new(Duration::from_secs(5)));
    let finisher = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        store.complete(&key, token, b"done", None).await
    };
    let (waited, finished) = tokio::join!(waiter, finisher);
    assert!(waited.is_ok() && finished.is_ok());
    let record = existing(store, request(&key, None)).await;
    assert_eq!(record.status, RecordStatus::Completed);
}

/// `cleanup` succeeds (it may remove nothing where the backend expires records itself).
pub async fn cleanup_succeeds(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("cleanup");
    let token = acquire(store, request(&key, None)).await;
    store.complete(&key, token, b"x", Some(SHORT)).await.ok();
    tokio::time::sleep(PAST_SHORT).await;
    let cleaned = store.cleanup().await;
    assert!(cleaned.is_ok(), "cleanup failed: {cleaned:?}");
    assert_eq!(store.get(&key).await.ok(), Some(None));
}

/// A `complete` retried after it was applied (its reply was lost, or an error was reported
/// after the write) answers `Ok` and leaves the record as it was; a `fail` by the same
/// token, or a `complete` with another result, is still `StaleToken`.
///
/// Not in [`store_conformance_tests!`]: the memory store answers a repeated `complete`
/// with `StaleToken`, which is harmless in one process (no reply is ever lost). The remote
/// stores call it from their own test files.
pub async fn retried_finish_that_was_applied_is_ok(store: &(impl IdempotencyStore + ?Sized)) {
    bounded("retried_finish_that_was_applied_is_ok", async {
        let key = unique_key("retried-finish");
        let token = acquire(store, request(&key, Some("fp"))).await;
        let result = b"receipt-42";
        let first = store.complete(&key, token, result, Some(LONG)).await;
        assert!(first.is_ok(), "complete failed: {first:?}");
        let retried = store.complete(&key, token, result, Some(LONG)).await;
        assert!(
            retried.is_ok(),
            "a retried complete must recognise its own applied write: {retried:?}"
        );
        assert_stale(
            "complete with another result",
            store.complete(&key, token, b"other", Some(LONG)).await,
        );
        assert_stale(
            "fail after complete",
            store.fail(&key, token, result, Some(LONG)).await,
        );
        let record = existing(store, request(&key, Some("fp"))).await;
        assert_eq!(record.status, RecordStatus::Completed);
        assert_eq!(record.result.as_deref(), Some(&result[..]));
    })
    .await;
}

/// A value under the key that is not a record written by this store is a typed decode
/// error for both `get` and `start` — never a panic, never treated as free.
///
/// `write_garbage` writes something undecodable under the given key, the way another
/// program sharing the backend might.
pub async fn undecodable_record_is_a_typed_error<F, Fut>(
    store: &(impl IdempotencyStore + ?Sized),
    write_garbage: F,
) where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let key = unique_key("garbage");
    write_garbage(key.clone()).await;
    let got = store.get(&key).await;
    assert!(
        matches!(
            got,
            Err(StoreError::Decode(_) | StoreError::UnsupportedVersion { .. })
        ),
        "get of garbage must be a decode error, got {got:?}"
    );
    let started = store.start(request(&key, None)).await;
    assert!(
        matches!(
            started,
            Err(StoreError::Decode(_) | StoreError::UnsupportedVersion { .. })
        ),
        "start on garbage must be a decode error, got {started:?}"
    );
}

/// Generates one `#[tokio::test]` per behaviour of the suite, each building its store
/// with `$make` (an expression evaluating to a future of the store).
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@tests $make;
            get_of_absent_key_is_none,
            start_acquires_a_free_key,
            start_on_running_key_reports_the_owner,
            concurrent_starts_acquire_exactly_once,
            every_acquire_issues_a_fresh_token,
            complete_stores_the_result,
            start_seen_shows_what_start_returns,
            binary_results_round_trip,
            failed_record_is_kept,
            failed_record_is_rerun_only_when_asked_and_fingerprint_agrees,
            stale_token_is_rejected_by_every_write,
            writes_on_absent_key_are_stale,
            finished_record_cannot_be_written_again,
            release_frees_the_key,
            delete_removes_any_record,
            expired_lease_is_taken_over_and_old_owner_fenced,
            renewed_lease_stays_owned,
            renewed_lease_lapses_after_its_renewed_length,
            retried_finish_that_was_applied_is_ok,
            finished_record_expires_after_ttl,
            finished_record_without_ttl_is_kept,
            long_unicode_keys_work,
            similar_keys_are_distinct,
            wait_for_change_returns_after_finish,
            cleanup_succeeds,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $make.await;
                $crate::$name(&store).await;
            }
        )*
    };
}
