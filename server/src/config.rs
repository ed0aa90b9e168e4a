//! Command-line and environment configuration of `orderflow-server`.
//!
//! Every setting is a flag and an environment variable (clap `env`), so `--help` documents the
//! whole surface and docker-compose only sets variables. Everything is parsed and checked before
//! anything connects; `main` exits with 64 (EX_USAGE) listing every bad setting at once.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::{
    bus::{AmqpUrl, RetryPolicy, Topology, management::ManagementUrl},
    db::{DatabaseUrl, DbSync},
    service::Service,
    telemetry::LogFormat,
};

/// Settings of one `orderflow-server` process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "orderflow-server",
    version,
    about = "orderflow's Order, Inventory and Payment services"
)]
pub struct Config {
    /// Services to run in this process, comma-separated. Run each in its own process to scale
    /// them independently; several processes may run the same service side by side.
    #[arg(
        long,
        env = "ORDERFLOW_SERVICES",
        value_delimiter = ',',
        default_value = "order,inventory,payment"
    )]
    pub services: Vec<Service>,

    /// RabbitMQ URL, or several separated by commas (the nodes of a cluster: a service
    /// connects to the first that answers and fails over to the others). The password is
    /// never logged.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_default_value = false,
        hide_env_values = true
    )]
    pub amqp_url: AmqpUrl,

    /// Prefix of every exchange and queue name, so deployments (or tests) sharing a broker never
    /// see each other's messages. Letters, digits, `-` and `_`.
    #[arg(long, env = "ORDERFLOW_NAMESPACE", default_value = "orderflow")]
    pub namespace: String,

    /// Address of the gRPC server: health and reflection in every process, plus
    /// `OrderService` and `DeadLetters` where the order service runs.
    #[arg(long, env = "ORDERFLOW_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// PostgreSQL for the services' state instead of SQLite files, e.g.
    /// `postgres://orderflow@db/orderflow`: each service gets its own schema
    /// (`<namespace>_<service>`), and several instances of a service can share it.
    #[arg(long, env = "ORDERFLOW_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,

    /// Directory of the services' SQLite databases (`order.db`, `inventory.db`, `payment.db`).
    #[arg(long, env = "ORDERFLOW_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// JSON catalog that seeds Inventory's stock (see README); a demo catalog when unset.
    #[arg(long, env = "ORDERFLOW_CATALOG")]
    pub catalog: Option<PathBuf>,

    /// Payment declines orders whose total exceeds this many cents.
    #[arg(long, env = "ORDERFLOW_PAYMENT_LIMIT_CENTS", default_value_t = 100_000)]
    pub payment_limit_cents: i64,

    /// Unacknowledged deliveries each consumer may hold (AMQP prefetch). Also the largest batch
    /// one database transaction handles.
    #[arg(long, env = "ORDERFLOW_PREFETCH", default_value_t = 50)]
    pub prefetch: u16,

    /// Attempts a message gets (first delivery included) before it is dead-lettered.
    #[arg(long, env = "ORDERFLOW_RETRY_MAX_ATTEMPTS", default_value_t = 5)]
    pub retry_max_attempts: u32,

    /// Delay before the first retry; each further retry doubles it (with ±20% jitter).
    #[arg(long, env = "ORDERFLOW_RETRY_INITIAL_DELAY", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub retry_initial_delay: Duration,

    /// Upper bound of a retry delay.
    #[arg(long, env = "ORDERFLOW_RETRY_MAX_DELAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_max_delay: Duration,

    /// Publishes of one outbox event the broker may refuse (unroutable: no queue bound for its
    /// routing key; or nacked) before the event is parked in the dead-letter queue. Later
    /// events keep flowing meanwhile. With the default delays, 15 attempts span about five
    /// minutes: long enough to ride out a binding missing during a deploy, short enough that
    /// an order stuck behind a real mistake is FAILED and visible soon.
    #[arg(long, env = "ORDERFLOW_OUTBOX_MAX_ATTEMPTS", default_value_t = 15)]
    pub outbox_max_attempts: u32,

    /// Delay before an outbox event the broker refused is published again; each further
    /// refusal doubles it (with ±20% jitter). A broker outage does not count as a refusal.
    #[arg(long, env = "ORDERFLOW_OUTBOX_INITIAL_DELAY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub outbox_initial_delay: Duration,

    /// Upper bound of an outbox retry delay: also the longest an event waits once its route
    /// is back.
    #[arg(long, env = "ORDERFLOW_OUTBOX_MAX_DELAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub outbox_max_delay: Duration,

    /// How many times the broker redelivers a message that was never acknowledged (e.g. the
    /// process crashed while handling it) before dead-lettering it.
    #[arg(long, env = "ORDERFLOW_DELIVERY_LIMIT", default_value_t = 20)]
    pub delivery_limit: u32,

    /// SQLite durability: `full` syncs every commit to disk (survives power loss); `normal`
    /// survives process crashes only and is faster.
    #[arg(long, env = "ORDERFLOW_DB_SYNC", value_enum, default_value_t = DbSync::Full)]
    pub db_sync: DbSync,

    /// How long a graceful shutdown may take before the process exits anyway.
    #[arg(long, env = "ORDERFLOW_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// `all`: declare every exchange and queue of the namespace on connect (needs `configure`
    /// permission); `verify`: declare nothing, check that what this service uses exists with
    /// the right types, arguments and bindings (through the management API; exits with 78,
    /// EX_CONFIG, listing every difference), for pre-declared topologies and least-privilege
    /// users (docker-compose).
    #[arg(long, env = "ORDERFLOW_DECLARE_TOPOLOGY", value_enum, default_value_t = DeclareTopology::All)]
    pub declare_topology: DeclareTopology,

    /// RabbitMQ management HTTP API that `--declare-topology verify` reads, e.g.
    /// `http://rabbitmq:15672`. Default: port 15672 (15671 for `amqps://`) on the host of the
    /// AMQP node connected to. Its credentials, else the AMQP URL's, need the `management` tag;
    /// the vhost is the AMQP URL's. The password is never logged.
    #[arg(long, env = "ORDERFLOW_MANAGEMENT_URL", hide_env_values = true)]
    pub management_url: Option<ManagementUrl>,

    /// Fault injection for tests and demos, e.g. `payment:transient:2` (see README). Off by default.
    #[arg(long, env = "ORDERFLOW_FAULTS", value_delimiter = ',')]
    pub faults: Vec<crate::fault::Rule>,

    /// TLS certificate chain (PEM) of the gRPC server. With `--tls-key`, the server speaks TLS
    /// only; without both, plaintext (local use).
    #[arg(long, env = "ORDERFLOW_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) for `--tls-cert`.
    #[arg(long, env = "ORDERFLOW_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// JSON file of bearer tokens and their roles (see README, Security). Without it anyone who
    /// reaches the port may call every API.
    #[arg(long, env = "ORDERFLOW_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// Largest gRPC request message accepted, in bytes.
    #[arg(long, env = "ORDERFLOW_MAX_REQUEST_BYTES", default_value_t = 64 * 1024)]
    pub max_request_bytes: usize,

    /// Concurrent calls (HTTP/2 streams) per client connection.
    #[arg(
        long,
        env = "ORDERFLOW_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_streams_per_connection: u32,

    /// CA certificate (PEM) to trust for `amqps://` broker URLs, in addition to the system's.
    #[arg(long, env = "ORDERFLOW_AMQP_CA_CERT")]
    pub amqp_ca_cert: Option<PathBuf>,

    /// Deliveries larger than this many bytes are refused to the dead-letter queue unread.
    #[arg(long, env = "ORDERFLOW_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Most concurrent `WatchOrder` streams this server serves.
    #[arg(long, env = "ORDERFLOW_MAX_WATCH_STREAMS", default_value_t = crate::api::DEFAULT_MAX_WATCHES)]
    pub max_watch_streams: usize,

    /// Serve Prometheus metrics on `http://<addr>/metrics` (e.g. `127.0.0.1:9464`). Off when unset.
    #[arg(long, env = "ORDERFLOW_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// OTLP/gRPC collector for traces (e.g. Jaeger's `http://localhost:4317`); traces are not
    /// exported when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Service name reported to the collector when this process runs a single service. In the
    /// all-in-one process each service reports under its own name regardless.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,

    /// Log format on stderr.
    #[arg(long, env = "ORDERFLOW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How services prepare the broker topology (see `--declare-topology`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeclareTopology {
    /// Declare everything.
    All,
    /// Check only.
    Verify,
}

