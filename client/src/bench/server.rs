//! Starting and stopping the real `orderflow-server` for a run: one all-in-one process or
//! one process per service, each on its own free loopback port and data directory, ready
//! once its gRPC health check says SERVING; stopped with SIGTERM like any deployment would,
//! killed only if it overstays its grace period.
//!
//! Each process logs to a file in its data directory, so a failed start can be explained.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;
use serde::Serialize;
use tokio::{
    process::{Child, Command},
    time::Instant,
};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long a server may take to report SERVING (it connects to RabbitMQ and declares its
/// topology first).
const START_TIMEOUT: Duration = Duration::from_secs(30);
const HEALTH_POLL: Duration = Duration::from_millis(100);
/// The server's own grace period is 10 s by default; a little more before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts before the servers dead-letter a message (the server's default, passed
/// explicitly so the clean-up knows how many retry queues there are).
pub(crate) const RETRY_MAX_ATTEMPTS: u32 = 5;

/// How the services are deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Deployment {
    /// One process runs Order, Inventory and Payment.
    AllInOne,
    /// One process per service; the gRPC API is on the order process.
    Separate,
}

/// SQLite durability, passed through to `--db-sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum DbSync {
    /// Sync every commit to disk.
    Full,
    /// Sync at checkpoints only.
    Normal,
}

impl DbSync {
    fn as_arg(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Normal => "normal",
        }
    }
}

impl fmt::Display for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AllInOne => "all-in-one",
            Self::Separate => "separate",
        })
    }
}

/// Everything needed to start the servers of one run.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) bin: PathBuf,
    pub(crate) deployment: Deployment,
    pub(crate) amqp_url: String,
    pub(crate) namespace: String,
    /// Fresh directory for this run; each process gets a subdirectory.
    pub(crate) data_dir: PathBuf,
    pub(crate) catalog: PathBuf,
    pub(crate) db_sync: DbSync,
    pub(crate) prefetch: u16,
    /// Above any order's total, so Payment never declines.
    pub(crate) payment_limit_cents: i64,
}

/// One running server process.
#[derive(Debug)]
pub(crate) struct Process {
    /// `orderflow-server` (all-in-one) or the service it runs.
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) grpc_addr: SocketAddr,
    pub(crate) log: PathBuf,
    child: Child,
}

/// The running servers of one run.
#[derive(Debug)]
pub(crate) struct Servers {
    processes: Vec<Process>,
}

/// How a process ended when asked to stop.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Exit {
    pub(crate) name: String,
    /// Exit code, or `None` when killed by a signal.
    pub(crate) code: Option<i32>,
    /// Whether it had to be killed after the grace period.
    pub(crate) killed: bool,
}

impl Servers {
    /// Starts the processes of `spec` and waits until every one reports SERVING.
    pub(crate) async fn start(spec: &Spec) -> Result<Self> {
        anyhow::ensure!(
            spec.bin.is_file(),
            "no server binary at {} (build it with `cargo build --release -p orderflow-server`, \
             or pass --server-bin)",
            spec.bin.display()
        );
        let roles: &[(&str, &str)] = match spec.deployment {
            Deployment::AllInOne => &[("orderflow-server", "order,inventory,payment")],
            Deployment::Separate => &[
                ("order", "order"),
                ("inventory", "inventory"),
                ("payment", "payment"),
            ],
        };
        let mut servers = Servers {
            processes: Vec::new(),
        };
        for (name, services) in roles {
            match spawn(spec, name, services) {
                Ok(process) => servers.processes.push(process),
                Err(error) => {
                    servers.stop().await;
                    return Err(error);
                }
            }
        }
        for i in 0..servers.processes.len() {
            if let Err(error) = wait_serving(&mut servers.processes[i]).await {
                servers.stop().await;
                return Err(error);
            }
        }
        Ok(servers)
    }

    pub(crate) fn processes(&self) -> &[Process] {
        &self.processes
    }

    /// gRPC address of the process that serves the OrderService (the first one).
    pub(crate) fn order_addr(&self) -> Option<SocketAddr> {
        self.processes.first().map(|p| p.grpc_addr)
    }

    /// A process that exited although nobody stopped it, with its log's tail.
    pub(crate) fn crashed(&mut self) -> Option<String> {
        self.processes.iter_mut().find_map(|p| {
            let status = p.child.try_wait().ok()??;
            Some(format!(
                "{} exited unexpectedly ({status}); its log ends with:\n{}",
                p.name,
                log_tail(&p.log)
            ))
        })
    }

