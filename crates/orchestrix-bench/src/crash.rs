//! Crash takeover: an owner process is killed with SIGKILL in the middle of its step; a
//! second process takes the key over once the lease lapses. The killed owner's late writes
//! are replayed with its stale fencing token twice: **while the taker's step is still
//! running** (the taker holds its step until the parent has made them, so a fence that
//! ignored the token would overwrite or delete a live owner's record), and again after
//! the taker completed. Every one must be refused, and the taker's result must win.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use orchestrix::store::{FencingToken, IdempotencyStore, RecordStatus, StoreError};
use orchestrix::{Context, Flow, KeyScope, OnRunning, RunOptions, Status, StepError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::args::Args;
use crate::counter::{ExecutionLog, LogFile};
use crate::section::{Section, Table};
use crate::stores::{Backend, Namespace, StoreKind, unique_suffix};
use crate::storm::{store_error_kind, unix_ms};

/// How long the owner's step would run if it were not killed.
const OWNER_STEP: Duration = Duration::from_secs(120);
/// How long the taker waits for the key (it must get it once the lease lapses).
const TAKER_WAIT: Duration = Duration::from_secs(30);
/// How long the taker holds its step for the parent's stale writes before giving up.
const TAKER_HOLD: Duration = Duration::from_secs(30);
/// What the parent writes to the taker's stdin once it has made the stale writes.
const RELEASE_TAKER: &str = "GO";
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

/// Who runs the crash flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Acquires, then sleeps in its step until it is killed.
    Owner,
    /// Takes the key over, then holds its step until the parent writes [`RELEASE_TAKER`]
    /// to its stdin.
    Taker,
    /// The parent's replay at the end: its step must never run, and would not wait.
    Replayer,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Taker => "taker",
            Self::Replayer => "replayer",
        }
    }
}

/// The crash flow. Its one step records the execution (`role:key`), prints the fencing
/// token the store holds for this run, and then (owner) sleeps until killed, (taker)
/// holds until the parent releases it, and finishes with its name as output.
fn crash_flow(
    store: Arc<dyn IdempotencyStore>,
    log: ExecutionLog,
    key: String,
    role: Role,
) -> anyhow::Result<Flow<u64, String>> {
    let step_store = Arc::clone(&store);
    Ok(Flow::<u64, String>::builder("crash")
        .store(store)
        .step("work", move |ctx: Context<u64>| {
            let (store, log, key) = (Arc::clone(&step_store), log.clone(), key.clone());
            async move {
                log.record(&format!("{}:{key}", role.name()))?;
                let record = store
                    .get(&key)
                    .await?
                    .ok_or_else(|| StepError::msg("no record under the key while running"))?;
                println!("TOKEN {}", record.token);
                println!("ACQUIRED-AT-MS {}", unix_ms());
                match role {
                    Role::Owner => tokio::time::sleep(OWNER_STEP).await,
                    Role::Taker => hold_until_released().await?,
                    Role::Replayer => {}
                }
                ctx.set("who", format!("{}-{}", role.name(), std::process::id()))?;
                Ok(())
            }
        })
        .output(|ctx| Ok(ctx.get::<String>("who")?.unwrap_or_default()))
        .build()?)
}

/// The taker's step waits here, mid-run, for the parent's [`RELEASE_TAKER`] line.
async fn hold_until_released() -> Result<(), StepError> {
    let released = async {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await? {
            if line == RELEASE_TAKER {
                return Ok(true);
            }
        }
        Ok::<_, std::io::Error>(false)
    };
    match tokio::time::timeout(TAKER_HOLD, released).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(StepError::msg(
            "stdin closed before the parent released the taker",
        )),
        Ok(Err(e)) => Err(StepError::new(e)),
        Err(_) => Err(StepError::msg(format!(
            "the parent did not release the taker within {TAKER_HOLD:?}"
        ))),
    }
}

fn options(key: &str, lease: Duration) -> RunOptions {
    RunOptions::key(key)
        .scope(KeyScope::Global)
        .lease(lease)
        .ttl(Duration::from_secs(3600))
}

/// The child side: `crash-owner` or `crash-taker`.
pub async fn child(args: &Args, role: Role) -> anyhow::Result<()> {
    let kind = StoreKind::parse(args.required("store")?)?;
    let key = args.required("key")?.to_owned();
    let lease = args.millis("lease-ms", Duration::from_secs(1))?;
    let log = ExecutionLog::open(Path::new(args.required("log")?))?;
    let backend = Backend::open(kind, args.required("ns")?, 4).await?;
    let flow = crash_flow(backend.store(), log, key.clone(), role)?;
    let mut options = options(&key, lease);
    let owner = role == Role::Owner;
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
    /// Stale writes refused while the taker's step was running.
    refused_while_running: usize,
    /// Stale writes refused after the taker completed.
    refused_after: usize,
    final_record: String,
    executions: Vec<String>,
}

