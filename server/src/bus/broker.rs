//! A supervised connection to RabbitMQ. lapin does not reconnect for us, so [`Broker::run`]
//! connects with backoff and jitter, declares the namespace's topology, publishes the live
//! [`Link`] to everyone who waits for one, and starts over when the connection dies.
//! Consumers and publishers never hold a connection across a reconnect: they ask for the
//! current link and treat any channel error as "ask again". It also follows the broker's
//! `connection.blocked` notices (a resource alarm holding every publisher) for health.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use backon::ExponentialBuilder;
use futures_util::StreamExt as _;
use lapin::{Channel, Connection, ConnectionProperties, Event, uri::AMQPUri};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    AmqpUrl, Topology,
    management::{Management, ManagementUrl},
    retry::nth_delay,
    topology::Declare,
};

/// Heartbeat asked of the broker when the URL does not set one, so a silently dead peer (a
/// network blip, a paused VM) is noticed within seconds rather than RabbitMQ's default minute.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Bound on one connection attempt, handshake and topology declaration included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Reconnect delays: `d = 200ms * 2^(n-1)`, at most 5 s, drawn from `[d/2, d]` so many
/// restarting services do not reconnect in lockstep. backon's jitter draws from `[d', 2d')`,
/// hence the halved bounds.
const RECONNECT: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_millis(2500))
    .with_jitter();
/// How long a shutdown waits for the broker to confirm a connection close before dropping it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// One live connection. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    connection: Arc<Connection>,
    generation: u64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Opens a channel on this connection.
    pub async fn channel(&self) -> lapin::Result<Channel> {
        self.connection.create_channel().await
    }

    /// Increases by one with every successful (re)connection.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// Handle to a supervised connection; clone it freely.
#[derive(Clone, Debug)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    url: AmqpUrl,
    connection_name: String,
    topology: Topology,
    declare: Declare,
    ca_cert: Option<String>,
    management_url: Option<ManagementUrl>,
    link: watch::Sender<Option<Link>>,
    /// Whether the broker has blocked the current connection (resource alarm).
    blocked: watch::Sender<bool>,
    broken: Notify,
}

impl Broker {
    /// A broker handle; nothing connects until [`Broker::run`].
    pub fn new(
        url: AmqpUrl,
        connection_name: impl Into<String>,
        topology: Topology,
        declare: Declare,
    ) -> Self {
        Broker {
            inner: Arc::new(Inner {
                url,
                connection_name: connection_name.into(),
                topology,
                declare,
                ca_cert: None,
                management_url: None,
                link: watch::Sender::new(None),
                blocked: watch::Sender::new(false),
                broken: Notify::new(),
            }),
        }
    }

