//! Chaos runs: what production does to orderflow, on one machine, with proof that nothing is
//! lost. A [`Deployment`] runs the three services as separate `orderflow-server` processes;
//! the [`driver`] keeps placing orders through gRPC; [`faults`] closes broker connections,
//! restarts the broker, kills or stops services at random; [`audit`] then checks every
//! invariant against the services' databases.
//!
//! Used by the `orderflow-chaos` binary and by the resilience tests. Loopback only; every run
//! is bounded in time and count.

pub mod faults;

use std::{collections::BTreeMap, fmt, time::Duration};

use orderflow_server::{bus::Topology, service::Service};

use crate::{
    audit::{self, Audit},
    broker,
    deployment::{self, Deployment},
    driver,
};

/// What one chaos run did and found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Wall time of the run, drain included.
    pub elapsed: Duration,
    /// How long orders were being placed.
    pub placing: Duration,
    /// From the first order to every order terminal and every outbox empty.
    pub settled_after: Duration,
    /// Faults injected, in order, with when.
    pub faults: Vec<(Duration, String)>,
    /// The audit of the final state.
    pub audit: Audit,
    /// Peak resident memory per process (KiB), across restarts.
    pub peak_rss_kib: BTreeMap<Service, u64>,
}

impl Report {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.audit.passed()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.audit;
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "chaos run: {:.1} s, {} faults injected",
            secs,
            self.faults.len()
        )?;
        for (at, fault) in &self.faults {
            writeln!(f, "  {:>6.1} s  {fault}", at.as_secs_f64())?;
        }
        writeln!(f, "orders placed:        {}", a.placed)?;
        writeln!(f, "  completed:          {}", a.completed)?;
        writeln!(f, "  rejected:           {}", a.rejected)?;
        writeln!(f, "  payment failed:     {}", a.payment_failed)?;
        writeln!(f, "  failed (DLQ):       {} (must be 0)", a.failed)?;
        writeln!(f, "  lost:               {} (must be 0)", a.lost)?;
        writeln!(f, "duplicated effects:   {} (must be 0)", a.duplicated)?;
        let placing = self.placing.as_secs_f64().max(0.001);
        writeln!(
            f,
            "throughput:           {:.1} orders/s placed over {placing:.1} s",
            a.placed as f64 / placing
        )?;
        let settled = self.settled_after.as_secs_f64().max(0.001);
        writeln!(
            f,
            "                      {:.1} orders/s finished ({settled:.1} s from the first order to settled)",
            a.placed as f64 / settled
        )?;
        for (service, kib) in &self.peak_rss_kib {
            writeln!(
                f,
                "peak RSS {:<10}  {:.1} MiB",
                service.as_str(),
                *kib as f64 / 1024.0
            )?;
        }
        for problem in &a.problems {
            writeln!(f, "PROBLEM: {problem}")?;
        }
        write!(f, "{}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

/// What a chaos run does.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The processes.
    pub deployment: deployment::Settings,
    /// How long orders keep coming and faults keep happening.
    pub duration: Duration,
    /// Which faults to pick from; none for a plain load run.
    pub faults: Vec<faults::Fault>,
    /// Time between faults: uniform in this range.
    pub fault_interval: (Duration, Duration),
    /// The order stream.
    pub plan: driver::Plan,
    /// Initial stock per SKU (the catalog the processes were given).
    pub initial_stock: std::collections::HashMap<String, i64>,
    /// How long the system may take to finish in-flight orders after the run.
    pub settle_timeout: Duration,
    /// The broker's control command, for the faults that need it.
    pub rabbitmqctl: broker::Ctl,
}

/// Runs a deployment under orders and faults, then audits it. Stops its processes and deletes
/// its broker namespace afterwards.
pub async fn run(settings: Settings) -> anyhow::Result<Report> {
    use rand::Rng as _;

    let started = std::time::Instant::now();
    let namespace = settings.deployment.namespace.clone();
    let mut deployment = Deployment::start(settings.deployment.clone()).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let run_id = format!("{namespace}-{}", uuid::Uuid::new_v4().simple());
    let load_started = std::time::Instant::now();
    let mut driver = {
        let (addrs, plan, stop) = (
            deployment.order_addrs(),
            settings.plan.clone(),
            stop.clone(),
        );
        tokio::spawn(async move { driver::run(&addrs, plan, &run_id, stop).await })
    };

    let mut injected = Vec::new();
    let mut finished = None;
    let result: anyhow::Result<()> = async {
        loop {
            let (low, high) = settings.fault_interval;
            let wait = if high > low {
                rand::rng().random_range(low..high)
            } else {
                low
            };
            let remaining = settings.duration.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(wait.min(remaining)) => {}
                // The plan's order count is reached: nothing left to disturb.
                done = &mut driver => {
                    finished = Some(done);
                    return Ok(());
                }
            }
            deployment.sample_memory();
            if settings.faults.is_empty() || started.elapsed() >= settings.duration {
                continue;
            }
            let fault = settings.faults[rand::rng().random_range(0..settings.faults.len())];
            let at = started.elapsed();
            let what =
                faults::inject(fault, &mut deployment, &namespace, &settings.rabbitmqctl).await?;
            // How long injecting and recovering took, so a run with fewer faults than its
            // schedule allowed explains itself.
            let took = started.elapsed().saturating_sub(at);
            tracing::info!(fault = %fault, what = %what, took = ?took, "Injected a fault.");
            injected.push((
                at,
                format!("{fault}: {what} (took {:.1} s)", took.as_secs_f64()),
            ));
        }
    }
    .await;
    stop.cancel();
    let placed = match finished {
        Some(done) => done??,
        None => driver.await??,
    };
    let placing = placed.elapsed;
    result?;

    let state = deployment.state();
    let settled = audit::wait_settled(&state, settings.settle_timeout).await?;
    let settled_after = load_started.elapsed();
    let mut audit = audit::audit(&state, &placed.accepted, &settings.initial_stock).await?;
    if !settled {
        audit.problems.push(format!(
            "the system did not settle within {:?}",
            settings.settle_timeout
        ));
    }
    if !placed.abandoned.is_empty() {
        // Not losses (the client gave up before the server accepted them), but worth seeing.
        tracing::warn!(
            abandoned = placed.abandoned.len(),
            "Some orders were never accepted by the API."
        );
    }
    let peak_rss_kib = deployment.peak_rss_kib();
    deployment.stop().await?;
    // Best effort: the report matters more than a namespace left behind.
    if let Err(error) = Topology::for_teardown(namespace.as_str())
        .delete_all_at(&settings.deployment.amqp_url)
        .await
    {
        tracing::warn!(error = %format!("{error:#}"), "Could not delete the run's namespace.");
    }
    Ok(Report {
        elapsed: started.elapsed(),
        placing,
        settled_after,
        faults: injected,
        audit,
        peak_rss_kib,
    })
}
