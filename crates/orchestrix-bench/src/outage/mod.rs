//! A Redis outage during a storm: a private `redis-server` (no persistence) fails while
//! concurrent callers run keyed flows whose keys roll (new keys every [`WINDOW`], raced by
//! every caller, and now and then an old one revisited). Two faults:
//!
//! * [`Fault::Kill`] ([`kill`]): the server is killed with SIGKILL and restarted, empty,
//!   on the same port — a crash that loses every record.
//! * [`Fault::Stop`] ([`hang`]): the server is frozen with SIGSTOP and thawed with SIGCONT
//!   — a hung process that keeps its connections and records, answers nothing for a
//!   while, and then executes what it had read, including requests whose callers gave up.
//!
//! The store is wrapped in an [observer](observed) that notes every acquisition `start`
//! answered until its owner settles it, and how the store answered the settlement; the
//! step claims the acquisition it runs under. Each fault's module states, and checks, its
//! invariants.

mod hang;
mod kill;
mod observed;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::bail;
use orchestrix::idempotency::DEFAULT_LEASE;
use orchestrix::{Context, Flow, KeyScope, RunOptions, StepError};
use orchestrix_redis::RedisStore;

use crate::args::Args;
use crate::redis_server::PrivateRedis;
use crate::section::Section;
use crate::stores::unique_suffix;
use crate::storm::Tally;
use observed::{Acquisition, Held, ObservedStore};

/// The bound on one `Flow::run` with the store's default timeouts.
const RUN_TIMEOUT: Duration = Duration::from_secs(15);
/// A run makes at most four round trips that can each wait out the response timeout
/// (`start`, then the three attempts at persisting its outcome), and persisting sleeps
/// this long between its attempts.
const ROUND_TRIPS_PER_RUN: u32 = 4;
const SETTLE_BACKOFF: Duration = Duration::from_millis(500);

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

/// How the server fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then a restart, empty, on the same port.
    Kill,
    /// SIGSTOP, then SIGCONT: a hung server.
    Stop,
}

