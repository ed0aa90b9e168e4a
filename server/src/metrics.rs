//! Prometheus metrics: counters and histograms the services update as they work, gauges read
//! at scrape time (outbox backlog, dead-letter queue depth, broker connection), rendered in the
//! Prometheus text format on `GET /metrics` at `ORDERFLOW_METRICS_ADDR`.
//!
//! A handle is passed to every component that records (no global registry); prometheus-client
//! keeps the values, and recording is an atomic add behind a read lock on the label map.

mod scrape;
mod server;

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Metric, Registry},
};

pub use server::serve;

/// A scrape-time reading: `(metric name, help, labels, value)` rows.
pub type Gauges = Vec<(&'static str, &'static str, Vec<(&'static str, String)>, f64)>;

/// Something read at scrape time, such as a queue depth.
pub type Probe = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Gauges> + Send>> + Send + Sync>;

/// Upper bounds of histogram buckets, in seconds: 0.5 ms to 30 s.
const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds of the batch-size buckets, in deliveries: one alone up to a prefetch of 500.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

/// Labels of the per-event counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabels {
    service: &'static str,
    r#type: String,
}

/// Labels of the handler duration histogram.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandlerLabels {
    service: &'static str,
    queue: String,
}

/// Labels of the per-event outcome counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    service: &'static str,
    r#type: String,
    outcome: &'static str,
}

/// One gRPC method, labelled as go-grpc-prometheus labels it: `grpc_type` is `unary`,
/// `server_stream`, `client_stream` or `bidi_stream`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Rpc {
    /// How the method streams.
    pub grpc_type: &'static str,
    /// The fully qualified service, e.g. `orderflow.v1.OrderService`.
    pub grpc_service: String,
    /// The method, e.g. `PlaceOrder`.
    pub grpc_method: String,
}

/// An [`Rpc`] and the status code it ended with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcCodeLabels {
    #[prometheus(flatten)]
    rpc: Rpc,
    grpc_code: &'static str,
}

/// How the handling of one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handled, its effects committed.
    Ok,
    /// Already handled before (a redelivery or a republished copy): acknowledged, nothing applied.
    Duplicate,
    /// Failed; parked for a delayed retry.
    Retried,
    /// Failed for good; moved to the dead-letter queue.
    DeadLettered,
}

impl Outcome {
    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Duplicate => "duplicate",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

/// Labels of the finished-orders counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

type Events = Family<EventLabels, Counter>;
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn histograms<L: Clone + Eq + std::hash::Hash>() -> Histograms<L> {
    Family::new_with_constructor(|| Histogram::new(BUCKETS))
}

/// Every metric of one process. Cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    /// Everything below, registered once; the probes are read per scrape.
    registry: Registry,
    orders_placed: Counter,
    orders_finished: Family<StatusLabels, Counter>,
    published: Events,
    consumed: Events,
    retried: Events,
    dead_lettered: Events,
    outbox_retried: Events,
    outbox_parked: Events,
    handler_seconds: Histograms<HandlerLabels>,
    batch_size: Histograms<HandlerLabels>,
    events_handled: Family<OutcomeLabels, Counter>,
    event_seconds: Histograms<EventLabels>,
    rpc_started: Family<Rpc, Counter>,
    rpc_handled: Family<RpcCodeLabels, Counter>,
    rpc_seconds: Histograms<Rpc>,
    saga_seconds: Histogram,
    probes: Mutex<Vec<Probe>>,
}

