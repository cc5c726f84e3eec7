//! The record admin conformance suite: what every [`RecordAdmin`] must show (see the
//! guarantees in `orchestrix::store::RecordAdmin`'s module). A backend's test file calls
//! [`admin_conformance_tests!`](crate::admin_conformance_tests) with an expression building
//! its store, [`admin_journal_conformance_tests!`](crate::admin_journal_conformance_tests)
//! too when the store keeps journals, and
//! [`undecodable_records_are_reported_not_skipped`] with a closure that writes garbage.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use orchestrix::store::{
    DurableStartOutcome, FencingToken, IdempotencyStore, JournalStore, Lease, ListRequest, Listed,
    RecordAdmin, RecordInfo, RecordStatus, Released, SCHEMA_VERSION, StartOutcome, StatusFilter,
    StoreError,
};

use crate::journal::durable;
use crate::{LONG, PAST_SHORT, SHORT, request, unique_key};

/// How long [`admin_conformance_tests!`](crate::admin_conformance_tests) takes at most per
/// check.
pub const CHECK_BOUND: Duration = Duration::from_secs(120);

/// A TTL that does not lapse during a check, long enough to tell from [`LONG`].
const HOUR: Duration = Duration::from_secs(3600);

/// How far a measured duration may fall short of the one that was set: the time a check
/// takes, and a remote store's round trips.
const SLACK: Duration = Duration::from_secs(20);

/// The most pages a listing may take in these checks: the stores that scan (Redis) may
/// return short or empty pages, but never loop forever.
const MAX_PAGES: usize = 100_000;

/// The store's admin, or a failed test: every store under this suite offers one.
fn admin(store: &(impl IdempotencyStore + ?Sized)) -> &dyn RecordAdmin {
    match store.admin() {
        Some(admin) => admin,
        None => panic!("the store under test offers no record admin"),
    }
}

fn journal(store: &(impl IdempotencyStore + ?Sized)) -> &dyn JournalStore {
    match store.journal_store() {
        Some(journal) => journal,
        None => panic!("the store under test does not keep journals"),
    }
}

async fn acquire(
    store: &(impl IdempotencyStore + ?Sized),
    key: &str,
    lease: Duration,
) -> FencingToken {
    let req = orchestrix::store::StartRequest {
        lease,
        ..request(key, Some("fp"))
    };
    match store.start(req).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("expected to acquire {key:?}, got {other:?}"),
    }
}

async fn acquire_durable(
    store: &(impl IdempotencyStore + ?Sized),
    key: &str,
    lease: Duration,
) -> FencingToken {
    let req = orchestrix::store::DurableStart {
        lease,
        ..durable(key, Some("fp"), b"input")
    };
    match journal(store).start_durable(req).await {
        Ok(DurableStartOutcome::Acquired { token, .. }) => token,
        other => panic!("expected to acquire {key:?} for a durable run, got {other:?}"),
    }
}

async fn inspect(store: &(impl IdempotencyStore + ?Sized), key: &str) -> Option<RecordInfo> {
    match admin(store).inspect(key).await {
        Ok(info) => info,
        Err(e) => panic!("inspect({key:?}) failed: {e}"),
    }
}

fn assert_about(what: &str, measured: Option<Duration>, set: Duration) {
    let Some(measured) = measured else {
        panic!("{what} must be about {set:?}, got none");
    };
    assert!(
        measured <= set + Duration::from_secs(2) && measured + SLACK >= set,
        "{what} must be about {set:?}, got {measured:?}"
    );
}

fn held(info: &RecordInfo) -> Option<Duration> {
    match info.lease {
        Some(Lease::Held { left }) => Some(left),
        _ => None,
    }
}

