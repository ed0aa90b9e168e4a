//! The bench's own AMQP plumbing: checking the URL points at this machine, opening named
//! connections, reading queue depths, and deleting the baseline's queues and exchanges when a
//! run is over. An orderflow namespace is deleted by the server's own topology
//! (`Topology::delete_all`), never from a copy of its names.

use std::{collections::BTreeMap, str::FromStr as _};

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
}
