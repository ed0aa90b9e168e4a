//! `orderflow`: place, inspect, list and watch orders on an orderflow server over gRPC.
//!
//! `main` only wires the pieces: parse the command line, run the command, and turn the
//! outcome into an exit status. See `cli` for the commands and `exit` for the statuses.

mod api;
mod cli;
mod commands;
mod exit;
mod output;
mod time;

use std::process::ExitCode;

use clap::Parser as _;

// One thread is plenty: the CLI waits on one call or stream at a time.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => exit::report(&err),
    }
}
