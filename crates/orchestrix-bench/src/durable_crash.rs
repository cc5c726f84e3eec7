//! Durable crash proof: a 5-step durable flow with a parallel group is killed with SIGKILL
//! at every step boundary and in the middle of every step, on every store, and resumed
//! by another process, once by retrying the key and once by `Flow::recover`.
//!
//! The flow is `reserve → {charge (at most once), notify} → pack → ship`. Each step reads
//! what earlier steps wrote to the context, writes its own value, and appends one line to
//! a file of its own opened with `O_APPEND` (its compensation to another), so the files
//! count what really ran and the output depends on restored state.
//!
//! **Exact kill points.** The owner process runs one key per kill point (for each resume
//! mode), all at once, and each run *parks* at its point: a step parks after appending its
//! line (`in <step>`); a wrapper around the store parks the run inside the journal write
//! once the store accepted it (`after <step>`: the checkpoint is stored, the next step has
//! not started; `charge started`: the at-most-once mark is stored, the effect not done),
//! or inside the acquire (`acquired`). A parked run prints where it is and waits forever,
//! its heartbeat still renewing its lease. Once every run is parked, the parent kills the
//! process with SIGKILL: every key dies exactly at its point. The parent reads each
//! journal back to check the point was exact. In the owner, `notify` starts only once
//! `charge`'s checkpoint is stored, so the group's points are exact too.
//!
//! The memory store lives in one process: there, the owner's runs are polled in this
//! process until parked, and the crash is modelled by forgetting their futures
//! (`std::mem::forget`): nothing of them runs again and nothing settles their records, as
//! after SIGKILL. The resumers then run in the same process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use orchestrix::idempotency::OnRunning;
use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, FinalStatus, IdempotencyStore, Journal,
    JournalStore, Record, Redrive, StartOutcome, StartRequest, StoreError, Wait,
};
use orchestrix::{
    CancellationToken, Context, Flow, FlowError, FlowResult, Parallel, RunError, RunOptions,
    Status, Step, StepError,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Notify, mpsc};

use crate::args::Args;
use crate::counter::ExecutionLog;
use crate::section::{Section, Table};
use crate::stores::{Backend, Namespace, StoreKind};

/// The flow's steps, in order; `charge` and `notify` are a parallel group.
pub const STEPS: [&str; 5] = ["reserve", "charge", "notify", "pack", "ship"];
/// The at-most-once step (index into [`STEPS`]).
pub(crate) const CHARGE: usize = 1;
/// `notify`, which waits in the owner until `charge`'s checkpoint is stored.
const NOTIFY: usize = 2;
/// Steps with a compensation: all but `ship`, the last.
pub(crate) const COMPENSATED: [bool; 5] = [true, true, true, true, false];

/// The shortest lease the proof gives runs on DynamoDB (see `main`).
const DYNAMODB_LEASE: Duration = Duration::from_secs(3);
/// How long the parent waits for the owner's runs to park.
const PARK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a resumer waits for a key (retry) or looks for abandoned runs (recover).
pub(crate) const RESUME_TIMEOUT: Duration = Duration::from_secs(40);
/// Bound on a resumer process.
pub(crate) const RESUMER_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the recovering process asks for abandoned runs.
pub(crate) const RECOVER_EVERY: Duration = Duration::from_millis(100);
/// The TTL of every run.
const TTL: Duration = Duration::from_secs(3600);
/// What the parent writes to a thawed owner to let its parked runs go on.
const RELEASE: &str = "GO";
/// The line a resumer prints per key.
pub(crate) const OUTCOME_TAG: &str = "OUTCOME ";
/// The line the owner prints per parked run.
const PARKED_TAG: &str = "PARKED ";

/// Where the owner's run of a key is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Point {
    /// Acquired (input journaled), before the first step.
    Acquired,
    /// The at-most-once step's start mark is stored; its effect has not happened.
    Started(usize),
    /// The step appended its line (its effect happened); its checkpoint is not written.
    In(usize),
    /// The step's checkpoint is stored; the next step has not started.
    After(usize),
}

impl Point {
    /// Every kill point, in the order the owner reaches them.
    pub fn all() -> Vec<Self> {
        let mut all = vec![Self::Acquired];
        for i in 0..STEPS.len() {
            if i == CHARGE {
                all.push(Self::Started(i));
            }
            all.push(Self::In(i));
            all.push(Self::After(i));
        }
        all
    }

    fn slug(self) -> String {
        match self {
            Self::Acquired => "acquired".to_owned(),
            Self::Started(i) => format!("started-{}", STEPS[i]),
            Self::In(i) => format!("in-{}", STEPS[i]),
            Self::After(i) => format!("after-{}", STEPS[i]),
        }
    }

    fn parse(slug: &str) -> anyhow::Result<Self> {
        Self::all()
            .into_iter()
            .find(|p| p.slug() == slug)
            .with_context(|| format!("unknown kill point {slug:?}"))
    }

    /// `all`, or a comma-separated list of slugs.
    pub fn parse_list(list: &str) -> anyhow::Result<Vec<Self>> {
        if list == "all" {
            return Ok(Self::all());
        }
        list.split(',').map(Self::parse).collect()
    }

    /// The steps whose checkpoint was stored before the kill (the owner runs them in
    /// order: `notify` after `charge`'s checkpoint).
    fn completed_before(self) -> usize {
        match self {
            Self::Acquired => 0,
            Self::Started(i) | Self::In(i) => i,
            Self::After(i) => i + 1,
        }
    }

    /// The step in flight at the kill, and whether its effect happened.
    fn in_flight(self) -> Option<(usize, bool)> {
        match self {
            Self::Started(i) => Some((i, false)),
            Self::In(i) => Some((i, true)),
            Self::Acquired | Self::After(_) => None,
        }
    }

    /// Whether the run must end with `StepInterrupted`: the at-most-once step was marked
    /// started and did not complete.
    fn interrupts(self) -> bool {
        self.in_flight().is_some_and(|(i, _)| i == CHARGE)
    }

    /// The journal the kill leaves, as [`journal_summary`] renders it.
    fn expected_journal(self) -> String {
        let mut parts: Vec<String> = STEPS[..self.completed_before()]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        if let Some((i, _)) = self.in_flight()
            && i == CHARGE
        {
            parts.push(format!("{}(started)", STEPS[i]));
        }
        if parts.is_empty() {
            "input only".to_owned()
        } else {
            parts.join(" ")
        }
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Acquired => f.write_str("acquired"),
            Self::Started(i) => write!(f, "{} started", STEPS[*i]),
            Self::In(i) => write!(f, "in {}", STEPS[*i]),
            Self::After(i) => write!(f, "after {}", STEPS[*i]),
        }
    }
}

/// How the second process resumes the killed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `Flow::run` with the same key and `OnRunning::Wait`: it takes over once the lease
    /// lapses.
    Retry,
    /// `Flow::recover()`, no caller: it finds the abandoned run and resumes it with the
    /// journaled input.
    Recover,
    /// The owner is frozen (SIGSTOP; in process: no longer polled) instead of killed, a
    /// second process runs every key again as `Retry` does, and then the owner is thawed
    /// and goes on from where it stood, its lease long lapsed.
    Freeze,
}