impl Default for Inner {
    fn default() -> Self {
        // Counters are registered without `_total`, which the encoder appends to the samples'
        // and the family's name; help texts without their full stop, which it adds.
        let mut r = Registry::default();
        Self {
            orders_placed: register(
                &mut r,
                "orderflow_orders_placed",
                "Orders accepted by PlaceOrder",
                Counter::default(),
            ),
            orders_finished: register(
                &mut r,
                "orderflow_orders_finished",
                "Orders that reached a terminal status, by status",
                Family::default(),
            ),
            published: register(
                &mut r,
                "orderflow_events_published",
                "Events published (confirmed by the broker)",
                Events::default(),
            ),
            consumed: register(
                &mut r,
                "orderflow_events_consumed",
                "Events handled successfully",
                Events::default(),
            ),
            retried: register(
                &mut r,
                "orderflow_events_retried",
                "Deliveries parked for a delayed retry",
                Events::default(),
            ),
            dead_lettered: register(
                &mut r,
                "orderflow_events_dead_lettered",
                "Deliveries moved to a dead-letter queue",
                Events::default(),
            ),
            outbox_retried: register(
                &mut r,
                "orderflow_outbox_retries",
                "Outbox publishes the broker refused (unroutable or nacked), to be retried",
                Events::default(),
            ),
            outbox_parked: register(
                &mut r,
                "orderflow_outbox_parked",
                "Outbox events the broker kept refusing, moved to the dead-letter queue",
                Events::default(),
            ),
            handler_seconds: register(
                &mut r,
                "orderflow_handler_duration_seconds",
                "Time to handle one delivery, database work included",
                histograms(),
            ),
            batch_size: register(
                &mut r,
                "orderflow_consumer_batch_size",
                "Deliveries a consumer handled in one database transaction; _sum over _count is the mean batch",
                Family::new_with_constructor(|| Histogram::new(BATCH_BUCKETS)),
            ),
            events_handled: register(
                &mut r,
                "orderflow_events_handled",
                "Deliveries settled, by event type and outcome (ok, duplicate, retried, dead_lettered)",
                Family::default(),
            ),
            event_seconds: register(
                &mut r,
                "orderflow_event_handling_seconds",
                "Time from receiving a delivery to settling it, by event type, whatever the outcome",
                histograms(),
            ),
            rpc_started: register(
                &mut r,
                "orderflow_grpc_server_started",
                "gRPC calls started on the server",
                Family::default(),
            ),
            rpc_handled: register(
                &mut r,
                "orderflow_grpc_server_handled",
                "gRPC calls completed on the server, by status code (CANCELLED when the client went away first)",
                Family::default(),
            ),
            rpc_seconds: register(
                &mut r,
                "orderflow_grpc_server_handling_seconds",
                "Time from a gRPC call's arrival to its status; for streams, the stream's lifetime",
                histograms(),
            ),
            saga_seconds: register(
                &mut r,
                "orderflow_saga_duration_seconds",
                "Time from PlaceOrder to COMPLETED, REJECTED or PAYMENT_FAILED",
                Histogram::new(BUCKETS),
            ),
            probes: Mutex::default(),
            registry: {
                r.register_collector(Box::new(scrape::DroppedSpans));
                r
            },
        }
    }
}

