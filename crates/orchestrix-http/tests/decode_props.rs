//! Property tests of the stored-response decoding, through the layer over real HTTP on
//! 127.0.0.1: whatever bytes a finished record holds, a request with its key gets the
//! stored response replayed or a problem document (503 unreadable, 409 not kept) — never a
//! panic, a dropped connection, or a run of the handler.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use orchestrix::store::{IdempotencyStore, MemoryStore, StartOutcome, StartRequest};
use orchestrix_http::IdempotencyLayer;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use common::{Http, app, serve};

/// The key under which `layer` keeps the record of a request with `key` and no credentials.
fn store_key(layer: &IdempotencyLayer, key: &str) -> String {
    let (parts, ()) = http::Request::post("/")
        .header("idempotency-key", key)
        .body(())
        .unwrap()
        .into_parts();
    layer.store_key(&parts).unwrap()
}

/// Stores `bytes` as the completed response under `layer`'s key for `key`, without a
/// fingerprint (so any request with the key may replay it).
async fn store_response(store: &MemoryStore, layer: &IdempotencyLayer, key: &str, bytes: &[u8]) {
    let key = store_key(layer, key);
    let req = StartRequest {
        key: &key,
        fingerprint: None,
        lease: Duration::from_secs(30),
        rerun_failed: false,
    };
    let StartOutcome::Acquired(token) = store.start(req).await.unwrap() else {
        panic!("key {key} was taken");
    };
    store.complete(&key, token, bytes, None).await.unwrap();
}

/// A byte string near a valid stored response: the real encoding with bytes overwritten,
/// truncated or extended, or the valid header followed by anything.
fn near_valid(real: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = real.len();
    let header = real[..8.min(len)].to_vec();
    prop_oneof![
        (
            prop::collection::vec((0..len.max(1), any::<u8>()), 1..4),
            0..=len,
            prop::collection::vec(any::<u8>(), 0..3),
        )
            .prop_map(move |(overwrites, cut, tail)| {
                let mut bytes = real.clone();
                for (at, byte) in overwrites {
                    if let Some(b) = bytes.get_mut(at) {
                        *b = byte;
                    }
                }
                bytes.truncate(cut);
                bytes.extend(tail);
                bytes
            }),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(move |tail| {
            let mut bytes = header.clone();
            bytes.extend(tail);
            bytes
        }),
    ]
}

#[test]
fn any_stored_bytes_are_replayed_or_refused_and_nothing_runs() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let layer = IdempotencyLayer::new(Arc::clone(&store) as Arc<dyn IdempotencyStore>);
    let (http, probe, real) = runtime.block_on(async {
        let (router, probe) = app(layer.clone());
        let http = Http::new(serve(router).await);
        // One real response, for the near-valid cases.
        let first = http.post("/orders", Some("real"), "{}").await;
        assert_eq!(first.status.as_u16(), 201);
        let real = store
            .get(&store_key(&layer, "real"))
            .await
            .unwrap()
            .and_then(|r| r.result)
            .expect("the real response is stored");
        (http, probe, real)
    });
    let strategy = prop_oneof![prop::collection::vec(any::<u8>(), 0..96), near_valid(real),];
    let case = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 160,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&strategy, |bytes| {
        let key = format!("garbage-{}", case.fetch_add(1, Ordering::Relaxed));
        runtime.block_on(async {
            store_response(&store, &layer, &key, &bytes).await;
            let runs_before = probe.runs();
            let request = http.post_request("/orders", &key, "{}");
            let reply = http.try_request(request).await.map_err(|e| {
                TestCaseError::fail(format!("no answer (did the layer panic?): {e}"))
            })?;
            prop_assert_eq!(
                probe.runs(),
                runs_before,
                "the handler ran for a stored key"
            );
            if !reply.replayed() {
                let status = reply.status.as_u16();
                prop_assert!(
                    status == 503 || status == 409,
                    "unexpected answer {reply:?}"
                );
                prop_assert_eq!(
                    reply.header("content-type"),
                    Some("application/problem+json")
                );
            }
            Ok(())
        })
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
