//! Composing one `orderflow-server` process from its configuration: open the databases of the
//! services it names, start each service on its own endpoint (`order::start`, ...), and serve
//! the gRPC API and the metrics endpoint over them. Each service wires itself; this only
//! chooses which ones run, and [`Stages`] stops them in order.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    api::{self, DeadLetterApi, OrderApi, Security, auth::Tokens},
    config::Config,
    db::{self, Database, Location},
    endpoint::{self, Endpoint},
    health, inventory,
    metrics::{self, Metrics},
    order,
    payment::{self, provider::Provider},
    service::Service,
    shutdown::{Stage, Stages},
};

/// A configured process, ready to run.
#[derive(Debug)]
pub struct App {
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    databases: BTreeMap<Service, Database>,
    security: Security,
    endpoint: endpoint::Settings,
    catalog: Vec<inventory::catalog::Entry>,
}

impl App {
    /// Opens the databases, loads the catalog and binds the ports: everything that can fail
    /// because of configuration fails here, before any connection to the broker.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        config
            .validate()
            .map_err(|problems| anyhow::anyhow!(problems.join("\n")))?;
        let services = config.service_set();
        let catalog = if services.contains(&Service::Inventory) {
            inventory::catalog::load(config.catalog.as_deref())?
        } else {
            Vec::new()
        };
        let mut databases = BTreeMap::new();
        for service in services {
            let location = match &config.database_url {
                Some(url) => Location::Postgres {
                    url: url.expose(),
                    schema: db::schema_name(&config.namespace, service),
                },
                None => Location::File(&config.data_dir),
            };
            databases.insert(
                service,
                Database::open(&location, config.db_sync, service).await?,
            );
        }
        let security = security(&config)?;
        let ca_cert = read_optional(config.amqp_ca_cert.as_deref())?;
        let endpoint = config.endpoint(ca_cert);
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
            databases,
            security,
            endpoint,
            catalog,
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
            databases,
            security,
            endpoint,
            catalog,
        } = self;
        let grpc_addr = listener.local_addr()?;
        let metrics = Metrics::default();
        let topology = config.topology();
        let mut stages = Stages::default();
        let mut dependencies = Vec::new();
        let mut orders = None;
        for (service, database) in databases {
            let endpoint = Endpoint::start(
                service,
                database,
                &endpoint,
                &topology,
                &metrics,
                &mut stages,
            );
            dependencies.push(endpoint.dependencies());
            match service {
                Service::Order => orders = Some(order::start(&endpoint, &mut stages)),
                Service::Inventory => inventory::start(&endpoint, &mut stages, &catalog).await?,
                Service::Payment => payment::start(
                    &endpoint,
                    &mut stages,
                    Provider::new(config.payment_limit_cents),
                ),
            }
        }

        let (ready, follow) = health::readiness(dependencies, stages.token(Stage::Intake));
        stages.spawn(Stage::Intake, |_| follow);
        let apis = orders.map(|order| {
            let order_api = OrderApi::new(
                order.database.pool().clone(),
                order.placements,
                order.hub,
                stages.streams(),
                stages.token(Stage::Intake),
                config.max_watch_streams,
                metrics.clone(),
            );
            (order_api, DeadLetterApi::new(order.dead_letters, topology))
        });
        let grpc_metrics = metrics.clone();
        stages.spawn(Stage::Intake, |stop| {
            api::serve(listener, apis, ready, security, grpc_metrics, stop)
        });
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = metrics_listener {
            stages.spawn(Stage::Intake, |stop| {
                metrics::serve(listener, metrics.clone(), stop)
            });
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
    Ok(Security {
        tls,
        tokens,
        max_request_bytes: config.max_request_bytes,
        max_streams_per_connection: config.max_streams_per_connection,
    })
}

fn read_optional(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    path.map(|path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    })
    .transpose()
}
