//! The three services as separate `orderflow-server` processes sharing one namespace and data
//! directory, each restartable on the same gRPC port so clients reconnect by themselves.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::process::{Child, Command};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::service::Service;

/// How to run the processes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `orderflow-server` binary.
    pub server_bin: PathBuf,
    /// Broker namespace of this deployment.
    pub namespace: String,
    /// Where the databases and the process logs go.
    pub data_dir: PathBuf,
    /// RabbitMQ.
    pub amqp_url: String,
    /// Extra flags for every process (e.g. `--catalog`, `--db-sync`).
    pub args: Vec<String>,
    /// Extra environment for every process.
    pub env: Vec<(String, String)>,
}

/// A running deployment.
#[derive(Debug)]
pub struct Deployment {
    settings: Settings,
    ports: BTreeMap<Service, SocketAddr>,
    processes: BTreeMap<Service, Child>,
    peak_rss_kib: BTreeMap<Service, u64>,
}

impl Deployment {
    /// Starts every service and waits until each is SERVING.
    pub async fn start(settings: Settings) -> anyhow::Result<Deployment> {
        std::fs::create_dir_all(settings.data_dir.join("logs"))
            .context("creating the data directory")?;
        let mut ports = BTreeMap::new();
        for service in Service::ALL {
            ports.insert(service, free_port()?);
        }
        let mut deployment = Deployment {
            settings,
            ports,
            processes: BTreeMap::new(),
            peak_rss_kib: BTreeMap::new(),
        };
        for service in Service::ALL {
            deployment.start_service(service).await?;
        }
        Ok(deployment)
    }

    /// Where the order service's gRPC API listens (stable across restarts).
    pub fn order_addr(&self) -> SocketAddr {
        self.ports[&Service::Order]
    }

    /// Where `service`'s gRPC server (health) listens.
    pub fn addr(&self, service: Service) -> SocketAddr {
        self.ports[&service]
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.settings.data_dir
    }

    /// Whether `service` has a running process.
    pub fn is_running(&self, service: Service) -> bool {
        self.processes.contains_key(&service)
    }

    /// Starts `service` (again) and waits until it is SERVING.
    pub async fn start_service(&mut self, service: Service) -> anyhow::Result<()> {
        let s = &self.settings;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                s.data_dir
                    .join("logs")
                    .join(format!("{}.log", service.as_str())),
            )
            .context("opening the process log")?;
        let child = Command::new(&s.server_bin)
            .args([
                "--services",
                service.as_str(),
                "--namespace",
                &s.namespace,
                "--amqp-url",
                &s.amqp_url,
            ])
            .arg("--grpc-addr")
            .arg(self.ports[&service].to_string())
            .arg("--data-dir")
            .arg(&s.data_dir)
            .args(&s.args)
            .envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("ORDERFLOW_LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,orderflow_server=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", s.server_bin.display()))?;
        self.processes.insert(service, child);
        self.wait_serving(service, Duration::from_secs(60)).await
    }

    async fn wait_serving(&mut self, service: Service, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("http://{}", self.ports[&service]);
        loop {
            if let Some(child) = self.processes.get_mut(&service)
                && let Ok(Some(status)) = child.try_wait()
            {
                self.processes.remove(&service);
                anyhow::bail!(
                    "{service} exited during start-up ({status}); see its log in the data directory"
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
                "{service} not SERVING within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: the process dies mid-work, nothing is flushed.
    pub async fn kill(&mut self, service: Service) -> anyhow::Result<()> {
        self.sample_memory();
        if let Some(mut child) = self.processes.remove(&service) {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM and wait for the exit; returns how long the graceful shutdown took and whether
    /// the process exited with 0.
    pub async fn terminate(
        &mut self,
        service: Service,
        timeout: Duration,
    ) -> anyhow::Result<(Duration, bool)> {
        self.sample_memory();
        let Some(mut child) = self.processes.remove(&service) else {
            return Ok((Duration::ZERO, true));
        };
        let pid = child.id().context("process already reaped")?;
        let started = Instant::now();
        signal(pid, "TERM").await?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok((started.elapsed(), status?.success())),
            Err(_) => {
                child.start_kill()?;
                child.wait().await?;
                anyhow::bail!("{service} did not exit within {timeout:?} of SIGTERM")
            }
        }
    }

    /// Records each process's current high-water mark of resident memory.
    pub fn sample_memory(&mut self) {
        for (service, child) in &self.processes {
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
        for service in Service::ALL {
            self.terminate(service, Duration::from_secs(30)).await?;
        }
        Ok(())
    }
}

async fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
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
