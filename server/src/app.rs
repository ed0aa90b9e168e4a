//! Assembling one `orderflow-server` process from its configuration: which services run,
//! their databases, broker connections, consumers, outbox relays and the gRPC server.
//!
//! Shutdown runs in stages so nothing in flight is lost: stop intake (gRPC calls, watch
//! streams, consumers finish and settle their batch), then drain the outboxes, then close the
//! broker connections.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use sqlx::SqlitePool;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{error, info};

use crate::{
    api::{self, DeadLetterApi, OrderApi},
    bus::{
        Broker, Consumer, Publisher, Topology, dead_letters::DeadLetterQueues, topology::QueueNames,
    },
    config::Config,
    db,
    fault::Faults,
    inbox::{Handler, Inbox},
    inventory::{self, catalog, handler::InventoryHandler},
    order::{
        self,
        handler::{DeadLetterHandler, SagaHandler},
        watch::Hub,
    },
    outbox::{Outbox, relay::Relay},
    payment::{self, handler::PaymentHandler, provider::Provider},
    service::Service,
};

/// A configured process, ready to run.
#[derive(Debug)]
pub struct App {
    config: Config,
    listener: TcpListener,
    pools: BTreeMap<Service, SqlitePool>,
    catalog: Vec<catalog::Entry>,
}

type Tasks = JoinSet<anyhow::Result<()>>;

impl App {
    /// Opens the databases, loads the catalog and binds the gRPC port: everything that can
    /// fail because of configuration fails here, before any connection to the broker.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        config
            .validate()
            .map_err(|problems| anyhow::anyhow!(problems.join("\n")))?;
        let services = config.service_set();
        let catalog = if services.contains(&Service::Inventory) {
            catalog::load(config.catalog.as_deref())?
        } else {
            Vec::new()
        };
        let mut pools = BTreeMap::new();
        for service in services {
            let path = config.data_dir.join(format!("{}.db", service.as_str()));
            let migrator = match service {
                Service::Order => order::migrations(),
                Service::Inventory => inventory::migrations(),
                Service::Payment => payment::migrations(),
            };
            pools.insert(
                service,
                db::open(&path, config.db_sync, &[db::common_migrations(), migrator]).await?,
            );
        }
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {}", config.grpc_addr))?;
        Ok(App {
            config,
            listener,
            pools,
            catalog,
        })
    }

    /// The bound gRPC address (useful when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.grpc_addr)
    }

    /// The database of `service`, if it runs here.
    pub fn pool(&self, service: Service) -> Option<SqlitePool> {
        self.pools.get(&service).cloned()
    }

    /// Runs until `shutdown` fires or a component fails, then shuts down in stages.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            config,
            listener,
            pools,
            catalog,
        } = self;
        let grpc_addr = listener.local_addr()?;
        let topology = Topology::new(
            config.namespace.clone(),
            config.retry_max_attempts.saturating_sub(1),
            config.delivery_limit,
        );
        let policy = config.retry_policy();

        // Intake stops first; relays after it has; connections last.
        let intake = CancellationToken::new();
        let relay_stop = CancellationToken::new();
        let broker_stop = CancellationToken::new();
        let mut intake_tasks = Tasks::new();
        let mut relay_tasks = Tasks::new();
        let mut broker_tasks = Tasks::new();
        let streams = TaskTracker::new();
        let mut brokers = Vec::new();
        let mut order_api = None;
        let mut dead_letter_api = None;

        for (service, pool) in pools {
            let broker = Broker::new(
                config.amqp_url.clone(),
                format!(
                    "orderflow {} ({})",
                    service.service_name(),
                    config.namespace
                ),
                topology.clone(),
            );
            brokers.push(broker.clone());
            broker_tasks.spawn(broker.clone().run(broker_stop.clone()));
            let publisher = Arc::new(Publisher::new(broker.clone()));
            let outbox = Outbox::new(service);
            relay_tasks.spawn(
                Relay::new(pool.clone(), outbox.clone(), publisher.clone(), &topology)
                    .run(relay_stop.clone()),
            );
            let faults = Faults::for_service(&config.faults, service);
            let wiring = Wiring {
                broker,
                publisher,
                outbox: outbox.clone(),
                pool: pool.clone(),
                service,
                policy,
                prefetch: config.prefetch,
                faults: faults.clone(),
            };

            match service {
                Service::Order => {
                    let hub = Hub::default();
                    for queue in topology.queues_of(service) {
                        if queue.subscription.source == crate::bus::topology::Source::DeadLetters {
                            let handler = DeadLetterHandler::new(hub.clone());
                            intake_tasks.spawn(
                                wiring
                                    .consumer(queue, handler, Some(DeadLetterHandler::dedup_key))
                                    .run(intake.clone()),
                            );
                        } else {
                            intake_tasks.spawn(
                                wiring
                                    .consumer(queue, SagaHandler::new(hub.clone()), None)
                                    .run(intake.clone()),
                            );
                        }
                    }
                    intake_tasks.spawn(hub.clone().follow(pool.clone(), intake.clone()));
                    order_api = Some(OrderApi::new(
                        pool,
                        outbox,
                        hub,
                        streams.clone(),
                        intake.clone(),
                        config.max_watch_streams,
                    ));
                    dead_letter_api = Some(DeadLetterApi::new(
                        DeadLetterQueues::new(wiring.broker.clone()),
                        topology.clone(),
                    ));
                }
                Service::Inventory => {
                    let added = catalog::seed(&pool, &catalog)
                        .await
                        .context("seeding the catalog")?;
                    info!(skus = catalog.len(), added, "Catalog loaded.");
                    for queue in topology.queues_of(service) {
                        intake_tasks.spawn(
                            wiring
                                .consumer(queue, InventoryHandler::new(faults.clone()), None)
                                .run(intake.clone()),
                        );
                    }
                }
                Service::Payment => {
                    let provider = Provider::new(config.payment_limit_cents);
                    for queue in topology.queues_of(service) {
                        intake_tasks.spawn(
                            wiring
                                .consumer(
                                    queue,
                                    PaymentHandler::new(provider, faults.clone()),
                                    None,
                                )
                                .run(intake.clone()),
                        );
                    }
                }
            }
            if !faults.is_empty() {
                tracing::warn!(service = service.service_name(), faults = ?config.faults, "Fault injection is ON.");
            }
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        let serves_orders = order_api.is_some();
        intake_tasks.spawn(report_health(
            health,
            brokers,
            serves_orders,
            intake.clone(),
        ));
        intake_tasks.spawn(api::serve(
            listener,
            order_api,
            dead_letter_api,
            health_service,
            intake.clone(),
        ));
        info!(
            grpc.addr = %grpc_addr,
            services = ?config.services,
            namespace = %config.namespace,
            broker.url = %config.amqp_url,
            data_dir = %config.data_dir.display(),
            "orderflow-server started."
        );

        let failure = tokio::select! {
            _ = shutdown.cancelled() => None,
            Some(result) = intake_tasks.join_next() => Some(unexpected_exit(result)),
            Some(result) = relay_tasks.join_next() => Some(unexpected_exit(result)),
            Some(result) = broker_tasks.join_next() => Some(unexpected_exit(result)),
        };
        if let Some(error) = &failure {
            error!(error = %format!("{error:#}"), "A component stopped; shutting down.");
        }

        info!("Shutting down: finishing in-flight work.");
        intake.cancel();
        drain(&mut intake_tasks).await;
        streams.close();
        streams.wait().await;
        info!("Intake stopped; draining the outboxes.");
        relay_stop.cancel();
        drain(&mut relay_tasks).await;
        broker_stop.cancel();
        drain(&mut broker_tasks).await;
        info!("Shutdown complete.");
        failure.map_or(Ok(()), Err)
    }
}