impl Fault {
    fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "kill" => Ok(Self::Kill),
            "stop" => Ok(Self::Stop),
            other => bail!("unknown --fault {other:?}: kill or stop"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct OutageConfig {
    pub fault: Fault,
    /// New keys per 100 ms window, raced by every caller.
    pub window_keys: u64,
    pub callers: u64,
    /// How long the step (the side effect) takes, so that some run mid-step when the server
    /// fails.
    pub step: Duration,
    pub duration: Duration,
    pub down_at: Duration,
    pub down_for: Duration,
    /// The runs' lease.
    pub lease: Duration,
    /// The store's response timeout; `None`: its default (2 s).
    pub response_timeout: Option<Duration>,
    /// The bound on one `Flow::run`; past it the run counts as hung.
    pub deadline: Duration,
}

impl OutageConfig {
    /// The kill scenario's defaults: the server is down 1.5 s; the runs' lease is the
    /// default 30 s, longer than the scenario.
    pub const KILL: Self = Self {
        fault: Fault::Kill,
        window_keys: 20,
        callers: 16,
        step: Duration::from_millis(5),
        duration: Duration::from_secs(8),
        down_at: Duration::from_millis(2500),
        down_for: Duration::from_millis(1500),
        lease: DEFAULT_LEASE,
        response_timeout: None,
        deadline: RUN_TIMEOUT,
    };

    /// The hang scenario's defaults: the store waits 500 ms for a reply, so a run takes at
    /// most [`deadline_for`] its timeout (2.5 s) and is given twice that (5 s); the server
    /// is frozen 6 s — longer than that deadline, so a call the store's timeout did not end
    /// would be seen hanging, and longer than the runs' 2 s lease, so leases lapse (Redis's
    /// clock runs on) while it hangs.
    pub const STOP: Self = Self {
        fault: Fault::Stop,
        duration: Duration::from_secs(10),
        down_for: Duration::from_secs(6),
        lease: Duration::from_secs(2),
        response_timeout: Some(Duration::from_millis(500)),
        deadline: Duration::from_secs(5),
        ..Self::KILL
    };

    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        let fault = Fault::parse(args.get("fault").unwrap_or("kill"))?;
        let defaults = match fault {
            Fault::Kill => Self::KILL,
            Fault::Stop => Self::STOP,
        };
        let response_timeout = match args.get("response-timeout-ms") {
            None => defaults.response_timeout,
            Some(_) => Some(args.millis("response-timeout-ms", Duration::ZERO)?),
        };
        let deadline = match (args.get("deadline-ms"), response_timeout) {
            (Some(_), _) => args.millis("deadline-ms", RUN_TIMEOUT)?,
            (None, Some(timeout)) => deadline_for(timeout),
            (None, None) => RUN_TIMEOUT,
        };
        let config = Self {
            fault,
            window_keys: args.count("window-keys", defaults.window_keys)?,
            callers: args.count("callers", defaults.callers)?,
            step: args.millis("step-ms", defaults.step)?,
            duration: args.seconds("seconds", defaults.duration)?,
            down_at: args.millis("down-at-ms", defaults.down_at)?,
            down_for: args.millis("down-for-ms", defaults.down_for)?,
            lease: args.millis("lease-ms", defaults.lease)?,
            response_timeout,
            deadline,
        };
        if config.down_at + config.down_for >= config.duration {
            bail!("the server must be back before the storm ends: down-at + down-for < seconds");
        }
        Ok(config)
    }
}

/// The bound on one run against a store that waits `response_timeout` for each reply:
/// twice the longest such a run can take.
pub fn deadline_for(response_timeout: Duration) -> Duration {
    (response_timeout * ROUND_TRIPS_PER_RUN + SETTLE_BACKOFF) * 2
}

/// Runs the outage scenario of `config.fault`.
pub async fn main(config: &OutageConfig) -> anyhow::Result<Section> {
    match config.fault {
        Fault::Kill => kill::main(config).await,
        Fault::Stop => hang::main(config).await,
    }
}

/// What the step saw.
#[derive(Debug, Default)]
struct Executions {
    /// Key and the acquisition it ran under, in the order the steps began.
    attributed: Vec<(String, Acquisition)>,
    /// Executions that found no acquisition of their key.
    orphans: Vec<String>,
}

/// One run, for the timeline checks.
struct RunRecord {
    key: u64,
    began: Instant,
    ended: Instant,
    ok: bool,
}

/// When the fault began, when the server was brought back, and when it answered again.
#[derive(Debug, Clone, Copy)]
struct Timeline {
    /// Killed (and gone), or frozen.
    fault: Instant,
    /// Restart begun, or SIGCONT sent.
    recovering: Instant,
    /// Restarted and answering, or thawed.
    recovered: Instant,
}

/// What a storm through a fault observed.
struct Storm {
    tally: Tally,
    runs: Vec<RunRecord>,
    timeline: Timeline,
    /// The callers' flow (on the observed store), for probes after the storm.
    flow: Flow<u64>,
    held: Arc<Held>,
    /// What the steps saw, the storm's and any probe's since.
    seen: Arc<Mutex<Executions>>,
}

impl Storm {
    /// Every execution so far.
    fn take_executions(&self) -> Executions {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The options of every run of key `i`.
fn options(i: u64, lease: Duration) -> RunOptions {
    RunOptions::key(format!("k{i}"))
        .scope(KeyScope::Global)
        .lease(lease)
        .ttl(Duration::from_secs(3600))
}

/// The storm, with the fault injected at `config.down_at` for `config.down_for`.
async fn storm_through_fault(
    server: &mut PrivateRedis,
    config: &OutageConfig,
) -> anyhow::Result<Storm> {
    let prefix = format!("orchestrix-bench:outage:{}:", unique_suffix());
    let mut builder = RedisStore::builder(server.url()).key_prefix(prefix);
    if let Some(timeout) = config.response_timeout {
        builder = builder.response_timeout(timeout);
    }
    let inner = builder.connect().await?;
    let held = Arc::new(Held::default());
    let store = Arc::new(ObservedStore {
        inner,
        held: Arc::clone(&held),
    });
    let executions = Arc::new(Mutex::new(Executions::default()));
    let seen = Arc::clone(&executions);
    let step_held = Arc::clone(&held);
    let step = config.step;
    let flow = Flow::<u64>::builder("outage")
        .store(store)
        .step("effect", move |ctx: Context<u64>| {
            let (held, seen) = (Arc::clone(&step_held), Arc::clone(&seen));
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
    let (lease, run_deadline) = (config.lease, config.deadline);
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
                    let began = Instant::now();
                    let outcome =
                        tokio::time::timeout(run_deadline, flow.run(i, options(i, lease))).await;
                    let ok = matches!(outcome, Ok(Ok(_)));
                    runs.push(RunRecord {
                        key: i,
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
    match config.fault {
        Fault::Kill => server.kill().await?,
        Fault::Stop => server.stop().await?,
    }
    let fault = Instant::now();
    tokio::time::sleep(config.down_for).await;
    let recovering = Instant::now();
    match config.fault {
        Fault::Kill => server.restart().await?,
        Fault::Stop => server.resume().await?,
    }
    let recovered = Instant::now();

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
    Ok(Storm {
        tally,
        runs,
        seen: executions,
        timeline: Timeline {
            fault,
            recovering,
            recovered,
        },
        flow,
        held,
    })
}

/// Error kinds outside [`EXPECTED_ERRORS`], as a violation.
fn unexpected_errors(tally: &Tally) -> Option<String> {
    let unexpected: Vec<String> = tally
        .errors
        .iter()
        .filter(|(kind, _)| !EXPECTED_ERRORS.contains(&kind.as_str()))
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect();
    (!unexpected.is_empty()).then(|| format!("unexpected errors: {}", unexpected.join(", ")))
}
