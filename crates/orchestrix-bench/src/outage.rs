//! A Redis outage during a storm: a private `redis-server` (no persistence) is killed with
//! SIGKILL while concurrent callers run keyed flows, and restarted, empty, on the same port.
//!
//! # What is checked, exactly
//!
//! A restart of a Redis without persistence forgets every record, so a key that executed
//! before the kill may legitimately execute once more after the restart: that is the data
//! loss the store's README warns about, not a duplicate. The invariants are therefore:
//!
//! 1. **No duplicate while a server was up**: for every key, at most one execution whose
//!    acquire was answered by the first server, and at most one whose acquire was answered
//!    by the restarted one. An acquire is attributed to the first server when its `start`
//!    call returned before the kill completed, to the restarted one when it began after;
//!    a call that straddled the kill is counted as ambiguous (reported, never a duplicate).
//!    The lease (30 s) outlasts the scenario, so no lease lapses within one server's life.
//! 2. **No step without an acquired record**: the store is wrapped in an observer that
//!    notes every `start` that answered `Acquired` until its owner settles; every execution
//!    of the step must find its key held that way.
//! 3. **Fail closed**: no run succeeds while no server is running.
//! 4. **Bounded**: every `Flow::run` returns within [`RUN_TIMEOUT`]; none hangs.
//! 5. **Typed errors only, no panics**: every `Err` is a `StoreError::Backend` (not
//!    started, or ran but not persisted) or a `StaleToken` on persisting (the record was
//!    lost with the server); any other kind, and any panicking caller, is a violation.
//! 6. **Recovery**: runs succeed again after the restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, Record, StartOutcome, StartRequest, StoreError,
};
use orchestrix::{Context, Flow, KeyScope, RunOptions, StepError};
use orchestrix_redis::RedisStore;

use crate::args::Args;
use crate::redis_server::PrivateRedis;
use crate::section::{Section, Table};
use crate::stores::unique_suffix;
use crate::storm::Tally;

/// The bound on one `Flow::run`.
const RUN_TIMEOUT: Duration = Duration::from_secs(15);

/// Error kinds an outage may cause (fail closed, or persisted nowhere).
const EXPECTED_ERRORS: [&str; 3] = [
    "not started: backend",
    "ran, not persisted: backend",
    "ran, not persisted: stale token",
];

/// How often the callers move on to new keys.
const WINDOW: Duration = Duration::from_millis(100);
/// One run in this many revisits an earlier key at random.
const REVISIT_EVERY: u64 = 8;

#[derive(Debug, Clone, Copy)]
pub struct OutageConfig {
    /// New keys per 100 ms window, raced by every caller.
    pub window_keys: u64,
    pub callers: u64,
    /// How long the step (the side effect) takes, so that some run mid-step when the server
    /// dies.
    pub step: Duration,
    pub duration: Duration,
    pub down_at: Duration,
    pub down_for: Duration,
}

impl OutageConfig {
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        let config = Self {
            window_keys: args.count("window-keys", 20)?,
            callers: args.count("callers", 16)?,
            step: args.millis("step-ms", Duration::from_millis(5))?,
            duration: args.seconds("seconds", Duration::from_secs(8))?,
            down_at: args.millis("down-at-ms", Duration::from_millis(2500))?,
            down_for: args.millis("down-for-ms", Duration::from_millis(1500))?,
        };
        if config.down_at + config.down_for >= config.duration {
            anyhow::bail!(
                "the server must be back before the storm ends: down-at + down-for < seconds"
            );
        }
        Ok(config)
    }
}

/// One acquisition seen by the observer.
#[derive(Debug, Clone, Copy)]
struct Acquisition {
    token: FencingToken,
    began: Instant,
    ended: Instant,
    claimed: bool,
}

/// Notes every acquisition until its owner settles it.
#[derive(Debug, Default)]
struct Held(Mutex<HashMap<String, Vec<Acquisition>>>);

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Acquisition>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn acquired(&self, key: &str, token: FencingToken, began: Instant) {
        let acquisition = Acquisition {
            token,
            began,
            ended: Instant::now(),
            claimed: false,
        };
        self.lock()
            .entry(key.to_owned())
            .or_default()
            .push(acquisition);
    }

    fn settled(&self, key: &str, token: FencingToken) {
        let mut held = self.lock();
        if let Some(list) = held.get_mut(key) {
            list.retain(|a| a.token != token);
            if list.is_empty() {
                held.remove(key);
            }
        }
    }

    /// The unclaimed acquisition of `key` an executing step belongs to.
    fn claim(&self, key: &str) -> Option<Acquisition> {
        let mut held = self.lock();
        let acquisition = held.get_mut(key)?.iter_mut().rev().find(|a| !a.claimed)?;
        acquisition.claimed = true;
        Some(*acquisition)
    }
}

/// The Redis store behind an observer of its acquisitions; every call goes to Redis.
#[derive(Debug)]
struct ObservedStore {
    inner: RedisStore,
    held: Arc<Held>,
}