/// What every service needs to consume its queues.
struct Wiring {
    broker: Broker,
    publisher: Arc<Publisher>,
    outbox: Outbox,
    pool: SqlitePool,
    service: Service,
    policy: crate::bus::RetryPolicy,
    prefetch: u16,
    faults: Faults,
}

impl Wiring {
    fn consumer<H: Handler>(
        &self,
        queue: QueueNames,
        handler: H,
        dedup_key: Option<crate::inbox::DedupKey>,
    ) -> Consumer<Inbox<H>> {
        let mut inbox = Inbox::new(
            self.pool.clone(),
            self.outbox.clone(),
            queue.work.clone(),
            Arc::new(handler),
        )
        .with_faults(self.faults.clone());
        if let Some(key) = dedup_key {
            inbox = inbox.with_dedup_key(key);
        }
        Consumer::new(
            self.broker.clone(),
            self.publisher.clone(),
            queue,
            self.service,
            self.policy,
            self.prefetch,
            Arc::new(inbox),
        )
    }
}

/// SERVING while every broker connection of this process is up, NOT_SERVING otherwise.
async fn report_health(
    health: HealthReporter,
    brokers: Vec<Broker>,
    serves_orders: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut watches: Vec<_> = brokers.iter().map(Broker::subscribe).collect();
    loop {
        let up = watches.iter_mut().all(|w| w.borrow_and_update().is_some());
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        if serves_orders {
            health
                .set_service_status("orderflow.v1.OrderService", status)
                .await;
        }
        let changed =
            futures_util::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        tokio::select! {
            _ = shutdown.cancelled() => {
                health.set_service_status("", ServingStatus::NotServing).await;
                return Ok(());
            }
            _ = changed => {}
        }
    }
}

fn unexpected_exit(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match result {
        Ok(Ok(())) => anyhow::anyhow!("a component exited before shutdown"),
        Ok(Err(error)) => error,
        Err(join) => anyhow::anyhow!("a component panicked: {join}"),
    }
}

async fn drain(tasks: &mut Tasks) {
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                error!(error = %format!("{error:#}"), "A component failed while stopping.")
            }
            Err(join) => error!(error = %join, "A component panicked while stopping."),
        }
    }
}
