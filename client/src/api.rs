//! The connection to the OrderService: connects eagerly so an unreachable server is reported
//! by address before any call, and bounds each unary call by the `--timeout` deadline.
//!
//! Streams are not bounded by that deadline: a watch legitimately lasts as long as the saga.

use std::{error::Error as StdError, fmt, future::Future, io, time::Duration};

use orderflow_proto::orderflow::v1 as pb;
use pb::{dead_letters_client::DeadLettersClient, order_service_client::OrderServiceClient};
use tonic::{
    Response, Status, Streaming,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_health::pb::health_client::HealthClient;

/// How often an idle HTTP/2 connection is pinged, so a long watch notices a vanished server
/// instead of waiting forever on a dead socket.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// The server could not be reached at all. Kept apart from [`Status`] because no call was
/// made, and the user needs the address to fix it.
#[derive(Debug)]
pub(crate) struct ConnectError {
    addr: String,
    cause: String,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot connect to {}: {}", self.addr, self.cause)
    }
}

impl StdError for ConnectError {}

impl ConnectError {
    fn new(addr: &str, cause: impl Into<String>) -> Self {
        Self {
            addr: addr.to_owned(),
            cause: cause.into(),
        }
    }

    /// tonic's own message is just "transport error"; the useful part (refused, DNS failure,
    /// timed out) is the innermost source.
    fn from_transport(addr: &str, err: &tonic::transport::Error) -> Self {
        let mut source: &(dyn StdError + 'static) = err;
        loop {
            if let Some(io) = source.downcast_ref::<io::Error>()
                && io.kind() == io::ErrorKind::ConnectionRefused
            {
                return Self::new(
                    addr,
                    "connection refused (is the orderflow server running?)",
                );
            }
            match source.source() {
                Some(next) => source = next,
                None => return Self::new(addr, source.to_string()),
            }
        }
    }
}

/// How to reach a secured server: a bearer token and a CA to trust for `https://`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Access {
    /// Sent as `authorization: Bearer <token>` with every call.
    pub(crate) token: Option<String>,
    /// PEM of a CA to trust besides the system's.
    pub(crate) tls_ca: Option<String>,
}

/// Adds the bearer token to every call.
#[derive(Debug, Clone)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authorized = InterceptedService<Channel, Bearer>;

/// The server's clients, bound to one connection and one deadline.
#[derive(Debug)]
pub(crate) struct Api {
    client: OrderServiceClient<Authorized>,
    dead_letters: DeadLettersClient<Authorized>,
    health: HealthClient<Channel>,
    addr: String,
    timeout: Duration,
}

impl Api {
    /// Connects to `addr` (already normalised to `http://…` or `https://…`), giving up after
    /// `timeout`.
    pub(crate) async fn connect(
        addr: &str,
        timeout: Duration,
        access: &Access,
    ) -> Result<Self, ConnectError> {
        let mut endpoint = Endpoint::from_shared(addr.to_owned())
            .map_err(|e| ConnectError::new(addr, e.to_string()))?
            .connect_timeout(timeout)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(timeout);
        if addr
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
        {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &access.tls_ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ConnectError::new(addr, e.to_string()))?;
        }
        let bearer = match &access.token {
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                ConnectError::new(addr, "the token has characters a header cannot carry")
            })?),
            None => None,
        };
        // connect_timeout bounds each TCP attempt but not the DNS lookup before it, so the
        // whole setup gets the deadline too.
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Ok(connected) => connected.map_err(|e| ConnectError::from_transport(addr, &e))?,
            Err(_) => {
                return Err(ConnectError::new(
                    addr,
                    format!(
                        "no connection within {}",
                        humantime::format_duration(timeout)
                    ),
                ));
            }
        };
        let bearer = Bearer(bearer);
        Ok(Self {
            client: OrderServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            dead_letters: DeadLettersClient::with_interceptor(channel.clone(), bearer),
            health: HealthClient::new(channel),
            addr: addr.to_owned(),
            timeout,
        })
    }

    /// grpc.health.v1 Check for `service` ("" for the whole server).
    pub(crate) async fn health(&mut self, service: String) -> Result<i32, Status> {
        let request = tonic_health::pb::HealthCheckRequest { service };
        within(self.timeout, &self.addr, self.health.check(request))
            .await
            .map(|r| r.status)
    }

    /// Every dead-letter queue with its depth.
    pub(crate) async fn dead_letter_queues(
        &mut self,
    ) -> Result<pb::ListDeadLetterQueuesResponse, Status> {
        within(
            self.timeout,
            &self.addr,
            self.dead_letters
                .list_queues(pb::ListDeadLetterQueuesRequest {}),
        )
        .await
    }

    /// Up to `limit` dead letters of `queue`.
    pub(crate) async fn dead_letters(
        &mut self,
        queue: String,
        limit: u32,
    ) -> Result<pb::ListDeadLettersResponse, Status> {
        let request = pb::ListDeadLettersRequest { queue, limit };
        within(
            self.timeout,
            &self.addr,
            self.dead_letters.list_dead_letters(request),
        )
        .await
    }

    /// One dead letter.
    pub(crate) async fn dead_letter(
        &mut self,
        queue: String,
        message_id: String,
    ) -> Result<pb::DeadLetter, Status> {
        let request = pb::GetDeadLetterRequest { queue, message_id };
        within(
            self.timeout,
            &self.addr,
            self.dead_letters.get_dead_letter(request),
        )
        .await
    }

    /// Replays the selected dead letters.
    pub(crate) async fn replay(
        &mut self,
        request: pb::ReplayRequest,
    ) -> Result<pb::ReplayResponse, Status> {
        within(self.timeout, &self.addr, self.dead_letters.replay(request)).await
    }

    /// Purges the selected dead letters.
    pub(crate) async fn purge(
        &mut self,
        request: pb::PurgeRequest,
    ) -> Result<pb::PurgeResponse, Status> {
        within(self.timeout, &self.addr, self.dead_letters.purge(request)).await
    }

    pub(crate) async fn place_order(
        &mut self,
        request: pb::PlaceOrderRequest,
    ) -> Result<pb::Order, Status> {
        within(self.timeout, &self.addr, self.client.place_order(request)).await
    }

    pub(crate) async fn get_order(&mut self, order_id: String) -> Result<pb::Order, Status> {
        let request = pb::GetOrderRequest { order_id };
        within(self.timeout, &self.addr, self.client.get_order(request)).await
    }

    pub(crate) async fn list_orders(
        &mut self,
        request: pb::ListOrdersRequest,
    ) -> Result<pb::ListOrdersResponse, Status> {
        within(self.timeout, &self.addr, self.client.list_orders(request)).await
    }

    /// Opens the watch stream. Only the opening is bounded by the deadline; the updates come
    /// whenever the saga moves.
    pub(crate) async fn watch_order(
        &mut self,
        order_id: String,
        resume_after_version: Option<u64>,
    ) -> Result<Streaming<pb::OrderUpdate>, Status> {
        let request = pb::WatchOrderRequest {
            order_id,
            resume_after_version,
        };
        within(self.timeout, &self.addr, self.client.watch_order(request)).await
    }
}

/// Runs `call` under the deadline. The deadline is enforced here rather than sent as
/// `grpc-timeout`, because tonic reports its own expiry of that header as CANCELLED
/// "Timeout expired", which reads like someone aborted the call. Dropping the call on
/// expiry resets the HTTP/2 stream, so the server still learns the client gave up.
async fn within<T>(
    timeout: Duration,
    addr: &str,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer from {addr} within {}",
            humantime::format_duration(timeout)
        ))),
    }
}