#[async_trait]
impl IdempotencyStore for ObservedStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        let began = Instant::now();
        let outcome = self.inner.start(req).await;
        if let Ok(StartOutcome::Acquired(token)) = &outcome {
            self.held.acquired(req.key, *token, began);
        }
        outcome
    }

    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.held.settled(key, token);
        self.inner.finish(key, token, status, result, ttl).await
    }

    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.held.settled(key, token);
        self.inner.release(key, token).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }

    async fn wait_for_change(&self, key: &str, max: Duration) -> Result<(), StoreError> {
        self.inner.wait_for_change(key, max).await
    }
}

/// What the step saw.
#[derive(Debug, Default)]
struct Executions {
    /// Key and the acquisition it ran under.
    attributed: Vec<(String, Acquisition)>,
    /// Executions that found no acquisition of their key.
    orphans: Vec<String>,
}

/// One run, for the timeline checks.
struct RunRecord {
    began: Instant,
    ended: Instant,
    ok: bool,
}

pub async fn main(config: &OutageConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Redis outage");
    section.about(format!(
        "A private `redis-server` (`--save \"\" --appendonly no`, its own loopback port) serves \
         {} concurrent callers running keyed flows for {:?}, whose one step (the side effect) \
         takes {:?}. The keys roll: every {WINDOW:?} all callers move on to {} new keys and race \
         for them, and one run in {REVISIT_EVERY} revisits an earlier key at random. At {:?} the \
         server is killed with SIGKILL — runs are mid-step — and {:?} later restarted, empty, on \
         the same port. The store uses its default timeouts (1 s connect, 2 s response) and the \
         runs the default lease (30 s, longer than the scenario).",
        config.callers,
        config.duration,
        config.step,
        config.window_keys,
        config.down_at,
        config.down_for
    ));
    section.about(
        "**Invariants, exactly as checked** — a restart of a Redis without persistence loses \
         its records, so a key may execute once before the kill and once more after the \
         restart; that is expected data loss, not a duplicate. Checked: (1) no key executes \
         twice under acquisitions answered by the same server instance (a `start` that \
         returned before the kill completed belongs to the first server, one that began after \
         it to the restarted one; calls straddling the kill are counted as ambiguous); (2) \
         every execution of the step happens under an acquisition that `start` answered and \
         that is not yet settled (an observer wraps the store); (3) no run succeeds while no \
         server is running (fail closed); (4) every `Flow::run` returns within 15 s; (5) every \
         error is a typed `StoreError` — `Backend` (not started, or ran but not persisted) or \
         `StaleToken` when persisting to a server that lost the record — and no caller panics; \
         (6) runs succeed again after the restart."
            .to_owned(),
    );
    let mut server = PrivateRedis::start().await?;
    let outcome = storm_through_outage(&mut server, config).await;
    server.kill().await?;
    let (tally, runs, executions, timeline) = outcome?;
    let (t_dead, t_respawn, t_up) = timeline;

    // (1) duplicates per server instance.
    let mut per_key: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
    for (key, acquisition) in &executions.attributed {
        let class = if acquisition.ended < t_dead {
            0
        } else if acquisition.began > t_dead {
            1
        } else {
            2
        };
        per_key.entry(key.as_str()).or_default()[class] += 1;
    }
    let duplicates: Vec<String> = per_key
        .iter()
        .filter(|(_, c)| c[0] > 1 || c[1] > 1)
        .map(|(k, c)| format!("{k} (first server ×{}, restarted ×{})", c[0], c[1]))
        .collect();
    let first = per_key.values().filter(|c| c[0] > 0).count();
    let second = per_key.values().filter(|c| c[1] > 0).count();
    let again = per_key.values().filter(|c| c[0] > 0 && c[1] > 0).count();
    let ambiguous: u64 = per_key.values().map(|c| c[2]).sum();
    if !duplicates.is_empty() {
        section.violation(format!(
            "{} keys executed twice against the same server instance: {}",
            duplicates.len(),
            duplicates
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // (2) steps without an acquisition.
    if !executions.orphans.is_empty() {
        section.violation(format!(
            "{} executions without an acquired record (e.g. {})",
            executions.orphans.len(),
            executions.orphans[0]
        ));
    }
    // (3) fail closed while down.
    let succeeded_while_down = runs
        .iter()
        .filter(|r| r.ok && r.began > t_dead && r.ended < t_respawn)
        .count();
    if succeeded_while_down > 0 {
        section.violation(format!(
            "{succeeded_while_down} runs succeeded while no server was running (fail open)"
        ));
    }
    // (4) and (5).
    if tally.timeouts > 0 {
        section.violation(format!(
            "{} runs did not return within {RUN_TIMEOUT:?} (hang)",
            tally.timeouts
        ));
    }
    if tally.panics > 0 {
        section.violation(format!("{} caller tasks panicked", tally.panics));
    }
    let unexpected: Vec<String> = tally
        .errors
        .iter()
        .filter(|(kind, _)| !EXPECTED_ERRORS.contains(&kind.as_str()))
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect();
    if !unexpected.is_empty() {
        section.violation(format!("unexpected errors: {}", unexpected.join(", ")));
    }
    // (6) recovery.
    let recovered = runs.iter().filter(|r| r.ok && r.began > t_up).count();
    if recovered == 0 {
        section.violation("no run succeeded after the restart");
    }
    let longest = runs
        .iter()
        .map(|r| r.ended - r.began)
        .max()
        .unwrap_or_default();
    let first_ok_after = runs
        .iter()
        .filter(|r| r.ok && r.began > t_respawn)
        .map(|r| r.ended.saturating_duration_since(t_respawn))
        .min();

    let mut table = Table::new(["measure", "value"]);
    let mut row = |name: &str, value: String| table.row([name.to_owned(), value]);
    row("runs (all callers)", tally.runs.to_string());
    row(
        "executed / replayed / running",
        format!(
            "{} / {} / {}",
            tally.executed, tally.replayed, tally.running
        ),
    );
    row("errors (typed)", tally.errors_text());
    row("runs that hung (> 15 s)", tally.timeouts.to_string());
    row("longest run", format!("{:.2} s", longest.as_secs_f64()));
    row("keys executed under the first server", first.to_string());
    row(
        "keys executed under the restarted server",
        second.to_string(),
    );
    row(
        "keys executed under both (records lost in the restart)",
        again.to_string(),
    );
    row(
        "keys executed twice under one server",
        duplicates.len().to_string(),
    );
    row(
        "executions with an ambiguous server (straddled the kill)",
        ambiguous.to_string(),
    );
    row(
        "executions without an acquired record",
        executions.orphans.len().to_string(),
    );
    row(
        "runs that succeeded while no server ran",
        succeeded_while_down.to_string(),
    );
    row(
        "first success after the restart",
        first_ok_after.map_or("never".to_owned(), |d| {
            format!("{:.0} ms after respawn", d.as_secs_f64() * 1000.0)
        }),
    );
    row("successful runs after the restart", recovered.to_string());
    section.tables.push(table);
    Ok(section)
}

type Timeline = (Instant, Instant, Instant);

async fn storm_through_outage(
    server: &mut PrivateRedis,
    config: &OutageConfig,
) -> anyhow::Result<(Tally, Vec<RunRecord>, Executions, Timeline)> {
    let prefix = format!("orchestrix-bench:outage:{}:", unique_suffix());
    let inner = RedisStore::builder(server.url())
        .key_prefix(prefix)
        .connect()
        .await?;
    let held = Arc::new(Held::default());
    let store = Arc::new(ObservedStore {
        inner,
        held: Arc::clone(&held),
    });
    let executions = Arc::new(Mutex::new(Executions::default()));
    let seen = Arc::clone(&executions);
    let step = config.step;
    let flow = Flow::<u64>::builder("outage")
        .store(store)
        .step("effect", move |ctx: Context<u64>| {
            let (held, seen) = (Arc::clone(&held), Arc::clone(&seen));
            async move {
                let key = format!("k{}", ctx.input());
                let claimed = held.claim(&key);
                {
                    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    match claimed {
                        Some(acquisition) => seen.attributed.push((key, acquisition)),
                        None => seen.orphans.push(key),
                    }
                }
                tokio::time::sleep(step).await;
                Ok::<_, StepError>(())
            }
        })
        .build()?;

    let started = Instant::now();
    let deadline = started + config.duration;
    let callers: Vec<_> = (0..config.callers)
        .map(|caller| {
            let flow = flow.clone();
            let (keys, callers) = (config.window_keys, config.callers);
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut runs = Vec::new();
                let offset = caller * keys / callers;
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let window = u64::try_from(started.elapsed().as_millis() / WINDOW.as_millis())
                        .unwrap_or(u64::MAX);
                    let i = if n % REVISIT_EVERY == REVISIT_EVERY - 1 && window > 0 {
                        fastrand::u64(0..window * keys)
                    } else {
                        window * keys + (offset + n) % keys
                    };
                    n += 1;
                    let options = RunOptions::key(format!("k{i}"))
                        .scope(KeyScope::Global)
                        .ttl(Duration::from_secs(3600));
                    let began = Instant::now();
                    let outcome = tokio::time::timeout(RUN_TIMEOUT, flow.run(i, options)).await;
                    let ok = matches!(outcome, Ok(Ok(_)));
                    runs.push(RunRecord {
                        began,
                        ended: Instant::now(),
                        ok,
                    });
                    tally.count(outcome);
                    if !ok {
                        // Errors come back at once while the server is down; do not spin.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                (tally, runs)
            })
        })
        .collect();

    tokio::time::sleep_until((started + config.down_at).into()).await;
    server.kill().await?;
    let t_dead = Instant::now();
    tokio::time::sleep(config.down_for).await;
    let t_respawn = Instant::now();
    server.restart().await?;
    let t_up = Instant::now();

    let mut tally = Tally::default();
    let mut runs = Vec::new();
    for caller in callers {
        match caller.await {
            Ok((t, r)) => {
                tally.add(&t);
                runs.extend(r);
            }
            Err(_) => tally.panics += 1,
        }
    }
    drop(flow);
    let executions =
        std::mem::take(&mut *executions.lock().unwrap_or_else(PoisonError::into_inner));
    Ok((tally, runs, executions, (t_dead, t_respawn, t_up)))
}
