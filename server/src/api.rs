//! The gRPC server: `orderflow.v1.OrderService` and `orderflow.v1.DeadLetters` (where the order
//! service runs), the standard `grpc.health.v1.Health` service and server reflection, so
//! `grpcurl` works with no .proto files. This module and its children are the only place tonic
//! server types appear.

pub mod auth;
mod dead_letters;
mod error;
mod health;
mod message_limit;
mod red;
pub mod request;
mod response;
mod service;
mod status_stream;

use std::sync::Arc;

use anyhow::Context as _;
use opentelemetry::global;
use orderflow_proto::orderflow::v1::{
    dead_letters_server::DeadLettersServer, order_service_server::OrderServiceServer,
};
use sqlx::AnyPool;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming},
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use self::auth::{Api, Tokens};
pub use dead_letters::DeadLetterApi;
pub use error::{Error, Violation};

use crate::{
    metrics::Metrics,
    order::{placement::Placements, watch::Hub},
};

/// Default bound on concurrent `WatchOrder` streams per server.
pub const DEFAULT_MAX_WATCHES: usize = 10_000;

/// State behind `OrderService`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OrderApi {
    pool: AnyPool,
    placements: Placements,
    hub: Hub,
    streams: TaskTracker,
    shutdown: CancellationToken,
    watch_slots: Arc<Semaphore>,
    max_watches: usize,
    metrics: Metrics,
}

impl OrderApi {
    /// The API over the order database `pool`. Watch streams run on `streams` and end at
    /// `shutdown`.
    pub fn new(
        pool: AnyPool,
        placements: Placements,
        hub: Hub,
        streams: TaskTracker,
        shutdown: CancellationToken,
        max_watches: usize,
        metrics: Metrics,
    ) -> Self {
        OrderApi {
            pool,
            placements,
            hub,
            streams,
            shutdown,
            watch_slots: Arc::new(Semaphore::new(max_watches)),
            max_watches,
            metrics,
        }
    }
}

/// How the gRPC server protects itself.
#[derive(Debug, Clone)]
pub struct Security {
    /// TLS certificate chain and private key (PEM); plaintext when `None`.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Bearer tokens; anyone may call when `None`.
    pub tokens: Option<Arc<Tokens>>,
    /// Largest request message accepted, after decompression.
    pub max_request_bytes: usize,
    /// Concurrent HTTP/2 streams (calls) per client connection.
    pub max_streams_per_connection: u32,
}

/// Checks each call's bearer token for one API (or lets everyone in when none are configured).
#[derive(Debug, Clone)]
struct Guard {
    tokens: Option<Arc<Tokens>>,
    api: Api,
}

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        match &self.tokens {
            Some(tokens) => tokens.authorize(self.api, request),
            None => auth::open(request),
        }
    }
}

/// Serves gRPC on `listener` until `shutdown`: health (following `ready`) and reflection always
/// (no token needed), `OrderService` and `DeadLetters` when given (where the order service runs).
/// Every call is counted and timed in `metrics` (see [`red`]).
pub async fn serve(
    listener: TcpListener,
    apis: Option<(OrderApi, DeadLetterApi)>,
    ready: watch::Receiver<bool>,
    security: Security,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let serves_orders = apis.is_some();
    let (orders, dead_letters) = apis.unzip();
    let (reporter, health) = health::service().await;
    let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
    // grpcurl 1.8 speaks only v1alpha.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building reflection v1alpha")?;
    let guard = |api| Guard {
        tokens: security.tokens.clone(),
        api,
    };
    let limit = security.max_request_bytes;
    let orders = orders.map(|api| {
        InterceptedService::new(
            OrderServiceServer::new(api).max_decoding_message_size(limit),
            guard(Api::Orders),
        )
    });
    let dead_letters = dead_letters.map(|api| {
        InterceptedService::new(
            DeadLettersServer::new(api).max_decoding_message_size(limit),
            guard(Api::DeadLetters),
        )
    });
    let mut server = Server::builder();
    if let Some((cert, key)) = &security.tls {
        server = server
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .context("configuring TLS")?;
    }
    let server = server
        .max_concurrent_streams(Some(security.max_streams_per_connection))
        .layer(message_limit::MessageLimitLayer::new(limit))
        .trace_fn(request_span)
        .layer(red::RedLayer::new(metrics))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(orders)
        .add_optional_service(dead_letters)
        // Without TCP_NODELAY each small watch update can sit behind the client's delayed ACK
        // (~40 ms); tonic applies its own nodelay default only to listeners it binds itself.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        );
    let (served, ()) = tokio::join!(server, health::report(reporter, ready, serves_orders));
    served.context("gRPC server failed")
}

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(orderflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // The error detail types orderflow sends (google.rpc.BadRequest, ...), so grpcurl can
        // print their fields instead of raw bytes.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// The SERVER span of one call, continuing the caller's `traceparent` when there is one.
fn request_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        service.name = "order-service",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        order.id = tracing::field::Empty,
        customer.id = tracing::field::Empty,
    );
    let parent =
        global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
    let _ = span.set_parent(parent);
    span
}

struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
