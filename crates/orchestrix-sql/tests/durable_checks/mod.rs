//! Checks of durable records that hold for both SQL stores beyond the journal conformance
//! suite: how durable and plain records meet under one key, what `cleanup` and `abandoned`
//! do with durable rows, concurrent redrives. Generic over the store, like the suite.

use std::time::Duration;

use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, IdempotencyStore, JournalStore, RecordStatus,
    Redrive, StartOutcome, StartRequest, StoreError,
};
use orchestrix_conformance::journal::durable;
use orchestrix_conformance::{LONG, PAST_SHORT, SHORT, request, unique_key};

pub fn journal(store: &impl IdempotencyStore) -> &dyn JournalStore {
    store.journal_store().expect("the SQL stores keep journals")
}

pub async fn acquire(store: &impl IdempotencyStore, req: DurableStart<'_>) -> FencingToken {
    match journal(store).start_durable(req).await {
        Ok(DurableStartOutcome::Acquired { token, .. }) => token,
        other => panic!("expected to acquire {:?}, got {other:?}", req.key),
    }
}

/// A durable start with a lease that lapses within [`PAST_SHORT`].
pub fn short<'a>(key: &'a str, input: &'a [u8]) -> DurableStart<'a> {
    DurableStart {
        lease: SHORT,
        ..durable(key, None, input)
    }
}

/// An abandoned durable record reads as running, and a plain `start` reports it rather
/// than taking it over (it is resumable, so it holds the key).
pub async fn an_abandoned_durable_record_reads_as_running_and_blocks_a_plain_start(
    store: &impl IdempotencyStore,
) {
    let key = unique_key("abandoned-get");
    let token = acquire(store, short(&key, b"in")).await;
    tokio::time::sleep(PAST_SHORT).await;
    let record = store.get(&key).await.ok().flatten();
    assert_eq!(
        record.map(|r| (r.status, r.token)),
        Some((RecordStatus::Running, token))
    );
    match store.start(request(&key, None)).await {
        Ok(StartOutcome::Existing(record)) => assert_eq!(record.token, token),
        other => panic!("a plain start must not take over a durable run: {other:?}"),
    }
}

/// A plain `start` that re-runs a failed durable record makes it a plain record: no
/// journal, fenced on its plain lease, never listed as abandoned.
pub async fn a_plain_rerun_of_a_failed_durable_record_leaves_no_journal(
    store: &impl IdempotencyStore,
) {
    let key = unique_key("plain-rerun");
    let token = acquire(store, durable(&key, None, b"in")).await;
    assert!(journal(store).append(&key, token, b"e").await.is_ok());
    assert!(store.fail(&key, token, b"boom", None).await.is_ok());
    let rerun = StartRequest {
        rerun_failed: true,
        lease: SHORT,
        ..request(&key, None)
    };
    let Ok(StartOutcome::Acquired(token)) = store.start(rerun).await else {
        panic!("a failed record is re-run when asked");
    };
    assert_eq!(journal(store).read_journal(&key).await.ok(), Some(None));
    assert!(store.renew(&key, token, SHORT).await.is_ok());
    tokio::time::sleep(PAST_SHORT).await;
    assert!(matches!(
        journal(store).abandoned(&key, None, 10).await.as_deref(),
        Ok([])
    ));
    assert!(matches!(
        store.complete(&key, token, b"late", None).await,
        Err(StoreError::StaleToken)
    ));
    assert_eq!(store.get(&key).await.ok(), Some(None));
}

/// A durable start meets plain records by the table of `start_durable`: a live one blocks
/// it, a lapsed one (its lease is its expiry) and a failure re-run are acquired afresh.
pub async fn a_durable_start_treats_plain_records_by_the_start_rules(
    store: &impl IdempotencyStore,
) {
    let running = unique_key("plain-running");
    let Ok(StartOutcome::Acquired(token)) = store.start(request(&running, None)).await else {
        panic!("acquire");
    };
    match journal(store)
        .start_durable(durable(&running, None, b"in"))
        .await
    {
        Ok(DurableStartOutcome::Existing(r)) => assert_eq!(r.token, token),
        other => panic!("a live plain run blocks a durable start: {other:?}"),
    }
    let lapsed = unique_key("plain-lapsed");
    let short_plain = StartRequest {
        lease: SHORT,
        ..request(&lapsed, None)
    };
    assert!(matches!(
        store.start(short_plain).await,
        Ok(StartOutcome::Acquired(_))
    ));
    tokio::time::sleep(PAST_SHORT).await;
    match journal(store)
        .start_durable(durable(&lapsed, None, b"in"))
        .await
    {
        Ok(DurableStartOutcome::Acquired { resumed: None, .. }) => {}
        other => panic!("a lapsed plain run is acquired with a fresh journal: {other:?}"),
    }
    let failed = unique_key("plain-failed");
    let Ok(StartOutcome::Acquired(token)) = store.start(request(&failed, None)).await else {
        panic!("acquire");
    };
    assert!(store.fail(&failed, token, b"boom", None).await.is_ok());
    let rerun = DurableStart {
        rerun_failed: true,
        ..durable(&failed, None, b"in")
    };
    match journal(store).start_durable(rerun).await {
        Ok(DurableStartOutcome::Acquired { resumed: None, .. }) => {}
        other => panic!("a plain failure re-run is acquired with a fresh journal: {other:?}"),
    }
    assert!(matches!(
        journal(store).read_journal(&failed).await,
        Ok(Some(j)) if j.input == b"in" && j.entries.is_empty()
    ));
}