    /// SIGTERM to every process, then waits for each; kills those still running after the
    /// grace period.
    pub(crate) async fn stop(mut self) -> Vec<Exit> {
        for process in &self.processes {
            // std has no signal API; `kill` is in every Linux base system.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &process.pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut exits = Vec::new();
        for process in &mut self.processes {
            let (status, killed) =
                match tokio::time::timeout_at(deadline, process.child.wait()).await {
                    Ok(status) => (status.ok(), false),
                    Err(_) => {
                        let _ = process.child.kill().await;
                        (None, true)
                    }
                };
            exits.push(Exit {
                name: process.name.clone(),
                code: status.as_ref().and_then(ExitStatus::code),
                killed,
            });
        }
        exits
    }
}

fn spawn(spec: &Spec, name: &str, services: &str) -> Result<Process> {
    let dir = spec.data_dir.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let grpc_addr = free_port()?;
    let log = dir.join("server.log");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = Command::new(&spec.bin);
    // The server reads its whole configuration from ORDERFLOW_* (and OTEL_*) variables too; a
    // token, TLS or fault setting left in the caller's shell must not change what is measured.
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("ORDERFLOW_") || key_text.starts_with("OTEL_") {
            command.env_remove(&key);
        }
    }
    let child = command
        .arg("--services")
        .arg(services)
        .arg("--namespace")
        .arg(&spec.namespace)
        .arg("--grpc-addr")
        .arg(grpc_addr.to_string())
        .arg("--data-dir")
        .arg(&dir)
        .arg("--catalog")
        .arg(&spec.catalog)
        .arg("--payment-limit-cents")
        .arg(spec.payment_limit_cents.to_string())
        .arg("--prefetch")
        .arg(spec.prefetch.to_string())
        .arg("--db-sync")
        .arg(spec.db_sync.as_arg())
        .arg("--retry-max-attempts")
        .arg(RETRY_MAX_ATTEMPTS.to_string())
        // The URL carries the password, so it goes through the environment, not argv.
        .env("AMQP_URL", &spec.amqp_url)
        // Per-message INFO lines would cost the server more than some of the work measured.
        .env("RUST_LOG", "warn,lapin=off")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        // If the bench dies, the servers must not outlive it.
        .kill_on_drop(true)
        // Their own process group: Ctrl-C at the terminal reaches the bench, which then
        // stops them in order instead of racing them.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", spec.bin.display()))?;
    let pid = child
        .id()
        .context("the server exited before its pid could be read")?;
    Ok(Process {
        name: name.to_owned(),
        pid,
        grpc_addr,
        log,
        child,
    })
}

/// A port that was free a moment ago. Another program could take it before the server binds
/// it; the server then fails to start and says so.
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// Polls the standard health check (service "") until SERVING, the process exits, or
/// [`START_TIMEOUT`].
async fn wait_serving(process: &mut Process) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let endpoint = Endpoint::from_shared(format!("http://{}", process.grpc_addr))?
        .connect_timeout(Duration::from_secs(1));
    loop {
        if let Some(status) = process.child.try_wait()? {
            bail!(
                "{} exited during start-up ({status}); its log ends with:\n{}",
                process.name,
                log_tail(&process.log)
            );
        }
        let last = match check(&endpoint).await {
            Ok(ServingStatus::Serving) => return Ok(()),
            Ok(status) => format!("health status {}", status.as_str_name()),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            bail!(
                "{} did not report SERVING within {}s ({last}); its log ends with:\n{}",
                process.name,
                START_TIMEOUT.as_secs(),
                log_tail(&process.log)
            );
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

async fn check(endpoint: &Endpoint) -> Result<ServingStatus, String> {
    let channel: Channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(
        Duration::from_secs(2),
        HealthClient::new(channel).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .map_err(|_| "health check timed out".to_owned())?
    .map_err(|status| format!("health check failed: {}", status.message()))?;
    Ok(response.into_inner().status())
}

/// The last lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    const LINES: usize = 15;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
            if tail.is_empty() {
                "(empty)".to_owned()
            } else {
                tail
            }
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

/// Lines of the servers' logs at WARN or above, for the report: a healthy run has none.
pub(crate) fn warning_lines(servers: &[(String, PathBuf)]) -> Vec<String> {
    let mut lines = Vec::new();
    for (name, path) in servers {
        if let Ok(text) = std::fs::read_to_string(path) {
            lines.extend(
                text.lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(|l| format!("{name}: {l}")),
            );
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_on_loopback() {
        let addr = free_port().unwrap();
        assert!(addr.ip().is_loopback());
        assert_ne!(addr.port(), 0);
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("orderflow-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let text: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        assert!(
            tail.starts_with("line 26\n") && tail.ends_with("line 40"),
            "{tail}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(log_tail(&path).starts_with("(cannot read"));
    }
}