/// Registers `metric` under `name` and hands it back for recording.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// An order was accepted (not an idempotent retry).
    pub fn order_placed(&self) {
        self.inner.orders_placed.inc();
    }

    /// An order reached `status` (`completed`, `rejected`, `payment_failed`, `failed`) after
    /// `saga` since it was placed.
    pub fn order_finished(&self, status: &'static str, saga: Duration) {
        self.inner
            .orders_finished
            .get_or_create(&StatusLabels { status })
            .inc();
        if status != "failed" {
            self.inner.saga_seconds.observe(saga.as_secs_f64());
        }
    }

    /// `service` published an event of `kind`.
    pub fn published(&self, service: &'static str, kind: &str) {
        count(&self.inner.published, service, kind);
    }

    /// `service` handled an event of `kind` from `queue`, `took` after receiving it; `duplicate`
    /// when it had been handled before and nothing was applied.
    pub fn consumed(
        &self,
        service: &'static str,
        kind: &str,
        queue: &str,
        took: Duration,
        duplicate: bool,
    ) {
        count(&self.inner.consumed, service, kind);
        let labels = HandlerLabels {
            service,
            queue: queue.to_owned(),
        };
        self.inner
            .handler_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        let outcome = if duplicate {
            Outcome::Duplicate
        } else {
            Outcome::Ok
        };
        self.handled(service, kind, outcome, took);
    }

    /// A consumer of `service` took `size` deliveries from `queue` into one transaction. Its
    /// batches grow with the backlog up to the prefetch, so the mean says whether a larger
    /// prefetch could spread each commit over more deliveries.
    pub fn batch_taken(&self, service: &'static str, queue: &str, size: usize) {
        let labels = HandlerLabels {
            service,
            queue: queue.to_owned(),
        };
        self.inner
            .batch_size
            .get_or_create(&labels)
            .observe(size as f64);
    }

    /// `service` scheduled a retry of an event of `kind`, `took` after receiving it.
    pub fn retried(&self, service: &'static str, kind: &str, took: Duration) {
        count(&self.inner.retried, service, kind);
        self.handled(service, kind, Outcome::Retried, took);
    }

    /// `service` dead-lettered an event of `kind`, `took` after receiving it.
    pub fn dead_lettered(&self, service: &'static str, kind: &str, took: Duration) {
        count(&self.inner.dead_lettered, service, kind);
        self.handled(service, kind, Outcome::DeadLettered, took);
    }

    fn handled(&self, service: &'static str, kind: &str, outcome: Outcome, took: Duration) {
        let labels = OutcomeLabels {
            service,
            r#type: kind.to_owned(),
            outcome: outcome.as_str(),
        };
        self.inner.events_handled.get_or_create(&labels).inc();
        let labels = EventLabels {
            service,
            r#type: labels.r#type,
        };
        self.inner
            .event_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A gRPC call of `rpc` arrived.
    pub fn rpc_started(&self, rpc: &Rpc) {
        self.inner.rpc_started.get_or_create(rpc).inc();
    }

    /// A gRPC call of `rpc` ended with `code` (`OK`, `INVALID_ARGUMENT`, ...) `took` after it
    /// arrived.
    pub fn rpc_handled(&self, rpc: &Rpc, code: &'static str, took: Duration) {
        let labels = RpcCodeLabels {
            rpc: rpc.clone(),
            grpc_code: code,
        };
        self.inner.rpc_handled.get_or_create(&labels).inc();
        self.inner
            .rpc_seconds
            .get_or_create(rpc)
            .observe(took.as_secs_f64());
    }

    /// The broker refused `service`'s publish of an event of `kind`; it is retried later.
    pub fn outbox_retried(&self, service: &'static str, kind: &str) {
        count(&self.inner.outbox_retried, service, kind);
    }

    /// `service` parked an outbox event of `kind` the broker kept refusing.
    pub fn outbox_parked(&self, service: &'static str, kind: &str) {
        count(&self.inner.outbox_parked, service, kind);
    }

    /// Adds a reading taken at every scrape.
    pub fn probe(&self, probe: Probe) {
        self.inner
            .probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(probe);
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4). Fails only if
    /// prometheus-client cannot encode a value.
    pub async fn render(&self) -> Result<String, std::fmt::Error> {
        let probes: Vec<_> = {
            let probes = self.inner.probes.lock().unwrap_or_else(|e| e.into_inner());
            probes.iter().map(|p| p()).collect()
        };
        let mut gauges = Gauges::new();
        for probe in probes {
            gauges.extend(probe.await);
        }
        // The probes are async (a database query, the management API), and a collector is
        // not: they are read first, then encoded from a registry that lives for this scrape.
        let mut readings = Registry::default();
        readings.register_collector(Box::new(scrape::Readings(gauges)));
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.inner.registry)?;
        prometheus_text::encode(&mut out, &readings)?;
        Ok(out)
    }
}

