//! `orderflow-bench`: in one run, measures orderflow (real server processes, driven over
//! gRPC) and the raw-broker ceiling (the same three hops with lapin alone) under the same
//! load, and reports them side by side with the servers' CPU and memory.
//!
//! This module owns the command line and the order of events. The servers come from
//! [`crate::deployment`], the load from [`crate::driver`], the readings from
//! [`crate::procstat`]; the bench's own pieces are its `catalog`, the lapin `baseline` and its
//! `amqp` plumbing, the `stats`, the `report` and its `plot`s.

mod amqp;
mod baseline;
mod batches;
mod catalog;
mod plot;
mod postgres;
mod report;
mod stats;
mod timeline;

use std::{
    fmt,
    io::IsTerminal as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use orderflow_server::{bus::Topology, db::DbSync};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::{
    baseline::Baseline,
    report::{Report, Run, Samples, System, Usage},
    stats::Latencies,
};
use crate::{
    deployment::{self, Deployment, Layout},
    driver::{
        Driver, Follow,
        pattern::{Pattern, Phase, PhaseResult},
    },
    procstat,
};

/// How long to let the broker settle between runs (queue deletions, WAL flushes), so one
/// run's clean-up does not land in the next run's numbers.
const SETTLE: Duration = Duration::from_secs(3);
/// How long the baseline may take to connect, declare its queues and start consuming. lapin
/// has no timeouts of its own, and once (one run in about twenty) a start never finished.
const BASELINE_START: Duration = Duration::from_secs(30);
/// How often a long run reports progress on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Attempts before the servers dead-letter a message: the server's default, passed
/// explicitly so the end-of-run queue depths cover exactly the retry queues declared.
const RETRY_MAX_ATTEMPTS: u32 = 5;

/// The process name of PostgreSQL's server and backends, whose CPU is the database's cost.
const POSTGRES_COMM: &str = "postgres";

#[derive(Debug, Args)]
#[command(
    after_help = "Starts its own orderflow-server process(es) on free 127.0.0.1 ports with a fresh \
data directory and a throwaway broker namespace for every run, and deletes the namespace's \
queues and exchanges afterwards. --timeout bounds each PlaceOrder call. With --json the \
summary (without raw samples) is printed as JSON.

Example:
  cargo build --release -p orderflow-server -p orderflow-lab
  ./target/release/orderflow-bench --mode all --out bench-results"
)]
pub struct BenchArgs {
    /// Which load to apply; `all` runs the three in sequence, each with fresh servers.
    #[arg(long, value_enum, default_value_t = ModeArg::All)]
    pub mode: ModeArg,

    /// Which systems to measure.
    #[arg(long, value_enum, default_value_t = Systems::Both)]
    pub systems: Systems,

    /// Orders per saturation and per rate run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub orders: u64,

    /// Orders of the serial run (one at a time).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub serial_orders: u64,

    /// Orders in flight at once in saturation mode.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=5_000))]
    pub in_flight: u64,

    /// Arrival rate of the rate mode, orders per second.
    #[arg(long, default_value_t = 1000.0, value_parser = parse_rate)]
    pub rate: f64,

    /// Rate mode: most orders outstanding at once; a send beyond it waits (and that wait
    /// counts in its latency). Keeps the run under the server's watch-stream limit.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=9_000))]
    pub max_outstanding: u64,

    /// Orders sent before each measured run and left out of its numbers (connections,
    /// caches, the first queue pages).
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,

    /// Safety bound of each run: stop sending at this time, abandon what is in flight, and
    /// mark the run incomplete.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub duration_limit: Duration,

    /// One process for all services, or one per service.
    #[arg(long, value_enum, default_value_t = Layout::AllInOne)]
    pub deployment: Layout,

    /// SQLite durability of the servers.
    #[arg(long, value_enum, default_value_t = DbSync::Full)]
    pub db_sync: DbSync,

