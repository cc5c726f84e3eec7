//! `orchestrix`: the operator's tool for the idempotency records of Orchestrix flows, on
//! any remote store by URL. See the crate's README, or `orchestrix --help`.
#![forbid(unsafe_code)]

mod cli;
mod open;
mod render;
mod store_url;
mod verbs;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("orchestrix: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(verbs::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("orchestrix: {}", render::error_line(&err));
            ExitCode::FAILURE
        }
    };
    // Background tasks of the clients (reconnection, pool upkeep) are not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}
