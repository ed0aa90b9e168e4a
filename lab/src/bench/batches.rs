//! How many deliveries orderflow's consumers handled per database transaction during a
//! measured phase, and how long each delivery took from its receipt to its settlement, from the
//! servers' own `orderflow_consumer_batch_size` and `orderflow_handler_duration_seconds`
//! histograms: read once before the phase and once after, so the warm-up is left out. A commit
//! costs about the same for one delivery or fifty, so the batch sizes say how much of a load's
//! cost is per order and how much per transaction; the times say which stage an order waits in.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::deployment::Deployment;

/// Where a series' value goes in [`Batches`].
type Field = fn(&mut Batches) -> &mut f64;

/// The series read, and which field of [`Batches`] each one is.
const SERIES: [(&str, Field); 4] = [
    ("orderflow_consumer_batch_size_sum{", |b| &mut b.deliveries),
    ("orderflow_consumer_batch_size_count{", |b| &mut b.batches),
    ("orderflow_handler_duration_seconds_sum{", |b| {
        &mut b.handling_s
    }),
    ("orderflow_handler_duration_seconds_count{", |b| {
        &mut b.handled
    }),
];

/// The batches of one queue's consumers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Batches {
    /// Transactions: batches taken.
    pub(crate) batches: f64,
    /// Deliveries in them.
    pub(crate) deliveries: f64,
    /// Deliveries handled and settled, and their time from receipt to settlement in total.
    pub(crate) handled: f64,
    pub(crate) handling_s: f64,
}

impl Batches {
    /// Deliveries per batch.
    pub(crate) fn mean(&self) -> Option<f64> {
        (self.batches > 0.0).then(|| self.deliveries / self.batches)
    }

    /// Milliseconds from a delivery's receipt to its settlement, on average.
    pub(crate) fn mean_handling_ms(&self) -> Option<f64> {
        (self.handled > 0.0).then(|| self.handling_s * 1000.0 / self.handled)
    }
}

/// Every instance's batches so far, by queue (instances of one service add up).
pub(crate) async fn read(servers: &Deployment) -> anyhow::Result<BTreeMap<String, Batches>> {
    let mut total: BTreeMap<String, Batches> = BTreeMap::new();
    for instance in servers.instances() {
        for (queue, seen) in parse(&servers.metrics(instance).await?) {
            let sum = total.entry(queue).or_default();
            sum.batches += seen.batches;
            sum.deliveries += seen.deliveries;
            sum.handled += seen.handled;
            sum.handling_s += seen.handling_s;
        }
    }
    Ok(total)
}

/// What happened between two readings of the same servers.
pub(crate) fn between(
    before: &BTreeMap<String, Batches>,
    after: &BTreeMap<String, Batches>,
) -> BTreeMap<String, Batches> {
    after
        .iter()
        .map(|(queue, now)| {
            let then = before.get(queue).copied().unwrap_or_default();
            let during = Batches {
                batches: now.batches - then.batches,
                deliveries: now.deliveries - then.deliveries,
                handled: now.handled - then.handled,
                handling_s: now.handling_s - then.handling_s,
            };
            (queue.clone(), during)
        })
        .filter(|(_, during)| during.batches > 0.0)
        .collect()
}

/// The histograms' `_count` and `_sum` per `queue` label in a Prometheus text page.
fn parse(page: &str) -> BTreeMap<String, Batches> {
    let mut found: BTreeMap<String, Batches> = BTreeMap::new();
    for line in page.lines() {
        let Some((rest, field)) = SERIES
            .iter()
            .find_map(|(prefix, field)| Some((line.strip_prefix(prefix)?, field)))
        else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let queue = labels
            .split_once("queue=\"")
            .and_then(|(_, after)| after.split_once('"'))
            .map(|(queue, _)| queue);
        let (Some(queue), Ok(value)) = (queue, value.trim().parse::<f64>()) else {
            continue;
        };
        *field(found.entry(queue.to_owned()).or_default()) = value;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# TYPE orderflow_consumer_batch_size histogram
orderflow_consumer_batch_size_bucket{service=\"inventory-service\",queue=\"ns.inventory.order-created\",le=\"1\"} 3
orderflow_consumer_batch_size_sum{service=\"inventory-service\",queue=\"ns.inventory.order-created\"} 40.0
orderflow_consumer_batch_size_count{service=\"inventory-service\",queue=\"ns.inventory.order-created\"} 5
orderflow_consumer_batch_size_sum{service=\"order-service\",queue=\"ns.order.payment-processed\"} 1.0
orderflow_consumer_batch_size_count{service=\"order-service\",queue=\"ns.order.payment-processed\"} 1
orderflow_handler_duration_seconds_sum{service=\"order-service\",queue=\"ns.order.payment-processed\"} 0.5
orderflow_handler_duration_seconds_count{service=\"order-service\",queue=\"ns.order.payment-processed\"} 2
orderflow_handler_duration_seconds_bucket{service=\"order-service\",queue=\"ns.order.payment-processed\",le=\"0.005\"} 0
";

    #[test]
    fn reads_count_and_sum_per_queue() {
        let found = parse(PAGE);
        assert_eq!(found.len(), 2, "{found:?}");
        let inventory = found["ns.inventory.order-created"];
        assert_eq!(
            inventory,
            Batches {
                batches: 5.0,
                deliveries: 40.0,
                ..Batches::default()
            }
        );
        assert_eq!(inventory.mean(), Some(8.0));
        assert_eq!(inventory.mean_handling_ms(), None);
        let order = found["ns.order.payment-processed"];
        assert_eq!(order.mean(), Some(1.0));
        assert_eq!(order.mean_handling_ms(), Some(250.0));
    }

    #[test]
    fn keeps_only_what_happened_in_between() {
        let before = parse(PAGE);
        let mut after = before.clone();
        after.insert(
            "ns.inventory.order-created".to_owned(),
            Batches {
                batches: 7.0,
                deliveries: 100.0,
                handled: 100.0,
                handling_s: 0.5,
            },
        );
        let during = between(&before, &after);
        assert_eq!(during.len(), 1, "an idle queue is left out: {during:?}");
        assert_eq!(during["ns.inventory.order-created"].mean(), Some(30.0));
        assert_eq!(
            during["ns.inventory.order-created"].mean_handling_ms(),
            Some(5.0)
        );
    }
}
