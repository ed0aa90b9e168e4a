//! `orderflow-chaos`: runs the three services as separate processes under a stream of orders,
//! injects broker restarts, dropped connections and killed or stopped services at random for a
//! bounded time, then audits the result: orders placed, completed, failed (must be 0), lost
//! (must be 0), duplicated effects (must be 0). Exits 0 only if every invariant held.
//! Loopback only.

use std::{collections::HashMap, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use orderflow_lab::{
    broker::Ctl,
    chaos::{self, faults::Fault},
    deployment::{self, Layout},
    driver::Plan,
};

/// Chaos test of a local orderflow deployment.
#[derive(Debug, Parser)]
#[command(name = "orderflow-chaos", version)]
struct Args {
    /// How long to keep placing orders and injecting faults.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Orders per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Orders in flight at most.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// Stop after this many orders even if time remains.
    #[arg(long, default_value_t = 100_000)]
    max_orders: usize,
    /// Faults to choose from, comma-separated: close-connections, restart-broker, kill-service,
    /// stop-service.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "close-connections,restart-broker,kill-service,stop-service"
    )]
    faults: Vec<Fault>,
    /// Inject no faults: a plain load run (throughput, memory) with the same audit.
    #[arg(long)]
    no_faults: bool,
    /// Shortest pause between two faults.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    min_interval: Duration,
    /// Longest pause between two faults.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    max_interval: Duration,
    /// The server binary (default: `orderflow-server` next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// RabbitMQ on this machine (faults use its control command, `--rabbitmqctl`).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The broker's control command line, split on whitespace (e.g. `rabbitmqctl`, or
    /// `scripts/rabbitmq4.sh ctl` for another node).
    #[arg(long, env = "RABBITMQCTL", default_value = "rabbitmqctl")]
    rabbitmqctl: String,
    /// Keep the services' state in PostgreSQL (schemas `<namespace>_<service>`) instead of
    /// SQLite files; needed for `--instances` above 1.
    #[arg(long, env = "ORDERFLOW_DATABASE_URL")]
    database_url: Option<String>,
    /// Processes per service.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Keep the data directory (databases and process logs) afterwards.
    #[arg(long)]
    keep: bool,
}

/// Stock for the run: plenty of most things, a few scarce SKUs so some orders are rejected, and
/// an expensive one so some payments are declined.
const CATALOG: &[(&str, i64, i64)] = &[
    ("CH-AAA", 500, 1_000_000),
    ("CH-BBB", 1_250, 1_000_000),
    ("CH-CCC", 2_000, 1_000_000),
    ("CH-DDD", 700, 1_000_000),
    ("CH-SCARCE", 300, 40),
    ("CH-PRICEY", 80_000, 1_000_000),
];

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off,sqlx=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let server_bin = match args.server_bin {
        Some(path) => path,
        None => deployment::default_server_bin()?,
    };
    anyhow::ensure!(
        server_bin.is_file(),
        "{} not found: build it or pass --server-bin",
        server_bin.display()
    );
    let dir = tempfile_dir()?;
    let catalog: Vec<serde_json::Value> = CATALOG
        .iter()
        .map(|(sku, price, stock)| serde_json::json!({"sku": sku, "name": sku, "price_cents": price, "stock": stock}))
        .collect();
    let catalog_path = dir.join("catalog.json");
    std::fs::write(&catalog_path, serde_json::to_string_pretty(&catalog)?)?;
    let namespace = format!("chaos-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    eprintln!("namespace {namespace}, data in {}", dir.display());

    let settings = chaos::Settings {
        deployment: deployment::Settings {
            server_bin,
            namespace,
            data_dir: dir.clone(),
            amqp_url: args.amqp_url.clone(),
            database_url: args.database_url,
            sqlite_services: vec![],
            layout: Layout::Separate,
            instances: args.instances,
            args: vec![
                "--catalog".into(),
                catalog_path.display().to_string(),
                "--payment-limit-cents".into(),
                "100000".into(),
            ],
            env: vec![],
        },
        duration: args.duration,
        faults: if args.no_faults {
            Vec::new()
        } else {
            args.faults
        },
        fault_interval: (args.min_interval, args.max_interval),
        plan: Plan {
            skus: CATALOG.iter().map(|(s, _, _)| (*s).to_owned()).collect(),
            rate: args.rate,
            in_flight: args.in_flight,
            max_orders: args.max_orders,
            give_up_after: Duration::from_secs(120),
        },
        initial_stock: CATALOG
            .iter()
            .map(|(s, _, n)| ((*s).to_owned(), *n))
            .collect::<HashMap<_, _>>(),
        settle_timeout: Duration::from_secs(180),
        rabbitmqctl: Ctl::parse(&args.rabbitmqctl),
    };
    let report = chaos::run(settings).await?;
    println!("{report}");
    if !args.keep && report.passed() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report.passed())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("orderflow-chaos-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
