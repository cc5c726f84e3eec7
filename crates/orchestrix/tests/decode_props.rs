//! Property tests of everything the core decodes from a store: fencing tokens, record
//! statuses, and stored run results replayed through `Flow::run`. Arbitrary input must
//! give a value or a typed error — never a panic, and never a run of the steps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use orchestrix::idempotency::IdempotencyError;
use orchestrix::store::{
    FencingToken, IdempotencyStore, MemoryStore, RecordStatus, StartOutcome, StartRequest,
    StoreError,
};
use orchestrix::{Flow, KeyScope, RunError, RunOptions};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

fn is_hex_digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_is_a_fencing_token_or_a_decode_error(text in ".{0,40}") {
        match text.parse::<FencingToken>() {
            Ok(token) => {
                prop_assert_eq!(text.len(), 32);
                prop_assert!(is_hex_digits(&token.to_string(), 32));
            }
            Err(e) => {
                prop_assert!(matches!(e, StoreError::Decode(_)), "{e:?}");
                prop_assert!(!is_hex_digits(&text, 32));
            }
        }
    }

    #[test]
    fn near_miss_tokens_never_panic(text in "[0-9a-fA-F+\\- xg]{30,34}") {
        match text.parse::<FencingToken>() {
            Ok(_) => prop_assert_eq!(text.len(), 32),
            Err(e) => prop_assert!(matches!(e, StoreError::Decode(_)), "{e:?}"),
        }
    }

    #[test]
    fn every_token_round_trips_through_its_text(raw in any::<u128>()) {
        let token = FencingToken::from_u128(raw);
        prop_assert_eq!(token.to_string().parse::<FencingToken>().ok(), Some(token));
    }

    #[test]
    fn any_text_is_a_record_status_or_a_decode_error(text in ".{0,20}") {
        match text.parse::<RecordStatus>() {
            Ok(status) => prop_assert_eq!(status.as_str(), text.as_str()),
            Err(e) => prop_assert!(matches!(e, StoreError::Decode(_)), "{e:?}"),
        }
    }
}

/// A flow with a typed output whose step counts its executions.
fn flow(
    store: Arc<dyn IdempotencyStore>,
    runs: Arc<AtomicUsize>,
) -> Flow<u64, BTreeMap<String, u64>> {
    Flow::<u64, BTreeMap<String, u64>>::builder("props")
        .store(store)
        .step("count", move |ctx| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                ctx.set("n", *ctx.input())?;
                Ok(())
            }
        })
        .output(|ctx| {
            let n = ctx.get::<u64>("n")?.unwrap_or_default();
            Ok(BTreeMap::from([("n".to_owned(), n)]))
        })
        .build()
        .expect("valid flow")
}

/// Stores `bytes` as the finished (`failed` or completed) result under `key`, without a
/// fingerprint, as another writer might.
async fn store_result(store: &MemoryStore, key: &str, bytes: &[u8], failed: bool) {
    let req = StartRequest {
        key,
        fingerprint: None,
        lease: std::time::Duration::from_secs(30),
        rerun_failed: false,
    };
    let StartOutcome::Acquired(token) = store.start(req).await.expect("start") else {
        panic!("key {key} was taken");
    };
    if failed {
        store.fail(key, token, bytes, None).await.expect("fail");
    } else {
        store
            .complete(key, token, bytes, None)
            .await
            .expect("complete");
    }
}

/// Replays whatever is stored under `key`: a replayed result or a typed decode error, and
/// the step never runs.
fn replay_is_typed(bytes: Vec<u8>, failed: bool) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let flow = flow(
            Arc::clone(&store) as Arc<dyn IdempotencyStore>,
            Arc::clone(&runs),
        );
        store_result(&store, "stored", &bytes, failed).await;
        let outcome = flow
            .run(1, RunOptions::key("stored").scope(KeyScope::Global))
            .await;
        match outcome {
            Ok(result) => prop_assert!(result.replayed, "a stored record must be replayed"),
            Err(RunError::Idempotency(IdempotencyError::Store(
                StoreError::Decode(_) | StoreError::UnsupportedVersion { .. },
            ))) => {}
            Err(other) => prop_assert!(false, "untyped or unexpected error: {other:?}"),
        }
        prop_assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "a stored record must never run the steps"
        );
        Ok(())
    })
}

/// The bytes a real run stores, for mutation.
fn real_result() -> Vec<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let flow = flow(
            Arc::clone(&store) as Arc<dyn IdempotencyStore>,
            Arc::default(),
        );
        flow.run(42, RunOptions::key("real").scope(KeyScope::Global))
            .await
            .expect("run");
        store
            .get("real")
            .await
            .expect("get")
            .and_then(|r| r.result)
            .expect("a stored result")
    })
}

/// A byte string derived from a valid stored result: truncated, with bytes overwritten,
/// or with bytes inserted.
fn mutated_result() -> impl Strategy<Value = Vec<u8>> {
    let base = real_result();
    let len = base.len();
    (
        0..=len,
        prop::collection::vec((0..len.max(1), any::<u8>()), 0..4),
        prop::collection::vec((0..=len, any::<u8>()), 0..3),
    )
        .prop_map(move |(cut, overwrites, inserts)| {
            let mut bytes = base.clone();
            let inserted = inserts.len();
            for (at, byte) in inserts {
                bytes.insert(at.min(bytes.len()), byte);
            }
            for (at, byte) in overwrites {
                if let Some(b) = bytes.get_mut(at) {
                    *b = byte;
                }
            }
            bytes.truncate(cut + inserted);
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_stored_bytes_replay_or_fail_typed(bytes in prop::collection::vec(any::<u8>(), 0..256), failed in any::<bool>()) {
        replay_is_typed(bytes, failed)?;
    }

    #[test]
    fn arbitrary_json_stored_results_replay_or_fail_typed(text in "\\{(\"[a-z]{1,6}\":(-?[0-9]{1,20}|\"[a-z]*\"|\\[\\]|null|true),?){0,6}\\}") {
        replay_is_typed(text.into_bytes(), false)?;
    }

    #[test]
    fn mutated_real_results_replay_or_fail_typed(bytes in mutated_result(), failed in any::<bool>()) {
        replay_is_typed(bytes, failed)?;
    }
}
