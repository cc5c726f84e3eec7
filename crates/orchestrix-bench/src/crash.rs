//! Crash takeover: an owner process is killed with SIGKILL in the middle of its step; a
//! second process takes the key over once the lease lapses and completes it; then the
//! killed owner's late writes are replayed with its stale fencing token and must be
//! refused.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use orchestrix::store::{FencingToken, IdempotencyStore, RecordStatus, StoreError};
use orchestrix::{Context, Flow, KeyScope, OnRunning, RunOptions, Status, StepError};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::args::Args;
use crate::counter::{ExecutionLog, LogFile};
use crate::section::{Section, Table};
use crate::stores::{Backend, Namespace, StoreKind, unique_suffix};
use crate::storm::{store_error_kind, unix_ms};

/// How long the owner's step would run if it were not killed.
const OWNER_STEP: Duration = Duration::from_secs(120);
/// How long the taker waits for the key (it must get it once the lease lapses).
const TAKER_WAIT: Duration = Duration::from_secs(30);
/// Bound on waiting for a child's lines and exit.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct CrashConfig {
    pub lease: Duration,
    pub rounds: u64,
}

impl CrashConfig {
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        Ok(Self {
            lease: args.millis("lease-ms", Duration::from_secs(1))?,
            rounds: args.count("rounds", 1)?,
        })
    }
}

/// The crash flow. Its one step records the execution (`role:key`), prints the fencing
/// token the store holds for this run, and then (owner) sleeps until killed or (taker)
/// finishes with its name as output.
fn crash_flow(
    store: Arc<dyn IdempotencyStore>,
    log: ExecutionLog,
    key: String,
    owner: bool,
) -> anyhow::Result<Flow<u64, String>> {
    let step_store = Arc::clone(&store);
    Ok(Flow::<u64, String>::builder("crash")
        .store(store)
        .step("work", move |ctx: Context<u64>| {
            let (store, log, key) = (Arc::clone(&step_store), log.clone(), key.clone());
            async move {
                let role = if owner { "owner" } else { "taker" };
                log.record(&format!("{role}:{key}"))?;
                let record = store
                    .get(&key)
                    .await?
                    .ok_or_else(|| StepError::msg("no record under the key while running"))?;
                println!("TOKEN {}", record.token);
                println!("ACQUIRED-AT-MS {}", unix_ms());
                if owner {
                    tokio::time::sleep(OWNER_STEP).await;
                }
                ctx.set("who", format!("{role}-{}", std::process::id()))?;
                Ok(())
            }
        })
        .output(|ctx| Ok(ctx.get::<String>("who")?.unwrap_or_default()))
        .build()?)
}

fn options(key: &str, lease: Duration) -> RunOptions {
    RunOptions::key(key)
        .scope(KeyScope::Global)
        .lease(lease)
        .ttl(Duration::from_secs(3600))
}

/// The child side: `crash-owner` or `crash-taker`.
pub async fn child(args: &Args, owner: bool) -> anyhow::Result<()> {
    let kind = StoreKind::parse(args.required("store")?)?;
    let key = args.required("key")?.to_owned();
    let lease = args.millis("lease-ms", Duration::from_secs(1))?;
    let log = ExecutionLog::open(Path::new(args.required("log")?))?;
    let backend = Backend::open(kind, args.required("ns")?, 4).await?;
    let flow = crash_flow(backend.store(), log, key.clone(), owner)?;
    let mut options = options(&key, lease);
    if !owner {
        options = options.on_running(OnRunning::Wait {
            timeout: TAKER_WAIT,
        });
    }
    let result = flow.run(7, options).await;
    if owner {
        bail!(
            "the owner's run ended ({:?}) instead of being killed",
            result.map(|r| r.status)
        );
    }
    let result = result.map_err(|e| anyhow::anyhow!("the taker's run failed: {e}"))?;
    println!(
        "RESULT status={:?} replayed={} output={}",
        result.status,
        result.replayed,
        result.output.unwrap_or_default()
    );
    Ok(())
}

/// What one crash round observed.
struct Round {
    owner_token: FencingToken,
    taker_token: FencingToken,
    takeover_ms: u64,
    stale_refused: usize,
    final_record: String,
    executions: Vec<String>,
}

