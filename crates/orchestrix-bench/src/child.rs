//! The hidden `child` subcommand: this binary re-executed as one process of a scenario.

use anyhow::bail;

use crate::args::Args;

pub async fn main(args: &Args) -> anyhow::Result<()> {
    match args.positional.first().map(String::as_str) {
        Some("storm") => crate::storm::child(args).await,
        Some("storm-dead-owner") => crate::takeover::dead_owner_child(args).await,
        Some("crash-owner") => crate::crash::child(args, crate::crash::Role::Owner).await,
        Some("crash-taker") => crate::crash::child(args, crate::crash::Role::Taker).await,
        Some(
            role @ ("durable-crash-owner"
            | "durable-crash-retry"
            | "durable-crash-recover"
            | "durable-crash-freeze-owner"
            | "durable-crash-freeze"),
        ) => crate::durable_crash::child(args, role.trim_start_matches("durable-crash-")).await,
        Some(
            stage @ ("durable-chaos-owner"
            | "durable-chaos-resume"
            | "durable-chaos-retry"
            | "durable-chaos-recover"),
        ) => crate::durable_chaos::child(args, stage.trim_start_matches("durable-chaos-")).await,
        other => bail!("unknown child role {other:?}"),
    }
}
