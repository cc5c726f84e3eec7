//! Property tests of record decoding, through the public store against the real Redis:
//! arbitrary values written under a key by something else (a hash with arbitrary fields,
//! or another Redis type) make `get` and `start` return a record or a typed error —
//! never a panic, never a backend error, and never "free" when the value cannot be read.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use orchestrix::store::{IdempotencyStore, StartOutcome, StartRequest, StoreError};
use orchestrix_redis::redis::{self, AsyncCommands};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// What another program might leave under a key.
#[derive(Debug, Clone)]
enum Garbage {
    Hash(Vec<(String, Vec<u8>)>),
    String(Vec<u8>),
    List(Vec<Vec<u8>>),
    Set(Vec<Vec<u8>>),
    SortedSet(Vec<(f64, Vec<u8>)>),
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// A field value: mostly near-valid values (so decoding gets deep), sometimes anything.
fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"1".to_vec()),
        Just(b"2".to_vec()),
        Just(b"01".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"99999999999".to_vec()),
        Just(b"running".to_vec()),
        Just(b"completed".to_vec()),
        Just(b"failed".to_vec()),
        "[0-9a-f]{32}".prop_map(String::into_bytes),
        "[0-9a-fA-Fx+ -]{30,33}".prop_map(String::into_bytes),
        bytes(40),
    ]
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v".to_owned()),
        Just("status".to_owned()),
        Just("token".to_owned()),
        Just("fp".to_owned()),
        Just("result".to_owned()),
        "[a-z]{1,6}",
    ]
}

fn garbage() -> impl Strategy<Value = Garbage> {
    prop_oneof![
        6 => prop::collection::vec((field_name(), field_value()), 1..7).prop_map(Garbage::Hash),
        1 => bytes(40).prop_map(Garbage::String),
        1 => prop::collection::vec(bytes(10), 1..4).prop_map(Garbage::List),
        1 => prop::collection::vec(bytes(10), 1..4).prop_map(Garbage::Set),
        1 => prop::collection::vec((-1e9f64..1e9, bytes(10)), 1..4).prop_map(Garbage::SortedSet),
    ]
}

async fn write(
    raw: &mut redis::aio::MultiplexedConnection,
    key: &str,
    garbage: &Garbage,
) -> redis::RedisResult<()> {
    let _: () = raw.del(key).await?;
    match garbage {
        Garbage::Hash(fields) => {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(key);
            for (name, value) in fields {
                cmd.arg(name).arg(value);
            }
            cmd.exec_async(raw).await?;
        }
        Garbage::String(value) => raw.set(key, value).await?,
        Garbage::List(items) => raw.rpush(key, items).await?,
        Garbage::Set(items) => raw.sadd(key, items).await?,
        Garbage::SortedSet(items) => {
            let members: Vec<(f64, &Vec<u8>)> = items.iter().map(|(s, m)| (*s, m)).collect();
            raw.zadd_multiple(key, &members).await?
        }
    }
    raw.expire(key, 600).await
}

/// Whether `start.lua`'s takeover rule accepts this hash for `req`: schema version `1`,
/// status `failed`, a token of 32 hex digits, agreeing fingerprints. It looks at nothing
/// else, so a failed record with an undecodable fingerprint (not UTF-8) is taken over by a
/// caller that re-runs failures without a fingerprint, although `get` reports it as
/// `StoreError::Decode` (a deviation reported with these tests; the record is replaced by a
/// well-formed one, never read as garbage).
fn failed_hash_rerun(garbage: &Garbage, req: &StartRequest<'_>) -> bool {
    let Garbage::Hash(fields) = garbage else {
        return false;
    };
    let field = |name: &str| {
        fields
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    };
    let token_ok =
        field("token").is_some_and(|t| t.len() == 32 && t.iter().all(u8::is_ascii_hexdigit));
    let fp_agrees = match (req.fingerprint, field("fp")) {
        (Some(mine), Some(stored)) => mine.as_bytes() == stored,
        _ => true,
    };
    req.rerun_failed
        && field("v") == Some(b"1".as_slice())
        && field("status") == Some(b"failed".as_slice())
        && token_ok
        && fp_agrees
}

fn typed(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Decode(_) | StoreError::UnsupportedVersion { .. }
    )
}

#[test]
fn arbitrary_values_under_a_key_are_records_or_typed_errors() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let prefix = common::unique_prefix("decode-props");
    let (store, raw) = runtime.block_on(async {
        (
            common::store_with_prefix(&prefix).await,
            common::raw().await,
        )
    });
    let case = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 192,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(
        &(garbage(), any::<bool>(), any::<bool>()),
        |(garbage, rerun_failed, with_fingerprint)| {
            runtime.block_on(async {
                let key = format!("k{}", case.fetch_add(1, Ordering::Relaxed));
                let mut raw = raw.clone();
                write(&mut raw, &format!("{prefix}{key}"), &garbage)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("writing garbage: {e}")))?;

                let read = store.get(&key).await;
                match &read {
                    Ok(Some(record)) => prop_assert_eq!(&record.key, &key),
                    Ok(None) => prop_assert!(false, "a written key read as absent"),
                    Err(e) => prop_assert!(typed(e), "get: untyped error {e:?}"),
                }

                let req = StartRequest {
                    key: &key,
                    fingerprint: with_fingerprint.then_some("fp-1"),
                    lease: Duration::from_secs(30),
                    rerun_failed,
                };
                match store.start(req).await {
                    Ok(StartOutcome::Existing(record)) => {
                        prop_assert_eq!(
                            Some(record),
                            read.ok().flatten(),
                            "start and get disagree"
                        );
                    }
                    Ok(StartOutcome::Acquired(_)) => match &read {
                        Ok(Some(record)) => prop_assert!(
                            req.may_take_over(record.status, record.fingerprint.as_deref()),
                            "start took over a record it may not: {record:?}"
                        ),
                        Ok(None) => prop_assert!(false, "a written key read as absent"),
                        Err(_) => prop_assert!(
                            failed_hash_rerun(&garbage, &req),
                            "start took over a value get cannot read: {read:?}"
                        ),
                    },
                    Err(e) => {
                        prop_assert!(typed(&e), "start: untyped error {e:?}");
                        prop_assert!(
                            read.is_err(),
                            "start failed ({e:?}) where get read {read:?}"
                        );
                    }
                }
                Ok(())
            })
        },
    );
    runtime.block_on(async {
        let mut raw = raw.clone();
        for n in 0..case.load(Ordering::Relaxed) {
            let _: redis::RedisResult<()> = raw.del(format!("{prefix}k{n}")).await;
        }
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
