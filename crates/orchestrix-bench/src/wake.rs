//! `wake`: how soon a waiting duplicate (`OnRunning::Wait`) returns once the owner
//! finished, per store, by notification and by polling, beside one round trip of the same
//! store measured in the same run.
//!
//! Each sample: an owner run (a real flow) acquires a key and blocks in its step; a
//! duplicate run of the same key waits for it, on a second store value over the same
//! backend (another process, as far as the backend can tell) unless said otherwise; after
//! 10–40 ms the owner's step returns, and the latency is from the owner's `run` returning
//! (its finish acknowledged) to the waiter's `run` returning with the owner's result.
//! "poll" puts the waiter's store behind a wrapper that keeps the trait's default
//! `wait_for_change`: the backoff from 2 ms to 50 ms.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, Record, StartOutcome, StartRequest, StoreError,
};
use orchestrix::{Context, Flow, OnRunning, RunOptions, StepError};
use tokio::sync::Notify;

use crate::section::{Section, Table};
use crate::stores::{Backend, Namespace, StoreKind};

/// The bound on one sample.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct WakeConfig {
    /// Samples per store and mode (the DynamoDB-compatible server gets half).
    pub samples: usize,
}

impl WakeConfig {
    pub fn from_args(args: &crate::args::Args) -> anyhow::Result<Self> {
        Ok(Self {
            samples: usize::try_from(args.count("samples", 60)?).unwrap_or(60),
        })
    }
}

/// How the waiter is woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The store's own `wait_for_change`, waiter on a second store value.
    Own,
    /// The store's own `wait_for_change`, waiter on the owner's store value (SQLite's
    /// in-process wake-up; the memory store has only one value).
    SameStore,
    /// The trait's default: polling with backoff.
    Poll,
}

/// The modes measured for each store, with their names in the table.
fn modes(kind: StoreKind) -> Vec<(Mode, &'static str)> {
    match kind {
        StoreKind::Memory => vec![
            (Mode::SameStore, "notification (in process)"),
            (Mode::Poll, "polling (backoff 2→50 ms)"),
        ],
        StoreKind::Postgres => vec![
            (Mode::Own, "notification (LISTEN/NOTIFY)"),
            (Mode::Poll, "polling (backoff 2→50 ms)"),
        ],
        StoreKind::Sqlite => vec![
            (Mode::SameStore, "notification (same store, in process)"),
            (Mode::Own, "polling (other process: backoff 2→50 ms)"),
        ],
        StoreKind::Redis => vec![
            (Mode::Own, "notification (sharded pub/sub)"),
            (Mode::Poll, "polling (backoff 2→50 ms)"),
        ],
        StoreKind::Dynamodb => vec![(Mode::Own, "polling (backoff 2→50 ms)")],
    }
}

pub async fn main(kinds: &[StoreKind], config: &WakeConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Wake-up latency of a waiting duplicate");
    section.about(
        "A duplicate run with `OnRunning::Wait` waits for the owner of its key; the owner's step \
         returns 10–40 ms after the duplicate began waiting. Latency: from the owner's `run` \
         returning (its finish acknowledged by the store) to the duplicate's `run` returning \
         with the owner's result. The duplicate runs on a second store value over the same \
         backend (another pool or client: another process, as far as the backend can tell), \
         except where the mode says \"same store\". \"polling\" is the trait's default \
         `wait_for_change`: 2 ms on a caller's first wait, doubling to 50 ms. One round trip: \
         the p50 of the store client's raw round trip (PING, SELECT 1, GetItem) in the same \
         run. Target: notification p50 ≤ 2× one round trip.",
    );
    let mut table = Table::new([
        "store",
        "waiter woken by",
        "samples",
        "p50",
        "p99",
        "one round trip (p50)",
        "p50 ÷ round trip",
    ]);
    for &kind in kinds {
        match store_rows(kind, config, &mut table).await {
            Ok(()) => {}
            Err(e) => section.note(format!("{}: skipped ({e:#})", kind.name())),
        }
    }
    section.tables.push(table);
    section.note(
        "Redis: the store's own wait is woken by the finish script's `SPUBLISH` (one \
         subscription connection per store, a 1 s safety poll). DynamoDB has no change \
         notification a store could use cheaply (Streams are a \
         separate, paid, eventually delivered service): it polls.",
    );
    Ok(section)
}