/// `cleanup` removes a durable record once its retention after the lease lapsed, and
/// keeps abandoned records still within theirs (or kept until deleted). `store` must hold
/// nothing else.
pub async fn cleanup_removes_durable_records_past_their_retention_only(
    store: &impl IdempotencyStore,
) {
    let prefix = unique_key("retention");
    let key = |name: &str| format!("{prefix}:{name}");
    let (gone, kept, forever) = (key("gone"), key("kept"), key("forever"));
    let briefly = DurableStart {
        retain: Some(SHORT),
        ..short(&gone, b"in")
    };
    acquire(store, briefly).await;
    acquire(store, short(&kept, b"in")).await;
    let until_deleted = DurableStart {
        retain: None,
        ..short(&forever, b"in")
    };
    acquire(store, until_deleted).await;
    tokio::time::sleep(PAST_SHORT * 2).await;
    assert_eq!(store.cleanup().await.ok(), Some(1));
    assert_eq!(journal(store).read_journal(&gone).await.ok(), Some(None));
    let listed = journal(store).abandoned(&prefix, None, 10).await;
    assert_eq!(listed.ok(), Some(vec![forever, kept]));
}

/// A durable record taken over, whose new owner then died before any other write, is
/// swept by `cleanup` once it expires, like any. `store` must hold nothing else.
pub async fn cleanup_removes_a_taken_over_record_once_it_expires(store: &impl IdempotencyStore) {
    let key = unique_key("swept-after-takeover");
    let brief = DurableStart {
        retain: Some(SHORT),
        ..short(&key, b"in")
    };
    acquire(store, brief).await;
    tokio::time::sleep(PAST_SHORT).await;
    acquire(store, brief).await;
    tokio::time::sleep(PAST_SHORT * 2).await;
    assert_eq!(store.cleanup().await.ok(), Some(1));
    assert_eq!(store.get(&key).await.ok(), Some(None));
}

/// A plain `start` over a durable record past its retention makes a plain record of it:
/// no journal, fenced on its plain lease, never listed as abandoned.
pub async fn a_plain_start_over_an_expired_durable_record_makes_a_plain_record(
    store: &impl IdempotencyStore,
) {
    let key = unique_key("plain-over-expired");
    let brief = DurableStart {
        retain: Some(SHORT),
        ..short(&key, b"in")
    };
    acquire(store, brief).await;
    tokio::time::sleep(PAST_SHORT * 2).await;
    let plain = StartRequest {
        lease: SHORT,
        ..request(&key, None)
    };
    let Ok(StartOutcome::Acquired(token)) = store.start(plain).await else {
        panic!("an expired durable record is free");
    };
    assert_eq!(journal(store).read_journal(&key).await.ok(), Some(None));
    tokio::time::sleep(PAST_SHORT).await;
    assert!(matches!(
        journal(store).abandoned(&key, None, 10).await.as_deref(),
        Ok([])
    ));
    assert!(matches!(
        store.renew(&key, token, LONG).await,
        Err(StoreError::StaleToken)
    ));
    let Ok(StartOutcome::Acquired(token)) = store.start(request(&key, None)).await else {
        panic!("a lapsed plain record is free");
    };
    assert!(store.renew(&key, token, LONG).await.is_ok());
    assert!(store.complete(&key, token, b"ok", None).await.is_ok());
}

/// `abandoned` matches its prefix byte for byte: `%`, `_` and non-ASCII characters are
/// characters like any, and a key equal to the prefix matches it.
pub async fn abandoned_matches_prefixes_byte_for_byte(store: &impl IdempotencyStore) {
    let base = unique_key("bytes");
    let names = ["p%_:a", "p%_:b", "pX_:c", "p%_;d", "p%_:", "é:1", "é;2"];
    let keys: Vec<String> = names.iter().map(|n| format!("{base}{n}")).collect();
    for key in &keys {
        acquire(store, short(key, b"in")).await;
    }
    tokio::time::sleep(PAST_SHORT).await;
    let listed = journal(store)
        .abandoned(&format!("{base}p%_:"), None, 10)
        .await;
    assert_eq!(
        listed.ok(),
        Some(vec![keys[4].clone(), keys[0].clone(), keys[1].clone()])
    );
    let listed = journal(store)
        .abandoned(&format!("{base}é:"), None, 10)
        .await;
    assert_eq!(listed.ok(), Some(vec![keys[5].clone()]));
    let listed = journal(store).abandoned(&base, None, 100).await;
    assert_eq!(listed.map(|k| k.len()).ok(), Some(keys.len()));
    let everything = journal(store).abandoned("", None, usize::MAX).await;
    let everything = everything.unwrap_or_default();
    assert!(keys.iter().all(|k| everything.contains(k)));
}

