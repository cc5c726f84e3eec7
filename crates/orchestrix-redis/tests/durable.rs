//! Durable records on Redis beyond the shared journal suite, against the real Redis at
//! `REDIS_URL`: the layout on the wire, key expiry as retention, values the store did not
//! write, the lease index behind `abandoned`, and the base operations on durable records.

mod common;

use std::time::Duration;

use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, IdempotencyStore, Journal, JournalStore,
    RecordStatus, Redrive, StartOutcome, StartRequest, StoreError,
};
use orchestrix_conformance::journal::durable;
use orchestrix_conformance::{LONG, PAST_SHORT, SHORT, request, unique_key};
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::{self, AsyncCommands};

const GOOD_TOKEN: &str = "0123456789abcdef0123456789abcdef";

async fn acquire(store: &RedisStore, req: DurableStart<'_>) -> (FencingToken, Option<Journal>) {
    match store.start_durable(req).await {
        Ok(DurableStartOutcome::Acquired { token, resumed }) => (token, resumed),
        other => panic!("expected to acquire {:?}, got {other:?}", req.key),
    }
}

fn short<'a>(key: &'a str, input: &'a [u8]) -> DurableStart<'a> {
    DurableStart {
        lease: SHORT,
        ..durable(key, None, input)
    }
}

/// The stored value under `key`, byte for byte.
async fn raw_value(store: &RedisStore, key: &str) -> Option<Vec<u8>> {
    let mut raw = common::raw().await;
    raw.get(format!("{}{key}", store.key_prefix()))
        .await
        .unwrap()
}

async fn pttl(store: &RedisStore, key: &str) -> i64 {
    let mut raw = common::raw().await;
    raw.pttl(format!("{}{key}", store.key_prefix()))
        .await
        .unwrap()
}

async fn write_string(store: &RedisStore, key: &str, value: &[u8]) {
    let mut raw = common::raw().await;
    let _: () = raw
        .set(format!("{}{key}", store.key_prefix()), value)
        .await
        .unwrap();
}

/// The lease index's entry for `key`, if any.
async fn index_score(store: &RedisStore, key: &str) -> Option<f64> {
    let mut raw = common::raw().await;
    raw.zscore(format!("{}\0durable-leases", store.key_prefix()), key)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_durable_record_is_one_string_in_the_documented_layout() {
    let store = common::store("durable-layout").await;
    let key = unique_key("layout");
    let (token, _) = acquire(&store, durable(&key, Some("fp"), b"in")).await;
    assert_eq!(token.as_u128() & 1, 1, "a durable run's token is odd");
    let value = raw_value(&store, &key).await.unwrap();
    let deadline = std::str::from_utf8(&value[34..49]).unwrap();
    assert!(deadline.bytes().all(|b| b.is_ascii_digit()), "{deadline}");
    let expected = format!("1R{token}{deadline}000000000030000--------0002fp00000002in");
    assert_eq!(value, expected.as_bytes());

    store.append(&key, token, b"step\0one").await.unwrap();
    let value = raw_value(&store, &key).await.unwrap();
    assert!(value.ends_with(b"00000002in00000008step\0one"));

    store.complete(&key, token, b"ok", None).await.unwrap();
    let value = raw_value(&store, &key).await.unwrap();
    let tail_at = expected.len() + 16;
    assert_eq!(&value[..2], b"1C");
    assert_eq!(&value[64..72], format!("{tail_at:08x}").as_bytes());
    assert_eq!(&value[tail_at..], b"+ok");
}

#[tokio::test]
async fn the_key_expires_after_lease_and_retention_while_running_and_after_the_ttl_once_finished() {
    let store = common::store("durable-expiry").await;
    let key = unique_key("expiry");
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    let both = i64::try_from((LONG * 2).as_millis()).unwrap();
    let ttl = pttl(&store, &key).await;
    assert!(ttl > both - 5_000 && ttl <= both, "PTTL {ttl}");
    store.renew(&key, token, LONG).await.unwrap();
    let ttl = pttl(&store, &key).await;
    assert!(ttl > both - 5_000 && ttl <= both, "PTTL after renew {ttl}");
    store
        .complete(&key, token, b"r", Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    let ttl = pttl(&store, &key).await;
    assert!(
        ttl > 3_595_000 && ttl <= 3_600_000,
        "PTTL once finished {ttl}"
    );

    let kept = unique_key("kept");
    let req = DurableStart {
        retain: None,
        ..durable(&kept, None, b"in")
    };
    let (token, _) = acquire(&store, req).await;
    assert_eq!(
        pttl(&store, &kept).await,
        -1,
        "no retention: kept until deleted"
    );
    store.suspend(&kept, token).await.unwrap();
    assert_eq!(pttl(&store, &kept).await, -1);
}

#[tokio::test]
async fn an_abandoned_durable_record_reads_as_running_and_a_plain_start_never_overwrites_it() {
    let store = common::store("durable-plain-start").await;
    let key = unique_key("abandoned");
    let (token, _) = acquire(&store, short(&key, b"in")).await;
    store.append(&key, token, b"e").await.unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    let record = store.get(&key).await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.token),
        (RecordStatus::Running, token)
    );
    for rerun_failed in [false, true] {
        let req = StartRequest {
            rerun_failed,
            ..request(&key, None)
        };
        match store.start(req).await {
            Ok(StartOutcome::Existing(r)) => assert_eq!(r.token, token),
            other => panic!("a plain start must show the durable record: {other:?}"),
        }
    }
    let journal = store.read_journal(&key).await.unwrap().unwrap();
    assert_eq!(journal.entries, vec![b"e".to_vec()]);
}