impl Config {
    /// Checks what clap's types cannot express. Returns every problem, not just the first.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Some(url) = &self.database_url
            && !(url.expose().starts_with("postgres://")
                || url.expose().starts_with("postgresql://"))
        {
            problems.push(format!(
                "--database-url {url}: expected postgres://user@host/database"
            ));
        }
        if let Some(problem) = self.amqp_url.problem() {
            problems.push(format!(
                "--amqp-url {}: {problem}",
                self.amqp_url.redacted()
            ));
        }
        if let Some(url) = &self.management_url {
            let parsed = url::Url::parse(url.expose());
            if !parsed.is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host()) {
                problems.push(format!(
                    "--management-url {url}: expected http(s)://[user:password@]host[:port]"
                ));
            }
        }
        if self.services.is_empty() {
            problems.push("--services: name at least one of order, inventory, payment".to_owned());
        }
        let valid_namespace = !self.namespace.is_empty()
            && self.namespace.len() <= 64
            && self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_namespace {
            problems.push(format!(
                "--namespace `{}`: use 1-64 letters, digits, `-` or `_`",
                self.namespace
            ));
        }
        if self.payment_limit_cents < 0 {
            problems.push("--payment-limit-cents: must not be negative".to_owned());
        }
        if self.prefetch == 0 {
            problems.push("--prefetch: must be at least 1".to_owned());
        }
        if self.retry_max_attempts == 0 || self.retry_max_attempts > 20 {
            problems.push("--retry-max-attempts: must be between 1 and 20".to_owned());
        }
        if self.retry_initial_delay.is_zero() || self.retry_initial_delay > self.retry_max_delay {
            problems.push(
                "--retry-initial-delay: must be above zero and at most --retry-max-delay"
                    .to_owned(),
            );
        }
        if self.outbox_max_attempts == 0 || self.outbox_max_attempts > 100 {
            problems.push("--outbox-max-attempts: must be between 1 and 100".to_owned());
        }
        if self.outbox_initial_delay.is_zero() || self.outbox_initial_delay > self.outbox_max_delay
        {
            problems.push(
                "--outbox-initial-delay: must be above zero and at most --outbox-max-delay"
                    .to_owned(),
            );
        }
        for (flag, path) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--auth-tokens", &self.auth_tokens),
            ("--amqp-ca-cert", &self.amqp_ca_cert),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                problems.push(format!("{flag} {}: no such file", path.display()));
            }
        }
        if self.max_request_bytes < 1024 {
            problems.push("--max-request-bytes: must be at least 1024".to_owned());
        }
        if self.max_message_bytes < 1024 {
            problems.push("--max-message-bytes: must be at least 1024".to_owned());
        }
        if self.delivery_limit == 0 {
            problems.push("--delivery-limit: must be at least 1".to_owned());
        }
        if let Some(catalog) = &self.catalog
            && !catalog.is_file()
        {
            problems.push(format!("--catalog {}: no such file", catalog.display()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The distinct services to run, in saga order.
    pub fn service_set(&self) -> BTreeSet<Service> {
        self.services.iter().copied().collect()
    }

    /// What telemetry needs from the configuration.
    pub fn telemetry(&self) -> crate::telemetry::Settings {
        crate::telemetry::Settings {
            log_format: self.log_format,
            log_filter: None,
            otlp_endpoint: self.otlp_endpoint.clone(),
            service_name: self.otel_service_name.clone(),
            services: self.service_set().into_iter().collect(),
        }
    }

    /// How every service endpoint of this process connects and consumes; `ca_cert` is the
    /// content of `--amqp-ca-cert`.
    pub fn endpoint(&self, ca_cert: Option<String>) -> crate::endpoint::Settings {
        crate::endpoint::Settings {
            amqp_url: self.amqp_url.clone(),
            ca_cert,
            management_url: self.management_url.clone(),
            verify_topology: self.declare_topology == DeclareTopology::Verify,
            retry: self.retry_policy(),
            outbox: self.outbox_policy(),
            prefetch: self.prefetch,
            max_message_bytes: self.max_message_bytes,
            faults: self.faults.clone(),
        }
    }

    /// The namespace's exchanges and queues.
    pub fn topology(&self) -> Topology {
        Topology::new(
            self.namespace.clone(),
            self.retry_max_attempts.saturating_sub(1),
            self.delivery_limit,
        )
    }

    /// The retry policy every consumer of this process applies.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.retry_max_attempts,
            initial_delay: self.retry_initial_delay,
            max_delay: self.retry_max_delay,
        }
    }

    /// How the outbox relays retry events the broker refused, and when they give up.
    pub fn outbox_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.outbox_max_attempts,
            initial_delay: self.outbox_initial_delay,
            max_delay: self.outbox_max_delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("orderflow-server").chain(args.iter().copied()))
    }

    #[test]
    fn malformed_url_is_refused_without_echoing_it() {
        let cfg = parse(&["--amqp-url", "amqp://svc:hunter2@localhost:notaport/%2f"]).unwrap();
        let problems = cfg.validate().unwrap_err().join("\n");
        assert!(problems.contains("malformed AMQP URL"), "{problems}");
        assert!(
            problems.contains("amqp://svc:***@localhost:notaport/%2f"),
            "{problems}"
        );
        assert!(!problems.contains("hunter2"), "{problems}");
        assert!(
            parse(&["--amqp-url", "http://x"])
                .unwrap()
                .validate()
                .is_err()
        );
    }

    #[test]
    fn reports_every_problem_at_once() {
        let cfg = parse(&[
            "--namespace",
            "bad name",
            "--prefetch",
            "0",
            "--retry-max-attempts",
            "0",
        ])
        .unwrap();
        let problems = cfg.validate().unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = parse(&[]).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.service_set().len(), 3);
        assert_eq!(cfg.namespace, "orderflow");
    }

    #[test]
    fn services_subset() {
        let cfg = parse(&["--services", "inventory,payment,payment"]).unwrap();
        assert_eq!(
            cfg.service_set().into_iter().collect::<Vec<_>>(),
            vec![Service::Inventory, Service::Payment]
        );
    }
}
