//! The command line: the store to open, and one verb.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Inspect, list, release and delete the idempotency records of Orchestrix flows.
///
/// Keys are the stored keys: a flow scopes its keys as `flow:key`, which `--flow` does
/// for you. Exit status: 0 done, 1 an error (bad URL, unreachable store, undecodable
/// record, refused or unconfirmed change), 2 bad usage, 3 no record under the key.
#[derive(Debug, Parser)]
#[command(name = "orchestrix", version, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Which store, and how long to wait for it.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The store: redis://…, rediss://…, postgres://…, postgresql://…, sqlite://PATH,
    /// dynamodb://TABLE?endpoint=URL&region=REGION.
    #[arg(
        long,
        short = 's',
        env = "ORCHESTRIX_STORE",
        global = true,
        hide_env_values = true
    )]
    pub store: Option<String>,
    /// Redis: the key prefix the store was built with (default "orchestrix:").
    #[arg(long, global = true)]
    pub prefix: Option<String>,
    /// PostgreSQL, SQLite: the records' table (default "orchestrix_idempotency");
    /// DynamoDB: the table, if the URL does not name it.
    #[arg(long, global = true)]
    pub table: Option<String>,
    /// How long to wait for the store to accept a connection.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// How long to wait for one answer of the store.
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything the store holds about one record: status, owner token, lease, TTL,
    /// fingerprint, result size, schema version, and a durable run's journal.
    Inspect(InspectArgs),
    /// The records under a prefix, a page at a time.
    List(ListArgs),
    /// Free a stuck running record without its owner's token. A plain record is deleted
    /// (the next run of the key starts over); a durable one keeps its journal and has its
    /// lease lapse (the next run of the key resumes it). Finished records are refused.
    Release(ChangeArgs),
    /// Delete a record, whatever its status: the operation may run again under its key.
    Delete(ChangeArgs),
    /// The abandoned durable runs (running, lease lapsed): what a recovery would resume.
    Abandoned(AbandonedArgs),
}

/// A record's key, as a flow would store it.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The key (with `--flow`, the key the flow was run with).
    #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub key: String,
    /// Scope the key as the flow of this name does (`flow:key`).
    #[arg(long)]
    pub flow: Option<String>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub key: KeyArgs,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only keys that start with this (after the flow's scope, with `--flow`).
    #[arg(value_name = "PREFIX", default_value = "")]
    pub starts_with: String,
    /// Only the records of this flow.
    #[arg(long)]
    pub flow: Option<String>,
    /// Only running records (abandoned durable runs included).
    #[arg(long, group = "status")]
    pub running: bool,
    /// Only completed records.
    #[arg(long, group = "status")]
    pub completed: bool,
    /// Only failed records.
    #[arg(long, group = "status")]
    pub failed: bool,
    /// Only running records whose lease lapsed (abandoned durable runs).
    #[arg(long, group = "status")]
    pub expired_lease: bool,
    /// At most this many records (Redis may show a few more: see the README).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Go on from a previous page's cursor.
    #[arg(long)]
    pub cursor: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ChangeArgs {
    #[command(flatten)]
    pub key: KeyArgs,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct AbandonedArgs {
    /// Only the runs of this flow.
    #[arg(long)]
    pub flow: Option<String>,
    /// At most this many keys.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Only keys after this one (the last key of a previous page).
    #[arg(long)]
    pub after: Option<String>,
    /// JSON instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// A duration such as `500ms`, `5s`, `2m` (a bare number is seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (500ms, 5s, 2m)"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        _ => return Err(format!("{text:?}: the unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
