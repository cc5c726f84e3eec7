//! What one journal append costs, beside a native `SET` round trip in the same run: latency
//! at concurrency 1, and Redis's CPU per call from `INFO commandstats`. A measurement, not a
//! test of behaviour (the benchmark crate carries the real figures), so it is ignored by
//! default:
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6390 cargo test -p orchestrix-redis --release \
//!     --test durable_cost -- --ignored --nocapture
//! ```
//!
//! Point it at a Redis nobody else uses: the CPU figures are differences of the server's
//! counters, which other clients' commands would blur. The operations are interleaved in
//! one loop, so that on a shared machine each meets the same load.

mod common;

use std::time::{Duration, Instant};

use orchestrix::store::{
    DurableStartOutcome, FencingToken, IdempotencyStore, JournalStore, StartOutcome,
};
use orchestrix_conformance::journal::durable;
use orchestrix_conformance::{request, unique_key};
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::{self, aio::MultiplexedConnection};

/// Round trips measured per operation.
const CALLS: usize = 20_000;
/// A checkpoint's size: a step's position, name, status, attempts and a little state.
const ENTRY: usize = 200;

/// The operations compared, each one round trip.
#[derive(Clone, Copy)]
enum Op {
    Set,
    Append,
    AppendBig,
    PlainRenew,
}

impl Op {
    const ALL: [Op; 4] = [Op::Set, Op::Append, Op::AppendBig, Op::PlainRenew];

    fn name(self) -> &'static str {
        match self {
            Op::Set => "native SET (200 B)",
            Op::Append => "append 200 B (journal < 200 KB)",
            Op::AppendBig => "append 200 B (journal 16 MiB)",
            Op::PlainRenew => "plain renew script (for scale)",
        }
    }

    /// The command whose server time `INFO commandstats` reports for it.
    fn command(self) -> &'static str {
        match self {
            Op::Set => "set",
            _ => "evalsha",
        }
    }
}

/// Latencies of one operation, and Redis's CPU per call of it.
#[derive(Default)]
struct Measured {
    latencies: Vec<Duration>,
    usec_per_call: f64,
}

impl Measured {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        sorted[((sorted.len() - 1) as f64 * p) as usize]
    }
}

/// Calls and total µs of one command in `INFO commandstats`.
async fn command_stats(raw: &mut MultiplexedConnection, command: &str) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(raw)
        .await
        .unwrap();
    let line = info
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{command}:")));
    let field = |name: &str| {
        line.and_then(|l| l.split([':', ',']).find_map(|f| f.strip_prefix(name)))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("calls="), field("usec="))
}

async fn acquire(store: &RedisStore, key: &str) -> FencingToken {
    match store.start_durable(durable(key, None, b"input")).await {
        Ok(DurableStartOutcome::Acquired { token, .. }) => token,
        other => panic!("a fresh key must be acquired: {other:?}"),
    }
}

/// The fixture: a key for `SET`, durable runs to append to, a plain run to renew.
struct Bench {
    store: RedisStore,
    raw: MultiplexedConnection,
    set_key: String,
    runs: Vec<(String, FencingToken)>,
    big: (String, FencingToken),
    plain: (String, FencingToken),
    entry: Vec<u8>,
}

impl Bench {
    /// Appends per run, so journals stay of a realistic length.
    const PER_RUN: usize = 1000;

    async fn new() -> Self {
        let store = common::store("durable-cost").await;
        let raw = common::raw().await;
        let set_key = format!("{}{}", store.key_prefix(), unique_key("set"));
        let mut runs = Vec::new();
        for _ in 0..=2 * CALLS / Self::PER_RUN {
            let key = unique_key("append");
            let token = acquire(&store, &key).await;
            runs.push((key, token));
        }
        let big = unique_key("big");
        let big_token = acquire(&store, &big).await;
        let chunk = vec![b'j'; 1024 * 1024];
        for _ in 0..16 {
            store.append(&big, big_token, &chunk).await.unwrap();
        }
        let plain = unique_key("plain");
        let Ok(StartOutcome::Acquired(plain_token)) = store.start(request(&plain, None)).await
        else {
            panic!("a fresh key must be acquired");
        };
        Self {
            store,
            raw,
            set_key,
            runs,
            big: (big, big_token),
            plain: (plain, plain_token),
            entry: vec![b'e'; ENTRY],
        }
    }

    /// One round trip of `op`; `i` counts the appends made so far.
    async fn run(&mut self, op: Op, i: usize) {
        match op {
            Op::Set => {
                let _: () = redis::cmd("SET")
                    .arg(&self.set_key)
                    .arg(&self.entry)
                    .query_async(&mut self.raw)
                    .await
                    .unwrap();
            }
            Op::Append => {
                let (key, token) = &self.runs[i / Self::PER_RUN];
                self.store.append(key, *token, &self.entry).await.unwrap();
            }
            Op::AppendBig => {
                let (key, token) = &self.big;
                self.store.append(key, *token, &self.entry).await.unwrap();
            }
            Op::PlainRenew => {
                let (key, token) = &self.plain;
                let lease = Duration::from_secs(30);
                self.store.renew(key, *token, lease).await.unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test: run it with --ignored against a Redis of its own"]
async fn append_costs_about_one_native_round_trip() {
    let mut bench = Bench::new().await;
    let mut measured: Vec<Measured> = Op::ALL.iter().map(|_| Measured::default()).collect();
    let warm_up = CALLS / 10;
    for i in 0..warm_up + CALLS {
        for (op, m) in Op::ALL.into_iter().zip(&mut measured) {
            let began = Instant::now();
            bench.run(op, i).await;
            if i >= warm_up {
                m.latencies.push(began.elapsed());
            }
        }
    }
    // Redis's CPU: each operation alone, from its command's counters.
    let mut next = warm_up + CALLS;
    for (op, m) in Op::ALL.into_iter().zip(&mut measured) {
        let (calls_before, usec_before) = command_stats(&mut bench.raw, op.command()).await;
        for _ in 0..CALLS / 2 {
            bench.run(op, next).await;
            if matches!(op, Op::Append) {
                next += 1;
            }
        }
        let (calls_after, usec_after) = command_stats(&mut bench.raw, op.command()).await;
        let calls = (calls_after - calls_before).max(1);
        m.usec_per_call = (usec_after - usec_before) as f64 / calls as f64;
    }

    let set_p50 = measured[0].percentile(0.5).as_secs_f64();
    println!(
        "\n{:<34} {:>8} {:>8} {:>8} {:>10} {:>14}",
        "operation (concurrency 1)", "p50 µs", "p90 µs", "p99 µs", "p50 ÷ SET", "Redis µs/call"
    );
    for (op, m) in Op::ALL.into_iter().zip(&measured) {
        let us = |p| m.percentile(p).as_secs_f64() * 1e6;
        println!(
            "{:<34} {:>8.1} {:>8.1} {:>8.1} {:>10.2} {:>14.2}",
            op.name(),
            us(0.5),
            us(0.9),
            us(0.99),
            m.percentile(0.5).as_secs_f64() / set_p50,
            m.usec_per_call,
        );
    }
    let _: () = redis::cmd("DEL")
        .arg(&bench.set_key)
        .query_async(&mut bench.raw)
        .await
        .unwrap();
    for (key, _) in bench.runs.iter().chain([&bench.big, &bench.plain]) {
        bench.store.delete(key).await.unwrap();
    }
}