/// Runs the crash scenario against each store.
pub async fn main(kinds: &[StoreKind], config: &CrashConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Crash takeover");
    section.about(format!(
        "An owner process acquires a key through `Flow::run` (lease {:?}, renewed by its \
         heartbeat every third of it) and, inside its step, 1.5 leases later (the record is \
         checked to still be its own, running: the heartbeat works), is killed with SIGKILL. A second process runs the same \
         key with `OnRunning::Wait`: it gets the key once the dead owner's lease lapses and \
         completes it. Then the killed owner's late writes are simulated: `complete`, `fail`, \
         `renew` and `release` with its stale fencing token (printed by the owner's step from \
         `store.get`). **Invariant: every stale write is refused with `StoreError::StaleToken`; \
         one completed record remains, holding the new owner's token and result (a replay \
         returns it); the side effect ran exactly twice (the killed attempt and the takeover), \
         zero stale overwrites.**",
        config.lease
    ));
    let mut table = Table::new([
        "store",
        "lease",
        "rounds",
        "takeover after kill (ms)",
        "stale writes refused",
        "final record",
        "executions",
        "invariant",
    ]);
    for &kind in kinds {
        if kind == StoreKind::Memory {
            section.note("memory: skipped — the store lives in one process, so there is no other process to take over");
            continue;
        }
        let (namespace, backend) = match Namespace::create(kind, "crash", 4).await {
            Ok(opened) => opened,
            Err(e) => {
                section.note(format!("{}: skipped — {e:#}", kind.name()));
                continue;
            }
        };
        let mut takeovers = Vec::new();
        let mut refused = 0;
        let mut finals = Vec::new();
        let mut executions = 0;
        let mut broken = Vec::new();
        for round in 0..config.rounds {
            match crash_round(kind, &namespace, &backend, config.lease, round).await {
                Ok(r) => {
                    takeovers.push(r.takeover_ms);
                    refused += r.stale_refused;
                    executions += r.executions.len();
                    if r.owner_token == r.taker_token {
                        broken.push(format!("round {round}: the taker got the owner's token"));
                    }
                    if r.stale_refused != 4 {
                        broken.push(format!(
                            "round {round}: only {} of 4 stale writes refused",
                            r.stale_refused
                        ));
                    }
                    if r.executions.len() != 2 {
                        broken.push(format!(
                            "round {round}: executions {:?}, expected [owner, taker]",
                            r.executions
                        ));
                    }
                    finals.push(r.final_record);
                }
                Err(e) => broken.push(format!("round {round}: {e:#}")),
            }
        }
        if let Some(problem) = namespace.remove(&backend).await {
            section.note(problem);
        }
        let takeover = match (takeovers.iter().min(), takeovers.iter().max()) {
            (Some(min), Some(max)) if min == max => min.to_string(),
            (Some(min), Some(max)) => format!("{min}–{max}"),
            _ => "-".to_owned(),
        };
        finals.dedup();
        table.row([
            kind.name().to_owned(),
            format!("{:?}", config.lease),
            config.rounds.to_string(),
            takeover,
            format!("{refused} of {}", 4 * config.rounds),
            finals.join("; "),
            executions.to_string(),
            if broken.is_empty() {
                "held".to_owned()
            } else {
                "**BROKEN**".to_owned()
            },
        ]);
        for problem in broken {
            section.violation(format!("{}: {problem}", kind.name()));
        }
        if kind == StoreKind::Dynamodb {
            section.note(
                "dynamodb: a lease counts as lapsed only after the store's clock-skew allowance \
                 (default 1 s) on top of it, since DynamoDB has no server clock",
            );
        }
    }
    section.tables.push(table);
    Ok(section)
}

