//! Property tests of record decoding, through the public store against the real Redis:
//! arbitrary values written under a key by something else (a string that looks more or less
//! like an encoded record, arbitrary bytes, or another Redis type) make `get` and `start`
//! return a record or a typed error — never a panic, never a backend error, and never
//! "free" when the value cannot be read.

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

fn one_of(options: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(options).prop_map(|s| s.as_bytes().to_vec())
}

/// A string shaped like an encoded record (see the crate's record layout), each part
/// mostly valid (so decoding gets deep) and sometimes not.
fn near_record() -> impl Strategy<Value = Vec<u8>> {
    let version = one_of(&["1", "1", "1", "2", "9", "x", ""]);
    let status = one_of(&["r", "c", "f", "f", "x", ""]);
    let token = prop_oneof![
        3 => "[0-9a-f]{32}".prop_map(String::into_bytes),
        1 => "[0-9a-fA-Fx+ -]{30,33}".prop_map(String::into_bytes),
    ];
    // The fingerprint, and how its length is written: right, absent, or anything.
    let fingerprint = prop_oneof![
        2 => Just(Some(b"fp-1".to_vec())),
        1 => Just(Some(b"fp-2".to_vec())),
        1 => Just(Some(Vec::new())),
        1 => bytes(6).prop_map(Some),
        2 => Just(None),
    ];
    let length = prop_oneof![
        6 => Just(None),
        1 => one_of(&["ffff", "fffe", "00x1", "0001", "FFFF", "+001", ""]).prop_map(Some),
    ];
    let tail = prop_oneof![
        one_of(&["-", "-", "+"]),
        bytes(8).prop_map(|mut b| {
            b.insert(0, b'+');
            b
        }),
        bytes(4),
    ];
    (version, status, token, fingerprint, length, tail).prop_map(
        |(version, status, token, fingerprint, length, tail)| {
            let mut value = [version, status, token].concat();
            match (&fingerprint, length) {
                (_, Some(length)) => value.extend(length),
                (Some(fp), None) => value.extend(format!("{:04x}", fp.len()).into_bytes()),
                (None, None) => value.extend(b"ffff"),
            }
            value.extend(fingerprint.unwrap_or_default());
            value.extend(tail);
            value
        },
    )
}

fn garbage() -> impl Strategy<Value = Garbage> {
    prop_oneof![
        6 => near_record().prop_map(Garbage::String),
        1 => bytes(60).prop_map(Garbage::String),
        1 => prop::collection::vec(("[a-z]{1,6}", bytes(10)), 1..4).prop_map(Garbage::Hash),
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

/// Whether `start_rerun.lua`'s takeover rule accepts this value for `req`: schema version
/// `1`, status `f`, a token of 32 lowercase hex digits, a well-formed fingerprint length and
/// result flag, agreeing fingerprints. It does not check that the fingerprint is UTF-8, so
/// a failed record with a fingerprint that is not is taken over by a caller that re-runs
/// failures without a fingerprint, although `get` reports it as `StoreError::Decode` (a
/// known deviation: the record is replaced by a well-formed one, never read as garbage).
fn failed_record_rerun(garbage: &Garbage, req: &StartRequest<'_>) -> bool {
    let Garbage::String(value) = garbage else {
        return false;
    };
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if !req.rerun_failed || value.len() < 39 || !value.starts_with(b"1f") || !hex(&value[2..34]) {
        return false;
    }
    let length = &value[34..38];
    let stored = if length == b"ffff" {
        None
    } else if hex(length) {
        let len = usize::from_str_radix(std::str::from_utf8(length).unwrap(), 16).unwrap();
        match value.get(38..38 + len) {
            Some(fp) => Some(fp),
            None => return false,
        }
    } else {
        return false;
    };
    let flag_at = 38 + stored.map_or(0, <[u8]>::len);
    let flag_ok = match value.get(flag_at) {
        Some(b'+') => true,
        Some(b'-') => value.len() == flag_at + 1,
        _ => false,
    };
    let fp_agrees = match (req.fingerprint, stored) {
        (Some(mine), Some(stored)) => mine.as_bytes() == stored,
        _ => true,
    };
    flag_ok && fp_agrees
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
        cases: 256,
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
                            failed_record_rerun(&garbage, &req),
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
