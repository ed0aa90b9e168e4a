//! Logging and tracing: a `tracing` subscriber that writes human or JSON lines to stderr
//! (filtered by `RUST_LOG`, each line carrying its trace and span id) and exports spans over
//! OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; W3C trace context and baggage are
//! propagated through gRPC metadata and AMQP headers either way.
//!
//! Standard variables are honoured: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (resource),
//! `OTEL_TRACES_SAMPLER(_ARG)` (sampling), `OTEL_BSP_*` (batching). Export runs on the SDK's
//! own thread with a bounded queue: a slow or absent collector costs dropped spans, never latency.

pub mod export;
mod format;

use std::io::IsTerminal as _;

use anyhow::Context as _;
use opentelemetry::{global, propagation::TextMapCompositePropagator, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::{Sampler, SdkTracerProvider},
};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::Targets, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use self::export::ServiceRouter;
use crate::service::Service;

/// Default filter when `RUST_LOG` is unset: lifecycle events, one line per message handled or
/// published (`orderflow::message`), warnings from everything else. lapin is silenced: every
/// error it logs also reaches orderflow as a result, which is logged once with context.
pub const DEFAULT_FILTER: &str = "warn,lapin=off,orderflow_server=info,orderflow=info";

/// How long an OTLP export may take before it is abandoned.
const EXPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What telemetry needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter (`RUST_LOG` syntax); [`DEFAULT_FILTER`] when `None`.
    pub log_filter: Option<String>,
    /// OTLP/gRPC collector, e.g. `http://localhost:4317`; no export when `None`.
    pub otlp_endpoint: Option<String>,
    /// `OTEL_SERVICE_NAME`, if set.
    pub service_name: Option<String>,
    /// The services this process runs.
    pub services: Vec<Service>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the tracer provider; [`Telemetry::shutdown`] flushes what is still queued.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports queued spans and stops the exporter. Blocks: call from a blocking thread.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("warning: flushing traces at shutdown failed: {error}");
        }
    }
}

/// Installs the global propagator, tracer provider and subscriber. Call once, inside the Tokio
/// runtime (the OTLP exporter's connection lives on it).
pub fn init(settings: &Settings) -> anyhow::Result<Telemetry> {
    global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    let provider = provider(settings)?;
    global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("orderflow-server");

    let log_filter = match &settings.log_filter {
        Some(filter) => EnvFilter::try_new(filter).context("invalid log filter")?,
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        }
    };
    // Spans are exported independently of the log filter (RUST_LOG=warn must not break traces),
    // and only orderflow's own: library internals would drown the saga.
    let trace_filter = Targets::new().with_target("orderflow_server", Level::INFO);
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Busy/idle timings on every poll of every span cost more than they tell.
        .with_tracked_inactivity(false)
        .with_error_records_to_exceptions(true)
        .with_filter(trace_filter);
    let logs = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .event_format(format::Text)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(format::Json)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(traces)
        .with(logs.with_filter(log_filter))
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(Telemetry { provider })
}

/// Marks `span` failed and records the error as an OpenTelemetry `exception` event.
pub fn record_error(span: &tracing::Span, kind: &str, error: &dyn std::fmt::Display) {
    span.set_status(opentelemetry::trace::Status::error(error.to_string()));
    record_exception(span, kind, error);
}

/// Records an error as an OpenTelemetry `exception` event on `span`, leaving its status alone:
/// for an error the span's own work recovers from, such as a failed attempt being retried.
pub fn record_exception(span: &tracing::Span, kind: &str, error: &dyn std::fmt::Display) {
    span.add_event(
        "exception",
        vec![
            opentelemetry::KeyValue::new("exception.type", kind.to_owned()),
            opentelemetry::KeyValue::new("exception.message", error.to_string()),
        ],
    );
}

fn provider(settings: &Settings) -> anyhow::Result<SdkTracerProvider> {
    // Resource::builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let builder = SdkTracerProvider::builder().with_resource(Resource::builder().build());
    let Some(endpoint) = &settings.otlp_endpoint else {
        // Nothing exports, so nothing is recorded: spans still get ids (log lines carry them,
        // and `traceparent` propagates through gRPC and the broker), but no span data is built.
        return Ok(builder.with_sampler(Sampler::AlwaysOff).build());
    };
    let single = settings.services.len() == 1 && settings.service_name.is_some();
    let default_name = settings
        .service_name
        .clone()
        .unwrap_or_else(|| "orderflow-server".to_owned());
    let names = std::iter::once(default_name)
        .chain(Service::ALL.iter().map(|s| s.service_name().to_owned()));
    let mut routes = Vec::new();
    for name in names {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .context("building the OTLP exporter")?;
        routes.push((name, exporter));
    }
    Ok(builder
        .with_batch_exporter(ServiceRouter::new(routes, single))
        .build())
}