/// Every record listed under `prefix` with `filter`, paging `limit` at a time: the keys of
/// the decoded records and of the undecodable ones. Checks on the way that every key
/// starts with `prefix`, that a page holds at most `limit` records (more only on a store
/// that documents it, up to `overshoot`), and that the listing ends.
async fn list_all(
    store: &(impl IdempotencyStore + ?Sized),
    prefix: &str,
    filter: StatusFilter,
    limit: usize,
) -> (Vec<RecordInfo>, BTreeSet<String>) {
    let mut records = Vec::new();
    let mut undecodable = BTreeSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let req = ListRequest::new(prefix)
            .filter(filter)
            .limit(limit)
            .cursor(cursor.as_deref());
        let page = match admin(store).list(req).await {
            Ok(page) => page,
            Err(e) => panic!("list({prefix:?}, {filter:?}) failed: {e}"),
        };
        // Redis may end a page with its last SCAN batch whole: a few keys of one bucket.
        assert!(
            page.records.len() <= limit + 8,
            "a page of at most {limit} records holds {}",
            page.records.len()
        );
        for listed in page.records {
            assert!(
                listed.key().starts_with(prefix),
                "{:?} is listed under {prefix:?}",
                listed.key()
            );
            match listed {
                Listed::Record(info) => {
                    assert!(filter.matches(&info), "{info:?} does not match {filter:?}");
                    records.push(info);
                }
                Listed::Undecodable { key, .. } => {
                    undecodable.insert(key);
                }
                other => panic!("unknown row {other:?}"),
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return (records, undecodable),
        }
    }
    panic!("listing {prefix:?} did not end within {MAX_PAGES} pages");
}

fn keys(records: &[RecordInfo]) -> BTreeSet<String> {
    records.iter().map(|info| info.key.clone()).collect()
}

/// `inspect` of a key never written is `None`.
pub async fn inspect_of_an_absent_key_is_none(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("admin-absent");
    assert_eq!(inspect(store, &key).await, None);
}

/// A running record shows its owner's token, fingerprint and lease, and no result.
pub async fn inspect_shows_a_running_record_with_its_lease(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("admin-running");
    let token = acquire(store, &key, LONG).await;
    let info = inspect(store, &key).await;
    let info = info.unwrap_or_else(|| panic!("a running record under {key:?} must be shown"));
    assert_eq!(info.key, key);
    assert_eq!(info.status, RecordStatus::Running);
    assert_eq!(info.token, token);
    assert_eq!(info.fingerprint.as_deref(), Some("fp"));
    assert_eq!(info.result_bytes, None);
    assert_eq!(info.schema_version, SCHEMA_VERSION);
    assert!(!info.durable);
    assert_about("the lease left", held(&info), LONG);
    assert_about("a plain running record's expiry", info.expires_in, LONG);
    assert!(!info.is_abandoned());
    assert_eq!(info.journal, None);
}

/// A finished record shows its result's size and what is left of its TTL, and no lease;
/// one kept until deleted has no expiry.
pub async fn inspect_shows_a_finished_record_with_its_result_size_and_ttl(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let key = unique_key("admin-completed");
    let token = acquire(store, &key, LONG).await;
    assert!(
        store
            .complete(&key, token, b"12345", Some(HOUR))
            .await
            .is_ok()
    );
    let info = inspect(store, &key).await;
    let info = info.unwrap_or_else(|| panic!("a completed record under {key:?} must be shown"));
    assert_eq!(
        (info.status, info.token, info.result_bytes, info.lease),
        (RecordStatus::Completed, token, Some(5), None)
    );
    assert_about("the TTL left", info.expires_in, HOUR);

    let key = unique_key("admin-failed");
    let token = acquire(store, &key, LONG).await;
    assert!(store.fail(&key, token, b"", None).await.is_ok());
    let info = inspect(store, &key).await;
    let info = info.unwrap_or_else(|| panic!("a failed record under {key:?} must be shown"));
    assert_eq!(
        (info.status, info.result_bytes, info.expires_in),
        (RecordStatus::Failed, Some(0), None)
    );
}

/// A plain running record whose lease lapsed is free: neither inspected nor listed.
pub async fn a_lapsed_plain_record_is_neither_inspected_nor_listed(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let prefix = unique_key("admin-lapsed");
    let key = format!("{prefix}:k");
    acquire(store, &key, SHORT).await;
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(inspect(store, &key).await, None);
    let (listed, undecodable) = list_all(store, &prefix, StatusFilter::Any, 10).await;
    assert!(listed.is_empty() && undecodable.is_empty(), "{listed:?}");
}

