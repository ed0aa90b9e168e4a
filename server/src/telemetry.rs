//! Logging and tracing setup: a `tracing` subscriber writing human or JSON lines to stderr,
//! filtered by `RUST_LOG`, and the W3C trace-context propagator that carries traces through
//! gRPC metadata and AMQP headers.

use anyhow::Context as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::config::LogFormat;

/// Default filter when `RUST_LOG` is unset: lifecycle events of orderflow, warnings elsewhere.
const DEFAULT_FILTER: &str = "warn,orderflow_server=info";

/// Installs the global subscriber and propagator. Call once, inside the Tokio runtime.
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    }
    .context("installing the tracing subscriber")
}
