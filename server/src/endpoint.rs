//! One service's place on the bus, the way MassTransit and NServiceBus call it an endpoint: its
//! own broker connection, publisher and outbox relay, the consumers of its queues, each behind
//! an inbox on the service's database, and the health of all that. Every service starts one
//! (`order::start`, `inventory::start`, `payment::start`) and hands it its handlers.
//!
//! Fault injection (`ORDERFLOW_FAULTS`) is wired here, at the consumer/inbox seam, and nowhere
//! near a domain handler.

use std::sync::Arc;

use tracing::warn;

use crate::{
    bus::{
        AmqpUrl, Broker, Consumer, ConsumerSettings, ParkFault, Publisher, RetryPolicy, Topology,
        management::ManagementUrl,
        pause::{self, Pause},
        topology::{Declare, QueueNames},
    },
    db::Database,
    fault::{self, Faults},
    health::{self, Dependencies},
    inbox::{DedupKey, Handler, Inbox},
    metrics::Metrics,
    outbox::{self, Outbox, relay::Relay},
    service::Service,
    shutdown::{Stage, Stages},
};

/// How endpoints connect and consume; the same for every service of a process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker (or a cluster's nodes).
    pub amqp_url: AmqpUrl,
    /// Extra CA (PEM) trusted for `amqps://`.
    pub ca_cert: Option<String>,
    /// The management API, for `verify_topology`.
    pub management_url: Option<ManagementUrl>,
    /// Check a pre-declared topology instead of declaring it.
    pub verify_topology: bool,
    /// How consumers retry a failed message before dead-lettering it.
    pub retry: RetryPolicy,
    /// How the outbox relay retries an event the broker refused.
    pub outbox: RetryPolicy,
    /// Unacknowledged deliveries per consumer (and the largest batch).
    pub prefetch: u16,
    /// Larger event deliveries are dead-lettered unread.
    pub max_message_bytes: usize,
    /// Injected faults (none in production).
    pub faults: Vec<fault::Rule>,
}

/// A running service endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Endpoint {
    service: Service,
    broker: Broker,
    publisher: Arc<Publisher>,
    outbox: Outbox,
    database: Database,
    topology: Topology,
    settings: Settings,
    faults: Faults,
    metrics: Metrics,
    dependencies: Dependencies,
}

impl Endpoint {
    /// Starts `service`'s connection supervisor, outbox relay and database watch.
    pub fn start(
        service: Service,
        database: Database,
        settings: &Settings,
        topology: &Topology,
        metrics: &Metrics,
        stages: &mut Stages,
    ) -> Endpoint {
        let name = format!(
            "orderflow {} ({})",
            service.service_name(),
            topology.namespace()
        );
        let declare = if settings.verify_topology {
            Declare::Verify(service)
        } else {
            Declare::All(service)
        };
        let broker = Broker::new(settings.amqp_url.clone(), name, topology.clone(), declare)
            .with_ca_cert(settings.ca_cert.clone())
            .with_management_url(settings.management_url.clone());
        stages.spawn(Stage::Connection, |stop| broker.clone().run(stop));
        let publisher = Arc::new(Publisher::new(broker.clone()));
        let outbox = Outbox::new(service, database.backend());
        let relay = Relay::new(
            database.clone(),
            outbox.clone(),
            publisher.clone(),
            topology,
            settings.outbox,
            metrics.clone(),
        );
        stages.spawn(Stage::Relay, |stop| relay.run(stop));
        metrics.probe(outbox::backlog_probe(
            outbox.clone(),
            database.pool().clone(),
        ));
        let (database_up, watch_database) =
            health::watch_database(service, database.clone(), stages.token(Stage::Intake));
        stages.spawn(Stage::Intake, |_| watch_database);
        let dependencies = Dependencies {
            service,
            broker: broker.clone(),
            database_up,
        };
        metrics.probe(health::probe(dependencies.clone()));
        let faults = Faults::for_service(&settings.faults, service);
        if !faults.is_empty() {
            warn!(service = service.service_name(), faults = ?settings.faults, "Fault injection is ON.");
        }
        Endpoint {
            service,
            broker,
            publisher,
            outbox,
            database,
            topology: topology.clone(),
            settings: settings.clone(),
            faults,
            metrics: metrics.clone(),
            dependencies,
        }
    }

    /// The service's database.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// The service's outbox.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The namespace's topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What the service needs to work, for health reporting.
    pub fn dependencies(&self) -> Dependencies {
        self.dependencies.clone()
    }

    /// Consumes the event queue `queue` with `handler`: each delivery is decoded at the edge,
    /// refused if larger than the limit, and applied exactly once through the inbox.
    pub fn consume<H: Handler>(&self, queue: QueueNames, handler: H, stages: &mut Stages) {
        let inbox = self
            .inbox(&queue, handler, stages)
            .with_faults(self.faults.clone());
        let limit = self.settings.max_message_bytes;
        self.spawn_consumer(queue, inbox, limit, stages);
    }

    /// Consumes the dead-letter intake with `handler`, recognising duplicates by `dedup_key`.
    /// It takes whatever the broker delivered, whatever its size (refusing a dead letter would
    /// push it out of the store), decodes nothing, and injects no faults.
    pub fn consume_dead_letters<H: Handler>(
        &self,
        queue: QueueNames,
        handler: H,
        dedup_key: DedupKey,
        stages: &mut Stages,
    ) {
        let inbox = self
            .inbox(&queue, handler, stages)
            .with_dedup_key(dedup_key);
        self.spawn_consumer(queue, inbox, usize::MAX, stages);
    }

    fn inbox<H: Handler>(&self, queue: &QueueNames, handler: H, stages: &Stages) -> Inbox<H> {
        Inbox::new(
            self.database.clone(),
            self.outbox.clone(),
            queue.work.clone(),
            Arc::new(handler),
        )
        .with_shutdown(stages.token(Stage::Intake))
    }

    fn spawn_consumer<H: Handler>(
        &self,
        queue: QueueNames,
        inbox: Inbox<H>,
        max_message_bytes: usize,
        stages: &mut Stages,
    ) {
        let pause = Pause::default();
        self.metrics.probe(pause::probe(
            self.service.service_name(),
            queue.work.clone(),
            pause.clone(),
            self.broker.clone(),
        ));
        let inbox = inbox.with_pause(pause.clone());
        let settings = ConsumerSettings {
            queue,
            service: self.service,
            policy: self.settings.retry,
            prefetch: self.settings.prefetch,
            max_message_bytes,
            refuse_park: (!self.faults.is_empty()).then(|| {
                let faults = self.faults.clone();
                ParkFault(Arc::new(move || faults.refuse_park()))
            }),
            pause,
        };
        let consumer = Consumer::new(
            self.broker.clone(),
            self.publisher.clone(),
            settings,
            Arc::new(inbox),
            self.metrics.clone(),
        );
        stages.spawn(Stage::Intake, |stop| consumer.run(stop));
    }
}