/// At the lease boundary, with appends in flight: the takeover's journal holds exactly the
/// entries whose `append` returned `Ok` to the stale owner — none lost, none extra. Run a
/// few times, since the race is what is checked.
pub async fn a_takeover_returns_exactly_the_appends_its_owner_saw_succeed(
    store: &impl IdempotencyStore,
) {
    for _ in 0..5 {
        let key = unique_key("append-race");
        let old = acquire(store, short(&key, b"in")).await;
        let appender = async {
            let mut acked = Vec::new();
            for n in 0u32..100_000 {
                let entry = n.to_be_bytes().to_vec();
                match journal(store).append(&key, old, &entry).await {
                    Ok(()) => acked.push(entry),
                    Err(StoreError::StaleToken) => return acked,
                    Err(e) => panic!("append failed: {e}"),
                }
            }
            panic!("appends were never refused");
        };
        let taker = async {
            tokio::time::sleep(SHORT * 2 / 3).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match journal(store)
                    .start_durable(durable(&key, None, b"in"))
                    .await
                {
                    Ok(DurableStartOutcome::Acquired {
                        resumed: Some(j), ..
                    }) => return j,
                    Ok(DurableStartOutcome::Existing(_)) => {
                        assert!(tokio::time::Instant::now() < deadline, "never taken over");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    other => panic!("unexpected takeover outcome: {other:?}"),
                }
            }
        };
        let (acked, resumed) = tokio::join!(appender, taker);
        assert!(!acked.is_empty(), "the owner appended nothing in its lease");
        assert_eq!(resumed.entries, acked);
    }
}

/// Of concurrent redrives of one failed run, exactly one acquires it with its journal; the
/// others see it running.
pub async fn concurrent_redrives_acquire_exactly_once(store: &impl IdempotencyStore) {
    let key = unique_key("redrive-storm");
    let token = acquire(store, durable(&key, None, b"in")).await;
    assert!(journal(store).append(&key, token, b"e").await.is_ok());
    assert!(store.fail(&key, token, b"boom", None).await.is_ok());
    let redrives = (0..16).map(|_| journal(store).redrive(&key, LONG, Some(LONG)));
    let mut acquired = 0;
    for outcome in futures_util::future::join_all(redrives).await {
        match outcome {
            Ok(Redrive::Acquired { journal, .. }) => {
                assert_eq!(journal.entries, vec![b"e".to_vec()]);
                acquired += 1;
            }
            Ok(Redrive::NotFailed(r)) => assert_eq!(r.status, RecordStatus::Running),
            other => panic!("unexpected redrive outcome: {other:?}"),
        }
    }
    assert_eq!(acquired, 1);
}

/// A redrive of a plain failure, or of an expired one, does nothing.
pub async fn redrive_leaves_plain_and_expired_failures_alone(store: &impl IdempotencyStore) {
    let plain = unique_key("redrive-plain");
    let Ok(StartOutcome::Acquired(token)) = store.start(request(&plain, None)).await else {
        panic!("acquire");
    };
    assert!(store.fail(&plain, token, b"boom", None).await.is_ok());
    assert!(matches!(
        journal(store).redrive(&plain, LONG, None).await,
        Ok(Redrive::NotFailed(r)) if r.status == RecordStatus::Failed
    ));
    let expired = unique_key("redrive-expired");
    let token = acquire(store, durable(&expired, None, b"in")).await;
    assert!(
        store
            .fail(&expired, token, b"boom", Some(SHORT))
            .await
            .is_ok()
    );
    tokio::time::sleep(PAST_SHORT).await;
    assert!(matches!(
        journal(store).redrive(&expired, LONG, None).await,
        Ok(Redrive::Absent)
    ));
}

/// An input larger than the journal limit is refused before anything is written. `store`
/// keeps journals of at most 16 bytes.
pub async fn an_oversize_input_is_refused_before_anything_is_written(
    store: &impl IdempotencyStore,
) {
    let key = unique_key("big-input");
    let started = journal(store)
        .start_durable(durable(&key, None, &[0; 17]))
        .await;
    assert!(matches!(
        started,
        Err(StoreError::TooLarge {
            size: 17,
            limit: 16
        })
    ));
    assert_eq!(store.get(&key).await.ok(), Some(None));
}