impl Mode {
    /// The modes whose owner is killed.
    const KILLED: [Self; 2] = [Self::Retry, Self::Recover];
    const ALL: [Self; 3] = [Self::Retry, Self::Recover, Self::Freeze];

    fn name(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Recover => "recover",
            Self::Freeze => "freeze",
        }
    }

    /// Each mode has a flow of its own, so a recovery never picks up a key meant for a
    /// retry (recovery finds the runs of its flow's scope).
    fn flow(self) -> String {
        format!("durable-crash-{}", self.name())
    }
}

/// The flow name of the uncrashed reference runs.
const BASELINE_FLOW: &str = "durable-crash-baseline";

#[derive(Debug, Clone)]
pub struct DurableCrashConfig {
    pub lease: Duration,
    pub rounds: u64,
    pub points: Vec<Point>,
    /// Keys per random-kill round ([`crate::durable_chaos`]); 0: none.
    pub chaos_keys: u64,
}

impl DurableCrashConfig {
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        Ok(Self {
            lease: args.millis("lease-ms", Duration::from_secs(1))?,
            rounds: args.count("rounds", 1)?,
            points: Point::parse_list(args.get("points").unwrap_or("all"))?,
            chaos_keys: args.number("chaos-keys", 16)?,
        })
    }
}

/// The key of kill point `point` in `round` (the same in both flows, scoped apart).
fn key_of(round: u64, point: Point) -> String {
    format!("r{round}-{}", point.slug())
}

/// The key as the store holds it: scoped by flow name (`flow:key`).
pub(crate) fn scoped(flow: &str, key: &str) -> String {
    format!("{flow}:{key}")
}

/// The input of a kill point's run: its index among all points, so every key's output
/// differs.
fn input_of(point: Point) -> u64 {
    Point::all()
        .iter()
        .position(|p| *p == point)
        .map_or(0, |i| i as u64 + 1)
}

pub(crate) fn options(key: &str, lease: Duration) -> RunOptions {
    RunOptions::key(key).lease(lease).ttl(TTL)
}

// --- The flow -------------------------------------------------------------------------

/// The per-step `O_APPEND` files of one scenario run, each line
/// `<flow> <key> <role> <step key>`.
#[derive(Clone)]
pub(crate) struct Logs {
    steps: Vec<ExecutionLog>,
    undo: Vec<ExecutionLog>,
}

impl Logs {
    pub(crate) fn open(dir: &Path) -> anyhow::Result<Self> {
        let open = |name: String| {
            ExecutionLog::open(&dir.join(name)).context("opening a step's execution file")
        };
        Ok(Self {
            steps: STEPS
                .iter()
                .map(|s| open(format!("{s}.log")))
                .collect::<anyhow::Result<_>>()?,
            undo: STEPS
                .iter()
                .map(|s| open(format!("{s}.undo.log")))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

/// What one step reads from the context, and the value it writes.
fn step_value(i: usize, ctx: &Context<u64>) -> Result<String, StepError> {
    let need = |key: &str| -> Result<String, StepError> {
        ctx.get::<String>(key)?
            .ok_or_else(|| StepError::msg(format!("state {key:?} missing: not restored")))
    };
    Ok(match i {
        0 => format!("R{}", ctx.input()),
        1 => format!("{}/paid", need("reserve")?),
        2 => format!("{}/notified", need("reserve")?),
        3 => format!("[{}+{}]", need("charge")?, need("notify")?),
        _ => format!("shipped {}", need("pack")?),
    })
}

/// The steps of one process: what they append, and (owner only) where they park.
#[derive(Clone)]
pub(crate) struct Effects {
    pub(crate) logs: Logs,
    pub(crate) flow: String,
    pub(crate) role: &'static str,
    parking: Option<Arc<Parking>>,
    /// Random pauses (up to this long) before and after each step's effect and each
    /// compensation: the random-kill rounds spread their kills over every window.
    pub(crate) jitter: Option<Duration>,
}

impl Effects {
    /// The steps of a run that parks nowhere.
    pub(crate) fn plain(
        logs: &Logs,
        flow: &str,
        role: &'static str,
        jitter: Option<Duration>,
    ) -> Self {
        Self {
            logs: logs.clone(),
            flow: flow.to_owned(),
            role,
            parking: None,
            jitter,
        }
    }

    fn line(&self, ctx: &Context<u64>) -> String {
        let key = ctx.step_key().unwrap_or_else(|| "-".to_owned());
        format!("{} {} {} {key}", self.flow, ctx.input(), self.role)
    }

    async fn pause(&self) {
        if let Some(max) = self.jitter {
            let micros = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..=micros))).await;
        }
    }

    async fn run(self, i: usize, ctx: Context<u64>) -> Result<(), StepError> {
        self.pause().await;
        let value = step_value(i, &ctx)?;
        if i == NOTIFY
            && let Some(parking) = &self.parking
        {
            tokio::select! {
                () = parking.charge_stored(&self.flow, *ctx.input()) => {}
                // A thawed owner that learns its lease is lost stops its steps.
                () = ctx.cancellation().cancelled() => {
                    return Err(StepError::msg("stopped: the run was cancelled"));
                }
            }
        }
        self.logs.steps[i].record(&self.line(&ctx))?;
        ctx.set(STEPS[i], value)?;
        if let Some(parking) = &self.parking
            && parking.point_of(*ctx.input()) == Some(Point::In(i))
        {
            parking.park(&self.flow, Point::In(i)).await;
        }
        self.pause().await;
        Ok(())
    }

    async fn undo(self, i: usize, ctx: Context<u64>) -> Result<(), StepError> {
        self.pause().await;
        self.logs.undo[i].record(&self.line(&ctx))?;
        self.pause().await;
        Ok(())
    }

    fn step(&self, i: usize) -> Step<u64> {
        let (run, undo) = (self.clone(), self.clone());
        let mut step = Step::new(STEPS[i], move |ctx| run.clone().run(i, ctx));
        if COMPENSATED[i] {
            step = step.compensate(move |ctx| undo.clone().undo(i, ctx));
        }
        if i == CHARGE {
            step = step.at_most_once();
        }
        step
    }
}

pub(crate) fn crash_flow(
    store: Arc<dyn IdempotencyStore>,
    effects: &Effects,
) -> anyhow::Result<Flow<u64, String>> {
    Ok(Flow::<u64, String>::builder(effects.flow.clone())
        .durable()
        .store(store)
        .then(effects.step(0))
        .parallel(
            Parallel::new()
                .with(effects.step(CHARGE))
                .with(effects.step(NOTIFY)),
        )
        .then(effects.step(3))
        .then(effects.step(4))
        .output(|ctx| {
            ctx.get::<String>("ship")?
                .ok_or_else(|| StepError::msg("no shipment"))
        })
        .build()?)
}

// --- Parking the owner's runs -----------------------------------------------------------

/// Where the owner's runs park, and how they say so.
#[derive(Debug)]
struct Parking {
    /// The kill point of each input.
    points: HashMap<u64, Point>,
    /// Scoped key → (flow, input), for the store wrapper.
    keys: HashMap<String, (String, u64)>,
    /// (flow, input) whose `charge` checkpoint is stored.
    charged: Mutex<HashSet<(String, u64)>>,
    charged_changed: Notify,
    /// Where "parked" is reported: stdout (a child process) or a channel (in-process).
    report: Option<mpsc::UnboundedSender<String>>,
    /// Fired to let parked runs go on (a frozen owner, thawed); never, for a killed one.
    release: CancellationToken,
}

impl Parking {
    fn new(round: u64, points: &[Point], modes: &[Mode], control: &OwnerControl) -> Self {
        let mut keys = HashMap::new();
        for &mode in modes {
            for &point in points {
                keys.insert(
                    scoped(&mode.flow(), &key_of(round, point)),
                    (mode.flow(), input_of(point)),
                );
            }
        }
        Self {
            points: points.iter().map(|p| (input_of(*p), *p)).collect(),
            keys,
            charged: Mutex::new(HashSet::new()),
            charged_changed: Notify::new(),
            report: control.report.clone(),
            release: control.release.clone(),
        }
    }

