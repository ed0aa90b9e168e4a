//! Assembling one `orderflow-server` process from its configuration: which services run,
//! their databases, broker connections, consumers, outbox relays, the gRPC server and the
//! metrics endpoint.
//!
//! Shutdown runs in stages so nothing in flight is lost: stop intake (gRPC calls and watch
//! streams end, consumers finish and settle their batch), then drain the outboxes, then close
//! the broker connections.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use sqlx::AnyPool;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::{
    api::{self, DeadLetterApi, OrderApi, Security, auth::Tokens},
    bus::{
        Broker, Consumer, ConsumerSettings, ParkFault, Publisher, RetryPolicy, Topology,
        topology::{Declare, QueueNames, Source},
    },
    config::{Config, DeclareTopology},
    db::{self, Database, Location},
    fault::Faults,
    health::{self, Dependencies},
    inbox::{DedupKey, Handler, Inbox},
    inventory::{catalog, handler::InventoryHandler},
    metrics::{self, Metrics},
    order::{
        self,
        dead_letters::DeadLetterStore,
        handler::{DeadLetterHandler, SagaHandler},
        watch::Hub,
    },
    outbox::{Outbox, relay::Relay},
    payment::{handler::PaymentHandler, provider::Provider},
    service::Service,
};

/// A configured process, ready to run.
#[derive(Debug)]
pub struct App {
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    pools: BTreeMap<Service, Database>,
    security: Security,
    catalog: Vec<catalog::Entry>,
    metrics: Metrics,
}

type Tasks = JoinSet<anyhow::Result<()>>;

impl App {
    /// Opens the databases, loads the catalog and binds the ports: everything that can fail
    /// because of configuration fails here, before any connection to the broker.
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
            let location = match &config.database_url {
                Some(url) => Location::Postgres {
                    url: url.expose(),
                    schema: db::schema_name(&config.namespace, service),
                },
                None => Location::File(&config.data_dir),
            };
            pools.insert(
                service,
                Database::open(&location, config.db_sync, service).await?,
            );
        }
        let security = security(&config)?;
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {}", config.grpc_addr))?;
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the metrics address {addr}"))?,
            ),
            None => None,
        };
        Ok(App {
            config,
            listener,
            metrics_listener,
            pools,
            security,
            catalog,
            metrics: Metrics::default(),
        })
    }

    /// The bound gRPC address (useful when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.grpc_addr)
    }

    /// The bound metrics address, if metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Runs until `shutdown` fires or a component fails, then shuts down in stages.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            config,
            listener,
            metrics_listener,
            pools,
            security,
            catalog,
            metrics,
        } = self;
        let grpc_addr = listener.local_addr()?;
        let topology = Topology::new(
            config.namespace.clone(),
            config.retry_max_attempts.saturating_sub(1),
            config.delivery_limit,
        );
        let mut stages = Stages::default();
        let mut dependencies = Vec::new();
        let mut order_api = None;
        let mut dead_letter_api = None;

        for (service, database) in pools {
            let wiring = Wiring::start(
                service,
                database,
                &config,
                &security,
                &topology,
                &metrics,
                &mut stages,
            );
            dependencies.push(wiring.dependencies.clone());
            match service {
                Service::Order => {
                    let hub = Hub::default();
                    for queue in topology.queues_of(service) {
                        let intake = stages.intake.clone();
                        if queue.subscription.source == Source::DeadLetters {
                            let work_queues =
                                topology.all_queues().into_iter().map(|q| q.work).collect();
                            let handler =
                                DeadLetterHandler::new(hub.clone(), metrics.clone(), work_queues);
                            let consumer =
                                wiring.consumer(queue, handler, Some(DeadLetterHandler::dedup_key));
                            stages.intake_tasks.spawn(consumer.run(intake));
                        } else {
                            let handler = SagaHandler::new(hub.clone(), metrics.clone());
                            stages
                                .intake_tasks
                                .spawn(wiring.consumer(queue, handler, None).run(intake));
                        }
                    }
                    stages.intake_tasks.spawn(
                        hub.clone()
                            .follow(wiring.database.clone(), stages.intake.clone()),
                    );
                    let (placements, writer) = order::placement::writer(
                        wiring.database.clone(),
                        wiring.outbox.clone(),
                        hub.clone(),
                    );
                    stages.intake_tasks.spawn(writer.run(stages.intake.clone()));
                    order_api = Some(OrderApi::new(
                        wiring.database.pool().clone(),
                        placements,
                        hub,
                        stages.streams.clone(),
                        stages.intake.clone(),
                        config.max_watch_streams,
                        metrics.clone(),
                    ));
                    let store =
                        DeadLetterStore::new(wiring.database.clone(), wiring.outbox.clone());
                    metrics.probe(dead_letter_depths(store.clone(), topology.clone()));
                    dead_letter_api = Some(DeadLetterApi::new(store, topology.clone()));
                }
                Service::Inventory => {
                    let added = catalog::seed(&wiring.database, &catalog)
                        .await
                        .context("seeding the catalog")?;
                    info!(skus = catalog.len(), added, "Catalog loaded.");
                    for queue in topology.queues_of(service) {
                        let handler = InventoryHandler::new(wiring.faults.clone());
                        stages.intake_tasks.spawn(
                            wiring
                                .consumer(queue, handler, None)
                                .run(stages.intake.clone()),
                        );
                    }
                }
                Service::Payment => {
                    let provider = Provider::new(config.payment_limit_cents);
                    for queue in topology.queues_of(service) {
                        let handler = PaymentHandler::new(provider, wiring.faults.clone());
                        stages.intake_tasks.spawn(
                            wiring
                                .consumer(queue, handler, None)
                                .run(stages.intake.clone()),
                        );
                    }
                }
            }
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        // tonic-health starts the server-wide status at SERVING; a probe answered before the
        // first broker connection would be told a lie.
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let serves_orders = order_api.is_some();
        stages.intake_tasks.spawn(health::report(
            health,
            dependencies,
            serves_orders,
            stages.intake.clone(),
        ));
        stages.intake_tasks.spawn(api::serve(
            listener,
            order_api,
            dead_letter_api,
            health_service,
            security,
            stages.intake.clone(),
        ));
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = metrics_listener {
            stages.intake_tasks.spawn(metrics::serve(
                listener,
                metrics.clone(),
                stages.intake.clone(),
            ));
        }
        info!(
            grpc.addr = %grpc_addr,
            metrics.addr = ?metrics_addr,
            services = ?config.services,
            namespace = %config.namespace,
            broker.url = %config.amqp_url,
            data_dir = %config.data_dir.display(),
            "orderflow-server started."
        );
        stages.run_until_stopped(shutdown).await
    }
}