async fn store_rows(kind: StoreKind, config: &WakeConfig, table: &mut Table) -> anyhow::Result<()> {
    let (namespace, backend) = Namespace::create(kind, "wake", 8).await?;
    let samples = if kind == StoreKind::Dynamodb {
        config.samples / 2
    } else {
        config.samples
    }
    .max(4);
    let outcome = async {
        let round_trip = round_trip_p50(&backend, 50).await?;
        let other = match kind {
            StoreKind::Memory => backend.clone(),
            _ => Backend::open(kind, &namespace.name, 8).await?,
        };
        let mut rows = Vec::new();
        for (mode, name) in modes(kind) {
            let owner_store = backend.store();
            let waiter_store: Arc<dyn IdempotencyStore> = match mode {
                Mode::Own => other.store(),
                Mode::SameStore => Arc::clone(&owner_store),
                Mode::Poll => Arc::new(Polling(other.store())),
            };
            let mut latencies = measure(owner_store, waiter_store, samples, name).await?;
            latencies.sort();
            rows.push((name, latencies));
        }
        anyhow::Ok((round_trip, rows))
    }
    .await;
    let _ = namespace.remove(&backend).await;
    let (round_trip, rows) = outcome?;
    for (name, latencies) in rows {
        let p50 = percentile(&latencies, 50);
        let p99 = percentile(&latencies, 99);
        let ratio = if kind == StoreKind::Memory || round_trip.is_zero() {
            "-".to_owned()
        } else {
            format!("{:.1}", p50.as_secs_f64() / round_trip.as_secs_f64())
        };
        table.row([
            kind.name().to_owned(),
            name.to_owned(),
            latencies.len().to_string(),
            millis(p50),
            millis(p99),
            if kind == StoreKind::Memory {
                "-".to_owned()
            } else {
                millis(round_trip)
            },
            ratio,
        ]);
    }
    Ok(())
}

/// The median of `count` sequential raw round trips.
async fn round_trip_p50(backend: &Backend, count: usize) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let sent = Instant::now();
        tokio::time::timeout(SAMPLE_TIMEOUT, backend.round_trip()).await??;
        times.push(sent.elapsed());
    }
    times.sort();
    Ok(percentile(&times, 50))
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted[at]
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The owner's step: tells the harness it started, then waits for the gate.
#[derive(Default)]
struct Gate {
    started: Notify,
    open: Notify,
}

fn gated_flow(store: Arc<dyn IdempotencyStore>, gate: &Arc<Gate>) -> anyhow::Result<Flow<u64>> {
    let gate = Arc::clone(gate);
    Ok(Flow::<u64>::builder("wake")
        .store(store)
        .step("work", move |ctx: Context<u64>| {
            let gate = Arc::clone(&gate);
            async move {
                std::hint::black_box(ctx.input());
                gate.started.notify_one();
                gate.open.notified().await;
                Ok::<_, StepError>(())
            }
        })
        .build()?)
}

/// `samples` wake-ups (after one warm-up, which also starts PostgreSQL's listener).
async fn measure(
    owner_store: Arc<dyn IdempotencyStore>,
    waiter_store: Arc<dyn IdempotencyStore>,
    samples: usize,
    mode: &str,
) -> anyhow::Result<Vec<Duration>> {
    let gate = Arc::new(Gate::default());
    let owner = gated_flow(owner_store, &gate)?;
    let waiter = gated_flow(waiter_store, &gate)?;
    let run = format!("{:08x}", fastrand::u32(..));
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..=samples {
        let key = format!("wake-{run}-{n}");
        let latency = tokio::time::timeout(SAMPLE_TIMEOUT, sample(&owner, &waiter, &gate, key))
            .await
            .map_err(|_| anyhow::anyhow!("{mode}: a sample took over {SAMPLE_TIMEOUT:?}"))??;
        if n > 0 {
            latencies.push(latency);
        }
    }
    Ok(latencies)
}

async fn sample(
    owner: &Flow<u64>,
    waiter: &Flow<u64>,
    gate: &Gate,
    key: String,
) -> anyhow::Result<Duration> {
    let owned = tokio::spawn({
        let (owner, key) = (owner.clone(), key.clone());
        async move {
            let result = owner.run(1, RunOptions::key(key)).await;
            (result, Instant::now())
        }
    });
    gate.started.notified().await;
    let waited = tokio::spawn({
        let waiter = waiter.clone();
        let wait = OnRunning::Wait {
            timeout: SAMPLE_TIMEOUT,
        };
        async move {
            let result = waiter.run(1, RunOptions::key(key).on_running(wait)).await;
            (result, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(fastrand::u64(10..40))).await;
    gate.open.notify_one();
    let (owner_result, owner_done) = owned.await?;
    let (waiter_result, waiter_done) = waited.await?;
    let owner_result = owner_result?;
    let waiter_result = waiter_result?;
    if owner_result.replayed || !waiter_result.replayed {
        anyhow::bail!("the waiter ran the flow itself instead of receiving the owner's result");
    }
    Ok(waiter_done.saturating_duration_since(owner_done))
}

/// A store seen as one that cannot notify: everything delegated but `wait_for_change`,
/// which stays the trait's default (polling with backoff).
#[derive(Debug)]
pub(crate) struct Polling(pub(crate) Arc<dyn IdempotencyStore>);

#[async_trait]
impl IdempotencyStore for Polling {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.0.get(key).await
    }
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        self.0.start(req).await
    }
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.0.finish(key, token, status, result, ttl).await
    }
    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.0.renew(key, token, lease).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.0.release(key, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key).await
    }
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
}