#[tokio::test]
async fn a_plain_rerun_takes_over_a_durable_failure_and_a_durable_start_a_plain_one() {
    let store = common::store("durable-rerun-mixed").await;
    let key = unique_key("durable-failure");
    let (token, _) = acquire(&store, durable(&key, Some("fp"), b"in")).await;
    store.fail(&key, token, b"boom", None).await.unwrap();
    let rerun = StartRequest {
        rerun_failed: true,
        ..request(&key, Some("fp"))
    };
    let Ok(StartOutcome::Acquired(plain)) = store.start(rerun).await else {
        panic!("a plain re-run must take the durable failure over");
    };
    assert_eq!(plain.as_u128() & 1, 0, "a plain run's token is even");
    assert_eq!(store.read_journal(&key).await.unwrap(), None);
    store.fail(&key, plain, b"boom", None).await.unwrap();

    let rerun = DurableStart {
        rerun_failed: true,
        ..durable(&key, Some("fp"), b"new")
    };
    let (token, resumed) = acquire(&store, rerun).await;
    assert_eq!(resumed, None);
    store.append(&key, token, b"e").await.unwrap();
    let journal = store.read_journal(&key).await.unwrap().unwrap();
    assert_eq!(journal.input, b"new");
}

#[tokio::test]
async fn a_durable_start_reports_a_live_plain_record() {
    let store = common::store("durable-on-plain").await;
    let key = unique_key("plain");
    let Ok(StartOutcome::Acquired(token)) = store.start(request(&key, None)).await else {
        panic!("a fresh key must be acquired");
    };
    match store.start_durable(durable(&key, None, b"in")).await {
        Ok(DurableStartOutcome::Existing(r)) => {
            assert_eq!((r.status, r.token), (RecordStatus::Running, token));
        }
        other => panic!("the plain record must be shown: {other:?}"),
    }
    assert!(matches!(
        store.append(&key, token, b"x").await,
        Err(StoreError::StaleToken)
    ));
    store.complete(&key, token, b"ok", None).await.unwrap();
    assert_eq!(store.read_journal(&key).await.unwrap(), None);
    assert!(matches!(
        store.redrive(&key, LONG, None).await,
        Ok(Redrive::NotFailed(r)) if r.status == RecordStatus::Completed
    ));
}

