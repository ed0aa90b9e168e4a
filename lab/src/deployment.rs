//! The services as real `orderflow-server` processes sharing one namespace: all three in one
//! process or one process per service, one instance or several of each, on SQLite files in
//! one data directory or on PostgreSQL schemas. The bench, the chaos tool and the
//! process-level tests all start their servers here.
//!
//! Each process keeps its gRPC and metrics ports across restarts, so clients reconnect by
//! themselves; it is ready once its gRPC health check says SERVING, and stopped with SIGTERM
//! like any deployment would, killed only if it overstays its grace period.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::ValueEnum;
use orderflow_server::service::Service;
use serde::Serialize;
use tokio::process::{Child, Command};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{audit::State, procstat};

/// How long a process may take to report SERVING (it connects to RabbitMQ, and maybe
/// PostgreSQL, and declares its topology first).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The server's own grace period is 10 s by default; this is a generous margin on top.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Which services each process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// One process runs Order, Inventory and Payment.
    AllInOne,
    /// One process per service; the gRPC API is on the order process.
    Separate,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AllInOne => "all-in-one",
            Self::Separate => "separate",
        })
    }
}

/// How to run the processes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `orderflow-server` binary.
    pub server_bin: PathBuf,
    /// Broker namespace of this deployment.
    pub namespace: String,
    /// Where the SQLite databases (when no `database_url`) and the process logs go.
    pub data_dir: PathBuf,
    /// PostgreSQL for the services' state, instead of SQLite files.
    pub database_url: Option<String>,
    /// Services that keep SQLite files even with a `database_url` (e.g. Order on SQLite while
    /// Inventory and Payment are on PostgreSQL).
    pub sqlite_services: Vec<Service>,
    /// RabbitMQ: one URL, or several (a cluster) separated by commas.
    pub amqp_url: String,
    /// Which services each process runs.
    pub layout: Layout,
    /// Processes per service (per layout unit). More than one needs `database_url`.
    pub instances: usize,
    /// Extra flags for every process (e.g. `--catalog`, `--db-sync`).
    pub args: Vec<String>,
    /// Extra environment for every process (wins over the defaults, e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
}

/// One process: the service it is keyed by (in the all-in-one layout, [`Service::Order`],
/// whose API it serves), and which instance of it.
pub type Instance = (Service, usize);

/// How logs and reports name an instance: `inventory #1`.
pub fn instance_name((service, index): Instance) -> String {
    format!("{service} #{index}")
}

/// How a process ended when asked to stop.
#[derive(Debug, Clone, Serialize)]
pub struct Exit {
    /// The process's [`Deployment::process_name`].
    pub name: String,
    /// Exit code, or `None` when killed by a signal.
    pub code: Option<i32>,
    /// Whether it had to be killed after the grace period.
    pub killed: bool,
}

/// A running deployment. Dropping it kills whatever still runs.
#[derive(Debug)]
pub struct Deployment {
    settings: Settings,
    ports: BTreeMap<Instance, SocketAddr>,
    metrics_ports: BTreeMap<Instance, SocketAddr>,
    processes: BTreeMap<Instance, Child>,
    peak_rss_kib: BTreeMap<Service, u64>,
}

impl Deployment {
    /// Starts every instance and waits until each is SERVING.
    pub async fn start(settings: Settings) -> anyhow::Result<Deployment> {
        anyhow::ensure!(
            settings.server_bin.is_file(),
            "no server binary at {} (build it with `cargo build --release -p orderflow-server`, \
             or pass --server-bin)",
            settings.server_bin.display()
        );
        anyhow::ensure!(
            settings.instances <= 1 || settings.database_url.is_some(),
            "several instances of a service share their state through PostgreSQL: set a database URL"
        );
        std::fs::create_dir_all(settings.data_dir.join("logs"))
            .context("creating the data directory")?;
        let keys: &[Service] = match settings.layout {
            Layout::AllInOne => &[Service::Order],
            Layout::Separate => &Service::ALL,
        };
        let (mut ports, mut metrics_ports) = (BTreeMap::new(), BTreeMap::new());
        for &service in keys {
            for index in 0..settings.instances.max(1) {
                ports.insert((service, index), free_port()?);
                metrics_ports.insert((service, index), free_port()?);
            }
        }
        let instances: Vec<Instance> = ports.keys().copied().collect();
        let mut deployment = Deployment {
            settings,
            ports,
            metrics_ports,
            processes: BTreeMap::new(),
            peak_rss_kib: BTreeMap::new(),
        };
        for instance in instances {
            deployment.start_instance(instance).await?;
        }
        Ok(deployment)
    }

