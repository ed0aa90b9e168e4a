//! `orderflow-bench`: measures orders/s and latency of a fresh orderflow next to a raw
//! RabbitMQ baseline; see `orderflow_lab::bench` and BENCHMARKS.md.

use std::process::ExitCode;

use clap::Parser;
use orderflow_lab::bench::{self, BenchArgs};

/// Measure orders/s and latency of a fresh orderflow next to a raw RabbitMQ baseline.
#[derive(Debug, Parser)]
#[command(name = "orderflow-bench", version)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

// Every core: the bench drives thousands of concurrent streams and runs the baseline's
// consumers in this process.
#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match bench::run(cli.bench).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
