//! Big results: a private `redis-server` that refuses a result for its size
//! (`--proto-max-bulk-len 1mb`) or for its memory (`--maxmemory 4mb --maxmemory-policy
//! noeviction`, the policy the Redis store's README recommends), and flows whose output is
//! larger than that limit.
//!
//! A refused result must not make the operation runnable again: the owner finishes the
//! record *without* its result (fenced), the caller gets `RunError::NotPersisted` with
//! its result and a source that says the result was not kept
//! (`StoreError::ResultRefused` or `TooLarge`), and every later caller — also after the
//! lease has lapsed — gets a typed "result not stored" and runs nothing. The independent
//! [`ExecutionLog`] counts what really ran: exactly once per key.
//!
//! Each key is raced by C callers; keys are taken one after another, so one refused write
//! at a time meets the server (a protocol error makes Redis close the connection, and
//! would otherwise fail the unrelated commands sharing it). A caller whose run the store
//! refused to start (`StoreError::Backend` before anything ran: a Redis over its memory
//! limit refuses the acquire too, until its Lua heap has let go of the refused argument)
//! runs it again, as a client would, for up to [`RETRY_FOR`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use orchestrix::idempotency::IdempotencyError;
use orchestrix::store::{IdempotencyStore, StoreError};
use orchestrix::{Context, Flow, FlowResult, KeyScope, RunError, RunOptions, Status};
use orchestrix_redis::RedisStore;

use crate::args::Args;
use crate::counter::{ExecutionLog, LogFile};
use crate::redis_server::PrivateRedis;
use crate::section::{Section, Table};
use crate::stores::unique_suffix;
use crate::storm::{RUN_TIMEOUT, error_kind, store_error_kind};

/// Past the lease, how long the second round waits more before it starts.
const LAPSE_MARGIN: Duration = Duration::from_millis(300);
/// How long a caller whose run the store refused to start keeps retrying it.
const RETRY_FOR: Duration = Duration::from_secs(10);
const RETRY_PAUSE: Duration = Duration::from_millis(50);

type RunOutcome = Result<Result<FlowResult<String>, RunError<String>>, tokio::time::error::Elapsed>;

const MIB: usize = 1024 * 1024;

/// A limit the private server is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--proto-max-bulk-len 1mb`: Redis refuses any argument above 1 MiB (and closes the
    /// connection).
    BulkLength,
    /// `--maxmemory 4mb --maxmemory-policy noeviction`: Redis refuses writes while its
    /// memory is over 4 MiB (`OOM command not allowed`), which a 5 MiB argument makes it
    /// (and keeps it, in the Lua heap, until Lua collects it).
    Memory,
}

impl Limit {
    pub const ALL: [Self; 2] = [Self::BulkLength, Self::Memory];

    fn parse_list(text: &str) -> anyhow::Result<Vec<Self>> {
        match text {
            "all" => Ok(Self::ALL.to_vec()),
            "bulk" => Ok(vec![Self::BulkLength]),
            "memory" => Ok(vec![Self::Memory]),
            other => bail!("unknown --limit {other:?}: bulk, memory or all"),
        }
    }

    fn server_config(self) -> &'static [&'static str] {
        match self {
            Self::BulkLength => &["--proto-max-bulk-len", "1mb"],
            Self::Memory => &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
        }
    }

    /// The flow's output: above the limit.
    fn output_bytes(self) -> usize {
        match self {
            Self::BulkLength => 2 * MIB,
            Self::Memory => 5 * MIB,
        }
    }

    fn describe(self) -> String {
        format!("`{}`", self.server_config().join(" "))
    }
}

#[derive(Debug, Clone)]
pub struct BigResultsConfig {
    pub limits: Vec<Limit>,
    pub keys: u64,
    pub callers: u64,
    pub lease: Duration,
}

impl BigResultsConfig {
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        Ok(Self {
            limits: Limit::parse_list(args.get("limit").unwrap_or("all"))?,
            keys: args.count("keys", 10)?,
            callers: args.count("callers", 4)?,
            lease: args.millis("lease-ms", Duration::from_secs(1))?,
        })
    }
}

/// How the runs of one round ended, by kind, and what the executing runs returned.
#[derive(Debug, Default)]
struct Round {
    outcomes: BTreeMap<String, u64>,
    /// Executing runs whose error said the result was not kept (finished without it).
    finished_without_result: u64,
    /// Executing runs that returned their whole output to the caller.
    output_returned: u64,
    /// Runs the store refused to start (fail closed) that their caller ran again.
    fail_closed_retries: u64,
    hung: u64,
    panicked: u64,
}

