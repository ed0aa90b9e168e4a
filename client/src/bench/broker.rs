//! The bench's own RabbitMQ housekeeping: checking the URL points at this machine, opening
//! connections, and deleting a bench namespace's queues and exchanges when a run is over,
//! so repeated runs leave nothing behind on the broker.
//!
//! The names to delete are the server's topology as mirrored here, plus whatever
//! `rabbitmqctl` lists under the namespace's prefix: the topology grows, and the mirror
//! would otherwise silently leave new queues behind.

use std::{collections::BTreeMap, process::Stdio, str::FromStr as _, time::Duration};

use anyhow::{Context as _, Result, bail};
use lapin::{
    Connection, ConnectionProperties,
    options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
    uri::AMQPUri,
};

/// Refuses a broker that is not on the loopback interface: the bench creates and deletes
/// queues and floods them, which is only acceptable on a broker of one's own.
pub(crate) fn check_loopback(url: &str) -> Result<()> {
    let uri = AMQPUri::from_str(url).map_err(|e| {
        anyhow::anyhow!("malformed AMQP URL ({e}); expected amqp://user:password@host:port/vhost")
    })?;
    let host = uri
        .authority
        .host
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("the bench only runs against a broker on this machine (127.0.0.1), not {host:?}");
    }
    Ok(())
}

/// A named connection, so the broker's management views show which stage is which.
pub(crate) async fn connect(url: &str, name: &str) -> Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    Connection::connect(url, properties)
        .await
        .with_context(|| format!("connecting to RabbitMQ for {name}"))
}

/// The queues and exchanges an orderflow-server creates for `namespace`, as declared by the
/// server's `bus::topology` (8 work queues with their DLQs, `retry_levels` delayed-retry
/// queue/exchange pairs per service, the events and dead-letter exchanges). Mirrored here
/// rather than linked, so the CLI does not depend on the server crate; a name added there
/// and not here would be left on the broker, which the bench reports (see [`delete`]).
pub(crate) fn orderflow_names(namespace: &str, retry_levels: u32) -> (Vec<String>, Vec<String>) {
    const WORK_QUEUES: [&str; 8] = [
        "inventory.order-created",
        "inventory.payment-failed",
        "payment.inventory-reserved",
        "order.inventory-reserved",
        "order.inventory-rejected",
        "order.payment-processed",
        "order.payment-failed",
        "order.dead-letters",
    ];
    let mut queues = Vec::new();
    for work in WORK_QUEUES {
        queues.push(format!("{namespace}.{work}"));
        queues.push(format!("{namespace}.{work}.dlq"));
    }
    let mut exchanges = vec![
        format!("{namespace}.events"),
        format!("{namespace}.dead-letters"),
    ];
    for service in ["order", "inventory", "payment"] {
        for attempt in 1..=retry_levels {
            let name = format!("{namespace}.{service}.retry.{attempt}");
            queues.push(name.clone());
            exchanges.push(name);
        }
    }
    (queues, exchanges)
}

/// Every queue and exchange whose name starts with `<namespace>.`, as `rabbitmqctl` lists
/// them on this machine; `None` when it cannot be run (not installed, no permission).
pub(crate) async fn list_namespace(
    url: &str,
    namespace: &str,
) -> Option<(Vec<String>, Vec<String>)> {
    let vhost = AMQPUri::from_str(url).ok()?.vhost;
    let prefix = format!("{namespace}.");
    let mut lists = Vec::new();
    for what in ["list_queues", "list_exchanges"] {
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("rabbitmqctl")
                .args([what, "-q", "--no-table-headers", "-p", &vhost, "name"])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .ok()?
        .ok()?;
        if !output.status.success() {
            return None;
        }
        let names: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::trim)
            .filter(|name| name.starts_with(&prefix))
            .map(str::to_owned)
            .collect();
        lists.push(names);
    }
    let exchanges = lists.pop()?;
    let queues = lists.pop()?;
    Some((queues, exchanges))
}

/// `known` plus anything `rabbitmqctl` lists under the namespace, without duplicates.
pub(crate) async fn namespace_names(
    url: &str,
    namespace: &str,
    known: (Vec<String>, Vec<String>),
) -> (Vec<String>, Vec<String>) {
    let (mut queues, mut exchanges) = known;
    if let Some((listed_queues, listed_exchanges)) = list_namespace(url, namespace).await {
        queues.extend(listed_queues);
        exchanges.extend(listed_exchanges);
    }
    for names in [&mut queues, &mut exchanges] {
        names.sort();
        names.dedup();
    }
    (queues, exchanges)
}

/// Ready messages in each of `queues` that has any, read with passive declares (which
/// create nothing). A queue that cannot be read is skipped.
pub(crate) async fn depths(url: &str, queues: &[String]) -> Result<BTreeMap<String, u64>> {
    let connection = connect(url, "orderflow bench queue depths").await?;
    let mut channel = connection.create_channel().await?;
    let mut depths = BTreeMap::new();
    for queue in queues {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
        {
            Ok(declared) if declared.message_count() > 0 => {
                depths.insert(queue.clone(), u64::from(declared.message_count()));
            }
            Ok(_) => {}
            // A missing queue closes the channel; carry on with a new one.
            Err(_) => channel = connection.create_channel().await?,
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(depths)
}

/// Deletes `queues` then `exchanges`; returns the queues that still held messages, with
/// their counts. A missing name is not an error (RabbitMQ's deletes are idempotent), but any
/// other failure is, with the names that could not be deleted.
pub(crate) async fn delete(
    url: &str,
    queues: &[String],
    exchanges: &[String],
) -> Result<BTreeMap<String, u64>> {
    let connection = connect(url, "orderflow bench clean-up").await?;
    let mut channel = connection.create_channel().await?;
    let mut left_messages = BTreeMap::new();
    let mut failed = Vec::new();
    for queue in queues {
        match channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            Ok(0) => {}
            Ok(messages) => {
                left_messages.insert(queue.clone(), u64::from(messages));
            }
            Err(error) => {
                failed.push(format!("queue {queue}: {error}"));
                // A failed command closes the channel; the rest needs a new one.
                channel = connection.create_channel().await?;
            }
        }
    }
    for exchange in exchanges {
        if let Err(error) = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
        {
            failed.push(format!("exchange {exchange}: {error}"));
            channel = connection.create_channel().await?;
        }
    }
    let _ = connection.close(200, "clean-up done".into()).await;
    if !failed.is_empty() {
        bail!("could not delete {}", failed.join("; "));
    }
    Ok(left_messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_brokers() {
        assert!(check_loopback("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(check_loopback("amqp://guest:guest@localhost:5672/%2f").is_ok());
        assert!(check_loopback("amqp://u:p@127.0.0.2/%2f").is_ok());
        let err = check_loopback("amqp://u:p@10.0.0.5:5672/%2f").unwrap_err();
        assert!(err.to_string().contains("10.0.0.5"), "{err}");
        assert!(check_loopback("amqp://u:p@rabbit.example:5672/%2f").is_err());
        assert!(check_loopback("not a url").is_err());
    }

    #[test]
    fn every_orderflow_name_is_in_the_namespace() {
        let (queues, exchanges) = orderflow_names("bench-x", 4);
        assert_eq!(queues.len(), 16 + 12);
        assert_eq!(exchanges.len(), 2 + 12);
        assert!(
            queues
                .iter()
                .chain(&exchanges)
                .all(|n| n.starts_with("bench-x."))
        );
        assert!(queues.contains(&"bench-x.payment.retry.4".to_owned()));
        assert!(queues.contains(&"bench-x.order.dead-letters.dlq".to_owned()));
    }
}