    /// Trusts `ca_cert` (PEM) for `amqps://` URLs, in addition to the system's roots.
    pub fn with_ca_cert(self, ca_cert: Option<String>) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).expect("configured before it is shared");
        inner.ca_cert = ca_cert;
        Broker {
            inner: Arc::new(inner),
        }
    }

    /// Reads the topology through `url` for `Declare::Verify` instead of the management API
    /// on the connected node's host (see [`Management::new`]).
    pub fn with_management_url(self, url: Option<ManagementUrl>) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).expect("configured before it is shared");
        inner.management_url = url;
        Broker {
            inner: Arc::new(inner),
        }
    }

    /// The topology this broker declares on every connection.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Waits for a live connection. `None` once `shutdown` fires.
    pub async fn link(&self, shutdown: &CancellationToken) -> Option<Link> {
        let mut rx = self.inner.link.subscribe();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            link = rx.wait_for(Option::is_some) => link.ok().and_then(|l| l.clone()),
        }
    }

    /// The current link, without waiting.
    pub fn current(&self) -> Option<Link> {
        self.inner.link.borrow().clone()
    }

    /// Follows connection state changes (`Some` while connected), e.g. for health reporting.
    pub fn subscribe(&self) -> watch::Receiver<Option<Link>> {
        self.inner.link.subscribe()
    }

    /// Follows whether the broker blocks this connection's publishes (`true` during a memory
    /// or disk alarm): the connection is up, yet nothing published gets through.
    pub fn subscribe_blocked(&self) -> watch::Receiver<bool> {
        self.inner.blocked.subscribe()
    }

    /// Whether the broker blocks this connection's publishes right now.
    pub fn blocked(&self) -> bool {
        *self.inner.blocked.borrow()
    }

    /// Tells the supervisor that `link` failed in a way only a new connection fixes.
    pub fn report_broken(&self, link: &Link) {
        if self
            .current()
            .is_some_and(|current| current.generation == link.generation)
        {
            self.inner.broken.notify_one();
        }
    }

    /// Keeps a connection up until `shutdown`, then closes it. Returns `Ok` on shutdown, and an
    /// error only for what retrying cannot fix ([`super::is_configuration_error`]): a verified
    /// topology that differs from the spec, or a management API that refuses the user.
    ///
    /// With several broker URLs (a cluster), each attempt tries the nodes in turn, starting
    /// after the one last connected to, so losing a node moves the connection to the next.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let nodes = self.inner.url.nodes();
        let mut next = 0usize;
        let mut failures = 0u32;
        let mut generation = 0u64;
        while !shutdown.is_cancelled() {
            let mut connected = None;
            let mut last_error = None;
            for offset in 0..nodes.len() {
                let index = (next + offset) % nodes.len();
                let attempt = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    result = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(&nodes[index])) => {
                        result.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {CONNECT_TIMEOUT:?}")))
                    }
                };
                match attempt {
                    Ok(connection) => {
                        connected = Some((index, connection));
                        break;
                    }
                    Err(error) if super::is_configuration_error(&error) => {
                        return Err(error.context(format!("RabbitMQ node {}", nodes[index])));
                    }
                    Err(error) => {
                        if nodes.len() > 1 {
                            warn!(broker.url = %nodes[index], error = %format!("{error:#}"), "Cannot use this RabbitMQ node; trying the next.");
                        }
                        last_error = Some(error);
                    }
                }
            }
            let (index, connection) = match (connected, last_error) {
                (Some(connected), _) => connected,
                (None, None) => break,
                (None, Some(error)) => {
                    failures += 1;
                    let delay = nth_delay(RECONNECT, failures);
                    warn!(
                        broker.url = %self.inner.url,
                        attempt = failures,
                        retry_in = ?delay,
                        error = %format!("{error:#}"),
                        hint = hint(&error),
                        "Cannot use RabbitMQ yet; retrying."
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            next = index + 1;
            failures = 0;
            generation += 1;
            let connection = Arc::new(connection);
            let mut events = connection.events_listener();
            self.inner.link.send_replace(Some(Link {
                connection: connection.clone(),
                generation,
            }));
            info!(
                broker.url = %nodes[index],
                connection = %self.inner.connection_name,
                generation,
                "Connected to RabbitMQ; topology ready."
            );

            let reason = tokio::select! {
                _ = shutdown.cancelled() => None,
                reason = wait_until_dead(&connection, &mut events, &self.inner.blocked) => Some(reason),
                _ = self.inner.broken.notified() => Some("a component reported the connection broken".to_owned()),
            };
            self.inner.link.send_replace(None);
            self.inner.blocked.send_replace(false);
            match reason {
                None => {
                    // By now the consumers and the relay are done: the close is a courtesy.
                    // A busy broker (seen with RabbitMQ 4 cancelling quorum-queue consumers
                    // under load) may take longer to answer it than the whole grace period;
                    // dropping the socket ends the connection just as well.
                    let close = connection.close(200, "shutting down".into());
                    match tokio::time::timeout(CLOSE_TIMEOUT, close).await {
                        Ok(Ok(())) => {}
                        // A consumer's channel still closing as the connection closes: the
                        // close goes through all the same, nothing to warn about.
                        Ok(Err(error)) if already_closing(&error) => {
                            debug!(error = %error, "Closed the RabbitMQ connection.")
                        }
                        Ok(Err(error)) => {
                            warn!(error = %error, "Closing the RabbitMQ connection failed.")
                        }
                        Err(_) => warn!(
                            timeout = ?CLOSE_TIMEOUT,
                            "RabbitMQ did not confirm the close in time; dropping the connection."
                        ),
                    }
                    break;
                }
                Some(reason) => {
                    warn!(reason = %reason, "Lost the RabbitMQ connection; reconnecting.");
                    // A connection that is merely degraded would otherwise linger.
                    let _ = connection.close(320, "reconnecting".into()).await;
                }
            }
        }
        self.inner.link.send_replace(None);
        Ok(())
    }

    async fn connect(&self, node: &AmqpUrl) -> anyhow::Result<Connection> {
        let mut uri: AMQPUri = node
            .expose()
            .parse()
            .map_err(|e| anyhow::anyhow!("malformed AMQP URL: {e}"))?;
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
        let properties = ConnectionProperties::default()
            .with_connection_name(self.inner.connection_name.clone().into());
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: self.inner.ca_cert.clone(),
        };
        let runtime = lapin::runtime::default_runtime().context("no async runtime")?;
        let connection = Connection::connect_uri_with_config(uri, properties, tls, runtime)
            .await
            .context("connecting")?;
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        match self.inner.declare {
            Declare::All(service) => {
                let topology = &self.inner.topology;
                topology
                    .declare(&channel)
                    .await
                    .context("declaring the topology")?;
                topology
                    .retire_legacy_dead_letter_queues(&connection, service)
                    .await;
            }
            Declare::Verify(service) => {
                let management = Management::new(
                    node,
                    self.inner.management_url.as_ref(),
                    self.inner.ca_cert.as_deref(),
                )?;
                management
                    .verify(&self.inner.topology, service)
                    .await
                    .context("checking the pre-declared topology")?;
            }
        }
        let _ = channel.close(200, "topology ready".into()).await;
        Ok(connection)
    }
}

