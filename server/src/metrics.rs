//! Prometheus metrics: counters and histograms the services update as they work, gauges read
//! at scrape time (outbox backlog, dead-letter queue depth, broker connection), rendered in the
//! Prometheus text format on `GET /metrics` at `ORDERFLOW_METRICS_ADDR`.
//!
//! A handle is passed to every component that records (no global registry), and recording is a
//! short uncontended lock or an atomic add: cheap next to a broker round trip.

mod registry;
mod server;

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

pub use registry::{Histogram, LabelledCounters};
pub use server::serve;

/// A scrape-time reading: `(metric name, help, labels, value)` rows.
pub type Gauges = Vec<(&'static str, &'static str, Vec<(&'static str, String)>, f64)>;

/// Something read at scrape time, such as a queue depth.
pub type Probe = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Gauges> + Send>> + Send + Sync>;

/// Every metric of one process. Cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    orders_placed: LabelledCounters,
    orders_finished: LabelledCounters,
    published: LabelledCounters,
    consumed: LabelledCounters,
    retried: LabelledCounters,
    dead_lettered: LabelledCounters,
    outbox_retried: LabelledCounters,
    outbox_parked: LabelledCounters,
    handler_seconds: Mutex<BTreeMap<Vec<(&'static str, String)>, Histogram>>,
    saga_seconds: Histogram,
    probes: Mutex<Vec<Probe>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// An order was accepted (not an idempotent retry).
    pub fn order_placed(&self) {
        self.inner.orders_placed.add(vec![], 1);
    }

    /// An order reached `status` (`completed`, `rejected`, `payment_failed`, `failed`) after
    /// `saga` since it was placed.
    pub fn order_finished(&self, status: &'static str, saga: Duration) {
        self.inner
            .orders_finished
            .add(vec![("status", status.to_owned())], 1);
        if status != "failed" {
            self.inner.saga_seconds.observe(saga);
        }
    }

    /// `service` published an event of `kind`.
    pub fn published(&self, service: &'static str, kind: &str) {
        self.inner.published.add(labels(service, kind), 1);
    }

    /// `service` handled an event of `kind` in `took`.
    pub fn consumed(&self, service: &'static str, kind: &str, queue: &str, took: Duration) {
        self.inner.consumed.add(labels(service, kind), 1);
        let key = vec![("service", service.to_owned()), ("queue", queue.to_owned())];
        self.inner
            .handler_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .observe(took);
    }

    /// `service` scheduled a retry of an event of `kind`.
    pub fn retried(&self, service: &'static str, kind: &str) {
        self.inner.retried.add(labels(service, kind), 1);
    }

    /// `service` dead-lettered an event of `kind`.
    pub fn dead_lettered(&self, service: &'static str, kind: &str) {
        self.inner.dead_lettered.add(labels(service, kind), 1);
    }

    /// The broker refused `service`'s publish of an event of `kind`; it is retried later.
    pub fn outbox_retried(&self, service: &'static str, kind: &str) {
        self.inner.outbox_retried.add(labels(service, kind), 1);
    }

    /// `service` parked an outbox event of `kind` the broker kept refusing.
    pub fn outbox_parked(&self, service: &'static str, kind: &str) {
        self.inner.outbox_parked.add(labels(service, kind), 1);
    }

    /// Adds a reading taken at every scrape.
    pub fn probe(&self, probe: Probe) {
        self.inner
            .probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(probe);
    }

    /// Every metric in the Prometheus text exposition format.
    pub async fn render(&self) -> String {
        let i = &self.inner;
        let mut out = String::new();
        i.orders_placed.render(
            &mut out,
            "orderflow_orders_placed_total",
            "Orders accepted by PlaceOrder.",
        );
        i.orders_finished.render(
            &mut out,
            "orderflow_orders_finished_total",
            "Orders that reached a terminal status, by status.",
        );
        i.published.render(
            &mut out,
            "orderflow_events_published_total",
            "Events published (confirmed by the broker).",
        );
        i.consumed.render(
            &mut out,
            "orderflow_events_consumed_total",
            "Events handled successfully.",
        );
        i.retried.render(
            &mut out,
            "orderflow_events_retried_total",
            "Deliveries parked for a delayed retry.",
        );
        i.dead_lettered.render(
            &mut out,
            "orderflow_events_dead_lettered_total",
            "Deliveries moved to a dead-letter queue.",
        );
        i.outbox_retried.render(
            &mut out,
            "orderflow_outbox_retries_total",
            "Outbox publishes the broker refused (unroutable or nacked), to be retried.",
        );
        i.outbox_parked.render(
            &mut out,
            "orderflow_outbox_parked_total",
            "Outbox events the broker kept refusing, moved to the dead-letter queue.",
        );
        registry::render_histograms(
            &mut out,
            "orderflow_handler_duration_seconds",
            "Time to handle one delivery, database work included.",
            &i.handler_seconds.lock().unwrap_or_else(|e| e.into_inner()),
        );
        registry::render_histograms(
            &mut out,
            "orderflow_saga_duration_seconds",
            "Time from PlaceOrder to COMPLETED, REJECTED or PAYMENT_FAILED.",
            &BTreeMap::from([(vec![], i.saga_seconds.clone())]),
        );
        let dropped =
            crate::telemetry::export::DROPPED_SPANS.load(std::sync::atomic::Ordering::Relaxed);
        registry::render_rows(
            &mut out,
            &vec![(
                "orderflow_trace_spans_dropped_total",
                "Spans lost because the trace collector was unreachable.",
                vec![],
                dropped as f64,
            )],
            "counter",
        );
        let probes: Vec<_> = {
            let probes = i.probes.lock().unwrap_or_else(|e| e.into_inner());
            probes.iter().map(|p| p()).collect()
        };
        let mut gauges = Gauges::new();
        for probe in probes {
            gauges.extend(probe.await);
        }
        registry::render_rows(&mut out, &gauges, "gauge");
        out
    }
}

fn labels(service: &'static str, kind: &str) -> Vec<(&'static str, String)> {
    vec![("service", service.to_owned()), ("type", kind.to_owned())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_counters_histograms_and_probes() {
        let metrics = Metrics::default();
        metrics.order_placed();
        metrics.order_placed();
        metrics.order_finished("completed", Duration::from_millis(30));
        metrics.published("order-service", "orderflow.v1.OrderCreated");
        metrics.outbox_parked("inventory-service", "orderflow.v1.InventoryRejected");
        metrics.consumed(
            "inventory-service",
            "orderflow.v1.OrderCreated",
            "ns.inventory.order-created",
            Duration::from_millis(2),
        );
        metrics.probe(Box::new(|| {
            Box::pin(async {
                vec![(
                    "orderflow_outbox_backlog",
                    "Events waiting.",
                    vec![("service", "order-service".to_owned())],
                    3.0,
                )]
            })
        }));
        let text = metrics.render().await;
        assert!(text.contains("orderflow_orders_placed_total 2\n"), "{text}");
        assert!(
            text.contains("orderflow_orders_finished_total{status=\"completed\"} 1\n"),
            "{text}"
        );
        assert!(text.contains(
            "orderflow_events_published_total{service=\"order-service\",type=\"orderflow.v1.OrderCreated\"} 1\n"
        ));
        assert!(text.contains(
            "orderflow_outbox_parked_total{service=\"inventory-service\",type=\"orderflow.v1.InventoryRejected\"} 1\n"
        ));
        assert!(
            text.contains("orderflow_saga_duration_seconds_bucket{le=\"0.05\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("orderflow_saga_duration_seconds_count 1\n"));
        assert!(text.contains("# TYPE orderflow_handler_duration_seconds histogram\n"));
        assert!(
            text.contains("orderflow_outbox_backlog{service=\"order-service\"} 3\n"),
            "{text}"
        );
    }
}