/// `size` bytes of checkpoint-like JSON (compressible as real state is, not as a run of
/// one byte is).
fn json_like(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    let mut n = 0u64;
    while out.len() < size {
        n += 1;
        let step = format!(
            r#"{{"step":{n},"state":{{"order":"o-{}","amount":{}}}}}"#,
            n * 7919,
            n * 31 % 1000
        );
        out.extend_from_slice(step.as_bytes());
    }
    out.truncate(size);
    out
}

/// Median, 90th and 99th percentile of `samples`, in microseconds.
fn percentiles(samples: &mut [Duration]) -> [f64; 3] {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    [at(0.5), at(0.9), at(0.99)]
}

/// `append` at concurrency 1, interleaved one for one with `renew` (the cheapest fenced
/// write: a one-row `UPDATE` and its commit) and `select_1` (a bare round trip on the same
/// pool), so all three see the same machine at the same moments. Each run appends five
/// 256-byte entries (a five-step flow's checkpoints), then a new run starts (not timed);
/// the first 100 runs warm up. Prints the percentiles under `label`.
pub async fn measure_append<F, Fut>(store: &impl IdempotencyStore, label: &str, select_1: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let entry = [7u8; 256];
    let mut samples: [Vec<Duration>; 3] = Default::default();
    for run in 0..600 {
        let key = unique_key("bench");
        let token = acquire(store, durable(&key, None, b"input")).await;
        for _ in 0..5 {
            let began = std::time::Instant::now();
            let appended = journal(store).append(&key, token, &entry).await;
            let append = began.elapsed();
            assert!(appended.is_ok(), "append: {appended:?}");
            let began = std::time::Instant::now();
            let renewed = store.renew(&key, token, LONG).await;
            let renew = began.elapsed();
            assert!(renewed.is_ok(), "renew: {renewed:?}");
            let began = std::time::Instant::now();
            select_1().await;
            let select = began.elapsed();
            if run >= 100 {
                for (all, one) in samples.iter_mut().zip([append, renew, select]) {
                    all.push(one);
                }
            }
        }
        assert!(store.delete(&key).await.is_ok());
    }
    let n = samples[0].len();
    let [append, renew, select] = samples.map(|mut s| percentiles(&mut s));
    println!(
        "{label}, {n} samples each, µs p50/p90/p99: append {a0:.0}/{a1:.0}/{a2:.0}, \
         renew {r0:.0}/{r1:.0}/{r2:.0}, SELECT 1 {s0:.0}/{s1:.0}/{s2:.0}; at p50 \
         append/SELECT 1 = {x:.2}, append/renew = {y:.2}",
        a0 = append[0],
        a1 = append[1],
        a2 = append[2],
        r0 = renew[0],
        r1 = renew[1],
        r2 = renew[2],
        s0 = select[0],
        s1 = select[1],
        s2 = select[2],
        x = append[0] / select[0],
        y = append[0] / renew[0],
    );
    // An append rewrites the journal value: its cost grows with what is already there.
    for size in [64 << 10, 1 << 20, 8 << 20] {
        let key = unique_key("bench-large");
        let token = acquire(store, durable(&key, None, b"input")).await;
        assert!(
            journal(store)
                .append(&key, token, &json_like(size))
                .await
                .is_ok()
        );
        let mut appends = Vec::new();
        for _ in 0..20 {
            let began = std::time::Instant::now();
            let appended = journal(store).append(&key, token, &entry).await;
            appends.push(began.elapsed());
            assert!(appended.is_ok(), "append: {appended:?}");
        }
        let [p50, _, _] = percentiles(&mut appends);
        println!(
            "{label}: append of 256 B to a journal of {} KiB, p50 {p50:.0} µs",
            size >> 10
        );
        assert!(store.delete(&key).await.is_ok());
    }
}

/// Generates one `#[tokio::test]` per check above that may share its store with others,
/// each building its store with `$make`. (The cleanup and oversize checks need a store of
/// their own; each backend calls them.)
#[macro_export]
macro_rules! durable_checks {
    ($make:expr) => {
        $crate::durable_checks!(@tests $make;
            an_abandoned_durable_record_reads_as_running_and_blocks_a_plain_start,
            a_plain_rerun_of_a_failed_durable_record_leaves_no_journal,
            a_durable_start_treats_plain_records_by_the_start_rules,
            a_takeover_returns_exactly_the_appends_its_owner_saw_succeed,
            a_plain_start_over_an_expired_durable_record_makes_a_plain_record,
            abandoned_matches_prefixes_byte_for_byte,
            concurrent_redrives_acquire_exactly_once,
            redrive_leaves_plain_and_expired_failures_alone,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $make.await;
                $crate::durable_checks::$name(&store).await;
            }
        )*
    };
}