async fn crash_round(
    kind: StoreKind,
    namespace: &Namespace,
    backend: &Backend,
    lease: Duration,
    round: u64,
) -> anyhow::Result<Round> {
    let log_file = LogFile::new()?;
    let key = format!("crash-job-{round}-{}", unique_suffix());
    let exe = std::env::current_exe().context("locating this binary to spawn crash processes")?;
    let command = |role: &str| {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args([
                "child",
                role,
                "--store",
                kind.name(),
                "--ns",
                &namespace.name,
                "--key",
                &key,
            ])
            .args(["--lease-ms", &lease.as_millis().to_string()])
            .arg("--log")
            .arg(&log_file.path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    };

    // 1. The owner acquires and, inside its step, prints its token.
    let mut owner = command("crash-owner")
        .spawn()
        .context("spawning the owner")?;
    let stdout = owner.stdout.take().context("the owner's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let owner_token = tokio::time::timeout(CHILD_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(token) = line.strip_prefix("TOKEN ") {
                return Ok(token.parse::<FencingToken>()?);
            }
        }
        bail!("the owner exited before printing its token")
    })
    .await
    .map_err(|_| anyhow::anyhow!("the owner did not acquire the key within {CHILD_TIMEOUT:?}"))??;

    // 2. Past its first lease the key is still the owner's: its heartbeat renews it.
    tokio::time::sleep(lease * 3 / 2).await;
    let store = backend.store();
    match store.get(&key).await? {
        Some(r) if r.status == RecordStatus::Running && r.token == owner_token => {}
        other => bail!("1.5 leases after acquiring, the live owner's record is {other:?}"),
    }

    // 3. SIGKILL, mid-step: no settle, no release, its heartbeat stops.
    let killed_at_ms = unix_ms();
    owner.kill().await.context("killing the owner")?;

    // 4. Another process takes the key over once the lease lapses.
    let taker = command("crash-taker")
        .spawn()
        .context("spawning the taker")?;
    let output = tokio::time::timeout(CHILD_TIMEOUT, taker.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("the taker did not finish within {CHILD_TIMEOUT:?}"))??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::to_owned)
    };
    let (Some(taker_token), Some(acquired_at), Some(result)) =
        (field("TOKEN "), field("ACQUIRED-AT-MS "), field("RESULT "))
    else {
        bail!(
            "the taker did not take over ({}): {} {}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    };
    let taker_token: FencingToken = taker_token.parse()?;
    let takeover_ms = acquired_at.parse::<u64>()?.saturating_sub(killed_at_ms);
    let taker_output = result
        .split_once("output=")
        .map(|(_, o)| o.to_owned())
        .context("the taker's result has no output")?;
    if !result.starts_with("status=Completed replayed=false") {
        bail!("the taker's run: {result}");
    }

    // 5. The killed owner's late writes, with its stale token.
    let stale = [
        (
            "complete",
            store
                .complete(&key, owner_token, b"stale overwrite", None)
                .await,
        ),
        (
            "fail",
            store
                .fail(&key, owner_token, b"stale overwrite", None)
                .await,
        ),
        ("renew", store.renew(&key, owner_token, lease).await),
        ("release", store.release(&key, owner_token).await),
    ];
    let mut stale_refused = 0;
    let mut problems = Vec::new();
    for (op, outcome) in stale {
        match outcome {
            Err(StoreError::StaleToken) => stale_refused += 1,
            Ok(()) => problems.push(format!("stale {op} was ACCEPTED")),
            Err(e) => problems.push(format!(
                "stale {op}: {} error instead of StaleToken: {e}",
                store_error_kind(&e)
            )),
        }
    }

    // 6. One completed record, the taker's, and a replay returns its result.
    let record = store
        .get(&key)
        .await?
        .context("no record left under the key")?;
    if record.status != RecordStatus::Completed || record.token != taker_token {
        problems.push(format!(
            "final record is {} under token {} (taker's: {taker_token})",
            record.status, record.token
        ));
    }
    // The stored result is the engine's binary envelope, which ends with the run's output
    // as JSON. (The replay below checks the same through the engine.)
    let output_json = serde_json::to_vec(&taker_output)?;
    if !record
        .result
        .as_deref()
        .is_some_and(|stored| stored.ends_with(&output_json))
    {
        problems.push(format!(
            "final record does not hold the taker's output {taker_output:?}"
        ));
    }
    let replay_log = ExecutionLog::open(&log_file.path)?;
    let replay = crash_flow(store, replay_log, key.clone(), false)?
        .run(7, options(&key, lease))
        .await
        .map_err(|e| anyhow::anyhow!("replaying the key failed: {e}"))?;
    if !(replay.replayed
        && replay.status == Status::Completed
        && replay.output.as_deref() == Some(taker_output.as_str()))
    {
        problems.push(format!(
            "a replay returned {:?} (replayed {})",
            replay.output, replay.replayed
        ));
    }
    let executions = log_file.lines()?;
    let expected = [format!("owner:{key}"), format!("taker:{key}")];
    if executions != expected {
        problems.push(format!("executions {executions:?}, expected {expected:?}"));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(Round {
        owner_token,
        taker_token,
        takeover_ms,
        stale_refused,
        final_record: "completed, the taker's token and result".to_owned(),
        executions,
    })
}