/// The four writes a killed owner can still make with its token.
const STALE_WRITES: usize = 4;

/// Runs the crash scenario against each store.
pub async fn main(kinds: &[StoreKind], config: &CrashConfig) -> anyhow::Result<Section> {
    let mut section = Section::new("Crash takeover");
    section.about(format!(
        "An owner process acquires a key through `Flow::run` (lease {:?}, renewed by its \
         heartbeat every third of it) and, inside its step, 1.5 leases later (the record is \
         checked to still be its own, running: the heartbeat works), is killed with SIGKILL. \
         A second process runs the same key with `OnRunning::Wait`: it gets the key once the \
         dead owner's lease lapses, and its step then **holds** until the parent has \
         replayed the killed owner's late writes — `complete`, `fail`, `renew` and `release` \
         with its stale fencing token (printed by the owner's step from `store.get`) — so \
         they land while the taker is running, where a fence that ignored the token would \
         overwrite or delete a live owner's record. The parent checks the record is still \
         the taker's and running, releases the taker, and once it completed replays the \
         four stale writes again. **Invariant: every stale write, while the taker runs and \
         after it completed, is refused with `StoreError::StaleToken`; the taker's record \
         is untouched by them; one completed record remains, holding the taker's token and \
         result (a replay returns it); the side effect ran exactly twice (the killed attempt \
         and the takeover), zero stale overwrites.**",
        config.lease
    ));
    let mut table = Table::new([
        "store",
        "lease",
        "rounds",
        "takeover after kill (ms)",
        "stale writes refused while the taker ran",
        "stale writes refused after it completed",
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
        let (mut refused_while_running, mut refused_after) = (0, 0);
        let mut finals = Vec::new();
        let mut executions = 0;
        let mut broken = Vec::new();
        for round in 0..config.rounds {
            match crash_round(kind, &namespace, &backend, config.lease, round).await {
                Ok(r) => {
                    takeovers.push(r.takeover_ms);
                    refused_while_running += r.refused_while_running;
                    refused_after += r.refused_after;
                    executions += r.executions.len();
                    if r.owner_token == r.taker_token {
                        broken.push(format!("round {round}: the taker got the owner's token"));
                    }
                    if r.refused_while_running != STALE_WRITES || r.refused_after != STALE_WRITES {
                        broken.push(format!(
                            "round {round}: stale writes refused: {} of {STALE_WRITES} while \
                             the taker ran, {} of {STALE_WRITES} after it completed",
                            r.refused_while_running, r.refused_after
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
            format!(
                "{refused_while_running} of {}",
                STALE_WRITES as u64 * config.rounds
            ),
            format!("{refused_after} of {}", STALE_WRITES as u64 * config.rounds),
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
    let mut owner_lines =
        BufReader::new(owner.stdout.take().context("the owner's stdout")?).lines();
    let owner_token = tokio::time::timeout(CHILD_TIMEOUT, next_field(&mut owner_lines, "TOKEN "))
        .await
        .map_err(|_| {
            anyhow::anyhow!("the owner did not acquire the key within {CHILD_TIMEOUT:?}")
        })??
        .context("the owner exited before printing its token")?
        .parse::<FencingToken>()?;

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

    // 4. Another process takes the key over once the lease lapses; its step then holds
    //    until this process releases it.
    let mut taker = command("crash-taker")
        .stdin(Stdio::piped())
        .spawn()
        .context("spawning the taker")?;
    let mut release = taker.stdin.take().context("the taker's stdin")?;
    let mut lines = BufReader::new(taker.stdout.take().context("the taker's stdout")?).lines();
    let acquired = tokio::time::timeout(CHILD_TIMEOUT, async {
        let token = next_field(&mut lines, "TOKEN ").await?;
        let at = next_field(&mut lines, "ACQUIRED-AT-MS ").await?;
        anyhow::Ok(token.zip(at))
    })
    .await
    .map_err(|_| anyhow::anyhow!("the taker did not take over within {CHILD_TIMEOUT:?}"))??;
    let Some((taker_token, acquired_at)) = acquired else {
        let status = taker.wait().await?;
        bail!(
            "the taker exited ({status}) without taking over: {}",
            stderr_of(&mut taker).await
        );
    };
    let taker_token: FencingToken = taker_token.parse()?;
    let takeover_ms = acquired_at.parse::<u64>()?.saturating_sub(killed_at_ms);

    // 5. While the taker's step runs: the killed owner's late writes, with its stale
    //    token. The taker's running record must come through them untouched.
    let mut problems = Vec::new();
    let running = RecordStatus::Running;
    expect_record(
        &*store,
        &key,
        running,
        taker_token,
        "once the taker held it",
        &mut problems,
    )
    .await?;
    let refused_while_running = stale_writes(
        &*store,
        &key,
        owner_token,
        lease,
        "while the taker ran",
        &mut problems,
    )
    .await;
    expect_record(
        &*store,
        &key,
        running,
        taker_token,
        "after the stale writes, while the taker ran",
        &mut problems,
    )
    .await?;

    // 6. Release the taker: it completes.
    release
        .write_all(format!("{RELEASE_TAKER}\n").as_bytes())
        .await
        .context("releasing the taker")?;
    drop(release);
    let result = tokio::time::timeout(CHILD_TIMEOUT, next_field(&mut lines, "RESULT "))
        .await
        .map_err(|_| anyhow::anyhow!("the taker did not finish within {CHILD_TIMEOUT:?}"))??;
    let status = tokio::time::timeout(CHILD_TIMEOUT, taker.wait())
        .await
        .map_err(|_| anyhow::anyhow!("the taker did not exit within {CHILD_TIMEOUT:?}"))??;
    let Some(result) = result else {
        problems.push(format!(
            "the taker did not complete ({status}): {}",
            stderr_of(&mut taker).await
        ));
        bail!("{}", problems.join("; "));
    };
    let taker_output = result
        .split_once("output=")
        .map(|(_, o)| o.to_owned())
        .context("the taker's result has no output")?;
    if !result.starts_with("status=Completed replayed=false") {
        problems.push(format!("the taker's run: {result}"));
    }

    // 7. The same late writes once the taker completed.
    let refused_after = stale_writes(
        &*store,
        &key,
        owner_token,
        lease,
        "after the taker completed",
        &mut problems,
    )
    .await;

    // 8. One completed record, the taker's, and a replay returns its result.
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
    let replay = crash_flow(store, replay_log, key.clone(), Role::Replayer)?
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
        refused_while_running,
        refused_after,
        final_record: "completed, the taker's token and result".to_owned(),
        executions,
    })
}

/// The rest of the first line starting with `prefix`, or `None` if the output ends first.
async fn next_field(
    lines: &mut Lines<BufReader<ChildStdout>>,
    prefix: &str,
) -> anyhow::Result<Option<String>> {
    while let Some(line) = lines.next_line().await? {
        if let Some(rest) = line.strip_prefix(prefix) {
            return Ok(Some(rest.to_owned()));
        }
    }
    Ok(None)
}

/// What an exited child wrote to stderr.
async fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let read = stderr.read_to_string(&mut text);
        if tokio::time::timeout(CHILD_TIMEOUT, read).await.is_err() {
            text.push_str(" (stderr still open)");
        }
    }
    text.trim().to_owned()
}

/// Checks the record under `key` is `status` under `token`; a mismatch is a problem.
async fn expect_record(
    store: &dyn IdempotencyStore,
    key: &str,
    status: RecordStatus,
    token: FencingToken,
    when: &str,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    match store.get(key).await? {
        Some(r) if r.status == status && r.token == token => {}
        Some(r) => problems.push(format!(
            "{when}: the record is {} under token {} (expected {status} under the taker's {token})",
            r.status, r.token
        )),
        None => problems.push(format!(
            "{when}: no record under the key (expected {status} under the taker's {token})"
        )),
    }
    Ok(())
}

/// The killed owner's four late writes — `complete`, `fail`, `renew`, `release` — with its
/// stale token. Returns how many were refused with `StaleToken`; anything else is a
/// problem.
async fn stale_writes(
    store: &dyn IdempotencyStore,
    key: &str,
    owner_token: FencingToken,
    lease: Duration,
    when: &str,
    problems: &mut Vec<String>,
) -> usize {
    let stale = [
        (
            "complete",
            store
                .complete(key, owner_token, b"stale overwrite", None)
                .await,
        ),
        (
            "fail",
            store.fail(key, owner_token, b"stale overwrite", None).await,
        ),
        ("renew", store.renew(key, owner_token, lease).await),
        ("release", store.release(key, owner_token).await),
    ];
    let mut refused = 0;
    for (op, outcome) in stale {
        match outcome {
            Err(StoreError::StaleToken) => refused += 1,
            Ok(()) => problems.push(format!("stale {op} {when} was ACCEPTED")),
            Err(e) => problems.push(format!(
                "stale {op} {when}: {} error instead of StaleToken: {e}",
                store_error_kind(&e)
            )),
        }
    }
    refused
}