/// The tasks of one process, grouped by the shutdown stage that stops them.
#[derive(Default)]
struct Stages {
    intake: CancellationToken,
    relay_stop: CancellationToken,
    broker_stop: CancellationToken,
    intake_tasks: Tasks,
    relay_tasks: Tasks,
    broker_tasks: Tasks,
    streams: TaskTracker,
}

impl Stages {
    /// Waits for `shutdown` (or the first component to stop, which is a failure), then stops
    /// intake, drains the outboxes and closes the connections, in that order.
    async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let failure = tokio::select! {
            _ = shutdown.cancelled() => None,
            Some(result) = self.intake_tasks.join_next() => Some(unexpected_exit(result)),
            Some(result) = self.relay_tasks.join_next() => Some(unexpected_exit(result)),
            Some(result) = self.broker_tasks.join_next() => Some(unexpected_exit(result)),
        };
        if let Some(error) = &failure {
            error!(error = %format!("{error:#}"), "A component stopped; shutting down.");
        }
        info!("Shutting down: finishing in-flight work.");
        self.intake.cancel();
        drain(&mut self.intake_tasks).await;
        self.streams.close();
        self.streams.wait().await;
        info!("Intake stopped; draining the outboxes.");
        self.relay_stop.cancel();
        drain(&mut self.relay_tasks).await;
        info!("Outboxes drained; closing the broker connections.");
        self.broker_stop.cancel();
        drain(&mut self.broker_tasks).await;
        info!("Shutdown complete.");
        failure.map_or(Ok(()), Err)
    }
}

/// Reads the TLS identity and the token file, and warns loudly if the API is open.
fn security(config: &Config) -> anyhow::Result<Security> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some((
            std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        )),
        _ => None,
    };
    let tokens = config
        .auth_tokens
        .as_deref()
        .map(Tokens::load)
        .transpose()?
        .map(Arc::new);
    if tokens.is_none() && config.services.contains(&Service::Order) {
        warn!(
            "NO AUTHENTICATION: anyone who can reach {} may place orders, read every customer's orders and \
             replay or purge dead letters. Set ORDERFLOW_AUTH_TOKENS (see README, Security).",
            config.grpc_addr
        );
    }
    if tls.is_none() && !config.grpc_addr.ip().is_loopback() {
        warn!(grpc.addr = %config.grpc_addr, "gRPC is served in plaintext on a non-loopback address; set ORDERFLOW_TLS_CERT and ORDERFLOW_TLS_KEY.");
    }
    let amqp_ca_cert = match &config.amqp_ca_cert {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    Ok(Security {
        tls,
        tokens,
        amqp_ca_cert,
        max_request_bytes: config.max_request_bytes,
        max_streams_per_connection: config.max_streams_per_connection,
    })
}

/// What one service needs to consume its queues: its connection, publisher, outbox and
/// database. Starting it starts the connection supervisor and the outbox relay.
struct Wiring {
    broker: Broker,
    publisher: Arc<Publisher>,
    outbox: Outbox,
    database: Database,
    service: Service,
    policy: RetryPolicy,
    prefetch: u16,
    max_message_bytes: usize,
    faults: Faults,
    metrics: Metrics,
    dependencies: Dependencies,
    intake: CancellationToken,
}

