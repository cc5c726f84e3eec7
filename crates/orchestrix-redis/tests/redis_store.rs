//! Behaviour specific to the Redis store, against the real Redis at `REDIS_URL`:
//! values it did not write, Redis-side expiry, key layout, limits and an unreachable server.

mod common;

use std::time::{Duration, Instant};

use orchestrix::store::{
    FencingToken, IdempotencyStore, RecordStatus, StartOutcome, StartRequest, StoreError,
};
use orchestrix_conformance::{LONG, request, unique_key};
use orchestrix_redis::redis::{self, AsyncCommands};
use orchestrix_redis::{RedisStore, RedisStoreError};

/// Writes `fields` as a hash under `prefix` + `key`, the way another program might.
async fn write_hash(prefix: &str, key: &str, fields: &[(&str, &str)]) {
    let mut raw = common::raw().await;
    let _: () = raw
        .hset_multiple(format!("{prefix}{key}"), fields)
        .await
        .unwrap();
}

const GOOD_TOKEN: &str = "0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn a_string_under_the_key_is_a_decode_error() {
    let prefix = common::unique_prefix("string");
    let store = common::store_with_prefix(&prefix).await;
    orchestrix_conformance::undecodable_record_is_a_typed_error(&store, |key| async move {
        let mut raw = common::raw().await;
        let _: () = raw
            .set(format!("{prefix}{key}"), "not a record")
            .await
            .unwrap();
    })
    .await;
}

/// Writes `value` as a string under `prefix` + `key`, the way another program might.
async fn write_string(prefix: &str, key: &str, value: &str) {
    let mut raw = common::raw().await;
    let _: () = raw.set(format!("{prefix}{key}"), value).await.unwrap();
}

#[tokio::test]
async fn a_hash_under_the_key_is_a_decode_error() {
    let prefix = common::unique_prefix("hash");
    let store = common::store_with_prefix(&prefix).await;
    orchestrix_conformance::undecodable_record_is_a_typed_error(&store, |key| async move {
        // The layout of earlier versions of this crate is a foreign type now, too.
        let fields = [("v", "1"), ("status", "completed"), ("token", GOOD_TOKEN)];
        write_hash(&prefix, &key, &fields).await;
    })
    .await;
}

