//! The services as separate `orderflow-server` processes sharing one namespace, one instance
//! or several of each, on SQLite files in one data directory or on PostgreSQL schemas. Each
//! process restarts on the same gRPC port, so clients reconnect by themselves.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::process::{Child, Command};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::audit::State;
use crate::service::Service;

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
    /// Processes per service. More than one needs `database_url`.
    pub instances: usize,
    /// Extra flags for every process (e.g. `--catalog`, `--db-sync`).
    pub args: Vec<String>,
    /// Extra environment for every process (wins over the defaults, e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
}

/// One process: which service, which instance of it.
pub type Instance = (Service, usize);

/// How logs and reports name an instance: `inventory #1`.
pub fn instance_name((service, index): Instance) -> String {
    format!("{service} #{index}")
}

/// A running deployment.
#[derive(Debug)]
pub struct Deployment {
    settings: Settings,
    ports: BTreeMap<Instance, SocketAddr>,
    metrics_ports: BTreeMap<Instance, SocketAddr>,
    processes: BTreeMap<Instance, Child>,
    peak_rss_kib: BTreeMap<Service, u64>,
}

impl Deployment {
    /// Starts every instance of every service and waits until each is SERVING.
    pub async fn start(settings: Settings) -> anyhow::Result<Deployment> {
        anyhow::ensure!(
            settings.instances == 1 || settings.database_url.is_some(),
            "several instances of a service share their state through PostgreSQL: set a database URL"
        );
        std::fs::create_dir_all(settings.data_dir.join("logs"))
            .context("creating the data directory")?;
        let (mut ports, mut metrics_ports) = (BTreeMap::new(), BTreeMap::new());
        for service in Service::ALL {
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

    /// Where an instance's stderr goes: `<data dir>/logs/<service>-<index>.log`.
    pub fn log_path(&self, (service, index): Instance) -> PathBuf {
        self.settings
            .data_dir
            .join("logs")
            .join(format!("{}-{index}.log", service.as_str()))
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
        let mut command = Command::new(&s.server_bin);
        command
            .args([
                "--services",
                service.as_str(),
                "--namespace",
                &s.namespace,
                "--amqp-url",
                &s.amqp_url,
            ])
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
            .env("ORDERFLOW_LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,orderflow_server=info".into()),
            )
            .envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", s.server_bin.display()))?;
        self.processes.insert(instance, child);
        self.wait_serving(instance, Duration::from_secs(60)).await
    }

    async fn wait_serving(&mut self, instance: Instance, timeout: Duration) -> anyhow::Result<()> {
        let (service, index) = instance;
        let deadline = Instant::now() + timeout;
        let url = format!("http://{}", self.ports[&instance]);
        loop {
            if let Some(child) = self.processes.get_mut(&instance)
                && let Ok(Some(status)) = child.try_wait()
            {
                self.processes.remove(&instance);
                let log = self.log_path(instance);
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let mut tail: Vec<&str> = text.lines().rev().take(5).collect();
                tail.reverse();
                anyhow::bail!(
                    "{service} #{index} exited during start-up ({status}); last lines of {}:\n{}",
                    log.display(),
                    tail.join("\n")
                );
            }
            if let Ok(channel) = tonic::transport::Channel::from_shared(url.clone())?
                .connect()
                .await
            {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                if status.is_ok_and(|s| s == ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{service} #{index} not SERVING within {timeout:?}"
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
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok((started.elapsed(), status?.success())),
            Err(_) => {
                child.start_kill()?;
                child.wait().await?;
                anyhow::bail!(
                    "{} #{} did not exit within {timeout:?} of SIGTERM",
                    instance.0,
                    instance.1
                )
            }
        }
    }

    /// Records each process's high-water mark of resident memory (the largest per service).
    pub fn sample_memory(&mut self) {
        for ((service, _), child) in &self.processes {
            if let Some(kib) = child.id().and_then(peak_rss_kib) {
                let peak = self.peak_rss_kib.entry(*service).or_default();
                *peak = (*peak).max(kib);
            }
        }
    }

    /// Peak resident memory per service seen so far (KiB).
    pub fn peak_rss_kib(&mut self) -> BTreeMap<Service, u64> {
        self.sample_memory();
        self.peak_rss_kib.clone()
    }

    /// Stops every process gracefully.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        for instance in self.instances() {
            self.terminate(instance, Duration::from_secs(30)).await?;
        }
        Ok(())
    }
}

/// `VmHWM` of a process: its peak resident set, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A loopback port nobody listens on right now.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}
