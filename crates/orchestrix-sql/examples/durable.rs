//! A durable order flow survives a crash. Run it with `cargo run --example durable`.
//!
//! 1. A child process runs `charge → reserve → ship` for order 17 on a SQLite file; it is
//!    killed (SIGKILL) while shipping, after the card was charged.
//! 2. This process runs the same key again once the dead owner's lease lapsed: the journal
//!    says `charge` and `reserve` completed, so they are restored, not run; `ship` runs,
//!    and the order completes.
//! 3. The charges file, written by the `charge` step itself, shows one charge.
//!
//! Every step prints what it does, and the console logger prints the engine's view.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use orchestrix::{Context, Flow, RunOptions, Step, StepError};
use orchestrix_sql::SqliteStore;

/// Short, so the example does not wait long for the dead owner's lease to lapse.
const LEASE: Duration = Duration::from_secs(2);

fn log(what: &str) {
    println!("{what}");
    let _ = std::io::stdout().flush();
}

/// The order flow: each step's side effect is a line appended to a file of its own.
async fn order_flow(
    db: &Path,
    effects: PathBuf,
) -> Result<Flow<u64, String>, Box<dyn std::error::Error>> {
    let store = SqliteStore::open(db).await?;
    store.migrate().await?;
    let effect = move |step: &'static str| {
        let effects = effects.clone();
        move |ctx: Context<u64>| {
            let effects = effects.clone();
            async move {
                // The key to send to the payment provider: the same after a crash.
                let key = ctx.step_key().unwrap_or_default();
                log(&format!(
                    "  [{step}] order {} (downstream idempotency key {key})",
                    ctx.input()
                ));
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(effects.join(step))?;
                writeln!(file, "order {}", ctx.input())?;
                ctx.set(format!("{step}_id"), format!("{step}-{}", ctx.input()))?;
                if step == "ship" && std::env::args().any(|a| a == "child") {
                    // The child is killed here, mid-step, by its parent.
                    log("  [ship] shipping... (this process is about to be killed)");
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Ok::<_, StepError>(())
            }
        }
    };
    let flow = Flow::<u64, String>::builder("order")
        .durable()
        .store(Arc::new(store))
        .logger()
        .then(Step::new("charge", effect("charge")))
        .then(Step::new("reserve", effect("reserve")))
        .then(Step::new("ship", effect("ship")))
        .output(|ctx| {
            let id = |s: &str| {
                ctx.get::<String>(&format!("{s}_id"))
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            };
            Ok(format!("{} {} {}", id("charge"), id("reserve"), id("ship")))
        })
        .build()?;
    Ok(flow)
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        let db = PathBuf::from(args.get(2).ok_or("child: no database path")?);
        let effects = PathBuf::from(args.get(3).ok_or("child: no effects directory")?);
        let flow = order_flow(&db, effects).await?;
        flow.run(17, RunOptions::key("order-17").lease(LEASE))
            .await?;
        return Ok(());
    }

    let dir = tempfile::tempdir()?;
    let db = dir.path().join("orders.db");
    let effects = dir.path().to_path_buf();
    println!("1. a child process runs order 17 and is killed while shipping:");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["child", &db.to_string_lossy(), &effects.to_string_lossy()])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("child has no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("   child | {line}");
        if line.contains("about to be killed") {
            break;
        }
    }
    child.kill()?;
    child.wait()?;
    println!(
        "   child killed (SIGKILL): charged {} time(s), shipped {} time(s) so far",
        lines(&effects.join("charge")),
        lines(&effects.join("ship"))
    );

    println!("\n2. the same key again, once the dead owner's lease ({LEASE:?}) lapsed:");
    tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
    let flow = order_flow(&db, effects.clone()).await?;
    let result = flow
        .run(17, RunOptions::key("order-17").lease(LEASE))
        .await?;
    for step in &result.steps {
        let how = if step.restored {
            "restored from the journal"
        } else {
            "ran in this process"
        };
        println!("   {:<8} {:?}, {how}", step.name, step.status);
    }
    println!(
        "   output: {:?}",
        result.output.as_deref().unwrap_or_default()
    );

    println!("\n3. side effects, as the steps wrote them:");
    println!(
        "   charge: {} time(s), reserve: {}, ship: {} (the ship in flight ran again)",
        lines(&effects.join("charge")),
        lines(&effects.join("reserve")),
        lines(&effects.join("ship"))
    );
    if lines(&effects.join("charge")) != 1 {
        return Err("the card was charged more than once".into());
    }
    Ok(())
}
