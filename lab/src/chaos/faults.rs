//! The faults a chaos run injects, and injecting one.

use std::{fmt, str::FromStr, time::Duration};

use rand::Rng as _;

use crate::{
    broker,
    deployment::{self, Deployment},
};

/// One kind of trouble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The broker closes this deployment's connections.
    CloseConnections,
    /// The RabbitMQ application stops and starts again.
    RestartBroker,
    /// A random service is killed with SIGKILL, then started again.
    KillService,
    /// A random service is stopped with SIGTERM, then started again.
    StopService,
}

impl Fault {
    /// Every kind.
    pub const ALL: [Fault; 4] = [
        Fault::CloseConnections,
        Fault::RestartBroker,
        Fault::KillService,
        Fault::StopService,
    ];
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "close-connections" => Ok(Fault::CloseConnections),
            "restart-broker" => Ok(Fault::RestartBroker),
            "kill-service" => Ok(Fault::KillService),
            "stop-service" => Ok(Fault::StopService),
            other => Err(format!(
                "unknown fault `{other}` (close-connections, restart-broker, kill-service, stop-service)"
            )),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::CloseConnections => "close-connections",
            Fault::RestartBroker => "restart-broker",
            Fault::KillService => "kill-service",
            Fault::StopService => "stop-service",
        })
    }
}

/// Injects `fault` into `deployment` and recovers from it; returns what was done.
pub async fn inject(
    fault: Fault,
    deployment: &mut Deployment,
    namespace: &str,
    ctl: &broker::Ctl,
) -> anyhow::Result<String> {
    let instances = deployment.instances();
    let instance = instances[rand::rng().random_range(0..instances.len())];
    let name = deployment::instance_name(instance);
    let pause = Duration::from_millis(rand::rng().random_range(200..2000));
    match fault {
        Fault::CloseConnections => {
            let closed = broker::close_connections(ctl, namespace).await?;
            Ok(format!("closed {closed} connections from the broker side"))
        }
        Fault::RestartBroker => {
            broker::restart(ctl, pause).await?;
            Ok(format!(
                "stopped and started RabbitMQ ({} ms down)",
                pause.as_millis()
            ))
        }
        Fault::KillService => {
            deployment.kill(instance).await?;
            tokio::time::sleep(pause).await;
            deployment.start_instance(instance).await?;
            Ok(format!(
                "kill -9 {name}, restarted after {} ms",
                pause.as_millis()
            ))
        }
        Fault::StopService => {
            let (took, clean) = deployment
                .terminate(instance, Duration::from_secs(30))
                .await?;
            anyhow::ensure!(clean, "{name} exited non-zero after SIGTERM");
            tokio::time::sleep(pause).await;
            deployment.start_instance(instance).await?;
            Ok(format!(
                "SIGTERM {name} (stopped in {} ms), restarted",
                took.as_millis()
            ))
        }
    }
}
