//! What durable records cost on this store, beside a raw `GetItem` round trip in the same
//! run: the latency of an append (on a small and on a large journal), a durable renewal, a
//! fresh durable start and a takeover at concurrency 1; and what `abandoned` costs as the
//! table grows, since it scans the whole table. A measurement, not a test of behaviour,
//! so it is ignored by default:
//!
//! ```sh
//! DYNAMODB_ENDPOINT=http://127.0.0.1:PORT cargo test -p orchestrix-dynamodb --release \
//!     --test durable_cost -- --ignored --nocapture
//! ```
//!
//! Against moto the figures say how the requests compare with each other, not what
//! DynamoDB's latency is: moto spends milliseconds of Python on every request. The
//! operations are interleaved in one loop, so that on a shared machine each meets the
//! same load.

mod common;

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, IdempotencyStore, JournalStore, StartOutcome,
};
use orchestrix_conformance::journal::durable;
use orchestrix_conformance::{request, unique_key};
use orchestrix_dynamodb::{DynamoOptions, DynamoStore};

/// Round trips measured per operation.
const CALLS: usize = 300;
/// A checkpoint's size: a step's position, name, status, attempts and a little state.
const ENTRY: usize = 200;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

async fn acquire(store: &DynamoStore, req: DurableStart<'_>) -> FencingToken {
    match store.start_durable(req).await {
        Ok(DurableStartOutcome::Acquired { token, .. }) => token,
        other => panic!("{other:?}"),
    }
}

async fn timed<T>(samples: &mut Vec<Duration>, op: impl std::future::Future<Output = T>) -> T {
    let began = Instant::now();
    let out = op.await;
    samples.push(began.elapsed());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it with --ignored --nocapture"]
async fn what_a_checkpoint_costs_beside_a_get_item() {
    let store = common::store().await;
    let client = common::client();
    // The baseline: a GetItem of a small plain record.
    let plain = unique_key("cost-plain");
    match store.start(request(&plain, Some("fp"))).await {
        Ok(StartOutcome::Acquired(token)) => store
            .complete(&plain, token, &[0u8; ENTRY], None)
            .await
            .expect("complete"),
        other => panic!("{other:?}"),
    }
    let running = unique_key("cost-running");
    let running_token = match store.start(request(&running, Some("fp"))).await {
        Ok(StartOutcome::Acquired(token)) => token,
        other => panic!("{other:?}"),
    };
    let small = unique_key("cost-small");
    let large = unique_key("cost-large");
    let small_token = acquire(&store, durable(&small, None, b"in")).await;
    let large_token = acquire(&store, durable(&large, None, b"in")).await;
    // About 100 KB of journal: under what moto lets an update reach (about 200 KB).
    for _ in 0..20 {
        store
            .append(&large, large_token, &[7u8; 5_000])
            .await
            .expect("fill");
    }
    let entry = [1u8; ENTRY];
    let names = [
        "GetItem (raw round trip)",
        "append 200 B (journal 0-60 KB)",
        "append 200 B (journal 100-160 KB)",
        "plain renew (UpdateItem, small item)",
        "durable renew (journal 0-60 KB)",
        "fresh start_durable (PutItem)",
        "takeover (PutItem + UpdateItem)",
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    for call in 0..CALLS {
        let get = client
            .get_item()
            .table_name(common::shared_table())
            .key("key", AttributeValue::S(plain.clone()))
            .consistent_read(true)
            .send();
        timed(&mut samples[0], get).await.expect("GetItem");
        timed(&mut samples[1], store.append(&small, small_token, &entry))
            .await
            .expect("append");
        timed(&mut samples[2], store.append(&large, large_token, &entry))
            .await
            .expect("append");
        timed(
            &mut samples[3],
            store.renew(&running, running_token, Duration::from_secs(30)),
        )
        .await
        .expect("renew");
        timed(
            &mut samples[4],
            store.renew(&small, small_token, Duration::from_secs(30)),
        )
        .await
        .expect("renew");
        let fresh = format!("{small}:fresh:{call}");
        timed(
            &mut samples[5],
            store.start_durable(durable(&fresh, None, b"in")),
        )
        .await
        .expect("start");
        let abandoned = format!("{small}:abandoned:{call}");
        let token = acquire(&store, durable(&abandoned, None, b"in")).await;
        store.suspend(&abandoned, token).await.expect("suspend");
        timed(
            &mut samples[6],
            store.start_durable(durable(&abandoned, None, b"in")),
        )
        .await
        .expect("takeover");
    }
    let base = median(samples[0].clone());
    println!("median of {CALLS} calls each, interleaved, concurrency 1:");
    for (name, samples) in names.iter().zip(samples) {
        let m = median(samples);
        println!(
            "  {name:<38} {:>8.2} ms  {:>5.2}x GetItem",
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() / base.as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it with --ignored --nocapture"]
async fn what_abandoned_costs_as_the_table_grows() {
    let table = common::unique_table("scan-cost");
    let store = DynamoStore::new(
        common::client(),
        DynamoOptions::new(&table).clock_skew(Duration::from_millis(100)),
    )
    .expect("valid options");
    store.create_table_if_missing().await.expect("table");
    let client = common::client();
    let mut written = 0;
    println!("abandoned(prefix, None, 100) with one abandoned run, median of 5:");
    for size in [1_000, 5_000, 20_000] {
        // Plain finished records, 25 to a batch: what a busy table mostly holds.
        while written < size {
            let batch: Vec<WriteRequest> = (written..(written + 25).min(size))
                .map(|n| {
                    let put = PutRequest::builder()
                        .item("key", AttributeValue::S(format!("other:{n:08}")))
                        .item("version", AttributeValue::N("1".into()))
                        .item("status", AttributeValue::S("completed".into()))
                        .item(
                            "token",
                            AttributeValue::S(FencingToken::generate().to_string()),
                        )
                        .item("result", AttributeValue::B(vec![0u8; 200].into()))
                        .build()
                        .expect("put request");
                    WriteRequest::builder().put_request(put).build()
                })
                .collect();
            written += batch.len();
            client
                .batch_write_item()
                .request_items(&table, batch)
                .send()
                .await
                .expect("BatchWriteItem");
        }
        let key = format!("flow:{size}");
        let req = DurableStart {
            lease: Duration::from_millis(10),
            ..durable(&key, None, b"in")
        };
        acquire(&store, req).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut samples = Vec::new();
        for _ in 0..5 {
            let listed = timed(&mut samples, store.abandoned("flow:", None, 100))
                .await
                .expect("abandoned");
            assert!(listed.contains(&key));
        }
        println!(
            "  {size:>6} items: {:>9.1} ms",
            median(samples).as_secs_f64() * 1e3
        );
    }
    client
        .delete_table()
        .table_name(&table)
        .send()
        .await
        .expect("drop the table");
}