/// Strings under the key that this version did not write: durable operations report them
/// as typed errors and leave them exactly as they were.
#[tokio::test]
async fn values_the_store_did_not_write_are_typed_errors_and_left_alone() {
    let store = common::store("durable-garbage").await;
    let header = |status: char, tail: &str| {
        format!("1{status}{GOOD_TOKEN}000000000001000000000000005000{tail}ffff")
    };
    let cases: Vec<Vec<u8>> = vec![
        b"not a record".to_vec(),
        Vec::new(),
        // A durable header with a journal that is not framed.
        format!("{}0000000xin", header('R', "--------")).into_bytes(),
        // An abandoned run whose journal ends mid-item.
        format!("{}00000009in", header('R', "--------")).into_bytes(),
        // A failure whose tail offset points nowhere.
        format!("{}00000002in-", header('F', "000000ff")).into_bytes(),
        // A header with a bad status, or a malformed deadline.
        format!("1X{GOOD_TOKEN}").into_bytes(),
        header('R', "--------")
            .replace("000000000001000", "00000000000100x")
            .into_bytes(),
    ];
    for value in cases {
        let key = unique_key("garbage");
        write_string(&store, &key, &value).await;
        let started = store.start_durable(durable(&key, None, b"in")).await;
        assert!(
            matches!(started, Err(StoreError::Decode(_))),
            "{:?}: {started:?}",
            String::from_utf8_lossy(&value)
        );
        let rerun = DurableStart {
            rerun_failed: true,
            ..durable(&key, None, b"in")
        };
        assert!(matches!(
            store.start_durable(rerun).await,
            Err(StoreError::Decode(_))
        ));
        assert!(matches!(
            store.read_journal(&key).await,
            Err(StoreError::Decode(_))
        ));
        // A redrive reads only the header of a record that is not a failure.
        let redriven = store.redrive(&key, LONG, None).await;
        assert!(
            matches!(
                redriven,
                Err(StoreError::Decode(_)) | Ok(Redrive::NotFailed(_))
            ),
            "{redriven:?}"
        );
        assert!(matches!(store.get(&key).await, Err(StoreError::Decode(_))));
        assert_eq!(raw_value(&store, &key).await.as_deref(), Some(&value[..]));
    }

    let key = unique_key("newer");
    let newer = format!("2R{GOOD_TOKEN}...");
    write_string(&store, &key, newer.as_bytes()).await;
    let started = store.start_durable(durable(&key, None, b"in")).await;
    assert!(
        matches!(started, Err(StoreError::UnsupportedVersion { found: 2 })),
        "{started:?}"
    );
    assert!(matches!(
        store.read_journal(&key).await,
        Err(StoreError::UnsupportedVersion { found: 2 })
    ));
}

#[tokio::test]
async fn another_redis_type_under_the_key_is_a_decode_error_for_every_durable_operation() {
    let store = common::store("durable-wrongtype").await;
    let key = unique_key("hash");
    let mut raw = common::raw().await;
    let full = format!("{}{key}", store.key_prefix());
    let _: () = raw.hset(&full, "owner", "theirs").await.unwrap();
    let token: FencingToken = "0123456789abcdef0123456789abcdef".parse().unwrap();
    assert!(matches!(
        store.start_durable(durable(&key, None, b"in")).await,
        Err(StoreError::Decode(_))
    ));
    assert!(matches!(
        store.append(&key, token, b"x").await,
        Err(StoreError::Decode(_))
    ));
    assert!(matches!(
        store.suspend(&key, token).await,
        Err(StoreError::Decode(_))
    ));
    assert!(matches!(
        store.complete(&key, token, b"x", None).await,
        Err(StoreError::Decode(_))
    ));
    assert!(matches!(
        store.renew(&key, token, LONG).await,
        Err(StoreError::Decode(_))
    ));
    assert!(matches!(
        store.release(&key, token).await,
        Err(StoreError::Decode(_))
    ));
    assert!(matches!(
        store.redrive(&key, LONG, None).await,
        Err(StoreError::Decode(_))
    ));
    assert!(matches!(
        store.read_journal(&key).await,
        Err(StoreError::Decode(_))
    ));
    let owner: String = raw.hget(&full, "owner").await.unwrap();
    assert_eq!(owner, "theirs");
}