fn count(family: &Events, service: &'static str, kind: &str) {
    let labels = EventLabels {
        service,
        r#type: kind.to_owned(),
    };
    family.get_or_create(&labels).inc();
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
            false,
        );
        metrics.consumed(
            "inventory-service",
            "orderflow.v1.OrderCreated",
            "ns.inventory.order-created",
            Duration::from_millis(2),
            true,
        );
        metrics.dead_lettered(
            "payment-service",
            "orderflow.v1.InventoryReserved",
            Duration::from_millis(40),
        );
        metrics.batch_taken("inventory-service", "ns.inventory.order-created", 1);
        metrics.batch_taken("inventory-service", "ns.inventory.order-created", 7);
        let place = Rpc {
            grpc_type: "unary",
            grpc_service: "orderflow.v1.OrderService".to_owned(),
            grpc_method: "PlaceOrder".to_owned(),
        };
        metrics.rpc_started(&place);
        metrics.rpc_handled(&place, "INVALID_ARGUMENT", Duration::from_millis(3));
        for (service, backlog) in [("order-service", 3.0), ("payment-service", 0.0)] {
            metrics.probe(Box::new(move || {
                Box::pin(async move {
                    vec![
                        (
                            "orderflow_outbox_backlog",
                            "Events waiting.",
                            vec![("service", service.to_owned())],
                            backlog,
                        ),
                        (
                            "orderflow_database_up",
                            "Database answers.",
                            vec![("service", service.to_owned())],
                            1.0,
                        ),
                    ]
                })
            }));
        }
        let text = metrics.render().await.unwrap();
        assert!(text.contains("orderflow_orders_placed_total 2\n"), "{text}");
        // Prometheus text 0.0.4 names the family as its samples, `_total` included.
        assert!(
            text.contains("# HELP orderflow_orders_placed_total Orders accepted by PlaceOrder.\n")
        );
        assert!(text.contains("# TYPE orderflow_orders_placed_total counter\n"));
        assert!(text.contains("# TYPE orderflow_trace_spans_dropped_total counter\n"));
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
        let batches = "orderflow_consumer_batch_size_bucket{service=\"inventory-service\",queue=\"ns.inventory.order-created\"";
        for (le, count) in [("1", 1), ("5", 1), ("10", 2)] {
            assert!(
                text.contains(&format!("{batches},le=\"{le}\"}} {count}\n")),
                "{text}"
            );
        }
        assert!(text.contains("orderflow_consumer_batch_size_sum{service=\"inventory-service\",queue=\"ns.inventory.order-created\"} 8.0\n"), "{text}");
        let handled = "orderflow_handler_duration_seconds_bucket{service=\"inventory-service\",queue=\"ns.inventory.order-created\"";
        assert!(
            text.contains(&format!("{handled},le=\"0.001\"}} 0\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{handled},le=\"0.0025\"}} 2\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{handled},le=\"+Inf\"}} 2\n")),
            "{text}"
        );
        for (outcome, n) in [("ok", 1), ("duplicate", 1)] {
            assert!(
                text.contains(&format!(
                    "orderflow_events_handled_total{{service=\"inventory-service\",type=\"orderflow.v1.OrderCreated\",outcome=\"{outcome}\"}} {n}\n"
                )),
                "{text}"
            );
        }
        assert!(text.contains(
            "orderflow_events_handled_total{service=\"payment-service\",type=\"orderflow.v1.InventoryReserved\",outcome=\"dead_lettered\"} 1\n"
        ));
        assert!(text.contains(
            "orderflow_event_handling_seconds_count{service=\"inventory-service\",type=\"orderflow.v1.OrderCreated\"} 2\n"
        ));
        let rpc = "grpc_type=\"unary\",grpc_service=\"orderflow.v1.OrderService\",grpc_method=\"PlaceOrder\"";
        assert!(
            text.contains(&format!("orderflow_grpc_server_started_total{{{rpc}}} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "orderflow_grpc_server_handled_total{{{rpc},grpc_code=\"INVALID_ARGUMENT\"}} 1\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "orderflow_grpc_server_handling_seconds_bucket{{{rpc},le=\"0.005\"}} 1\n"
            )),
            "{text}"
        );
        // Rows of one gauge from several probes come out together, under one HELP and TYPE.
        assert!(
            text.contains(
                "# TYPE orderflow_outbox_backlog gauge\n\
                 orderflow_outbox_backlog{service=\"order-service\"} 3.0\n\
                 orderflow_outbox_backlog{service=\"payment-service\"} 0.0\n"
            ),
            "{text}"
        );
        assert_eq!(text.matches("# HELP orderflow_database_up ").count(), 1);
    }
}