    /// Keep orderflow's state in PostgreSQL instead of SQLite: the URL of any database on a
    /// server on this machine (e.g. `postgres://postgres@127.0.0.1:5432/postgres`). Each run
    /// gets a database of its own there, dropped afterwards.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,

    /// AMQP prefetch of every consumer, orderflow's and the baseline's.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// The orderflow-server binary; by default the one next to this executable.
    #[arg(long)]
    pub server_bin: Option<PathBuf>,

    /// RabbitMQ on this machine (other hosts are refused).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// Write results.json, report.txt, report.md, latency.svg and memory.svg here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Keep the servers' data directories (databases and logs) and print where they are.
    #[arg(long)]
    pub keep: bool,

    /// Print the summary as JSON (without raw samples) instead of text.
    #[arg(
        long,
        env = "ORDERFLOW_JSON",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub json: bool,

    /// Deadline of each PlaceOrder call (e.g. `500ms`, `10s`).
    #[arg(long, env = "ORDERFLOW_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// As many orders as the system takes with `--in-flight` outstanding.
    Saturation,
    /// A fixed arrival rate (`--rate`), regardless of how the system keeps up.
    Rate,
    /// One order at a time: the unloaded latency.
    Serial,
    /// The three, in sequence.
    All,
}

/// `--systems`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Systems {
    /// orderflow, then the baseline, under each load.
    Both,
    /// orderflow only.
    Orderflow,
    /// The raw-RabbitMQ baseline only.
    Baseline,
}

/// One load shape, as run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    Saturation,
    Rate,
    Serial,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Saturation => "saturation",
            Self::Rate => "rate",
            Self::Serial => "serial",
        })
    }
}

impl ModeArg {
    fn modes(self) -> Vec<Mode> {
        match self {
            Self::Saturation => vec![Mode::Saturation],
            Self::Rate => vec![Mode::Rate],
            Self::Serial => vec![Mode::Serial],
            Self::All => vec![Mode::Saturation, Mode::Rate, Mode::Serial],
        }
    }
}

/// A human duration such as `10s`; zero is refused because every call would then fail.
fn parse_timeout(raw: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(raw)
        .map_err(|e| format!("{raw:?} is not a duration like 500ms, 10s or 1m: {e}"))?;
    if timeout.is_zero() {
        return Err("the timeout must be greater than zero".to_owned());
    }
    Ok(timeout)
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    let rate: f64 = raw
        .parse()
        .map_err(|_| format!("{raw:?} is not a number of orders per second"))?;
    if !(rate > 0.0 && rate <= 100_000.0) {
        return Err("the rate must be above 0 and at most 100000 orders/s".to_owned());
    }
    Ok(rate)
}

/// Everything the runs share.
#[derive(Debug)]
struct Bench {
    args: BenchArgs,
    server_bin: PathBuf,
    work_dir: PathBuf,
    catalog: PathBuf,
    /// Distinguishes this bench's namespaces from any other's on the broker.
    id: String,
    place_timeout: Duration,
    broker_pid: Option<u32>,
    progress: bool,
}