    fn point_of(&self, input: u64) -> Option<Point> {
        self.points.get(&input).copied()
    }

    /// Reports the run parked at `point` and waits, its heartbeat still renewing its lease,
    /// to be killed (or frozen, and then released).
    async fn park(&self, flow: &str, point: Point) {
        let line = format!("{flow} {}", point.slug());
        match &self.report {
            Some(report) => {
                let _ = report.send(line);
            }
            None => {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{PARKED_TAG}{line}");
                let _ = out.flush();
            }
        }
        self.release.cancelled().await;
    }

    /// Waits until `charge`'s checkpoint of this run is stored.
    async fn charge_stored(&self, flow: &str, input: u64) {
        let id = (flow.to_owned(), input);
        loop {
            let notified = self.charged_changed.notified();
            if self
                .charged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
            {
                return;
            }
            notified.await;
        }
    }

    /// A journal write of `key` was stored: note `charge`'s checkpoint, and park the run
    /// if this is its point.
    async fn appended(&self, key: &str, entry: &[u8]) {
        let (Some((flow, input)), Some((kind, name))) = (self.keys.get(key), entry_head(entry))
        else {
            return;
        };
        let Some(step) = STEPS.iter().position(|s| *s == name) else {
            return;
        };
        let point = match kind {
            COMPLETED => Point::After(step),
            STARTED => Point::Started(step),
            _ => return,
        };
        if self.point_of(*input) == Some(point) {
            // Parked before `notify` is let go: nothing after this checkpoint starts.
            self.park(flow, point).await;
        }
        if point == Point::After(CHARGE) {
            self.charged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((flow.clone(), *input));
            self.charged_changed.notify_waiters();
        }
    }

