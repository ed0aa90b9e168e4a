//! `orderflow`: place, inspect, list and watch orders on an orderflow server over gRPC.
//!
//! `main` only wires the pieces: parse the command line, run the command, and turn the
//! outcome into an exit status. See `cli` for the commands and `exit` for the statuses.

mod api;
mod cli;
mod commands;
mod dlq;
mod exit;
mod output;
mod time;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // One thread is plenty for a CLI that waits on one call or stream at a time.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let outcome = runtime
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(commands::run(cli)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => exit::report(&err),
    }
}