/// Runs the bench and prints (and with `--out`, writes) the report.
pub async fn run(args: BenchArgs) -> Result<()> {
    amqp::check_loopback(&args.amqp_url)?;
    let (json, place_timeout) = (args.json, args.timeout);
    let server_bin = match &args.server_bin {
        Some(path) => path.clone(),
        None => deployment::default_server_bin()?,
    };
    if args.systems != Systems::Baseline && !server_bin.is_file() {
        bail!(
            "no server binary at {} (build it with `cargo build --release -p orderflow-server`, \
             or pass --server-bin)",
            server_bin.display()
        );
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let work_dir = std::env::temp_dir().join(format!("orderflow-bench-{id}"));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let catalog = work_dir.join("catalog.json");
    std::fs::write(&catalog, catalog::catalog_json()).context("writing the bench catalog")?;

    let bench = Bench {
        server_bin,
        catalog,
        id,
        place_timeout,
        broker_pid: procstat::find_broker(),
        progress: std::io::stderr().is_terminal(),
        work_dir,
        args,
    };
    let result = bench.run_all().await;
    if bench.args.keep {
        eprintln!("data directories kept in {}", bench.work_dir.display());
    } else if let Err(error) = std::fs::remove_dir_all(&bench.work_dir) {
        eprintln!(
            "warning: could not remove {}: {error}",
            bench.work_dir.display()
        );
    }
    let report = result?;

    if json {
        println!("{}", report.summary_json()?);
    } else {
        print!("{}", report.text());
    }
    if let Some(out) = &bench.args.out {
        report.write(out)?;
        eprintln!("results written to {}", out.display());
    }
    if report.runs.iter().any(|r| !r.complete) {
        bail!("at least one run did not complete; see the report");
    }
    Ok(())
}

impl Bench {
    async fn run_all(&self) -> Result<Report> {
        let started_unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut runs = Vec::new();
        for mode in self.args.mode.modes() {
            if self.args.systems != Systems::Baseline {
                runs.push(self.run_orderflow(mode).await?);
                tokio::time::sleep(SETTLE).await;
            }
            if self.args.systems != Systems::Orderflow {
                runs.push(self.run_baseline(mode).await?);
                tokio::time::sleep(SETTLE).await;
            }
        }
        let args = &self.args;
        Ok(Report {
            started_unix_s,
            machine: report::Machine::detect(),
            config: report::Config {
                deployment: args.deployment,
                db_sync: args.db_sync,
                store: if args.postgres.is_some() {
                    "postgresql"
                } else {
                    "sqlite"
                },
                prefetch: args.prefetch,
                orders: args.orders,
                serial_orders: args.serial_orders,
                in_flight: args.in_flight as usize,
                rate_per_s: args.rate,
                max_outstanding: args.max_outstanding as usize,
                warmup_orders: args.warmup,
                duration_limit_s: args.duration_limit.as_secs_f64(),
                server_bin: self.server_bin.display().to_string(),
            },
            runs,
        })
    }

    fn phase(&self, mode: Mode) -> Phase {
        let args = &self.args;
        let (orders, pattern) = match mode {
            Mode::Saturation => (
                args.orders,
                Pattern::Closed {
                    in_flight: args.in_flight as usize,
                },
            ),
            Mode::Rate => (
                args.orders,
                Pattern::Open {
                    per_sec: args.rate,
                    max_outstanding: args.max_outstanding as usize,
                },
            ),
            Mode::Serial => (args.serial_orders, Pattern::Closed { in_flight: 1 }),
        };
        Phase {
            orders,
            pattern,
            limit: args.duration_limit,
        }
    }

    fn warmup(&self, mode: Mode) -> Phase {
        Phase {
            orders: self.args.warmup,
            ..self.phase(mode)
        }
    }

    fn namespace(&self, mode: Mode, system: System) -> String {
        let system = match system {
            System::Orderflow => "of",
            System::Baseline => "base",
        };
        format!("bench-{}-{mode}-{system}", self.id)
    }

    /// Fresh servers, warm-up, the measured phase with sampling, then shutdown and clean-up
    /// whatever happened.
    async fn run_orderflow(&self, mode: Mode) -> Result<Run> {
        let namespace = self.namespace(mode, System::Orderflow);
        eprintln!("{mode} / orderflow: starting the server ({namespace})");
        let database = match &self.args.postgres {
            Some(server) => Some(postgres::RunDatabase::create(server, &namespace).await?),
            None => None,
        };
        let settings = deployment::Settings {
            server_bin: self.server_bin.clone(),
            namespace: namespace.clone(),
            data_dir: self.work_dir.join(format!("{mode}-orderflow")),
            database_url: database.as_ref().map(|d| d.url.clone()),
            sqlite_services: Vec::new(),
            amqp_url: self.args.amqp_url.clone(),
            layout: self.args.deployment,
            instances: 1,
            args: [
                "--catalog",
                &self.catalog.display().to_string(),
                // Above any order's total, so Payment never declines.
                "--payment-limit-cents",
                &(i64::MAX / 2).to_string(),
                "--prefetch",
                &self.args.prefetch.to_string(),
                "--db-sync",
                &report::db_sync_arg(self.args.db_sync),
                "--retry-max-attempts",
                &RETRY_MAX_ATTEMPTS.to_string(),
            ]
            .map(str::to_owned)
            .to_vec(),
            // Per-message INFO lines would cost the server more than some of the work measured.
            env: vec![("RUST_LOG".to_owned(), "warn,lapin=off".to_owned())],
        };
        let topology = Topology::for_teardown(namespace.as_str());
        let mut servers = match Deployment::start(settings).await {
            Ok(servers) => servers,
            Err(error) => {
                // A server may have declared the topology before failing.
                let _ = topology.delete_all_at(&self.args.amqp_url).await;
                if let Some(database) = database {
                    let _ = database.drop().await;
                }
                return Err(error);
            }
        };
        let pids: Vec<(String, u32)> = servers
            .instances()
            .into_iter()
            .filter_map(|i| Some((servers.process_name(i), servers.pid(i)?)))
            .collect();
        let measured = interruptible(self.measure_orderflow(mode, &servers, &pids)).await;
        let crash = servers.crashed();
        let logs: Vec<(String, PathBuf)> = servers
            .instances()
            .into_iter()
            .map(|i| (servers.process_name(i), servers.log_path(i)))
            .collect();
        let exits = servers.stop_all().await;
        let leftover = topology.delete_all_at(&self.args.amqp_url).await;
        let dropped = match database {
            Some(database) => database.drop().await,
            None => Ok(()),
        };
        let (result, usage) = measured.with_context(|| {
            let tails: Vec<String> = logs
                .iter()
                .map(|(name, log)| format!("{name} log ends with:\n{}", deployment::log_tail(log)))
                .collect();
            format!("the orderflow run failed\n{}\n", tails.join("\n"))
        })?;
        let warnings = deployment::warning_lines(&logs);
        let mut run = self.record(mode, System::Orderflow, result, usage);
        run.server_exits = exits;
        run.server_warning_count = warnings.len();
        run.server_warnings = warnings.into_iter().take(50).collect();
        match leftover {
            Ok(messages) => run.leftover_messages = messages,
            Err(error) => run.notes.push(format!("clean-up failed: {error:#}")),
        }
        if let Err(error) = dropped {
            run.notes
                .push(format!("dropping the run's database failed: {error:#}"));
        }
        if let Some(crash) = crash {
            run.notes.push(crash);
            run.complete = false;
        }
        Ok(run)
    }

    async fn measure_orderflow(
        &self,
        mode: Mode,
        servers: &Deployment,
        pids: &[(String, u32)],
    ) -> Result<(PhaseResult, Measured)> {
        let concurrency = match self.phase(mode).pattern {
            Pattern::Closed { in_flight } => in_flight,
            Pattern::Open {
                max_outstanding, ..
            } => max_outstanding,
        };
        let driver =
            Driver::connect(&servers.order_addrs(), concurrency, self.place_timeout).await?;
        let (never, follow) = (CancellationToken::new(), Follow::ToTerminal);
        if self.args.warmup > 0 {
            let warm = driver
                .run(
                    self.warmup(mode),
                    0,
                    Arc::default(),
                    &never,
                    follow,
                    catalog::order,
                )
                .await;
            check_warmup(&warm)?;
        }
        let phase = self.phase(mode);
        let batches_before = batches::read(servers).await;
        let done = Arc::new(AtomicU64::new(0));
        let watch = self.watch(mode, System::Orderflow, pids, phase.orders, done.clone());
        let result = driver
            .run(
                phase,
                self.args.warmup,
                done,
                &never,
                follow,
                catalog::order,
            )
            .await;
        let mut measured = watch.finish().await;
        match (batches_before, batches::read(servers).await) {
            (Ok(before), Ok(after)) => measured.batches = batches::between(&before, &after),
            (Err(error), _) | (_, Err(error)) => {
                eprintln!(
                    "{mode} / orderflow: reading the consumers' batch sizes failed: {error:#}"
                );
            }
        }
        let topology = Topology::new(
            self.namespace(mode, System::Orderflow),
            RETRY_MAX_ATTEMPTS - 1,
            1,
        );
        let queues: Vec<String> = topology.spec().queues.into_iter().map(|q| q.name).collect();
        measured.backlog = amqp::depths(&self.args.amqp_url, &queues)
            .await
            .unwrap_or_default();
        Ok((result, measured))
    }

    /// The baseline in this process: declare, warm up, measure, delete.
    async fn run_baseline(&self, mode: Mode) -> Result<Run> {
        let namespace = self.namespace(mode, System::Baseline);
        eprintln!("{mode} / baseline: raw RabbitMQ ({namespace})");
        let start = Baseline::start(&self.args.amqp_url, &namespace, self.args.prefetch);
        let started = tokio::time::timeout(BASELINE_START, start)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the baseline did not start within {BASELINE_START:?}: the broker did not \
                     answer its connection, declarations or consumers"
                ))
            });
        let baseline = match started {
            Ok(baseline) => baseline,
            Err(error) => {
                let (queues, exchanges) = baseline::names(&namespace);
                let _ = amqp::delete(&self.args.amqp_url, &queues, &exchanges).await;
                return Err(error);
            }
        };
        let measured = interruptible(async {
            if self.args.warmup > 0 {
                let warm = baseline.run(self.warmup(mode), 0, Arc::default()).await;
                check_warmup(&warm)?;
            }
            let phase = self.phase(mode);
            let done = Arc::new(AtomicU64::new(0));
            let watch = self.watch(mode, System::Baseline, &[], phase.orders, done.clone());
            let result = baseline.run(phase, self.args.warmup, done).await;
            let mut measured = watch.finish().await;
            let (queues, _) = baseline::names(&namespace);
            measured.backlog = amqp::depths(&self.args.amqp_url, &queues)
                .await
                .unwrap_or_default();
            Ok((result, measured))
        })
        .await;
        let (stage_errors, strays) = baseline.stage_errors();
        let leftover = baseline.stop().await;
        let (result, usage) = measured?;
        let mut run = self.record(mode, System::Baseline, result, usage);
        for (kind, count) in stage_errors {
            run.notes.push(format!("{count} stage errors: {kind}"));
        }
        if strays > 0 {
            run.notes.push(format!(
                "{strays} completions of orders nobody waited for (abandoned at the limit)"
            ));
        }
        match leftover {
            Ok(messages) => run.leftover_messages = messages,
            Err(error) => run.notes.push(format!("clean-up failed: {error:#}")),
        }
        Ok(run)
    }

    /// Starts CPU/RSS bookkeeping and progress reports for a measured phase.
    fn watch(
        &self,
        mode: Mode,
        system: System,
        pids: &[(String, u32)],
        orders: u64,
        done: Arc<AtomicU64>,
    ) -> Watch {
        let read = |pid: u32| procstat::read(pid).ok();
        let progress = self.progress.then(|| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PROGRESS_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    eprintln!(
                        "  {mode} / {}: {} of {orders} orders done",
                        match system {
                            System::Orderflow => "orderflow",
                            System::Baseline => "baseline",
                        },
                        done.load(Ordering::Relaxed)
                    );
                }
            })
        });
        Watch {
            pids: pids.to_vec(),
            before: pids.iter().map(|(_, pid)| read(*pid)).collect(),
            broker_pid: self.broker_pid,
            broker_before: self.broker_pid.and_then(read),
            database_before: (system == System::Orderflow && self.args.postgres.is_some())
                .then(|| procstat::cpu_by_name(POSTGRES_COMM)),
            bench_before: procstat::read_self().ok(),
            machine_before: procstat::read_machine().ok(),
            load_before: procstat::load_average(),
            started: tokio::time::Instant::now(),
            sampler: procstat::Sampler::start(pids.to_vec(), done),
            progress,
        }
    }

    /// Turns a phase's outcomes and the resource readings into a report record.
    fn record(&self, mode: Mode, system: System, result: PhaseResult, usage: Measured) -> Run {
        let phase = self.phase(mode);
        let load = match phase.pattern {
            Pattern::Closed { in_flight: 1 } => "1 in flight".to_owned(),
            Pattern::Closed { in_flight } => format!("{in_flight} in flight"),
            Pattern::Open { per_sec, .. } => format!("{per_sec:.0} orders/s offered"),
        };
        let mut errors = std::collections::BTreeMap::new();
        let mut e2e = Vec::new();
        let mut last_completion = Duration::ZERO;
        for outcome in &result.outcomes {
            match &outcome.result {
                Ok(latency) => {
                    e2e.push(*latency);
                    last_completion = last_completion.max(outcome.finished);
                }
                Err(kind) => *errors.entry(kind.clone()).or_insert(0_u64) += 1,
            }
        }
        let unfinished = result.unfinished();
        if unfinished > 0 {
            errors.insert("unfinished at the duration limit".to_owned(), unfinished);
        }
        let completed = e2e.len() as u64;
        let failed = result.outcomes.len() as u64 - completed;
        let e2e = Latencies::from_durations(e2e);
        let accept =
            Latencies::from_durations(result.outcomes.iter().filter_map(|o| o.accept_latency));
        let wall_s = last_completion.as_secs_f64();
        let mut notes = Vec::new();
        if let Pattern::Open { per_sec, .. } = phase.pattern {
            let offered_s = phase.orders as f64 / per_sec;
            if wall_s > offered_s * 1.1 {
                notes.push(format!(
                    "did not keep up with the offered rate: {offered_s:.0}s of arrivals took \
                     {wall_s:.0}s"
                ));
            }
        }
        Run {
            mode,
            system,
            load,
            requested: phase.orders,
            sent: result.sent,
            completed,
            failed,
            unfinished,
            complete: !result.hit_limit && result.sent == phase.orders && unfinished == 0,
            errors,
            wall_s,
            orders_per_s: if wall_s > 0.0 {
                completed as f64 / wall_s
            } else {
                0.0
            },
            e2e_ms: e2e.summary(),
            accept_ms: accept.summary(),
            max_send_lag_ms: result.max_send_lag.as_secs_f64() * 1000.0,
            processes: usage.processes,
            broker: usage.broker,
            database: usage.database,
            bench: usage.bench,
            machine: usage.machine,
            rss_timeline: usage.timeline,
            server_exits: Vec::new(),
            server_warnings: Vec::new(),
            server_warning_count: 0,
            backlog_at_end: usage.backlog,
            batches: usage.batches,
            leftover_messages: std::collections::BTreeMap::new(),
            notes,
            e2e_by_second: timeline::by_second(
                result
                    .outcomes
                    .iter()
                    .filter_map(|o| o.result.as_ref().ok().map(|e2e| (o.finished, *e2e))),
            ),
            samples: Samples {
                e2e_us: e2e.micros().to_vec(),
                accept_us: accept.micros().to_vec(),
            },
            e2e,
        }
    }
}

