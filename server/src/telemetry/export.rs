//! Span export with one service name per orderflow service, even when all three run in one
//! process: spans carry a `service.name` attribute, and [`ServiceRouter`] sends each group to
//! an OTLP exporter whose resource has that name. Jaeger then shows order-service,
//! inventory-service and payment-service as separate services.
//!
//! Export failures never reach the data path (spans are exported from the SDK's own thread);
//! they are counted and logged once per outage instead of on every batch.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{SpanData, SpanExporter},
};
use tracing::warn;

/// Span attribute naming the service a span belongs to.
pub const SERVICE_NAME: Key = Key::from_static_str("service.name");

/// Spans lost because their export failed, since start.
pub static DROPPED_SPANS: AtomicU64 = AtomicU64::new(0);

/// Routes spans to per-service exporters by their `service.name` attribute.
#[derive(Debug)]
pub struct ServiceRouter<E> {
    /// Exporter per service name; index 0 takes every span of another (or no) name.
    routes: Vec<(String, E)>,
    /// When set, every span goes to `default` (a single-service process named by
    /// `OTEL_SERVICE_NAME`).
    single: bool,
    failing: AtomicBool,
}

impl<E: SpanExporter> ServiceRouter<E> {
    /// A router over `(service name, exporter)` pairs. The first pair takes spans of unknown
    /// or no service; with `single`, it takes every span.
    pub fn new(routes: Vec<(String, E)>, single: bool) -> Self {
        assert!(
            !routes.is_empty(),
            "a router needs at least its default route"
        );
        ServiceRouter {
            routes,
            single,
            failing: AtomicBool::new(false),
        }
    }

    /// Index into `routes` of the exporter for `span`.
    fn route(&self, span: &SpanData) -> usize {
        if self.single {
            return 0;
        }
        let Some(name) = span
            .attributes
            .iter()
            .find(|kv| kv.key == SERVICE_NAME)
            .map(|kv| kv.value.as_str())
        else {
            return 0;
        };
        self.routes
            .iter()
            .skip(1)
            .position(|(n, _)| *n == name)
            .map_or(0, |i| i + 1)
    }
}

impl<E: SpanExporter> SpanExporter for ServiceRouter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut groups: Vec<Vec<SpanData>> = self.routes.iter().map(|_| Vec::new()).collect();
        for span in batch {
            groups[self.route(&span)].push(span);
        }
        for ((_, exporter), spans) in self.routes.iter().zip(groups) {
            if spans.is_empty() {
                continue;
            }
            let count = spans.len() as u64;
            match exporter.export(spans).await {
                Ok(()) => {
                    if self.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(target: "orderflow::telemetry", "Trace export recovered.");
                    }
                }
                Err(error) => {
                    DROPPED_SPANS.fetch_add(count, Ordering::Relaxed);
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        warn!(
                            target: "orderflow::telemetry",
                            error = %error,
                            "Trace export failing; dropping spans until the collector is back."
                        );
                    }
                }
            }
        }
        // Failures are handled (counted, logged once); the SDK need not log them again.
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.routes
            .iter()
            .map(|(_, e)| e.shutdown_with_timeout(timeout))
            .fold(Ok(()), Result::and)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.routes
            .iter()
            .map(|(_, e)| e.force_flush())
            .fold(Ok(()), Result::and)
    }

    fn set_resource(&mut self, resource: &Resource) {
        for (name, exporter) in &mut self.routes {
            exporter.set_resource(&renamed(resource, name));
        }
    }
}

/// `resource` with its `service.name` replaced.
fn renamed(resource: &Resource, name: &str) -> Resource {
    Resource::builder_empty()
        .with_attributes(
            resource
                .iter()
                .filter(|(k, _)| **k != SERVICE_NAME)
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_service_name(name.to_owned())
        .build()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};

    use super::*;

    #[derive(Debug, Clone, Default)]
    struct Recorder {
        service: Arc<Mutex<String>>,
        got: Arc<Mutex<Vec<(String, String)>>>,
        fail: bool,
    }

    impl SpanExporter for Recorder {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.fail {
                return Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "down".into(),
                ));
            }
            let service = self.service.lock().unwrap().clone();
            self.got.lock().unwrap().extend(
                batch
                    .into_iter()
                    .map(|s| (service.clone(), s.name.to_string())),
            );
            Ok(())
        }

        fn set_resource(&mut self, resource: &Resource) {
            let name = resource
                .get(&SERVICE_NAME)
                .map(|v| v.to_string())
                .unwrap_or_default();
            self.service = Arc::new(Mutex::new(name));
        }
    }

    fn span(name: &'static str, service: Option<&'static str>) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(1),
                SpanId::from(1),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: name.into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: service
                .map(|s| KeyValue::new(SERVICE_NAME, s))
                .into_iter()
                .collect(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    #[tokio::test]
    async fn each_service_reports_under_its_own_name() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let recorder = || Recorder {
            got: got.clone(),
            ..Default::default()
        };
        let routes = ["orderflow-server", "order-service", "payment-service"]
            .map(|n| (n.to_owned(), recorder()));
        let mut router = ServiceRouter::new(routes.into(), false);
        router.set_resource(
            &Resource::builder_empty()
                .with_service_name("ignored")
                .build(),
        );
        router
            .export(vec![
                span("a", Some("order-service")),
                span("b", Some("payment-service")),
                span("c", None),
            ])
            .await
            .unwrap();
        let mut got = got.lock().unwrap().clone();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("order-service".into(), "a".into()),
                ("orderflow-server".into(), "c".into()),
                ("payment-service".into(), "b".into())
            ]
        );
    }

    #[tokio::test]
    async fn failures_are_counted_not_raised() {
        let router = ServiceRouter::new(
            vec![(
                "x".into(),
                Recorder {
                    fail: true,
                    ..Default::default()
                },
            )],
            true,
        );
        let before = DROPPED_SPANS.load(Ordering::Relaxed);
        router
            .export(vec![span("a", None), span("b", None)])
            .await
            .unwrap();
        assert!(DROPPED_SPANS.load(Ordering::Relaxed) >= before + 2);
    }
}