impl Wiring {
    fn start(
        service: Service,
        database: Database,
        config: &Config,
        security: &Security,
        topology: &Topology,
        metrics: &Metrics,
        stages: &mut Stages,
    ) -> Wiring {
        let name = format!(
            "orderflow {} ({})",
            service.service_name(),
            config.namespace
        );
        let declare = match config.declare_topology {
            DeclareTopology::All => Declare::All,
            DeclareTopology::Verify => Declare::Verify(service),
        };
        let broker = Broker::new(config.amqp_url.clone(), name, topology.clone(), declare)
            .with_ca_cert(security.amqp_ca_cert.clone())
            .with_management_url(config.management_url.clone());
        stages
            .broker_tasks
            .spawn(broker.clone().run(stages.broker_stop.clone()));
        let publisher = Arc::new(Publisher::new(broker.clone()));
        let outbox = Outbox::new(service);
        let relay = Relay::new(
            database.clone(),
            outbox.clone(),
            publisher.clone(),
            topology,
            config.outbox_policy(),
            metrics.clone(),
        );
        stages
            .relay_tasks
            .spawn(relay.run(stages.relay_stop.clone()));
        metrics.probe(outbox_backlog(service, database.pool().clone()));
        let (database_up, watch_database) =
            health::watch_database(service, database.clone(), stages.intake.clone());
        stages.intake_tasks.spawn(watch_database);
        let dependencies = Dependencies {
            service,
            broker: broker.clone(),
            database_up,
        };
        metrics.probe(health::probe(dependencies.clone()));
        let faults = Faults::for_service(&config.faults, service);
        if !faults.is_empty() {
            warn!(service = service.service_name(), faults = ?config.faults, "Fault injection is ON.");
        }
        Wiring {
            broker,
            publisher,
            outbox,
            database,
            service,
            policy: config.retry_policy(),
            prefetch: config.prefetch,
            max_message_bytes: config.max_message_bytes,
            faults,
            metrics: metrics.clone(),
            dependencies,
            intake: stages.intake.clone(),
        }
    }

    fn consumer<H: Handler>(
        &self,
        queue: QueueNames,
        handler: H,
        dedup_key: Option<DedupKey>,
    ) -> Consumer<Inbox<H>> {
        let mut inbox = Inbox::new(
            self.database.clone(),
            self.outbox.clone(),
            queue.work.clone(),
            Arc::new(handler),
        )
        .with_faults(self.faults.clone())
        .with_shutdown(self.intake.clone());
        if let Some(key) = dedup_key {
            inbox = inbox.with_dedup_key(key);
        }
        // The size limit spares handlers from decoding absurd bodies. The dead-letter intake
        // decodes nothing, and refusing a dead letter would push it out of the store: it takes
        // whatever the broker delivered.
        let max_message_bytes = match queue.subscription.source {
            Source::DeadLetters => usize::MAX,
            Source::Events => self.max_message_bytes,
        };
        let settings = ConsumerSettings {
            queue,
            service: self.service,
            policy: self.policy,
            prefetch: self.prefetch,
            max_message_bytes,
            refuse_park: (!self.faults.is_empty()).then(|| {
                let faults = self.faults.clone();
                ParkFault(Arc::new(move || faults.refuse_park()))
            }),
        };
        Consumer::new(
            self.broker.clone(),
            self.publisher.clone(),
            settings,
            Arc::new(inbox),
            self.metrics.clone(),
        )
    }
}

/// Outbox rows not yet published, read at scrape time.
fn outbox_backlog(service: Service, pool: AnyPool) -> metrics::Probe {
    Box::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            // Bounded: with the database gone the pool waits for a connection far longer
            // than a scrape may take, and the other readings (database_up first) must still
            // come through.
            let backlog = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                sqlx::query_as::<_, (i64,)>("SELECT COUNT(*) FROM outbox").fetch_one(&pool),
            )
            .await;
            match backlog {
                Ok(Ok((n,))) => vec![(
                    "orderflow_outbox_backlog",
                    "Events committed but not yet confirmed by the broker.",
                    vec![("service", service.service_name().to_owned())],
                    n as f64,
                )],
                Ok(Err(_)) | Err(_) => vec![],
            }
        })
    })
}

/// Dead letters kept per source, read from the store at scrape time (no broker involved, so a
/// resource alarm does not hold it up).
fn dead_letter_depths(store: DeadLetterStore, topology: Topology) -> metrics::Probe {
    Box::new(move || {
        let (store, topology) = (store.clone(), topology.clone());
        Box::pin(async move {
            // Bounded, like the outbox backlog: a database outage must not hold up the scrape.
            let read = tokio::time::timeout(std::time::Duration::from_secs(2), store.depths());
            let Ok(Ok(mut depths)) = read.await else {
                return vec![];
            };
            // Every known source, empty ones too, so a dashboard sees zero rather than nothing.
            for source in order::dead_letters::sources(&topology) {
                depths.entry(source.name).or_insert(0);
            }
            depths
                .into_iter()
                .map(|(source, depth)| {
                    (
                        "orderflow_dlq_depth",
                        "Dead letters kept, per work queue (or outbox) they failed in.",
                        vec![("queue", format!("{source}.dlq"))],
                        depth as f64,
                    )
                })
                .collect()
        })
    })
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
