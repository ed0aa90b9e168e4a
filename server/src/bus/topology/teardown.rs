//! Deleting a namespace: every queue and exchange [`Topology::spec`] declares, so clean-up
//! never keeps a copy of the names that could drift from what the services declare. Used by
//! tests and by the workshop (`lab/`) after a run; no service deletes its own topology.
//!
//! RabbitMQ's deletes are idempotent, so a topology wider than the one declared (more retry
//! levels, see [`Topology::for_teardown`]) deletes the same namespace cleanly.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
};

use super::Topology;

/// The most delayed-retry levels a service can declare: `--retry-max-attempts` is at most 20.
const MAX_RETRY_LEVELS: u32 = 19;
/// How long one node may take to accept the clean-up's connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long deleting a namespace's queues and exchanges may take.
const DELETE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the broker may take to confirm the clean-up connection's close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

impl Topology {
    /// Every name `namespace` can hold, whatever retry settings its services ran with: for
    /// deleting a namespace without knowing their configuration.
    pub fn for_teardown(namespace: impl Into<String>) -> Topology {
        Topology::new(namespace, MAX_RETRY_LEVELS, 1)
    }

    /// Deletes every queue, then every exchange of the namespace. Returns the queues that
    /// still held messages, with their counts. A name that does not exist is not an error.
    pub async fn delete_all(&self, channel: &Channel) -> lapin::Result<BTreeMap<String, u64>> {
        let spec = self.spec();
        let mut left = BTreeMap::new();
        // Queues first: a queue outlives its exchange's bindings, not the other way round.
        for queue in &spec.queues {
            let messages = channel
                .queue_delete(queue.name.as_str().into(), QueueDeleteOptions::default())
                .await?;
            if messages > 0 {
                left.insert(queue.name.clone(), u64::from(messages));
            }
        }
        for exchange in &spec.exchanges {
            channel
                .exchange_delete(
                    exchange.name.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await?;
        }
        Ok(left)
    }

    /// [`Topology::delete_all`] through the first node of `amqp_url` (one URL, or several
    /// separated by commas) that accepts a connection within 5 s.
    pub async fn delete_all_at(&self, amqp_url: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut refused = Vec::new();
        for node in amqp_url.split(',').map(str::trim) {
            let properties = ConnectionProperties::default()
                .with_connection_name(format!("orderflow teardown ({})", self.namespace()).into());
            let connection =
                match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(node, properties))
                    .await
                {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(error)) => {
                        refused.push(error.to_string());
                        continue;
                    }
                    Err(_) => {
                        refused.push(format!("no answer within {CONNECT_TIMEOUT:?}"));
                        continue;
                    }
                };
            let deleted = async {
                let channel = connection.create_channel().await?;
                self.delete_all(&channel).await
            };
            let deleted = match tokio::time::timeout(DELETE_TIMEOUT, deleted).await {
                Ok(deleted) => deleted.map_err(anyhow::Error::from),
                Err(_) => Err(anyhow::anyhow!("no answer within {DELETE_TIMEOUT:?}")),
            };
            // A close the broker never confirms must not hold the caller (seen once in a test
            // run: the broker had already dropped the socket).
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "teardown done".into()))
                    .await;
            return deleted
                .with_context(|| format!("deleting the topology of `{}`", self.namespace()));
        }
        anyhow::bail!(
            "no broker node accepted the teardown of `{}`: {}",
            self.namespace(),
            refused.join("; ")
        )
    }

    /// [`Topology::delete_all_at`] from synchronous code such as a `Drop`, best effort: on a
    /// thread with a runtime of its own, since the caller may be on (or dropping) an async
    /// runtime that cannot be blocked.
    pub fn delete_all_blocking(&self, amqp_url: &str) {
        let (topology, amqp_url) = (self.clone(), amqp_url.to_owned());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|runtime| runtime.block_on(topology.delete_all_at(&amqp_url)))
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Service;

    #[test]
    fn the_teardown_covers_every_retry_level_a_service_can_declare() {
        let widest = Topology::new("ns", MAX_RETRY_LEVELS, 20).spec();
        let teardown = Topology::for_teardown("ns").spec();
        let names = |spec: &super::super::spec::Spec| {
            let mut names: Vec<String> = spec
                .queues
                .iter()
                .map(|q| q.name.clone())
                .chain(spec.exchanges.iter().map(|e| e.name.clone()))
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(&widest), names(&teardown));
        assert!(
            names(&teardown).contains(&Topology::new("ns", 1, 1).retry_queue(Service::Order, 19))
        );
        assert!(names(&teardown).contains(&"ns.order.dead-letters.dlq".to_owned()));
    }
}