/// Readings taken at the start of a measured phase, and the sampler running through it.
#[derive(Debug)]
struct Watch {
    pids: Vec<(String, u32)>,
    before: Vec<Option<procstat::Reading>>,
    broker_pid: Option<u32>,
    broker_before: Option<procstat::Reading>,
    /// CPU of the PostgreSQL processes, when orderflow's state is there.
    database_before: Option<std::collections::BTreeMap<i32, f64>>,
    bench_before: Option<procstat::Reading>,
    machine_before: Option<procstat::MachineReading>,
    load_before: Option<f64>,
    started: tokio::time::Instant,
    sampler: procstat::Sampler,
    progress: Option<tokio::task::JoinHandle<()>>,
}

/// What a measured phase cost, per process.
#[derive(Debug)]
struct Measured {
    processes: Vec<Usage>,
    broker: Option<Usage>,
    database: Option<Usage>,
    bench: Usage,
    machine: report::MachineUsage,
    timeline: Vec<procstat::RssPoint>,
    /// Ready messages per queue at the end of the phase.
    backlog: std::collections::BTreeMap<String, u64>,
    /// orderflow's consumer batches during the phase, by queue.
    batches: std::collections::BTreeMap<String, batches::Batches>,
}

impl Watch {
    /// Takes the closing readings (while the servers still run) and stops the sampler.
    async fn finish(self) -> Measured {
        let processes: Vec<Usage> = self
            .pids
            .iter()
            .zip(&self.before)
            .map(|((name, pid), before)| Usage::between(name, *before, procstat::read(*pid).ok()))
            .collect();
        let broker = self
            .broker_pid
            .map(|pid| Usage::between("beam.smp", self.broker_before, procstat::read(pid).ok()));
        let database = self.database_before.map(|before| Usage {
            name: POSTGRES_COMM.to_owned(),
            cpu_s: procstat::cpu_since(&before, &procstat::cpu_by_name(POSTGRES_COMM)),
            rss_kib: None,
            peak_rss_kib: None,
        });
        let bench = Usage::between("bench", self.bench_before, procstat::read_self().ok());
        let machine_after = procstat::read_machine().ok();
        let wall_s = self.started.elapsed().as_secs_f64();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let machine = match (self.machine_before, machine_after) {
            (Some(before), Some(after)) => {
                let busy_s = after.busy_s - before.busy_s;
                let measured: f64 = processes
                    .iter()
                    .chain(&broker)
                    .chain(&database)
                    .chain(std::iter::once(&bench))
                    .map(|u: &Usage| u.cpu_s)
                    .filter(|cpu| cpu.is_finite())
                    .sum();
                report::MachineUsage {
                    capacity_cpu_s: wall_s * cpus as f64,
                    busy_cpu_s: Some(busy_s),
                    other_cpu_s: Some((busy_s - measured).max(0.0)),
                    iowait_s: Some(after.iowait_s - before.iowait_s),
                    load_before: self.load_before,
                }
            }
            _ => report::MachineUsage {
                capacity_cpu_s: wall_s * cpus as f64,
                busy_cpu_s: None,
                other_cpu_s: None,
                iowait_s: None,
                load_before: self.load_before,
            },
        };
        if let Some(progress) = self.progress {
            progress.abort();
        }
        Measured {
            processes,
            broker,
            database,
            bench,
            machine,
            timeline: self.sampler.finish().await,
            backlog: std::collections::BTreeMap::new(),
            batches: std::collections::BTreeMap::new(),
        }
    }
}

/// A warm-up that cannot complete means the system is not working; measuring it would
/// only produce a table of errors.
fn check_warmup(warm: &PhaseResult) -> Result<()> {
    let failed: Vec<&String> = warm
        .outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .collect();
    if let Some(first) = failed.first() {
        bail!(
            "{} of {} warm-up orders failed (first: {first}); not measuring",
            failed.len(),
            warm.sent
        );
    }
    if warm.unfinished() > 0 {
        bail!(
            "{} warm-up orders did not finish within the duration limit; not measuring",
            warm.unfinished()
        );
    }
    Ok(())
}

/// Runs `work` unless Ctrl-C comes first; either way the caller cleans up afterwards.
async fn interruptible<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}