    /// Where the order service's gRPC APIs listen (stable across restarts).
    pub fn order_addrs(&self) -> Vec<SocketAddr> {
        self.ports
            .iter()
            .filter(|((s, _), _)| *s == Service::Order)
            .map(|(_, addr)| *addr)
            .collect()
    }

    /// Where an instance's gRPC server (health) listens.
    pub fn addr(&self, instance: Instance) -> SocketAddr {
        self.ports[&instance]
    }

    /// Where an instance serves `/metrics`.
    pub fn metrics_addr(&self, instance: Instance) -> SocketAddr {
        self.metrics_ports[&instance]
    }

    /// Every instance.
    pub fn instances(&self) -> Vec<Instance> {
        self.ports.keys().copied().collect()
    }

    /// The pid of an instance's process, while it runs.
    pub fn pid(&self, instance: Instance) -> Option<u32> {
        self.processes.get(&instance)?.id()
    }

    /// How reports name a process: `orderflow-server` (all-in-one) or its service, with
    /// ` #<index>` when there are several instances.
    pub fn process_name(&self, (service, index): Instance) -> String {
        let base = match self.settings.layout {
            Layout::AllInOne => "orderflow-server",
            Layout::Separate => service.as_str(),
        };
        if self.settings.instances > 1 {
            format!("{base} #{index}")
        } else {
            base.to_owned()
        }
    }

    /// Where the services keep their state.
    pub fn state(&self) -> State {
        let files = State::Files(self.settings.data_dir.clone());
        let Some(url) = &self.settings.database_url else {
            return files;
        };
        let postgres = State::Postgres {
            url: url.clone(),
            namespace: self.settings.namespace.clone(),
        };
        if self.settings.sqlite_services.is_empty() {
            return postgres;
        }
        State::Each(
            Service::ALL
                .into_iter()
                .map(|service| {
                    let state = if self.settings.sqlite_services.contains(&service) {
                        files.clone()
                    } else {
                        postgres.clone()
                    };
                    (service, state)
                })
                .collect(),
        )
    }

    /// Where an instance's output goes: `<data dir>/logs/<service>-<index>.log`
    /// (`orderflow-server-<index>.log` in the all-in-one layout).
    pub fn log_path(&self, (service, index): Instance) -> PathBuf {
        let stem = match self.settings.layout {
            Layout::AllInOne => "orderflow-server",
            Layout::Separate => service.as_str(),
        };
        self.settings
            .data_dir
            .join("logs")
            .join(format!("{stem}-{index}.log"))
    }