/// Paging through every record under a prefix lists each of them, and nothing else.
pub async fn list_pages_through_every_record_under_a_prefix(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let prefix = unique_key("admin-pages");
    let mut created = BTreeSet::new();
    for i in 0..7 {
        let key = format!("{prefix}:{i}");
        let token = acquire(store, &key, LONG).await;
        if i % 2 == 0 {
            assert!(store.complete(&key, token, b"ok", Some(HOUR)).await.is_ok());
        }
        created.insert(key);
    }
    // A key that shares the prefix's text but not the prefix itself.
    let outside = format!("{prefix}-outside");
    acquire(store, &outside, LONG).await;
    let (listed, undecodable) = list_all(store, &format!("{prefix}:"), StatusFilter::Any, 3).await;
    assert!(undecodable.is_empty());
    assert_eq!(keys(&listed), created);
    let (everything, _) = list_all(store, &prefix, StatusFilter::Any, 100).await;
    assert_eq!(everything.len(), created.len() + 1);
}

/// Each status filter lists exactly the records it asks for.
pub async fn list_filters_by_status(store: &(impl IdempotencyStore + ?Sized)) {
    let prefix = unique_key("admin-filters");
    let running = format!("{prefix}:running");
    acquire(store, &running, LONG).await;
    let completed = format!("{prefix}:completed");
    let token = acquire(store, &completed, LONG).await;
    assert!(store.complete(&completed, token, b"ok", None).await.is_ok());
    let failed = format!("{prefix}:failed");
    let token = acquire(store, &failed, LONG).await;
    assert!(store.fail(&failed, token, b"no", None).await.is_ok());
    for (filter, expected) in [
        (StatusFilter::Any, vec![&running, &completed, &failed]),
        (StatusFilter::Running, vec![&running]),
        (StatusFilter::Completed, vec![&completed]),
        (StatusFilter::Failed, vec![&failed]),
        (StatusFilter::ExpiredLease, vec![]),
    ] {
        let (listed, _) = list_all(store, &prefix, filter, 2).await;
        let expected: BTreeSet<String> = expected.into_iter().cloned().collect();
        assert_eq!(keys(&listed), expected, "{filter:?}");
    }
    let (listed, _) = list_all(store, &completed, StatusFilter::Any, 10).await;
    assert_eq!(listed.first().and_then(|info| info.result_bytes), Some(2));
}

/// For a keyset store (memory, SQL): pages hold exactly `limit` records, in ascending
/// byte order of the keys, and a page's cursor is its last key. Not part of
/// [`admin_conformance_tests!`](crate::admin_conformance_tests): stores that scan list in
/// their own order.
pub async fn keyset_pages_hold_limit_records_in_key_order(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let prefix = unique_key("admin-keyset");
    // Written out of order, with a key that sorts differently by bytes than by text
    // (`é` is two bytes from 0xc3, after every ASCII key).
    for name in ["9", "é", "1", "0", "5", "3", "8", "2", "7", "4"] {
        acquire(store, &format!("{prefix}:{name}"), LONG).await;
    }
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let req = ListRequest::new(&prefix).limit(4).cursor(cursor.as_deref());
        let page = match admin(store).list(req).await {
            Ok(page) => page,
            Err(e) => panic!("list({prefix:?}) failed: {e}"),
        };
        let keys: Vec<String> = page
            .records
            .iter()
            .map(|listed| listed.key()[prefix.len() + 1..].to_owned())
            .collect();
        if let Some(next) = &page.next {
            assert_eq!(
                Some(next),
                page.records.last().map(|l| l.key().to_owned()).as_ref()
            );
        }
        pages.push(keys);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(
        pages,
        vec![
            vec!["0", "1", "2", "3"],
            vec!["4", "5", "7", "8"],
            vec!["9", "é"],
        ]
    );
}

