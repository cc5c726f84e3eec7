//! The verbs: each takes the opened store and its own arguments, does one thing, and
//! answers the exit status.

mod abandoned;
mod delete;
mod inspect;
mod list;
mod release;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use orchestrix::idempotency::scoped_key;
use orchestrix::store::{IdempotencyStore, RecordAdmin};

use crate::cli::{Cli, Command, KeyArgs};
use crate::open::{Timeouts, open};

/// The exit status when no record is under the key.
const NO_RECORD: u8 = 3;

/// Opens the store and runs the verb.
///
/// # Errors
/// Whatever stops the verb: a bad URL, an unreachable store, an undecodable record, a
/// refused or unconfirmed change. Printed on one line by `main`.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let url = cli
        .store
        .store
        .as_deref()
        .context("no store: give --store URL, or set ORCHESTRIX_STORE")?;
    let timeouts = Timeouts {
        connect: cli.store.connect_timeout,
        answer: cli.store.timeout,
    };
    let store = open(
        url,
        cli.store.prefix.as_deref(),
        cli.store.table.as_deref(),
        timeouts,
    )
    .await?;
    let store = Store {
        store,
        answer: timeouts.answer,
    };
    match cli.command {
        Command::Inspect(args) => inspect::run(&store, args).await,
        Command::List(args) => list::run(&store, args).await,
        Command::Release(args) => release::run(&store, args).await,
        Command::Delete(args) => delete::run(&store, args).await,
        Command::Abandoned(args) => abandoned::run(&store, args).await,
    }
}

/// The opened store, and how long one of its answers may take.
struct Store {
    store: Arc<dyn IdempotencyStore>,
    answer: Duration,
}

impl Store {
    /// The store's record admin.
    fn admin(&self) -> anyhow::Result<&dyn RecordAdmin> {
        self.store
            .admin()
            .context("this store offers no record admin")
    }

    /// `work` (one call of the store), bounded by the answer timeout: a store that hangs
    /// is an error, never a hung command.
    async fn bounded<T, E>(&self, work: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        // Each client bounds its own calls; this one holds whatever they miss (a pool
        // waiting for a connection, retries).
        let bound = self.answer * 2 + Duration::from_secs(1);
        match tokio::time::timeout(bound, work).await {
            Ok(done) => Ok(done?),
            Err(_) => Err(anyhow!("the store did not answer within {bound:?}")),
        }
    }
}

impl KeyArgs {
    /// The key as stored: scoped as the flow scopes it, with `--flow`.
    fn stored(&self) -> String {
        match &self.flow {
            Some(flow) => scoped_key(flow, &self.key),
            None => self.key.clone(),
        }
    }
}

/// The message and exit status of a key that holds no record.
fn no_record(key: &str) -> ExitCode {
    eprintln!("no record under {key:?}");
    ExitCode::from(NO_RECORD)
}

/// Asks `question` on the terminal unless `yes`; anything but `y` or `yes` is a no.
///
/// # Errors
/// When the answer is not yes (nothing was changed), or standard input cannot be read.
async fn confirm(question: String, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        eprint!("{question} [y/N] ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        Ok::<_, std::io::Error>(line)
    })
    .await
    .context("reading the confirmation")?
    .context("reading the confirmation")?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(anyhow!(
            "not confirmed: nothing changed (--yes skips the question)"
        )),
    }
}