    /// Starts an instance (again) and waits until it is SERVING.
    pub async fn start_instance(&mut self, instance: Instance) -> anyhow::Result<()> {
        let service = instance.0;
        let s = &self.settings;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(instance))
            .context("opening the process log")?;
        let services = match s.layout {
            Layout::AllInOne => "order,inventory,payment",
            Layout::Separate => service.as_str(),
        };
        let mut command = Command::new(&s.server_bin);
        // The server reads its whole configuration from ORDERFLOW_* (and OTEL_*) variables
        // too; a token, TLS or fault setting left in the caller's shell must not change the
        // deployment. What a caller wants goes through `args` and `env`.
        for (key, _) in std::env::vars_os() {
            let text = key.to_string_lossy();
            if text.starts_with("ORDERFLOW_") || text.starts_with("OTEL_") {
                command.env_remove(&key);
            }
        }
        command
            .args(["--services", services, "--namespace", &s.namespace])
            .arg("--grpc-addr")
            .arg(self.ports[&instance].to_string())
            .arg("--data-dir")
            .arg(&s.data_dir)
            .arg("--metrics-addr")
            .arg(self.metrics_ports[&instance].to_string());
        if let Some(url) = &s.database_url
            && !s.sqlite_services.contains(&service)
        {
            command.args(["--database-url", url]);
        }
        let child = command
            .args(&s.args)
            // The URL carries the password, so it goes through the environment, not argv.
            .env("AMQP_URL", &s.amqp_url)
            .env("ORDERFLOW_LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,orderflow_server=info".into()),
            )
            .envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("sharing the process log")?)
            .stderr(log)
            // If the caller dies, the servers must not outlive it.
            .kill_on_drop(true)
            // Their own process group: Ctrl-C at the terminal reaches the caller, which then
            // stops them in order instead of racing them.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", s.server_bin.display()))?;
        self.processes.insert(instance, child);
        self.wait_serving(instance).await
    }

    /// Polls the standard health check (service "") until SERVING, the process exits, or
    /// [`START_TIMEOUT`].
    async fn wait_serving(&mut self, instance: Instance) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let name = self.process_name(instance);
        loop {
            if let Some(child) = self.processes.get_mut(&instance)
                && let Ok(Some(status)) = child.try_wait()
            {
                self.processes.remove(&instance);
                anyhow::bail!(
                    "{name} exited during start-up ({status}); its log ends with:\n{}",
                    log_tail(&self.log_path(instance))
                );
            }
            let now = self.health(instance).await;
            if now == Some(ServingStatus::Serving) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{name} did not report SERVING within {START_TIMEOUT:?} (last: {now:?}); its log \
                 ends with:\n{}",
                log_tail(&self.log_path(instance))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What an instance's `grpc.health.v1.Health` says right now (`None`: no answer).
    pub async fn health(&self, instance: Instance) -> Option<ServingStatus> {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", self.ports[&instance]))
                .ok()?
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await
                .ok()?;
        let mut check = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        check.set_timeout(Duration::from_secs(5));
        let status = HealthClient::new(channel).check(check).await.ok()?;
        ServingStatus::try_from(status.into_inner().status).ok()
    }

    /// An instance's `/metrics` page (Prometheus text).
    pub async fn metrics(&self, instance: Instance) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let fetch = async {
            let mut stream = tokio::net::TcpStream::connect(self.metrics_ports[&instance]).await?;
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            anyhow::Ok(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), fetch)
            .await
            .context("/metrics did not answer within 10 s")??;
        let (_, body) = response
            .split_once("\r\n\r\n")
            .context("not an HTTP response")?;
        Ok(body.to_owned())
    }

    /// Waits until every instance reports `want` (each at most `within`).
    pub async fn wait_health_all(
        &self,
        want: ServingStatus,
        within: Duration,
    ) -> anyhow::Result<()> {
        for instance in self.instances() {
            self.wait_health(instance, want, within).await?;
        }
        Ok(())
    }

    /// The value of the gauge `name` that `instance` reports for its own service on `/metrics`.
    pub async fn gauge(&self, instance: Instance, name: &str) -> anyhow::Result<Option<f64>> {
        let page = self.metrics(instance).await?;
        let prefix = format!("{name}{{service=\"{}\"}} ", instance.0.service_name());
        Ok(page
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok()))
    }

    /// Waits until `instance` reports `want` (at most `within`).
    pub async fn wait_health(
        &self,
        instance: Instance,
        want: ServingStatus,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.health(instance).await;
            if now == Some(want) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} still reports {now:?}, not {want:?}, after {within:?}",
                instance_name(instance)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A process that exited although nobody stopped it, with its log's tail.
    pub fn crashed(&mut self) -> Option<String> {
        let instances = self.instances();
        instances.into_iter().find_map(|instance| {
            let status = self.processes.get_mut(&instance)?.try_wait().ok()??;
            Some(format!(
                "{} exited unexpectedly ({status}); its log ends with:\n{}",
                self.process_name(instance),
                log_tail(&self.log_path(instance))
            ))
        })
    }

    /// SIGKILL: the process dies mid-work, nothing is flushed.
    pub async fn kill(&mut self, instance: Instance) -> anyhow::Result<()> {
        self.sample_memory();
        if let Some(mut child) = self.processes.remove(&instance) {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM and wait for the exit; returns how long the graceful shutdown took and whether
    /// the process exited with 0.
    pub async fn terminate(
        &mut self,
        instance: Instance,
        timeout: Duration,
    ) -> anyhow::Result<(Duration, bool)> {
        self.sample_memory();
        let Some(mut child) = self.processes.remove(&instance) else {
            return Ok((Duration::ZERO, true));
        };
        let pid = child.id().context("process already reaped")?;
        let started = Instant::now();
        sigterm(pid).await?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok((started.elapsed(), status?.success())),
            Err(_) => {
                child.start_kill()?;
                child.wait().await?;
                anyhow::bail!(
                    "{} did not exit within {timeout:?} of SIGTERM",
                    instance_name(instance)
                )
            }
        }
    }

    /// Records each process's high-water mark of resident memory (the largest per service).
    pub fn sample_memory(&mut self) {
        for ((service, _), child) in &self.processes {
            if let Some(reading) = child.id().and_then(|pid| procstat::read(pid).ok()) {
                let peak = self.peak_rss_kib.entry(*service).or_default();
                *peak = (*peak).max(reading.peak_rss_kib);
            }
        }
    }

    /// Peak resident memory per service seen so far (KiB).
    pub fn peak_rss_kib(&mut self) -> BTreeMap<Service, u64> {
        self.sample_memory();
        self.peak_rss_kib.clone()
    }

    /// SIGTERM to every process at once, then waits for each; kills those still running
    /// [`STOP_TIMEOUT`] later. Returns how each ended.
    pub async fn stop_all(&mut self) -> Vec<Exit> {
        self.sample_memory();
        for child in self.processes.values() {
            if let Some(pid) = child.id() {
                let _ = sigterm(pid).await;
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        let mut exits = Vec::new();
        for (instance, mut child) in std::mem::take(&mut self.processes) {
            let (status, killed) = match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(status) => (status.ok(), false),
                Err(_) => {
                    let _ = child.kill().await;
                    (None, true)
                }
            };
            exits.push(Exit {
                name: self.process_name(instance),
                code: status.as_ref().and_then(ExitStatus::code),
                killed,
            });
        }
        exits
    }

    /// Stops every process gracefully; fails if one had to be killed.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let killed: Vec<String> = self
            .stop_all()
            .await
            .into_iter()
            .filter(|exit| exit.killed)
            .map(|exit| exit.name)
            .collect();
        anyhow::ensure!(
            killed.is_empty(),
            "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM",
            killed.join(", ")
        );
        Ok(())
    }
}

