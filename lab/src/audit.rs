//! Checking a deployment's final state against every invariant: each accepted order exists and
//! reached a terminal status, its history has no repeated step, Inventory and Payment agree with
//! it, and the stock arithmetic is exact. Reads the services' databases directly.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use sqlx::AnyPool;

use orderflow_server::{
    db::{self, Database, DbSync, Location},
    service::Service,
};

/// The outcome of an audit.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// Orders in the order database.
    pub placed: usize,
    /// By final status.
    pub completed: usize,
    /// Rejected by Inventory.
    pub rejected: usize,
    /// Declined by Payment.
    pub payment_failed: usize,
    /// Dead-lettered: a failure under any fault a chaos run injects.
    pub failed: usize,
    /// Accepted orders missing, or never terminal.
    pub lost: usize,
    /// Effects applied more than once (repeated steps, surplus stock movements).
    pub duplicated: usize,
    /// Everything that did not hold, in words.
    pub problems: Vec<String>,
}

impl Audit {
    /// Whether every invariant held: no order lost, FAILED or applied twice, nothing else
    /// amiss. The faults orderflow is built to survive never fail an order: a FAILED order
    /// is a bug, however cleanly it was dead-lettered.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.lost == 0 && self.failed == 0 && self.duplicated == 0
    }
}

/// Where a deployment keeps its state.
#[derive(Debug, Clone)]
pub enum State {
    /// SQLite files in this directory.
    Files(PathBuf),
    /// PostgreSQL schemas `<namespace>_<service>` in this database.
    Postgres {
        /// `postgres://…`.
        url: String,
        /// The deployment's namespace.
        namespace: String,
    },
    /// Each service where it is (a mixed deployment).
    Each(Vec<(Service, State)>),
}

impl State {
    async fn open(&self, service: Service) -> anyhow::Result<AnyPool> {
        let location = match self {
            State::Each(states) => {
                let (_, state) = states
                    .iter()
                    .find(|(s, _)| *s == service)
                    .ok_or_else(|| anyhow::anyhow!("no state for {service}"))?;
                return Box::pin(state.open(service)).await;
            }
            State::Files(dir) => Location::File(dir),
            State::Postgres { url, namespace } => Location::Postgres {
                url,
                schema: db::schema_name(namespace, service),
            },
        };
        let database = Database::open(&location, DbSync::Normal, service).await?;
        Ok(database.pool().clone())
    }
}