impl Round {
    fn count(&mut self, outcome: RunOutcome, output_bytes: usize) {
        let whole = |result: &FlowResult<String>| {
            result.output.as_ref().map(String::len) == Some(output_bytes)
        };
        let kind = match outcome {
            Err(_) => {
                self.hung += 1;
                "hung".to_owned()
            }
            Ok(Ok(result)) => match (result.status, result.replayed) {
                (Status::Completed, false) => {
                    self.output_returned += u64::from(whole(&result));
                    "ran, result stored".to_owned()
                }
                (Status::Completed, true) => "replayed".to_owned(),
                (Status::Running, _) => "running".to_owned(),
                (status, _) => format!("{status:?}").to_lowercase(),
            },
            Ok(Err(RunError::NotPersisted { result, source })) => {
                self.output_returned += u64::from(whole(&result));
                self.finished_without_result += u64::from(source.finished_without_result());
                format!("ran, not persisted: {}", store_error_kind(&source))
            }
            Ok(Err(e)) => error_kind(&e),
        };
        *self.outcomes.entry(kind).or_insert(0) += 1;
    }

    fn executed(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(kind, _)| kind.starts_with("ran"))
            .map(|(_, n)| n)
            .sum()
    }

    fn text(&self) -> String {
        let mut text = self
            .outcomes
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect::<Vec<_>>()
            .join(", ");
        if self.fail_closed_retries > 0 {
            text.push_str(&format!(
                " ({} runs refused at start, retried)",
                self.fail_closed_retries
            ));
        }
        text
    }
}

/// What one limit's scenario observed.
struct Observed {
    first: Round,
    second: Round,
    counts: BTreeMap<String, u64>,
}

pub async fn main(config: &BigResultsConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Big results (a Redis that refuses the result)");
    section.about(format!(
        "A private `redis-server` (no persistence, its own loopback port) started with a \
         limit, and a one-step flow whose step appends the key to a file opened with \
         `O_APPEND` (the independent count) and whose output is larger than the limit. Each \
         of K keys, one after another, is raced by C callers (lease {:?}); once the lease \
         has lapsed, C callers race for every key again. A caller whose run the store \
         refused to start (fail closed: a Redis over its memory limit refuses the acquire \
         too) runs it again, for up to {RETRY_FOR:?}. **Invariant: the file holds \
         exactly one line per key** (a refused result never makes the operation runnable \
         again); every run that executed returns `RunError::NotPersisted` with its whole \
         result and a source that says the record was finished without it \
         (`StoreError::ResultRefused` or `TooLarge`); after the lease every caller gets \
         `IdempotencyError::ResultNotStored` (not started), none runs; every call returns \
         within {RUN_TIMEOUT:?}.",
        config.lease
    ));
    let mut table = Table::new([
        "server limit",
        "output",
        "K × C",
        "executed (file)",
        "first round",
        "after the lease",
        "invariant",
    ]);
    for &limit in &config.limits {
        let observed = match run_limit(limit, config).await {
            Ok(observed) => observed,
            Err(e) => {
                section.violation(format!("{}: did not complete: {e:#}", limit.describe()));
                continue;
            }
        };
        let broken = check(limit, config, &observed);
        let lines: u64 = observed.counts.values().sum();
        table.row([
            limit.describe(),
            format!("{} MiB", limit.output_bytes() / MIB),
            format!("{} × {}", config.keys, config.callers),
            lines.to_string(),
            observed.first.text(),
            observed.second.text(),
            if broken.is_empty() {
                "held".to_owned()
            } else {
                "**BROKEN**".to_owned()
            },
        ]);
        for problem in broken {
            section.violation(format!("{}: {problem}", limit.describe()));
        }
    }
    section.tables.push(table);
    section.note(
        "`running`: the caller found the key held by the caller executing it; `result not \
         stored`: the record is finished without its result, so the run is refused and \
         nothing executes.",
    );
    Ok(section)
}

