//! What is read at scrape time rather than recorded: the probes' gauges and the count of spans
//! the trace exporter dropped, as prometheus-client collectors.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::Gauges;
use crate::telemetry::export::DROPPED_SPANS;

/// `orderflow_trace_spans_dropped_total`, kept by the exporter in an atomic.
#[derive(Debug)]
pub(super) struct DroppedSpans;

impl Collector for DroppedSpans {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let dropped = ConstCounter::new(DROPPED_SPANS.load(Ordering::Relaxed));
        let metric = encoder.encode_descriptor(
            "orderflow_trace_spans_dropped",
            "Spans lost because the trace collector was unreachable.",
            None,
            dropped.metric_type(),
        )?;
        dropped.encode(metric)
    }
}

/// The rows the probes returned for one scrape.
#[derive(Debug)]
pub(super) struct Readings(pub(super) Gauges);

impl Collector for Readings {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        // Several probes report the same gauge (one per service); the text format wants all
        // rows of a metric under its one HELP and TYPE.
        let mut families: BTreeMap<&str, (&str, Vec<_>)> = BTreeMap::new();
        for (name, help, labels, value) in &self.0 {
            families
                .entry(name)
                .or_insert((help, Vec::new()))
                .1
                .push((labels, *value));
        }
        for (name, (help, rows)) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, value) in rows {
                ConstGauge::new(value).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}