/// `release` deletes a plain running record: the key is free, the old owner is fenced.
pub async fn release_deletes_a_plain_running_record(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("admin-release");
    let old = acquire(store, &key, LONG).await;
    assert_eq!(
        admin(store).release(&key).await.ok(),
        Some(Released::Deleted)
    );
    assert_eq!(inspect(store, &key).await, None);
    let new = acquire(store, &key, LONG).await;
    assert_ne!(new, old);
    let stale = store.complete(&key, old, b"late", None).await;
    assert!(matches!(stale, Err(StoreError::StaleToken)), "{stale:?}");
}

/// `release` leaves a finished record alone, and reports an absent one.
pub async fn release_refuses_a_finished_record(store: &(impl IdempotencyStore + ?Sized)) {
    let key = unique_key("admin-release-finished");
    let token = acquire(store, &key, LONG).await;
    assert!(store.complete(&key, token, b"ok", None).await.is_ok());
    assert_eq!(
        admin(store).release(&key).await.ok(),
        Some(Released::NotRunning(RecordStatus::Completed))
    );
    let info = inspect(store, &key).await;
    assert_eq!(info.map(|i| i.status), Some(RecordStatus::Completed));
    let absent = unique_key("admin-release-absent");
    assert_eq!(
        admin(store).release(&absent).await.ok(),
        Some(Released::Absent)
    );
}

/// A durable record shows its journal and its lease; an abandoned one reads as lapsed and
/// is what `ExpiredLease` lists.
pub async fn inspect_shows_a_durable_run_with_its_journal(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let prefix = unique_key("admin-durable");
    let live = format!("{prefix}:live");
    let token = acquire_durable(store, &live, LONG).await;
    for entry in [&b"step 0"[..], b"step 1"] {
        assert!(journal(store).append(&live, token, entry).await.is_ok());
    }
    let info = inspect(store, &live).await;
    let info = info.unwrap_or_else(|| panic!("a durable record under {live:?} must be shown"));
    assert!(info.durable);
    assert_eq!((info.status, info.token), (RecordStatus::Running, token));
    assert_about("a durable run's lease", held(&info), LONG);
    let journal_read = info.journal.clone();
    assert_eq!(
        journal_read.as_ref().map(|j| j.input.as_slice()),
        Some(&b"input"[..])
    );
    assert_eq!(
        journal_read.map(|j| j.entries),
        Some(vec![b"step 0".to_vec(), b"step 1".to_vec()])
    );

    let abandoned = format!("{prefix}:abandoned");
    acquire_durable(store, &abandoned, SHORT).await;
    tokio::time::sleep(PAST_SHORT).await;
    let info = inspect(store, &abandoned).await;
    let info = info.unwrap_or_else(|| panic!("an abandoned run under {abandoned:?} is live"));
    assert!(info.is_abandoned(), "{info:?}");
    assert!(matches!(info.lease, Some(Lease::Lapsed { .. })));
    let (listed, _) = list_all(store, &prefix, StatusFilter::ExpiredLease, 10).await;
    assert_eq!(keys(&listed), BTreeSet::from([abandoned.clone()]));
    assert!(listed.iter().all(|info| info.journal.is_none()));
    let (listed, _) = list_all(store, &prefix, StatusFilter::Running, 10).await;
    assert_eq!(keys(&listed), BTreeSet::from([abandoned, live]));
}