/// What to check, given why connecting or preparing the topology failed.
fn hint(error: &anyhow::Error) -> &'static str {
    let text = format!("{error:#}");
    if text.contains("ACCESS_REFUSED") || text.contains("access refused") {
        "the broker refused this user: check the credentials in AMQP_URL and the user's permissions"
    } else if text.contains("management API") {
        "is the management plugin enabled (rabbitmq-plugins enable rabbitmq_management) and reachable? See ORDERFLOW_MANAGEMENT_URL"
    } else if text.contains("NOT_FOUND") {
        "the topology is not declared: load deploy/rabbitmq/definitions.json, or use --declare-topology all"
    } else if text.contains("PRECONDITION_FAILED") {
        "a queue exists with other arguments (e.g. another --delivery-limit): delete it or keep the old setting"
    } else {
        "is RabbitMQ running and reachable? Locally: rabbitmq-server -detached"
    }
}

/// Resolves when the connection reports an error or stops being connected; meanwhile keeps
/// `blocked` in step with the broker's `connection.blocked` / `unblocked` notices.
async fn wait_until_dead(
    connection: &Connection,
    events: &mut (impl futures_util::Stream<Item = Event> + Unpin),
    blocked: &watch::Sender<bool>,
) -> String {
    // Events are the fast path; the status poll catches a close that raised no event.
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Event::Error(error)) => return error.to_string(),
                Some(Event::ConnectionBlocked(reason)) => {
                    warn!(reason = %reason, "RabbitMQ blocks this connection's publishes.");
                    blocked.send_replace(true);
                }
                Some(Event::ConnectionUnblocked) => {
                    info!("RabbitMQ unblocked this connection.");
                    blocked.send_replace(false);
                }
                Some(_) => {}
                None => return "connection event stream ended".to_owned(),
            },
            _ = poll.tick() => {
                if !connection.status().connected() {
                    return "connection is no longer open".to_owned();
                }
            }
        }
    }
}

/// Whether `error` only says a channel was already on its way out.
fn already_closing(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Closing | lapin::ChannelState::Closed,
            _
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let first = nth_delay(RECONNECT, 1);
            assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
            let third = nth_delay(RECONNECT, 3);
            assert!(third >= Duration::from_millis(400) && third <= Duration::from_millis(800));
            let late = nth_delay(RECONNECT, 50);
            assert!(late >= Duration::from_millis(2500) && late <= Duration::from_secs(5));
        }
    }
}