/// Waits until no order is in flight and every outbox is empty, or `timeout` passes.
pub async fn wait_settled(state: &State, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let pools = [
        state.open(Service::Order).await?,
        state.open(Service::Inventory).await?,
        state.open(Service::Payment).await?,
    ];
    loop {
        let (in_flight,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM orders WHERE status IN ('PENDING', 'INVENTORY_RESERVED')",
        )
        .fetch_one(&pools[0])
        .await?;
        let mut backlog = 0;
        for pool in &pools {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox")
                .fetch_one(pool)
                .await?;
            backlog += n;
        }
        // Releases after declined payments trail the order's terminal status.
        let (unreleased,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM reservations WHERE status = 'reserved'")
                .fetch_one(&pools[1])
                .await?;
        let (processed,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM payments WHERE status = 'processed'")
                .fetch_one(&pools[2])
                .await?;
        let (unrecorded,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM orders WHERE status = 'PAYMENT_FAILED' AND stock_released_at IS NULL",
        )
        .fetch_one(&pools[0])
        .await?;
        if in_flight == 0 && backlog == 0 && unreleased <= processed && unrecorded == 0 {
            return Ok(true);
        }
        if tokio::time::Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Audits `data_dir` given the order ids clients got back and the stock the catalog started with.
pub async fn audit(
    state: &State,
    accepted: &[String],
    initial_stock: &HashMap<String, i64>,
) -> anyhow::Result<Audit> {
    let orders = state.open(Service::Order).await?;
    let inventory = state.open(Service::Inventory).await?;
    let payments = state.open(Service::Payment).await?;
    let mut audit = Audit::default();

    let rows: Vec<(String, String, Option<i64>, Option<i64>)> =
        sqlx::query_as("SELECT order_id, status, total_cents, stock_released_at FROM orders")
            .fetch_all(&orders)
            .await?;
    audit.placed = rows.len();
    let released: std::collections::HashSet<String> = rows
        .iter()
        .filter(|r| r.3.is_some())
        .map(|r| r.0.clone())
        .collect();
    let status: HashMap<String, (String, Option<i64>)> =
        rows.into_iter().map(|(id, s, t, _)| (id, (s, t))).collect();
    for id in accepted {
        if !status.contains_key(id) {
            audit.lost += 1;
            audit
                .problems
                .push(format!("accepted order {id} is not in the order database"));
        }
    }

    let history: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT order_id, version, status FROM order_history ORDER BY order_id, version",
    )
    .fetch_all(&orders)
    .await?;
    let mut steps: HashMap<&str, Vec<(i64, &str)>> = HashMap::new();
    for (id, version, s) in &history {
        steps
            .entry(id.as_str())
            .or_default()
            .push((*version, s.as_str()));
    }
    let reservations: HashMap<String, (String, String)> =
        sqlx::query_as::<_, (String, String, String)>(
            "SELECT order_id, status, lines FROM reservations",
        )
        .fetch_all(&inventory)
        .await?
        .into_iter()
        .map(|(id, s, lines)| (id, (s, lines)))
        .collect();
    let charges: HashMap<String, (String, i64)> = sqlx::query_as::<_, (String, String, i64)>(
        "SELECT order_id, status, amount_cents FROM payments",
    )
    .fetch_all(&payments)
    .await?
    .into_iter()
    .map(|(id, s, a)| (id, (s, a)))
    .collect();

    for (id, (s, total)) in &status {
        match s.as_str() {
            "COMPLETED" => audit.completed += 1,
            "REJECTED" => audit.rejected += 1,
            "PAYMENT_FAILED" => audit.payment_failed += 1,
            "FAILED" => {
                audit.failed += 1;
                audit
                    .problems
                    .push(format!("order {id} FAILED (its saga was dead-lettered)"));
            }
            other => {
                audit.lost += 1;
                audit
                    .problems
                    .push(format!("order {id} never finished (still {other})"));
            }
        }
        let order_steps = steps.get(id.as_str()).cloned().unwrap_or_default();
        let versions: Vec<i64> = order_steps.iter().map(|(v, _)| *v).collect();
        if versions != (1..=versions.len() as i64).collect::<Vec<_>>() {
            audit
                .problems
                .push(format!("order {id} has gaps in its history: {versions:?}"));
        }
        let mut seen = std::collections::HashSet::new();
        for (_, step) in &order_steps {
            if !seen.insert(*step) {
                audit.duplicated += 1;
                audit
                    .problems
                    .push(format!("order {id} went through {step} twice"));
            }
        }
        let reservation = reservations.get(id).map(|(s, _)| s.as_str());
        let charge = charges.get(id);
        let consistent = match s.as_str() {
            "COMPLETED" => {
                reservation == Some("reserved")
                    && charge.is_some_and(|(c, a)| c == "processed" && Some(*a) == *total)
            }
            "PAYMENT_FAILED" => {
                reservation == Some("released")
                    && charge.is_some_and(|(c, _)| c == "declined")
                    && released.contains(id)
            }
            "REJECTED" => reservation == Some("rejected") && charge.is_none(),
            _ => true,
        };
        if !consistent {
            audit.problems.push(format!(
                "order {id} is {s} but inventory says {reservation:?} and payment {:?}",
                charge.map(|(c, _)| c)
            ));
        }
    }

    // Stock arithmetic: what the catalog started with, minus what active reservations hold,
    // is exactly what is available.
    let mut held: HashMap<String, i64> = HashMap::new();
    for (status, lines) in reservations.values() {
        if status != "reserved" {
            continue;
        }
        let lines: Vec<serde_json::Value> = serde_json::from_str(lines).unwrap_or_default();
        for line in lines {
            let sku = line["sku"].as_str().unwrap_or_default().to_owned();
            *held.entry(sku).or_default() += line["quantity"].as_i64().unwrap_or(0);
        }
    }
    let available: Vec<(String, i64)> = sqlx::query_as("SELECT sku, available FROM stock")
        .fetch_all(&inventory)
        .await?;
    for (sku, available) in available {
        let Some(initial) = initial_stock.get(&sku) else {
            continue;
        };
        let expected = initial - held.get(&sku).copied().unwrap_or(0);
        if available != expected {
            audit.duplicated += (expected - available).unsigned_abs() as usize;
            audit.problems.push(format!(
                "stock of {sku}: {available} available, expected {expected}"
            ));
        }
    }
    Ok(audit)
}