/// `orderflow-server` next to the running executable, as `cargo build` lays binaries out. A
/// test binary runs from `deps/`, one level further down.
pub fn default_server_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut dir = exe.parent().context("this executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    Ok(dir.join("orderflow-server"))
}

/// Asks a process to shut down gracefully. std has no signal API; `kill` is in every Linux
/// base system.
async fn sigterm(pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
    Ok(())
}

/// A loopback port nobody listens on right now. Another program could take it before the
/// server binds it; the server then fails to start and says so.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
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

/// Lines of the processes' logs at WARN or above, prefixed with the process name: a healthy
/// run has none.
pub fn warning_lines(logs: &[(String, PathBuf)]) -> Vec<String> {
    let mut lines = Vec::new();
    for (name, path) in logs {
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        assert!(
            tail.starts_with("line 26\n") && tail.ends_with("line 40"),
            "{tail}"
        );
        drop(dir);
        assert!(log_tail(&path).starts_with("(cannot read"));
    }

    #[test]
    fn test_binaries_find_the_server_next_to_the_others() {
        let bin = default_server_bin().unwrap();
        assert_eq!(bin.file_name().unwrap(), "orderflow-server");
        assert!(
            !bin.parent().unwrap().ends_with("deps"),
            "{}",
            bin.display()
        );
    }
}
