//! The two metric shapes orderflow needs and their Prometheus text rendering.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Counters keyed by label set.
#[derive(Debug, Default)]
pub struct LabelledCounters {
    values: Mutex<BTreeMap<Vec<(&'static str, String)>, u64>>,
}

impl LabelledCounters {
    /// Adds `n` to the counter with `labels`.
    pub fn add(&self, labels: Vec<(&'static str, String)>, n: u64) {
        *self
            .values
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(labels)
            .or_default() += n;
    }

    pub(super) fn render(&self, out: &mut String, name: &str, help: &str) {
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, value) in values.iter() {
            let _ = writeln!(out, "{name}{} {value}", format_labels(labels));
        }
    }
}

/// Upper bounds of histogram buckets, in seconds: 0.5 ms to 30 s.
const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram with fixed buckets. Cheap to clone (shared counts).
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug, Default)]
struct HistogramInner {
    /// Non-cumulative counts per bucket, plus one for +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.inner.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.inner
            .sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }
}

pub(super) fn render_histograms(
    out: &mut String,
    name: &str,
    help: &str,
    histograms: &BTreeMap<Vec<(&'static str, String)>, Histogram>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (labels, histogram) in histograms {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_owned()])
            .enumerate()
        {
            cumulative += histogram.inner.counts[i].load(Ordering::Relaxed);
            let mut with_le = labels.clone();
            with_le.push(("le", bound));
            let _ = writeln!(out, "{name}_bucket{} {cumulative}", format_labels(&with_le));
        }
        let sum = histogram.inner.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{} {sum}", format_labels(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", format_labels(labels));
    }
}

pub(super) fn render_rows(out: &mut String, rows: &super::Gauges, kind: &str) {
    let mut described = std::collections::HashSet::new();
    for (name, help, labels, value) in rows {
        if described.insert(*name) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        let _ = writeln!(out, "{name}{} {value}", format_labels(labels));
    }
}

fn format_labels(labels: &[(&'static str, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Label values escape `\`, `"` and newlines.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        render_histograms(&mut out, "x", "help", &BTreeMap::from([(vec![], h)]));
        assert!(out.contains("x_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            format_labels(&[("q", "a\"b\\c\nd".to_owned())]),
            "{q=\"a\\\"b\\\\c\\nd\"}"
        );
    }
}