#[tokio::test]
async fn a_list_under_the_key_is_a_decode_error() {
    let prefix = common::unique_prefix("list");
    let store = common::store_with_prefix(&prefix).await;
    orchestrix_conformance::undecodable_record_is_a_typed_error(&store, |key| async move {
        let mut raw = common::raw().await;
        let _: () = raw.rpush(format!("{prefix}{key}"), "item").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_record_with_a_malformed_token_is_a_decode_error() {
    let prefix = common::unique_prefix("bad-token");
    let store = common::store_with_prefix(&prefix).await;
    orchestrix_conformance::undecodable_record_is_a_typed_error(&store, |key| async move {
        let value = format!("1c{}ffff-", GOOD_TOKEN.to_uppercase());
        write_string(&prefix, &key, &value).await;
    })
    .await;
}

#[tokio::test]
async fn a_truncated_record_is_a_decode_error() {
    let prefix = common::unique_prefix("truncated");
    let store = common::store_with_prefix(&prefix).await;
    orchestrix_conformance::undecodable_record_is_a_typed_error(&store, |key| async move {
        write_string(&prefix, &key, &format!("1c{GOOD_TOKEN}0004fp")).await;
    })
    .await;
}

#[tokio::test]
async fn a_record_with_a_malformed_fingerprint_length_is_a_decode_error() {
    let prefix = common::unique_prefix("bad-fp-len");
    let store = common::store_with_prefix(&prefix).await;
    orchestrix_conformance::undecodable_record_is_a_typed_error(&store, |key| async move {
        write_string(&prefix, &key, &format!("1c{GOOD_TOKEN}00x2fp-")).await;
    })
    .await;
}

#[tokio::test]
async fn a_record_of_another_schema_version_is_unsupported() {
    let prefix = common::unique_prefix("version");
    let store = common::store_with_prefix(&prefix).await;
    let key = unique_key("v9");
    write_string(&prefix, &key, &format!("9f{GOOD_TOKEN}ffff-")).await;
    let rerun = StartRequest {
        rerun_failed: true,
        ..request(&key, None)
    };
    let started = store.start(rerun).await;
    assert!(
        matches!(started, Err(StoreError::UnsupportedVersion { found: 9 })),
        "{started:?}"
    );
    let started = store.start(request(&key, None)).await;
    assert!(
        matches!(started, Err(StoreError::UnsupportedVersion { found: 9 })),
        "{started:?}"
    );
    let got = store.get(&key).await;
    assert!(
        matches!(got, Err(StoreError::UnsupportedVersion { found: 9 })),
        "{got:?}"
    );
}

#[tokio::test]
async fn a_failed_record_with_a_malformed_token_is_never_taken_over() {
    let prefix = common::unique_prefix("no-takeover");
    let store = common::store_with_prefix(&prefix).await;
    let key = unique_key("garbage-failed");
    let value = format!("1f{}ffff-", "x".repeat(32));
    write_string(&prefix, &key, &value).await;
    let rerun = StartRequest {
        rerun_failed: true,
        ..request(&key, None)
    };
    let started = store.start(rerun).await;
    assert!(matches!(started, Err(StoreError::Decode(_))), "{started:?}");
    let mut raw = common::raw().await;
    let stored: String = raw.get(format!("{prefix}{key}")).await.unwrap();
    assert_eq!(
        stored, value,
        "start must not overwrite what it cannot read"
    );
}

#[tokio::test]
async fn a_well_formed_failed_record_is_taken_over_by_a_rerun() {
    let prefix = common::unique_prefix("takeover");
    let store = common::store_with_prefix(&prefix).await;
    let key = unique_key("failed");
    write_string(&prefix, &key, &format!("1f{GOOD_TOKEN}0002fp+boom")).await;
    let rerun = StartRequest {
        rerun_failed: true,
        ..request(&key, Some("fp"))
    };
    let started = store.start(rerun).await;
    assert!(
        matches!(started, Ok(StartOutcome::Acquired(_))),
        "{started:?}"
    );
}

#[tokio::test]
async fn fenced_writes_on_a_foreign_type_are_decode_errors_and_leave_it_alone() {
    let prefix = common::unique_prefix("foreign");
    let store = common::store_with_prefix(&prefix).await;
    let key = unique_key("foreign");
    write_hash(&prefix, &key, &[("owner", "theirs")]).await;
    let token = orchestrix::store::FencingToken::generate();
    let completed = store.complete(&key, token, b"x", None).await;
    assert!(
        matches!(completed, Err(StoreError::Decode(_))),
        "{completed:?}"
    );
    let renewed = store.renew(&key, token, LONG).await;
    assert!(matches!(renewed, Err(StoreError::Decode(_))), "{renewed:?}");
    let released = store.release(&key, token).await;
    assert!(
        matches!(released, Err(StoreError::Decode(_))),
        "{released:?}"
    );
    let mut raw = common::raw().await;
    let owner: String = raw.hget(format!("{prefix}{key}"), "owner").await.unwrap();
    assert_eq!(owner, "theirs");
}

#[tokio::test]
async fn fenced_writes_on_a_foreign_string_are_stale_and_leave_it_alone() {
    let prefix = common::unique_prefix("foreign-string");
    let store = common::store_with_prefix(&prefix).await;
    let key = unique_key("foreign");
    write_string(&prefix, &key, "theirs").await;
    let token = orchestrix::store::FencingToken::generate();
    let completed = store.complete(&key, token, b"x", None).await;
    assert!(
        matches!(completed, Err(StoreError::StaleToken)),
        "{completed:?}"
    );
    let renewed = store.renew(&key, token, LONG).await;
    assert!(
        matches!(renewed, Err(StoreError::StaleToken)),
        "{renewed:?}"
    );
    let mut raw = common::raw().await;
    let value: String = raw.get(format!("{prefix}{key}")).await.unwrap();
    assert_eq!(value, "theirs");
}

/// A running record that carries the caller's token but is not what this store writes:
/// finishing it would make a record nobody can read, so `complete` and `fail` refuse it
/// and write nothing.
#[tokio::test]
async fn finishing_a_garbled_running_record_with_the_callers_token_is_a_decode_error() {
    let prefix = common::unique_prefix("garbled");
    let store = common::store_with_prefix(&prefix).await;
    let token: FencingToken = GOOD_TOKEN.parse().unwrap();
    let mut raw = common::raw().await;
    // Everything after "1r<token>".
    let rests = [
        "",
        "ffff",
        "ffff+",
        "ffff-x",
        "0003fp-",
        "0001fp-",
        "0x02fp-",
        "+002fp-",
        "000Aabcdefghij-",
        "0002fp",
        "0002fp*",
        "0002fp+x",
    ];
    for rest in rests {
        let key = unique_key("garbled");
        let value = format!("1r{GOOD_TOKEN}{rest}");
        write_string(&prefix, &key, &value).await;
        let completed = store.complete(&key, token, b"x", None).await;
        assert!(
            matches!(completed, Err(StoreError::Decode(_))),
            "{value:?}: {completed:?}"
        );
        let failed = store.fail(&key, token, b"x", None).await;
        assert!(
            matches!(failed, Err(StoreError::Decode(_))),
            "{value:?}: {failed:?}"
        );
        let stored: String = raw.get(format!("{prefix}{key}")).await.unwrap();
        assert_eq!(stored, value, "a garbled record must be left as it is");
        store.delete(&key).await.unwrap();
    }
}

/// Redis forgets its scripts on a restart, a failover or `SCRIPT FLUSH`; every scripted
/// operation loads its script again and succeeds.
#[tokio::test]
async fn scripted_operations_work_after_the_server_forgets_its_scripts() {
    let store = common::store("noscript").await;
    let mut raw = common::raw().await;
    let mut flush = async || {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut raw)
            .await
            .unwrap();
    };
    let acquire = async |key: &str| match store.start(request(key, None)).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("a fresh key must be acquired: {other:?}"),
    };

    let key = unique_key("noscript");
    let token = acquire(&key).await;
    flush().await;
    store.renew(&key, token, LONG).await.unwrap();
    flush().await;
    store.complete(&key, token, b"done", None).await.unwrap();
    store.delete(&key).await.unwrap();

    let key = unique_key("noscript");
    let token = acquire(&key).await;
    flush().await;
    store.fail(&key, token, b"boom", None).await.unwrap();
    flush().await;
    let rerun = StartRequest {
        rerun_failed: true,
        ..request(&key, None)
    };
    let Ok(StartOutcome::Acquired(token)) = store.start(rerun).await else {
        panic!("a re-run must take over the failed record");
    };
    flush().await;
    store.release(&key, token).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
}

#[tokio::test]
async fn records_live_in_one_string_under_the_prefixed_key() {
    let prefix = common::unique_prefix("layout");
    let store = common::store_with_prefix(&prefix).await;
    let key = unique_key("layout");
    let StartOutcome::Acquired(token) = store.start(request(&key, Some("fp"))).await.unwrap()
    else {
        panic!("a fresh key must be acquired");
    };
    let mut raw = common::raw().await;
    let kind: String = redis::cmd("TYPE")
        .arg(format!("{prefix}{key}"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(kind, "string");
    let value: Vec<u8> = raw.get(format!("{prefix}{key}")).await.unwrap();
    assert_eq!(value, format!("1r{token}0002fp-").into_bytes());
    store.fail(&key, token, b"\0boom", None).await.unwrap();
    let value: Vec<u8> = raw.get(format!("{prefix}{key}")).await.unwrap();
    assert_eq!(value, format!("1f{token}0002fp+\0boom").into_bytes());
}

#[tokio::test]
async fn redis_expires_a_running_record_after_its_lease() {
    let store = common::store("lease").await;
    let key = unique_key("lease");
    store.start(request(&key, None)).await.unwrap();
    let mut raw = common::raw().await;
    let pttl: i64 = raw
        .pttl(format!("{}{key}", store.key_prefix()))
        .await
        .unwrap();
    let lease = i64::try_from(LONG.as_millis()).unwrap();
    assert!(pttl > lease - 5_000 && pttl <= lease, "PTTL {pttl}");
}

#[tokio::test]
async fn redis_expires_a_finished_record_after_its_ttl_and_keeps_one_without() {
    let store = common::store("ttl").await;
    let mut raw = common::raw().await;
    for (ttl, expected) in [(Some(Duration::from_secs(3600)), 3_600_000), (None, -1)] {
        let key = unique_key("ttl");
        let Ok(StartOutcome::Acquired(token)) = store.start(request(&key, None)).await else {
            panic!("a fresh key must be acquired");
        };
        store.complete(&key, token, b"done", ttl).await.unwrap();
        let pttl: i64 = raw
            .pttl(format!("{}{key}", store.key_prefix()))
            .await
            .unwrap();
        if expected < 0 {
            assert_eq!(pttl, -1, "no TTL must mean no expiry");
        } else {
            assert!(pttl > expected - 5_000 && pttl <= expected, "PTTL {pttl}");
        }
    }
}

#[tokio::test]
async fn stores_with_different_prefixes_do_not_see_each_other() {
    let a = common::store("prefix-a").await;
    let b = common::store("prefix-b").await;
    let key = unique_key("shared");
    assert!(matches!(
        a.start(request(&key, None)).await,
        Ok(StartOutcome::Acquired(_))
    ));
    assert!(matches!(
        b.start(request(&key, None)).await,
        Ok(StartOutcome::Acquired(_))
    ));
}

#[tokio::test]
async fn a_too_large_result_finishes_the_record_without_it() {
    let store = RedisStore::builder(common::redis_url())
        .key_prefix(common::unique_prefix("too-large"))
        .max_result_size(16)
        .connect()
        .await
        .unwrap();
    let key = unique_key("large");
    let Ok(StartOutcome::Acquired(token)) = store.start(request(&key, None)).await else {
        panic!("a fresh key must be acquired");
    };
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
    let Ok(StartOutcome::Existing(record)) = store.start(request(&key, None)).await else {
        panic!("the finished record must still hold the key");
    };
    assert_eq!(record.status, RecordStatus::Completed);
    assert_eq!(record.result, None);
}

/// A password-protected ACL user allowed only the store's prefix can do everything: the
/// credentials in the URL are used, and the scripts touch only the keys they declare.
#[tokio::test]
async fn a_password_url_for_a_user_limited_to_the_prefix_works() {
    let prefix = common::unique_prefix("acl");
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
        let StartOutcome::Acquired(token) = store.start(request(&key, None)).await? else {
            return Ok::<_, Box<dyn std::error::Error>>(false);
        };
        store.complete(&key, token, b"ok", None).await?;
        Ok(store.get(&key).await?.and_then(|r| r.result) == Some(b"ok".to_vec()))
    }
    .await;
    let _: () = redis::cmd("ACL")
        .arg(&["DELUSER", &user])
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(matches!(outcome, Ok(true)), "{outcome:?}");
}

/// A store pointed at a closed port: a typed backend error, quickly, for every operation.
#[tokio::test]
async fn an_unreachable_redis_is_a_backend_error_within_seconds() {
    let store = RedisStore::builder("redis://127.0.0.1:1")
        .connect_lazy()
        .unwrap();
    let began = Instant::now();
    let started = store.start(request(&unique_key("down"), None)).await;
    assert!(
        matches!(started, Err(StoreError::Backend(_))),
        "{started:?}"
    );
    let got = store.get("down").await;
    assert!(matches!(got, Err(StoreError::Backend(_))), "{got:?}");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn connecting_to_an_unreachable_redis_fails_within_seconds() {
    let began = Instant::now();
    let connected = RedisStore::builder("redis://127.0.0.1:1").connect().await;
    assert!(
        matches!(connected, Err(RedisStoreError::Connect(_))),
        "{connected:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn a_malformed_url_is_an_invalid_settings_error() {
    let connected = RedisStore::builder("http://not-redis").connect().await;
    assert!(
        matches!(connected, Err(RedisStoreError::InvalidSettings(_))),
        "{connected:?}"
    );
}

#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn a_tls_url_needs_the_tls_feature() {
    let built = RedisStore::builder("rediss://127.0.0.1:6380").connect_lazy();
    assert!(
        matches!(built, Err(RedisStoreError::InvalidSettings(_))),
        "{built:?}"
    );
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn a_tls_url_is_accepted_with_the_tls_feature() {
    let built = RedisStore::builder("rediss://127.0.0.1:6380").connect_lazy();
    assert!(built.is_ok(), "{built:?}");
}

#[tokio::test]
async fn a_finish_retried_after_it_was_applied_is_ok() {
    let store = common::store("retried-finish").await;
    orchestrix_conformance::retried_finish_that_was_applied_is_ok(&store).await;
}