/// The append limit is checked by the script against the record's length, so the journal
/// stops growing at the limit and nothing past it is written.
#[tokio::test]
async fn appends_stop_at_the_journal_limit_and_write_nothing_past_it() {
    let limit = 4096;
    let store = RedisStore::builder(common::redis_url())
        .key_prefix(common::unique_prefix("durable-limit"))
        .max_journal_bytes(limit)
        .connect()
        .await
        .unwrap();
    let key = unique_key("limit");
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    let entry = [b'x'; 1000];
    let mut appended = 0;
    let refused = loop {
        match store.append(&key, token, &entry).await {
            Ok(()) => appended += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(refused, StoreError::TooLarge { size, limit: 4096 } if size > 4096),
        "{refused:?}"
    );
    let stored = raw_value(&store, &key).await.unwrap();
    assert!(stored.len() <= limit, "{}", stored.len());
    let journal = store.read_journal(&key).await.unwrap().unwrap();
    assert_eq!(journal.entries.len(), appended);
    assert_eq!(appended, 3);
}

#[tokio::test]
async fn a_result_over_the_limit_finishes_the_durable_record_without_it() {
    let store = RedisStore::builder(common::redis_url())
        .key_prefix(common::unique_prefix("durable-large-result"))
        .max_result_size(16)
        .connect()
        .await
        .unwrap();
    let key = unique_key("large");
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    store.append(&key, token, b"e").await.unwrap();
    let completed = store.complete(&key, token, &[7; 17], None).await;
    assert!(
        matches!(
            completed,
            Err(StoreError::TooLarge {
                size: 17,
                limit: 16
            })
        ),
        "{completed:?}"
    );
    let record = store.get(&key).await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.result),
        (RecordStatus::Completed, None)
    );
    let journal = store.read_journal(&key).await.unwrap().unwrap();
    assert_eq!(journal.entries, vec![b"e".to_vec()]);
}

/// A token issued by an earlier version of this crate may be odd while owning a plain
/// record: the durable script says so and the plain one finishes it.
#[tokio::test]
async fn an_odd_token_owning_a_plain_record_still_finishes_renews_and_releases_it() {
    let store = common::store("durable-legacy-token").await;
    let odd: FencingToken = "0123456789abcdef0123456789abcdef".parse().unwrap();
    assert_eq!(odd.as_u128() & 1, 1);
    let key = unique_key("legacy");
    write_string(&store, &key, format!("1r{GOOD_TOKEN}ffff-").as_bytes()).await;
    store.renew(&key, odd, LONG).await.unwrap();
    store.complete(&key, odd, b"ok", None).await.unwrap();
    let record = store.get(&key).await.unwrap().unwrap();
    assert_eq!(record.result.as_deref(), Some(&b"ok"[..]));

    let key = unique_key("legacy-release");
    write_string(&store, &key, format!("1r{GOOD_TOKEN}ffff-").as_bytes()).await;
    store.release(&key, odd).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
}

#[tokio::test]
async fn the_index_follows_durable_runs_and_forgets_finished_ones() {
    let store = common::store("durable-index").await;
    let key = unique_key("index");
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    let started = index_score(&store, &key).await.expect("an entry at start");
    store.renew(&key, token, LONG * 2).await.unwrap();
    let renewed = index_score(&store, &key).await.unwrap();
    assert!(renewed > started, "{renewed} > {started}");
    store.suspend(&key, token).await.unwrap();
    assert_eq!(index_score(&store, &key).await, Some(0.0));
    let (token, _) = acquire(&store, durable(&key, None, b"in")).await;
    store.complete(&key, token, b"ok", None).await.unwrap();
    assert_eq!(index_score(&store, &key).await, None);

    let released = unique_key("released");
    let (token, _) = acquire(&store, durable(&released, None, b"in")).await;
    store.release(&released, token).await.unwrap();
    assert_eq!(index_score(&store, &released).await, None);
    let deleted = unique_key("deleted");
    acquire(&store, durable(&deleted, None, b"in")).await;
    store.delete(&deleted).await.unwrap();
    assert_eq!(index_score(&store, &deleted).await, None);
}

