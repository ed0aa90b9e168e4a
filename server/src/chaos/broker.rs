//! Controlling the local RabbitMQ node for chaos: closing connections (all, or one
//! deployment's) and restarting the broker application. Uses `rabbitmqctl`, so it only works
//! against a broker on this machine.

use std::time::Duration;

use anyhow::Context as _;
use tokio::process::Command;

async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("rabbitmqctl").args(args).output(),
    )
    .await
    .context("rabbitmqctl timed out")?
    .context("running rabbitmqctl (is RabbitMQ installed on this machine?)")?;
    anyhow::ensure!(
        output.status.success(),
        "rabbitmqctl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Closes, from the broker side, every connection whose name contains `(namespace)` (the
/// services name their connections `orderflow <service> (<namespace>)`); returns how many.
pub async fn close_connections(namespace: &str) -> anyhow::Result<u32> {
    // The namespace is validated to [A-Za-z0-9_-], so it is safe inside an Erlang binary.
    let script = format!(
        "length([rabbit_networking:close_connection(P, \"chaos: connection closed by the broker\") || \
           P <- rabbit_networking:connections(), \
           [{{client_properties, Props}}] <- [rabbit_networking:connection_info(P, [client_properties])], \
           {{<<\"connection_name\">>, longstr, Name}} <- Props, \
           binary:match(Name, <<\"({namespace})\">>) =/= nomatch]).",
    );
    let closed = rabbitmqctl(&["eval", &script]).await?;
    Ok(closed.parse().unwrap_or(0))
}

/// Stops the RabbitMQ application (the node stays up), waits `down`, starts it again and waits
/// until it serves. Every client loses its connection meanwhile.
pub async fn restart(down: Duration) -> anyhow::Result<()> {
    rabbitmqctl(&["stop_app"]).await?;
    tokio::time::sleep(down).await;
    rabbitmqctl(&["start_app"]).await?;
    rabbitmqctl(&["await_startup"]).await?;
    Ok(())
}