    async fn acquired(&self, key: &str) {
        if let Some((flow, input)) = self.keys.get(key)
            && self.point_of(*input) == Some(Point::Acquired)
        {
            self.park(flow, Point::Acquired).await;
        }
    }
}

/// The kind bytes of the engine's journal entries (`orchestrix::durable` module docs:
/// `kind:u8 position:u32 name:str ...`).
pub(crate) const STARTED: u8 = b's';
pub(crate) const COMPLETED: u8 = b'c';
const COMPENSATION: u8 = b'x';
const FAILURE: u8 = b'f';

/// An entry's kind and step name.
pub(crate) fn entry_head(entry: &[u8]) -> Option<(u8, &str)> {
    let kind = *entry.first()?;
    let len = u32::from_le_bytes(entry.get(5..9)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(entry.get(9..9 + len)?).ok()?;
    Some((kind, name))
}

/// A journal as `reserve charge(started) ...`: completed steps, and start marks without
/// a completion (what a resumed run makes of it).
fn journal_summary(journal: &Journal) -> String {
    let mut done: Vec<&str> = Vec::new();
    let mut started: Vec<&str> = Vec::new();
    let mut other = Vec::new();
    for entry in &journal.entries {
        match entry_head(entry) {
            Some((COMPLETED, name)) => {
                started.retain(|s| *s != name);
                done.push(name);
            }
            Some((STARTED, name)) => started.push(name),
            Some((COMPENSATION, name)) => other.push(format!("{name}(compensated)")),
            Some((FAILURE, name)) => other.push(format!("failure({name})")),
            _ => other.push("unreadable".to_owned()),
        }
    }
    let mut parts: Vec<String> = done.iter().map(|s| (*s).to_owned()).collect();
    parts.extend(started.iter().map(|s| format!("{s}(started)")));
    parts.extend(other);
    if parts.is_empty() {
        "input only".to_owned()
    } else {
        parts.join(" ")
    }
}

/// The owner's store: every call goes to the real store; a journal write (or the
/// acquire) that the store accepted is held when it is the run's kill point.
#[derive(Debug)]
struct ParkingStore {
    inner: Arc<dyn IdempotencyStore>,
    parking: Arc<Parking>,
}

impl ParkingStore {
    fn journal(&self) -> Result<&dyn JournalStore, StoreError> {
        self.inner
            .journal_store()
            .ok_or_else(|| StoreError::backend_msg("the store keeps no journals"))
    }
}

#[async_trait]
impl IdempotencyStore for ParkingStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        self.inner.start(req).await
    }
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
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
        self.inner.release(key, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn wait_for_change(&self, key: &str, wait: Wait) -> Result<(), StoreError> {
        self.inner.wait_for_change(key, wait).await
    }
    fn journal_store(&self) -> Option<&dyn JournalStore> {
        Some(self)
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

#[async_trait]
impl JournalStore for ParkingStore {
    async fn start_durable(
        &self,
        req: DurableStart<'_>,
    ) -> Result<DurableStartOutcome, StoreError> {
        let outcome = self.journal()?.start_durable(req).await?;
        if matches!(outcome, DurableStartOutcome::Acquired { .. }) {
            self.parking.acquired(req.key).await;
        }
        Ok(outcome)
    }
    async fn append(&self, key: &str, token: FencingToken, entry: &[u8]) -> Result<(), StoreError> {
        self.journal()?.append(key, token, entry).await?;
        self.parking.appended(key, entry).await;
        Ok(())
    }
    async fn suspend(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        self.journal()?.suspend(key, token).await
    }
    async fn redrive(
        &self,
        key: &str,
        lease: Duration,
        retain: Option<Duration>,
    ) -> Result<Redrive, StoreError> {
        self.journal()?.redrive(key, lease, retain).await
    }
    async fn read_journal(&self, key: &str) -> Result<Option<Journal>, StoreError> {
        self.journal()?.read_journal(key).await
    }
    async fn abandoned(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.journal()?.abandoned(prefix, after, limit).await
    }
}

// --- Owner and resumers ---------------------------------------------------------------------

/// How an owner's parked runs are reported, and (in process) crashed or frozen.
#[derive(Clone, Default)]
struct OwnerControl {
    /// Where parked runs are reported in process (`None`: stdout).
    report: Option<mpsc::UnboundedSender<String>>,
    /// Lets the parked runs go on.
    release: CancellationToken,
    /// In process: every run is forgotten (the crash).
    crash: CancellationToken,
    /// In process: the runs are no longer polled until `thaw` (the freeze).
    freeze: CancellationToken,
    thaw: CancellationToken,
}

/// Starts the owner's runs (one per kill point and mode) on `store`; each parks at its
/// point. Returns the run futures' tasks, which end with the run's outcome: in a child
/// process they run until SIGKILL (or SIGSTOP, SIGCONT and release); in process, `crash`
/// makes each task forget its run, and `freeze` stops polling it until `thaw`.
fn start_owner(
    store: Arc<dyn IdempotencyStore>,
    logs: &Logs,
    round: u64,
    points: &[Point],
    modes: &[Mode],
    lease: Duration,
    control: &OwnerControl,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Option<Outcome>>>> {
    let parking = Arc::new(Parking::new(round, points, modes, control));
    let store: Arc<dyn IdempotencyStore> = Arc::new(ParkingStore {
        inner: store,
        parking: Arc::clone(&parking),
    });
    let mut tasks = Vec::new();
    for &mode in modes {
        let effects = Effects {
            logs: logs.clone(),
            flow: mode.flow(),
            role: "owner",
            parking: Some(Arc::clone(&parking)),
            jitter: None,
        };
        let flow = crash_flow(Arc::clone(&store), &effects)?;
        for &point in points {
            let (flow, control) = (flow.clone(), control.clone());
            let opts = options(&key_of(round, point), lease);
            tasks.push(tokio::spawn(async move {
                let input = input_of(point);
                let mut run = Box::pin(flow.run(input, opts));
                let mut frozen = false;
                loop {
                    tokio::select! {
                        biased;
                        () = control.crash.cancelled() => {
                            // The crash: the run is never polled again, and never dropped
                            // (a drop would settle its record).
                            std::mem::forget(run);
                            return None;
                        }
                        () = control.freeze.cancelled(), if !frozen => {
                            // Nothing of the run (its heartbeat neither) runs until thawed.
                            frozen = true;
                            control.thaw.cancelled().await;
                        }
                        result = &mut run => return Some(Outcome::of(input, &result)),
                    }
                }
            }));
        }
    }
    Ok(tasks)
}

/// How a resumed run ended, as a resumer reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Outcome {
    pub(crate) input: u64,
    pub(crate) status: Option<Status>,
    pub(crate) replayed: bool,
    pub(crate) output: Option<String>,
    pub(crate) error: Option<FlowError>,
    pub(crate) restored: Vec<String>,
    /// `Err` from the run, as text.
    pub(crate) run_error: Option<String>,
}

impl Outcome {
    pub(crate) fn of(input: u64, result: &Result<FlowResult<String>, RunError<String>>) -> Self {
        match result {
            Ok(r) => Self {
                input,
                status: Some(r.status),
                replayed: r.replayed,
                output: r.output.clone(),
                error: r.error.clone(),
                restored: r
                    .steps
                    .iter()
                    .filter(|s| s.restored)
                    .map(|s| s.name.to_string())
                    .collect(),
                run_error: None,
            },
            Err(e) => Self {
                input,
                status: match e {
                    RunError::NotPersisted { result, .. } => Some(result.status),
                    _ => None,
                },
                replayed: false,
                output: None,
                error: None,
                restored: Vec::new(),
                run_error: Some(e.to_string()),
            },
        }
    }
}

/// Resumes every point's key of `mode` on `store` as a new process would: by running the
/// key again (waiting for the dead owner's lease) or by recovering abandoned runs.
async fn resume(
    store: Arc<dyn IdempotencyStore>,
    logs: &Logs,
    mode: Mode,
    round: u64,
    points: &[Point],
    lease: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    let effects = Effects {
        logs: logs.clone(),
        flow: mode.flow(),
        role: mode.name(),
        parking: None,
        jitter: None,
    };
    let flow = crash_flow(store, &effects)?;
    match mode {
        Mode::Retry | Mode::Freeze => {
            let runs = points.iter().map(|&point| {
                let flow = flow.clone();
                let opts = options(&key_of(round, point), lease).on_running(OnRunning::Wait {
                    timeout: RESUME_TIMEOUT,
                });
                async move { Outcome::of(input_of(point), &flow.run(input_of(point), opts).await) }
            });
            Ok(futures_util::future::join_all(runs).await)
        }
        Mode::Recover => {
            let wanted: HashMap<String, u64> = points
                .iter()
                .map(|&p| (key_of(round, p), input_of(p)))
                .collect();
            let mut found: BTreeMap<String, Outcome> = BTreeMap::new();
            let deadline = tokio::time::Instant::now() + RESUME_TIMEOUT;
            while found.len() < wanted.len() && tokio::time::Instant::now() < deadline {
                for recovered in flow.recover().await? {
                    let Some(&input) = wanted.get(&recovered.key) else {
                        continue;
                    };
                    let outcome = Outcome::of(input, &recovered.outcome);
                    // Another recoverer holding it would answer `Running`: look again.
                    if outcome.status != Some(Status::Running) {
                        found.entry(recovered.key).or_insert(outcome);
                    }
                }
                tokio::time::sleep(RECOVER_EVERY).await;
            }
            Ok(found.into_values().collect())
        }
    }
}

/// The child side: `durable-crash-owner` runs every point's key and parks;
/// `durable-crash-retry` / `durable-crash-recover` resume them and print the outcomes.
pub async fn child(args: &Args, role: &str) -> anyhow::Result<()> {
    let kind = StoreKind::parse(args.required("store")?)?;
    let lease = args.millis("lease-ms", Duration::from_secs(1))?;
    let round: u64 = args.number("round", 0)?;
    let points = Point::parse_list(args.required("points")?)?;
    let logs = Logs::open(Path::new(args.required("dir")?))?;
    let backend = Backend::open(kind, args.required("ns")?, 8).await?;
    match role {
        "owner" => {
            let control = OwnerControl::default();
            let store = backend.store();
            let tasks = start_owner(store, &logs, round, &points, &Mode::KILLED, lease, &control)?;
            for task in tasks {
                let _ = task.await;
            }
            bail!("every run of the owner ended instead of parking until killed")
        }
        "freeze-owner" => {
            // Parks, is frozen and thawed by the parent, and goes on once told `GO`.
            let control = OwnerControl::default();
            let release = control.release.clone();
            tokio::spawn(async move {
                let mut stdin = BufReader::new(tokio::io::stdin()).lines();
                while let Ok(Some(line)) = stdin.next_line().await {
                    if line == RELEASE {
                        release.cancel();
                    }
                }
            });
            let store = backend.store();
            let modes = [Mode::Freeze];
            for task in start_owner(store, &logs, round, &points, &modes, lease, &control)? {
                if let Some(outcome) = task.await? {
                    println!("{OUTCOME_TAG}{}", serde_json::to_string(&outcome)?);
                }
            }
            Ok(())
        }
        "retry" | "recover" | "freeze" => {
            let mode = match role {
                "retry" => Mode::Retry,
                "recover" => Mode::Recover,
                _ => Mode::Freeze,
            };
            for outcome in resume(backend.store(), &logs, mode, round, &points, lease).await? {
                println!("{OUTCOME_TAG}{}", serde_json::to_string(&outcome)?);
            }
            Ok(())
        }
        other => bail!("unknown durable-crash role {other:?}"),
    }
}

// --- The parent ---------------------------------------------------------------------------

/// Lines per step (and per compensation) of one flow's key, and the step keys they carry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Lines {
    pub(crate) steps: [u64; 5],
    pub(crate) undo: [u64; 5],
    /// Steps (or compensations) whose lines carry more than one step key.
    pub(crate) unstable_keys: Vec<String>,
}

impl Lines {
    pub(crate) fn read(dir: &Path, flow: &str, input: u64) -> anyhow::Result<Self> {
        let mut lines = Self::default();
        for (i, step) in STEPS.iter().enumerate() {
            for (undo, file) in [
                (false, format!("{step}.log")),
                (true, format!("{step}.undo.log")),
            ] {
                let text = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
                let mut keys = HashSet::new();
                let mut n = 0;
                for line in text.lines() {
                    let mut words = line.split(' ');
                    if words.next() == Some(flow) && words.next() == Some(&input.to_string()) {
                        n += 1;
                        keys.insert(words.nth(1).unwrap_or_default().to_owned());
                    }
                }
                if keys.len() > 1 {
                    lines.unstable_keys.push(file);
                }
                if undo {
                    lines.undo[i] = n;
                } else {
                    lines.steps[i] = n;
                }
            }
        }
        Ok(lines)
    }

    /// `1 1 1 2 1`, then the compensations that ran: `undo reserve notify`.
    pub(crate) fn render(&self) -> String {
        let mut out = self.steps.map(|n| n.to_string()).join(" ");
        let undone: Vec<String> = STEPS
            .iter()
            .zip(self.undo)
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| {
                if n == 1 {
                    (*s).to_owned()
                } else {
                    format!("{s}×{n}")
                }
            })
            .collect();
        if !undone.is_empty() {
            out.push_str(&format!(" · undo {}", undone.join(" ")));
        }
        out
    }
}

/// One store's uncrashed outputs, by input.
type Baseline = HashMap<u64, String>;

/// What one (point, mode) observed in one round.
struct Observed {
    journal: String,
    lines: Lines,
    outcome: String,
}

/// Checks one resumed key against the invariants; returns what to print, and pushes
/// every broken invariant to `problems`.
#[allow(clippy::too_many_arguments)]
fn judge(
    point: Point,
    mode: Mode,
    journal_at_kill: &str,
    lines: &Lines,
    outcome: Option<&Outcome>,
    replay: Option<&Outcome>,
    baseline: &Baseline,
    problems: &mut Vec<String>,
) -> String {
    let mut broken = |what: String| problems.push(format!("{point}: {what}"));
    if journal_at_kill != point.expected_journal() {
        broken(format!(
            "the kill was not where it should be: the journal held {journal_at_kill:?}, expected {:?}",
            point.expected_journal()
        ));
    }
    let done = point.completed_before();
    let in_flight = point.in_flight();
    // A frozen owner's `notify` had started with `charge` (the group starts together) and
    // waits, inside its step, for `charge`'s checkpoint: it is in flight too, and its
    // effect may follow the thaw.
    let notify_in_flight = mode == Mode::Freeze
        && matches!(
            point,
            Point::Started(CHARGE) | Point::In(CHARGE) | Point::After(CHARGE)
        );
    for (i, step) in STEPS.iter().enumerate() {
        let n = lines.steps[i];
        if i == NOTIFY && notify_in_flight {
            if n > 2 {
                broken(format!(
                    "{step} was in flight and ran {n} times (at most twice)"
                ));
            }
            continue;
        }
        if i < done && n != 1 {
            broken(format!(
                "{step} completed before the kill and ran {n} times (must be exactly once)"
            ));
        }
        match in_flight {
            Some((f, effect)) if f == i => {
                if i == CHARGE && n != u64::from(effect) {
                    broken(format!(
                        "{step} (at most once) ran {n} times; the owner ran it {} times and \
                         nobody may run it again",
                        u64::from(effect)
                    ));
                }
                if n > 2 {
                    broken(format!(
                        "{step} was in flight and ran {n} times (at most twice)"
                    ));
                }
            }
            _ if i >= done && n > 1 => {
                broken(format!(
                    "{step} had not started before the kill and ran {n} times"
                ));
            }
            _ => {}
        }
    }
    if !lines.unstable_keys.is_empty() {
        broken(format!(
            "step keys changed across the crash in {}",
            lines.unstable_keys.join(", ")
        ));
    }
    let Some(outcome) = outcome else {
        broken("not resumed (no outcome from the resumer)".to_owned());
        return "not resumed".to_owned();
    };
    if let Some(e) = &outcome.run_error {
        broken(format!("the resume returned an error: {e}"));
        return format!("error: {e}");
    }
    let described = if point.interrupts() {
        let interrupted = matches!(
            &outcome.error,
            Some(FlowError::StepInterrupted { step }) if step == STEPS[CHARGE]
        );
        if outcome.status != Some(Status::Failed) || !interrupted {
            broken(format!(
                "expected a failure with StepInterrupted(charge), got {:?} {:?}",
                outcome.status, outcome.error
            ));
        }
        // Every step that completed (before the kill, or in the resumed run) is
        // compensated exactly once; the interrupted one, not known to have completed,
        // is not.
        for (i, step) in STEPS.iter().enumerate() {
            let completed = lines.steps[i] > 0 && i != CHARGE;
            let expected = u64::from(completed && COMPENSATED[i]);
            if lines.undo[i] != expected {
                broken(format!(
                    "compensation of {step} ran {} times, expected {expected}",
                    lines.undo[i]
                ));
            }
        }
        "failed: StepInterrupted(charge), compensated"
    } else {
        let expected = baseline.get(&outcome.input);
        if outcome.status != Some(Status::Completed) || outcome.output.as_ref() != expected {
            broken(format!(
                "expected completed with the uncrashed output {expected:?}, got {:?} {:?} ({:?})",
                outcome.status, outcome.output, outcome.error
            ));
        }
        if lines.undo.iter().any(|n| *n > 0) {
            broken(format!(
                "a compensation ran in a run that completed: {}",
                lines.render()
            ));
        }
        "completed = uncrashed"
    };
    if outcome.replayed {
        broken("the resume was a replay: nothing was resumed".to_owned());
    }
    let expected_restored: Vec<String> = STEPS[..done].iter().map(|s| (*s).to_owned()).collect();
    if outcome.restored != expected_restored {
        broken(format!(
            "restored steps reported {:?}, the journal held {expected_restored:?}",
            outcome.restored
        ));
    }
    match replay {
        Some(r)
            if r.replayed
                && r.status == outcome.status
                && r.output == outcome.output
                && r.error == outcome.error => {}
        other => broken(format!(
            "a later call did not replay the resumed outcome: {other:?}"
        )),
    }
    format!("{described}, {done} restored")
}

/// Runs the crash proof against each store.
pub async fn main(kinds: &[StoreKind], config: &DurableCrashConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Durable crash proof");
    section.about(format!(
        "A durable keyed flow `reserve → {{charge (at_most_once), notify}} → pack → ship`; each \
         step reads what earlier steps wrote to the context and writes its own value (the \
         output is built from the last one), and appends one line — flow, key, who ran it, \
         its `ctx.step_key()` — to a file of its own opened with `O_APPEND`; compensations \
         (all but `ship`) append to files of their own. An owner process runs one key per \
         kill point and resume mode, lease {lease:?}; each run **parks** exactly at its point \
         (`in <step>`: the step appended its line and waits; `after <step>`: the store \
         accepted the step's checkpoint and the run is held inside the journal write, \
         before the next step starts; `charge started`: the at-most-once mark is stored, \
         its effect not done; `acquired`: the input is journaled, no step ran; in the owner \
         `notify` waits for `charge`'s checkpoint, so the group's points are exact too), \
         and once all are parked the process is killed with SIGKILL. The parent reads every \
         journal back (it must hold exactly what the point says). Then two processes \
         resume at once: one runs every key again with `OnRunning::Wait` (it takes over \
         when the lease lapses), one calls `flow.recover()` (no caller; the input comes \
         from the journal) until it has found its keys. Finally the parent calls every key \
         once more. **Frozen owners** (the `freeze` columns): another owner process parks \
         one key per point the same way and is frozen with SIGSTOP instead of killed; a \
         process runs every key again once the lease lapsed; then the owner gets SIGCONT and \
         its parked runs go on, their lease long lapsed: they must stop before any further \
         step (or, past the last checkpoint, have their outcome refused). Its step in flight \
         may have run twice, and so may `notify`, which started with `charge` and waits \
         inside its step for `charge`'s checkpoint. **Invariants:** every step that completed before the kill appears \
         exactly once in its file; the step in flight at most twice; `charge` (at most \
         once) never again: a run interrupted in it fails with `StepInterrupted(charge)` \
         and every step that completed is compensated exactly once; every other run \
         completes with the output of an uncrashed run of the same input; the `FlowResult` \
         marks exactly the journaled steps `restored`; each step's lines carry one step \
         key; the later call replays the outcome.",
        lease = config.lease
    ));
    section.about(
        "Lines per step are `reserve charge notify pack ship` (summed over owner and \
         resumer), then the compensations that ran."
            .to_owned(),
    );
    let mut table = Table::new([
        "store",
        "kill point",
        "journal at kill",
        "retry: lines",
        "retry: outcome",
        "recover: lines",
        "recover: outcome",
        "freeze: lines",
        "freeze: outcome",
        "invariant",
    ]);
    let mut chaos_table = crate::durable_chaos::table();
    for &kind in kinds {
        let (namespace, backend) = match Namespace::create(kind, "dcrash", 8).await {
            Ok(opened) => opened,
            Err(e) => {
                section.note(format!("{}: skipped — {e:#}", kind.name()));
                continue;
            }
        };
        // The local DynamoDB-compatible server answers a few hundred requests a second;
        // with every waiter polling it, an answer can take longer than a 1 s lease, and a
        // run that learns of its acquire only after its lease lapsed rightly stops.
        let config = &DurableCrashConfig {
            lease: if kind == StoreKind::Dynamodb {
                config.lease.max(DYNAMODB_LEASE)
            } else {
                config.lease
            },
            ..config.clone()
        };
        let measured = store_rounds(kind, &namespace, &backend, config).await;
        if config.chaos_keys > 0 {
            let chaos = match tempfile::Builder::new()
                .prefix("orchestrix-bench-chaos-")
                .tempdir()
            {
                Ok(root) => {
                    crate::durable_chaos::run(
                        kind,
                        &namespace,
                        &backend,
                        root.path(),
                        config.rounds,
                        config.chaos_keys,
                        config.lease,
                    )
                    .await
                }
                Err(e) => Err(e.into()),
            };
            match chaos {
                Ok(tally) => {
                    crate::durable_chaos::row(
                        &mut chaos_table,
                        kind,
                        config.rounds,
                        config.chaos_keys,
                        &tally,
                    );
                    for problem in tally.problems {
                        section.violation(format!("{} (random kills): {problem}", kind.name()));
                    }
                }
                Err(e) => section.violation(format!(
                    "{}: the random kills did not complete: {e:#}",
                    kind.name()
                )),
            }
        }
        if let Some(problem) = namespace.remove(&backend).await {
            section.note(problem);
        }
        let rows = match measured {
            Ok(rows) => rows,
            Err(e) => {
                section.violation(format!(
                    "{}: the scenario did not complete: {e:#}",
                    kind.name()
                ));
                continue;
            }
        };
        for (point, per_mode, problems) in rows {
            let cell = |mode: Mode, f: &dyn Fn(&Observed) -> String| {
                let mut values: Vec<String> = per_mode
                    .get(&mode.name())
                    .map(|obs| obs.iter().map(f).collect())
                    .unwrap_or_default();
                values.dedup();
                values.join(" / ")
            };
            let journal = cell(Mode::Retry, &|o| o.journal.clone());
            table.row([
                kind.name().to_owned(),
                point.to_string(),
                journal,
                cell(Mode::Retry, &|o| o.lines.render()),
                cell(Mode::Retry, &|o| o.outcome.clone()),
                cell(Mode::Recover, &|o| o.lines.render()),
                cell(Mode::Recover, &|o| o.outcome.clone()),
                cell(Mode::Freeze, &|o| o.lines.render()),
                cell(Mode::Freeze, &|o| o.outcome.clone()),
                if problems.is_empty() {
                    "held".to_owned()
                } else {
                    "**BROKEN**".to_owned()
                },
            ]);
            for problem in problems {
                section.violation(format!("{}: {problem}", kind.name()));
            }
        }
        if kind == StoreKind::Memory {
            section.note(
                "memory: in one process — the owner's runs are parked in this process and the \
                 crash is modelled by forgetting their futures (`std::mem::forget`: never \
                 polled again, never dropped, so nothing settles their records and their \
                 heartbeats stop), as a SIGKILL leaves them; the resumers run in the same process",
            );
        }
        if kind == StoreKind::Dynamodb {
            section.note(format!(
                "dynamodb: lease {:?} (at least {DYNAMODB_LEASE:?}: the local server answers \
                 a few hundred requests a second, and a run whose acquire is answered after \
                 its lease lapsed stops before its first step); a lease counts as lapsed \
                 only after the store's clock-skew allowance (default 1 s) on top of it",
                config.lease
            ));
        }
    }
    section.tables.push(table);
    if config.chaos_keys > 0 {
        section.tables.push(chaos_table);
    }
    section.note(format!(
        "{} round(s) per store; where rounds differ, a cell lists each value.",
        config.rounds
    ));
    section.note(
        "A run interrupted in `charge` fails as designed; in the resumed run `notify` (the \
         parallel sibling, not yet run) still runs before the group fails, and is then \
         compensated: the group is not fail-fast.",
    );
    Ok(section)
}

/// Per point: observations by mode over the rounds, and the problems found.
type Rows = Vec<(Point, HashMap<&'static str, Vec<Observed>>, Vec<String>)>;

async fn store_rounds(
    kind: StoreKind,
    namespace: &Namespace,
    backend: &Backend,
    config: &DurableCrashConfig,
) -> anyhow::Result<Rows> {
    let mut rows: Rows = config
        .points
        .iter()
        .map(|p| (*p, HashMap::new(), Vec::new()))
        .collect();
    let root = tempfile::Builder::new()
        .prefix("orchestrix-bench-dcrash-")
        .tempdir()?;
    // Every round (and the uncrashed runs) appends to files of its own.
    let open = |name: &str| -> anyhow::Result<(PathBuf, Logs)> {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let logs = Logs::open(&dir)?;
        Ok((dir, logs))
    };
    let (baseline_dir, baseline_logs) = open("baseline")?;
    let baseline = run_baseline(
        backend.store(),
        &baseline_logs,
        &config.points,
        config.lease,
        &baseline_dir,
    )
    .await?;
    for round in 0..config.rounds {
        let (dir, logs) = open(&format!("round-{round}"))?;
        let crashed = if kind == StoreKind::Memory {
            crash_in_process(backend, &logs, round, config).await?
        } else {
            crash_in_processes(kind, namespace, backend, &dir, round, config).await?
        };
        for mode in Mode::ALL {
            // A later call of every key replays the resumed outcome and runs nothing.
            let effects = Effects {
                logs: logs.clone(),
                flow: mode.flow(),
                role: "replay",
                parking: None,
                jitter: None,
            };
            let flow = crash_flow(backend.store(), &effects)?;
            for (point, per_mode, problems) in &mut rows {
                let key = key_of(round, *point);
                let input = input_of(*point);
                let replay =
                    Outcome::of(input, &flow.run(input, options(&key, config.lease)).await);
                let lines = Lines::read(&dir, &mode.flow(), input)?;
                let journal = crashed
                    .journals
                    .get(&(mode.name(), input))
                    .cloned()
                    .unwrap_or_else(|| "unread".to_owned());
                let mut found = Vec::new();
                let mut text = judge(
                    *point,
                    mode,
                    &journal,
                    &lines,
                    crashed.outcomes.get(&(mode.name(), input)),
                    Some(&replay),
                    &baseline,
                    &mut found,
                );
                if mode == Mode::Freeze {
                    // The thawed owner must have stopped (its lease lapsed long ago), or,
                    // thawed after its last checkpoint, had its outcome refused.
                    let thawed = crashed.thawed.get(&input);
                    let status = thawed.and_then(|t| t.status);
                    let refused = thawed.is_some_and(|t| t.run_error.is_some());
                    let how = match (status, refused) {
                        (Some(Status::Cancelled), _) => "stopped",
                        (Some(Status::Completed), true) => "outcome refused",
                        _ => {
                            found.push(format!(
                                "{point}: the thawed owner ended {status:?} ({:?})",
                                thawed.and_then(|t| t.run_error.as_deref())
                            ));
                            "**went on**"
                        }
                    };
                    text.push_str(&format!("; thawed owner {how}"));
                }
                problems.extend(
                    found
                        .into_iter()
                        .map(|p| format!("round {round}, {}: {p}", mode.name())),
                );
                per_mode.entry(mode.name()).or_default().push(Observed {
                    journal,
                    lines,
                    outcome: text,
                });
            }
        }
    }
    Ok(rows)
}

/// Uncrashed runs of every point's input: the outputs resumed runs must equal. Each
/// step must have run once.
async fn run_baseline(
    store: Arc<dyn IdempotencyStore>,
    logs: &Logs,
    points: &[Point],
    lease: Duration,
    dir: &Path,
) -> anyhow::Result<Baseline> {
    let effects = Effects {
        logs: logs.clone(),
        flow: BASELINE_FLOW.to_owned(),
        role: "baseline",
        parking: None,
        jitter: None,
    };
    let flow = crash_flow(store, &effects)?;
    let mut baseline = Baseline::new();
    for &point in points {
        let input = input_of(point);
        let key = format!("baseline-{}", crate::stores::unique_suffix());
        let result = flow
            .run(input, options(&key, lease))
            .await
            .map_err(|e| anyhow::anyhow!("the uncrashed run of {point} failed: {e}"))?;
        let lines = Lines::read(dir, BASELINE_FLOW, input)?;
        if result.status != Status::Completed || lines.steps != [1; 5] || lines.undo != [0; 5] {
            bail!(
                "the uncrashed run of {point} ended {:?} with lines {}",
                result.status,
                lines.render()
            );
        }
        let output = result.output.context("the uncrashed run has no output")?;
        baseline.insert(input, output);
    }
    Ok(baseline)
}

/// Journals at the kill (or freeze), and the resumers' outcomes, by (mode, input); and
/// how the thawed owner's runs ended, by input.
struct Crashed {
    journals: HashMap<(&'static str, u64), String>,
    outcomes: HashMap<(&'static str, u64), Outcome>,
    thawed: HashMap<u64, Outcome>,
}

async fn read_journals(
    store: &Arc<dyn IdempotencyStore>,
    round: u64,
    points: &[Point],
    modes: &[Mode],
    journals: &mut HashMap<(&'static str, u64), String>,
) -> anyhow::Result<()> {
    let journal = store
        .journal_store()
        .context("the store keeps no journals")?;
    for &mode in modes {
        for &point in points {
            let key = scoped(&mode.flow(), &key_of(round, point));
            let summary = match journal.read_journal(&key).await? {
                Some(j) => journal_summary(&j),
                None => "no journal".to_owned(),
            };
            journals.insert((mode.name(), input_of(point)), summary);
        }
    }
    Ok(())
}

/// Waits for `n` parked runs reported on `parked`.
async fn await_parked(
    parked: &mut mpsc::UnboundedReceiver<String>,
    n: usize,
) -> anyhow::Result<()> {
    tokio::time::timeout(PARK_TIMEOUT, async {
        for _ in 0..n {
            if parked.recv().await.is_none() {
                break;
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the owner's runs did not all park within {PARK_TIMEOUT:?}"))
}

/// The memory store: owner, crash (or freeze) and resumers in this process.
async fn crash_in_process(
    backend: &Backend,
    logs: &Logs,
    round: u64,
    config: &DurableCrashConfig,
) -> anyhow::Result<Crashed> {
    let store = backend.store();
    let (points, lease) = (&config.points, config.lease);
    let (report, mut parked) = mpsc::unbounded_channel();
    let killed = OwnerControl {
        report: Some(report),
        ..OwnerControl::default()
    };
    let tasks = start_owner(
        Arc::clone(&store),
        logs,
        round,
        points,
        &Mode::KILLED,
        lease,
        &killed,
    )?;
    await_parked(&mut parked, points.len() * Mode::KILLED.len()).await?;
    killed.crash.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let mut journals = HashMap::new();
    read_journals(&store, round, points, &Mode::KILLED, &mut journals).await?;
    let (retry, recover) = tokio::join!(
        resume(Arc::clone(&store), logs, Mode::Retry, round, points, lease),
        resume(
            Arc::clone(&store),
            logs,
            Mode::Recover,
            round,
            points,
            lease
        ),
    );
    let mut outcomes = HashMap::new();
    for (mode, found) in [(Mode::Retry, retry?), (Mode::Recover, recover?)] {
        for outcome in found {
            outcomes.insert((mode.name(), outcome.input), outcome);
        }
    }

    // Frozen instead: parked, no longer polled (heartbeat included), resumed by another
    // caller, then thawed and let go.
    let (report, mut parked) = mpsc::unbounded_channel();
    let frozen = OwnerControl {
        report: Some(report),
        ..OwnerControl::default()
    };
    let tasks = start_owner(
        Arc::clone(&store),
        logs,
        round,
        points,
        &[Mode::Freeze],
        lease,
        &frozen,
    )?;
    await_parked(&mut parked, points.len()).await?;
    frozen.freeze.cancel();
    tokio::task::yield_now().await;
    read_journals(&store, round, points, &[Mode::Freeze], &mut journals).await?;
    for outcome in resume(Arc::clone(&store), logs, Mode::Freeze, round, points, lease).await? {
        outcomes.insert((Mode::Freeze.name(), outcome.input), outcome);
    }
    frozen.thaw.cancel();
    frozen.release.cancel();
    let mut thawed = HashMap::new();
    for task in tasks {
        if let Some(outcome) = task.await? {
            thawed.insert(outcome.input, outcome);
        }
    }
    Ok(Crashed {
        journals,
        outcomes,
        thawed,
    })
}

/// A shared store: the owner and the resumers are child processes.
async fn crash_in_processes(
    kind: StoreKind,
    namespace: &Namespace,
    backend: &Backend,
    dir: &Path,
    round: u64,
    config: &DurableCrashConfig,
) -> anyhow::Result<Crashed> {
    let exe = std::env::current_exe().context("locating this binary to spawn processes")?;
    let points: Vec<String> = config.points.iter().map(|p| p.slug()).collect();
    let points = points.join(",");
    let command = |role: &str| {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args([
                "child",
                &format!("durable-crash-{role}"),
                "--store",
                kind.name(),
            ])
            .args(["--ns", &namespace.name, "--points", &points])
            .args(["--round", &round.to_string()])
            .args(["--lease-ms", &config.lease.as_millis().to_string()])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let mut owner = command("owner").spawn().context("spawning the owner")?;
    let mut lines = BufReader::new(owner.stdout.take().context("the owner's stdout")?).lines();
    let expected = config.points.len() * Mode::KILLED.len();
    let parked = tokio::time::timeout(PARK_TIMEOUT, async {
        let mut parked = 0;
        while parked < expected {
            match lines.next_line().await? {
                Some(line) if line.starts_with(PARKED_TAG) => parked += 1,
                Some(_) => {}
                None => break,
            }
        }
        anyhow::Ok(parked)
    })
    .await;
    // SIGKILL: every run dies exactly where it is parked.
    owner.kill().await.context("killing the owner")?;
    match parked {
        Ok(Ok(n)) if n == expected => {}
        Ok(Ok(n)) => bail!(
            "the owner exited with {n} of {expected} runs parked: {}",
            stderr_text(&mut owner).await
        ),
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!(
            "only some of the owner's {expected} runs parked within {PARK_TIMEOUT:?}: {}",
            stderr_text(&mut owner).await
        ),
    }
    let store = backend.store();
    let mut journals = HashMap::new();
    read_journals(&store, round, &config.points, &Mode::KILLED, &mut journals).await?;
    let resumers = [Mode::Retry, Mode::Recover].map(|mode| {
        let mut command = command(mode.name());
        async move {
            let child = command.spawn().context("spawning a resumer")?;
            let output = tokio::time::timeout(RESUMER_TIMEOUT, child.wait_with_output())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "the {} resumer ran longer than {RESUMER_TIMEOUT:?}",
                        mode.name()
                    )
                })??;
            let stdout = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() {
                bail!(
                    "the {} resumer failed ({}): {}",
                    mode.name(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            stdout
                .lines()
                .filter_map(|l| l.strip_prefix(OUTCOME_TAG))
                .map(|json| Ok((mode.name(), serde_json::from_str::<Outcome>(json)?)))
                .collect::<anyhow::Result<Vec<_>>>()
        }
    });
    let mut outcomes = HashMap::new();
    for found in futures_util::future::join_all(resumers).await {
        for (mode, outcome) in found? {
            outcomes.insert((mode, outcome.input), outcome);
        }
    }

    // Frozen instead: SIGSTOP once parked, another process runs every key again, then
    // SIGCONT and `GO` let the owner's runs go on.
    let mut owner = command("freeze-owner")
        .stdin(Stdio::piped())
        .spawn()
        .context("spawning the owner to freeze")?;
    let mut go = owner.stdin.take().context("the frozen owner's stdin")?;
    let mut lines = BufReader::new(owner.stdout.take().context("the owner's stdout")?).lines();
    let expected = config.points.len();
    let parked = tokio::time::timeout(PARK_TIMEOUT, async {
        let mut parked = 0;
        while parked < expected {
            match lines.next_line().await? {
                Some(line) if line.starts_with(PARKED_TAG) => parked += 1,
                Some(_) => {}
                None => break,
            }
        }
        anyhow::Ok(parked)
    })
    .await;
    if !matches!(parked, Ok(Ok(n)) if n == expected) {
        owner.kill().await?;
        bail!(
            "the owner to freeze did not park its {expected} runs: {}",
            stderr_text(&mut owner).await
        );
    }
    let pid = owner.id().context("the owner to freeze has no pid")?;
    signal("STOP", pid).await?;
    read_journals(
        &store,
        round,
        &config.points,
        &[Mode::Freeze],
        &mut journals,
    )
    .await?;
    let taker = command("freeze").spawn().context("spawning the taker")?;
    let taken = tokio::time::timeout(RESUMER_TIMEOUT, taker.wait_with_output()).await;
    signal("CONT", pid).await?;
    let output =
        taken.map_err(|_| anyhow::anyhow!("the taker ran longer than {RESUMER_TIMEOUT:?}"))??;
    if !output.status.success() {
        bail!(
            "the taker failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    for json in String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(OUTCOME_TAG))
    {
        let outcome: Outcome = serde_json::from_str(json)?;
        outcomes.insert((Mode::Freeze.name(), outcome.input), outcome);
    }
    {
        use tokio::io::AsyncWriteExt as _;
        go.write_all(format!("{RELEASE}\n").as_bytes()).await?;
        drop(go);
    }
    let mut thawed = HashMap::new();
    tokio::time::timeout(RESUMER_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(json) = line.strip_prefix(OUTCOME_TAG) {
                let outcome: Outcome = serde_json::from_str(json)?;
                thawed.insert(outcome.input, outcome);
            }
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("the thawed owner ran longer than {RESUMER_TIMEOUT:?}"))??;
    let _ = owner.wait().await;
    Ok(Crashed {
        journals,
        outcomes,
        thawed,
    })
}

/// Sends `signal` to `pid` with the `kill` command (this crate has no `unsafe`).
async fn signal(signal: &str, pid: u32) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stdin(Stdio::null())
        .status()
        .await
        .with_context(|| format!("running `kill -{signal} {pid}`"))?;
    anyhow::ensure!(status.success(), "`kill -{signal} {pid}` failed ({status})");
    Ok(())
}

pub(crate) async fn stderr_text(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), stderr.read_to_string(&mut text)).await;
    }
    text.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_points_cover_every_boundary_and_every_step() {
        let all = Point::all();
        assert_eq!(all.len(), 12);
        for point in &all {
            assert_eq!(Point::parse(&point.slug()).ok(), Some(*point));
        }
        assert_eq!(
            Point::After(4).expected_journal(),
            "reserve charge notify pack ship"
        );
        assert_eq!(Point::In(1).expected_journal(), "reserve charge(started)");
        assert_eq!(Point::Acquired.expected_journal(), "input only");
    }

    #[test]
    fn entry_heads_read_kind_and_name() {
        let mut entry = vec![b'c'];
        entry.extend_from_slice(&2u32.to_le_bytes());
        entry.extend_from_slice(&6u32.to_le_bytes());
        entry.extend_from_slice(b"notify");
        entry.extend_from_slice(&[0; 12]);
        assert_eq!(entry_head(&entry), Some((b'c', "notify")));
        assert_eq!(entry_head(&entry[..8]), None);
    }
}