/// `abandoned` verifies what the index says: a run whose lease was renewed past its hint is
/// rescored and not listed, and the entry of a record that is gone is removed.
#[tokio::test]
async fn abandoned_verifies_the_index_and_corrects_it() {
    let store = common::store("durable-verify").await;
    let prefix = unique_key("verify");
    let (live, gone, lapsed) = (
        format!("{prefix}:live"),
        format!("{prefix}:gone"),
        format!("{prefix}:lapsed"),
    );
    let (token, _) = acquire(&store, short(&live, b"in")).await;
    acquire(&store, short(&gone, b"in")).await;
    acquire(&store, short(&lapsed, b"in")).await;
    // Renewed behind the index's back (a pipelined hint can be lost with a connection):
    // only the record says the lease is alive.
    store.renew(&live, token, LONG).await.unwrap();
    let mut raw = common::raw().await;
    let index = format!("{}\0durable-leases", store.key_prefix());
    let _: () = raw.zadd(&index, &live, 1).await.unwrap();
    let _: () = raw
        .del(format!("{}{gone}", store.key_prefix()))
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;

    let listed = store.abandoned(&prefix, None, 10).await.unwrap();
    assert_eq!(listed, vec![lapsed.clone()]);
    assert_eq!(index_score(&store, &gone).await, None);
    let rescored = index_score(&store, &live).await.unwrap();
    assert!(rescored > 1.0, "{rescored}");
    assert!(index_score(&store, &lapsed).await.is_some());
}

/// A stale owner's finish pipelines a `ZREM` of the key's entry, which belongs to the run
/// that took over; the entry is restored, so that run is still found once abandoned.
#[tokio::test]
async fn a_stale_finish_does_not_hide_the_run_that_took_over() {
    let store = common::store("durable-stale-finish").await;
    let prefix = unique_key("stale-finish");
    let key = format!("{prefix}:run");
    let (old, _) = acquire(&store, short(&key, b"in")).await;
    tokio::time::sleep(PAST_SHORT).await;
    let (new, resumed) = acquire(&store, short(&key, b"in")).await;
    assert!(resumed.is_some() && new != old);
    assert!(matches!(
        store.complete(&key, old, b"late", None).await,
        Err(StoreError::StaleToken)
    ));
    assert!(matches!(
        store.release(&key, old).await,
        Err(StoreError::StaleToken)
    ));
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.abandoned(&prefix, None, 10).await.unwrap(), vec![key]);
}

/// A user limited to the store's prefix can run durable flows: the index's key is under it.
#[tokio::test]
async fn a_user_limited_to_the_prefix_can_run_durable_flows() {
    let prefix = common::unique_prefix("durable-acl");
    let user = format!("orchestrix-test-{:016x}", fastrand::u64(..));
    let mut raw = common::raw().await;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            &user,
            "on",
            ">s3cret",
            &format!("~{prefix}*"),
            "+@all",
        ])
        .query_async(&mut raw)
        .await
        .unwrap();
    let url = common::redis_url().replacen("redis://", &format!("redis://{user}:s3cret@"), 1);
    let outcome = async {
        let store = RedisStore::builder(url)
            .key_prefix(&prefix)
            .connect()
            .await?;
        let key = unique_key("acl");
        let DurableStartOutcome::Acquired { token, .. } =
            store.start_durable(durable(&key, None, b"in")).await?
        else {
            return Ok::<_, Box<dyn std::error::Error>>(false);
        };
        store.append(&key, token, b"e").await?;
        store.suspend(&key, token).await?;
        let listed = store.abandoned("", None, 10).await?;
        Ok(listed == vec![key])
    }
    .await;
    let _: () = redis::cmd("ACL")
        .arg(&["DELUSER", &user])
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(matches!(outcome, Ok(true)), "{outcome:?}");
}