/// `release` of a durable running record lapses its lease and keeps its journal: the old
/// owner is fenced, the run is abandoned, and the next durable start resumes it.
pub async fn release_lapses_a_durable_lease_and_keeps_the_journal(
    store: &(impl IdempotencyStore + ?Sized),
) {
    let prefix = unique_key("admin-release-durable");
    let key = format!("{prefix}:k");
    let old = acquire_durable(store, &key, LONG).await;
    assert!(journal(store).append(&key, old, b"done").await.is_ok());
    assert_eq!(
        admin(store).release(&key).await.ok(),
        Some(Released::LeaseLapsed)
    );
    let info = inspect(store, &key).await;
    assert!(
        info.as_ref().is_some_and(RecordInfo::is_abandoned),
        "{info:?}"
    );
    let stale = journal(store).append(&key, old, b"late").await;
    assert!(matches!(stale, Err(StoreError::StaleToken)), "{stale:?}");
    let listed = journal(store).abandoned(&prefix, None, 10).await;
    assert_eq!(listed.ok(), Some(vec![key.clone()]));
    // Releasing it again changes nothing.
    assert_eq!(
        admin(store).release(&key).await.ok(),
        Some(Released::LeaseLapsed)
    );
    match journal(store)
        .start_durable(durable(&key, Some("fp"), b"other"))
        .await
    {
        Ok(DurableStartOutcome::Acquired {
            resumed: Some(resumed),
            ..
        }) => assert_eq!(resumed.entries, vec![b"done".to_vec()]),
        other => panic!("the released run must be resumed, got {other:?}"),
    }
}

/// A value under the store's keys that is not a record is reported by `inspect`, listed
/// as undecodable beside the records around it (the page goes on), and never released.
/// `write_garbage` writes such a value under the key it is given.
pub async fn undecodable_records_are_reported_not_skipped<F, Fut>(
    store: &(impl IdempotencyStore + ?Sized),
    write_garbage: F,
) where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let prefix = unique_key("admin-garbage");
    let garbage = format!("{prefix}:1-garbage");
    write_garbage(garbage.clone()).await;
    let good = [format!("{prefix}:0-good"), format!("{prefix}:2-good")];
    for key in &good {
        acquire(store, key, LONG).await;
    }
    let inspected = admin(store).inspect(&garbage).await;
    assert!(
        matches!(
            inspected,
            Err(StoreError::Decode(_) | StoreError::UnsupportedVersion { .. })
        ),
        "inspect of garbage must be a decode error, got {inspected:?}"
    );
    let (listed, undecodable) = list_all(store, &prefix, StatusFilter::Any, 1).await;
    assert_eq!(keys(&listed), good.iter().cloned().collect());
    assert_eq!(undecodable, BTreeSet::from([garbage.clone()]));
    let released = admin(store).release(&garbage).await;
    assert!(
        matches!(
            released,
            Err(StoreError::Decode(_) | StoreError::UnsupportedVersion { .. })
        ),
        "release of garbage must be a decode error, got {released:?}"
    );
    let deleted = store.delete(&garbage).await;
    assert!(deleted.is_ok(), "delete removes garbage: {deleted:?}");
    assert!(matches!(admin(store).inspect(&garbage).await, Ok(None)));
}

/// Generates one `#[tokio::test]` per record admin behaviour, each building its store with
/// `$make` (an expression evaluating to a future of the store).
#[macro_export]
macro_rules! admin_conformance_tests {
    ($make:expr) => {
        $crate::admin_conformance_tests!(@tests $make;
            inspect_of_an_absent_key_is_none,
            inspect_shows_a_running_record_with_its_lease,
            inspect_shows_a_finished_record_with_its_result_size_and_ttl,
            a_lapsed_plain_record_is_neither_inspected_nor_listed,
            list_pages_through_every_record_under_a_prefix,
            list_filters_by_status,
            release_deletes_a_plain_running_record,
            release_refuses_a_finished_record,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $make.await;
                let check = $crate::admin::$name(&store);
                if tokio::time::timeout($crate::admin::CHECK_BOUND, check).await.is_err() {
                    panic!("{} did not finish within {:?}", stringify!($name), $crate::admin::CHECK_BOUND);
                }
            }
        )*
    };
}

/// Generates the record admin checks of durable records, for a store that keeps journals.
#[macro_export]
macro_rules! admin_journal_conformance_tests {
    ($make:expr) => {
        $crate::admin_conformance_tests!(@tests $make;
            inspect_shows_a_durable_run_with_its_journal,
            release_lapses_a_durable_lease_and_keeps_the_journal,
        );
    };
}