fn check(limit: Limit, config: &BigResultsConfig, observed: &Observed) -> Vec<String> {
    let mut broken = Vec::new();
    let Observed {
        first,
        second,
        counts,
    } = observed;
    let lines: u64 = counts.values().sum();
    let twice: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(key, n)| format!("{key}×{n}"))
        .collect();
    if lines != config.keys || counts.len() as u64 != config.keys {
        broken.push(format!(
            "{lines} executions of {} distinct keys, expected exactly {} (repeated: {})",
            counts.len(),
            config.keys,
            if twice.is_empty() {
                "none".to_owned()
            } else {
                twice
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    let executed = first.executed() + second.executed();
    if executed != lines {
        broken.push(format!(
            "callers report {executed} executions, the file {lines}"
        ));
    }
    let told = first.finished_without_result + second.finished_without_result;
    if told != executed {
        broken.push(format!(
            "{told} of {executed} executing runs were told the record was finished without \
             its result (`ResultRefused` / `TooLarge`); first round: {}",
            first.text()
        ));
    }
    if first.output_returned != first.executed() {
        broken.push(format!(
            "{} of {} executing runs returned their whole {}-byte output",
            first.output_returned,
            first.executed(),
            limit.output_bytes()
        ));
    }
    let not_stored = second
        .outcomes
        .get("not started: result not stored")
        .copied()
        .unwrap_or(0);
    if not_stored != config.keys * config.callers {
        broken.push(format!(
            "after the lease, {not_stored} of {} runs were told the result was not stored: {}",
            config.keys * config.callers,
            second.text()
        ));
    }
    let hung = first.hung + second.hung;
    if hung > 0 {
        broken.push(format!("{hung} runs did not return within {RUN_TIMEOUT:?}"));
    }
    let panicked = first.panicked + second.panicked;
    if panicked > 0 {
        broken.push(format!("{panicked} callers panicked"));
    }
    broken
}

async fn run_limit(limit: Limit, config: &BigResultsConfig) -> anyhow::Result<Observed> {
    let mut server = PrivateRedis::start_with(limit.server_config()).await?;
    let outcome = rounds(&server, limit, config).await;
    server.kill().await?;
    outcome
}

async fn rounds(
    server: &PrivateRedis,
    limit: Limit,
    config: &BigResultsConfig,
) -> anyhow::Result<Observed> {
    let store = RedisStore::builder(server.url())
        .key_prefix(format!("orchestrix-bench:big:{}:", unique_suffix()))
        .connect()
        .await?;
    let log_file = LogFile::new()?;
    let flow = big_flow(
        Arc::new(store),
        ExecutionLog::open(&log_file.path)?,
        limit.output_bytes(),
    )?;
    let first = race_every_key(&flow, limit, config).await;
    tokio::time::sleep(config.lease + LAPSE_MARGIN).await;
    let second = race_every_key(&flow, limit, config).await;
    Ok(Observed {
        first,
        second,
        counts: log_file.counts()?,
    })
}

/// One step, the side effect; the output is `output_bytes` long.
fn big_flow(
    store: Arc<dyn IdempotencyStore>,
    log: ExecutionLog,
    output_bytes: usize,
) -> anyhow::Result<Flow<u64, String>> {
    Ok(Flow::<u64, String>::builder("big-results")
        .store(store)
        .step("effect", move |ctx: Context<u64>| {
            let log = log.clone();
            async move {
                log.record(&format!("big-{}", ctx.input()))?;
                Ok(())
            }
        })
        .output(move |_| Ok("x".repeat(output_bytes)))
        .build()?)
}

/// Every key in turn, each raced by the configured number of callers.
async fn race_every_key(
    flow: &Flow<u64, String>,
    limit: Limit,
    config: &BigResultsConfig,
) -> Round {
    let mut round = Round::default();
    for key in 0..config.keys {
        let callers: Vec<_> = (0..config.callers)
            .map(|_| {
                let flow = flow.clone();
                let options = RunOptions::key(format!("big-{key}"))
                    .scope(KeyScope::Global)
                    .lease(config.lease)
                    .ttl(Duration::from_secs(3600));
                tokio::spawn(async move { run_until_answered(&flow, key, options).await })
            })
            .collect();
        for caller in callers {
            match caller.await {
                Ok((outcome, retries)) => {
                    round.fail_closed_retries += retries;
                    round.count(outcome, limit.output_bytes());
                }
                Err(_) => round.panicked += 1,
            }
        }
    }
    round
}

/// One caller's run of `key`, retried while the store refuses to start it at all (a
/// server out of memory refuses the acquire too: fail closed, nothing ran), as a client
/// would. Returns the last outcome and how many runs were refused before it.
async fn run_until_answered(
    flow: &Flow<u64, String>,
    key: u64,
    options: RunOptions,
) -> (RunOutcome, u64) {
    let deadline = Instant::now() + RETRY_FOR;
    let mut retries = 0;
    loop {
        let outcome = tokio::time::timeout(RUN_TIMEOUT, flow.run(key, options.clone())).await;
        let fail_closed = matches!(
            &outcome,
            Ok(Err(RunError::Idempotency(IdempotencyError::Store(
                StoreError::Backend(_)
            ))))
        );
        if !fail_closed || Instant::now() >= deadline {
            return (outcome, retries);
        }
        retries += 1;
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}
