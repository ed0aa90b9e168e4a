//! Order persistence: placing an order (with its `OrderCreated` in the outbox, in one
//! transaction), reading and listing orders, reading history, and recording transitions.

use std::collections::HashMap;

use orderflow_proto::orderflow::v1 as pb;
use sqlx::{AnyConnection, AnyPool, FromRow};

use super::{Change, Item, NewOrder, Order, Status};
use crate::{
    db::{self, Writes},
    outbox::Staged,
    time::{self, timestamp},
};

/// Why placing an order did not create one.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// The idempotency key was used before for a different order.
    #[error("idempotency key was already used for a different order ({existing})")]
    KeyReused {
        /// The order the key belongs to.
        existing: String,
    },
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Another instance stored an order with the same idempotency key at the same moment;
    /// a retry returns that order.
    #[error("a request with the same idempotency key is being stored; retry")]
    Contended,
    /// The server is shutting down and takes no new orders.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// What `place` did.
#[derive(Debug)]
pub enum Placed {
    /// A new order was stored.
    Created(Order),
    /// The idempotency key matched an existing order, returned as it is now.
    Existing(Order),
}

#[derive(Debug, FromRow)]
struct OrderRow {
    order_id: String,
    customer_id: String,
    items: String,
    total_cents: Option<i64>,
    status: String,
    version: i64,
    failure_reason: String,
    transaction_id: Option<String>,
    idempotency_key: Option<String>,
    stock_released_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

#[derive(Debug, FromRow)]
struct ChangeRow {
    version: i64,
    status: String,
    reason: String,
    at: i64,
}

const ORDER_COLUMNS: &str = "order_id, customer_id, items, total_cents, status, version, failure_reason, \
     transaction_id, idempotency_key, stock_released_at, created_at, updated_at";

impl TryFrom<OrderRow> for Order {
    type Error = sqlx::Error;

    fn try_from(row: OrderRow) -> Result<Self, Self::Error> {
        let items: Vec<Item> =
            serde_json::from_str(&row.items).map_err(|e| sqlx::Error::Decode(e.into()))?;
        Ok(Order {
            order_id: row.order_id,
            customer_id: row.customer_id,
            items,
            total_cents: row.total_cents,
            status: parse_status(&row.status)?,
            version: row.version as u64,
            failure_reason: row.failure_reason,
            transaction_id: row.transaction_id,
            idempotency_key: row.idempotency_key,
            stock_released_at: row.stock_released_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
            history: Vec::new(),
        })
    }
}

impl TryFrom<ChangeRow> for Change {
    type Error = sqlx::Error;

    fn try_from(row: ChangeRow) -> Result<Self, Self::Error> {
        Ok(Change {
            version: row.version as u64,
            status: parse_status(&row.status)?,
            reason: row.reason,
            at: row.at,
        })
    }
}

fn parse_status(s: &str) -> Result<Status, sqlx::Error> {
    Status::parse(s)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown order status `{s}`").into()))
}

/// Stores new orders: looks their idempotency keys up on `conn` (inside the caller's
/// transaction), adds their inserts to `writes` and their `OrderCreated` events, each with its
/// request's trace context, to `staged`, for the caller to run and write to the outbox in the
/// same transaction. A request whose idempotency key names an order already stored, or one
/// earlier in `orders`, gets that order instead (or `KeyReused`). The new orders go in with a
/// few statements whatever their number, as each statement is a round trip to the database.
/// Nothing is durable until the caller commits.
pub async fn place(
    conn: &mut AnyConnection,
    writes: &mut Writes,
    orders: &[(&NewOrder, &opentelemetry::Context)],
    staged: &mut Vec<Staged>,
) -> sqlx::Result<Vec<Result<Placed, PlaceError>>> {
    let mut results = Vec::with_capacity(orders.len());
    let mut created: Vec<Order> = Vec::with_capacity(orders.len());
    let mut digests: Vec<String> = Vec::with_capacity(orders.len());
    // Keys of this batch's new orders: (customer, key) -> index in `created`.
    let mut keys: HashMap<(&str, &str), usize> = HashMap::new();
    for (order, trace) in orders {
        let digest = order.digest();
        if let Some(key) = &order.idempotency_key {
            if let Some(&earlier) = keys.get(&(order.customer_id.as_str(), key.as_str())) {
                results.push(if digests[earlier] == digest {
                    Ok(Placed::Existing(created[earlier].clone()))
                } else {
                    Err(PlaceError::KeyReused {
                        existing: created[earlier].order_id.clone(),
                    })
                });
                continue;
            }
            if let Some(found) = find_by_key(conn, &order.customer_id, key, &digest).await? {
                results.push(found);
                continue;
            }
            keys.insert((&order.customer_id, key), created.len());
        }
        let new = new_order(order);
        staged.push(Staged::new(&created_event(&new, order), trace));
        results.push(Ok(Placed::Created(new.clone())));
        created.push(new);
        digests.push(digest);
    }
    insert_orders(writes, &created, &digests)?;
    Ok(results)
}

/// The order `key` already names, if any: as it is now, or `KeyReused` if its request differed.
async fn find_by_key(
    conn: &mut AnyConnection,
    customer_id: &str,
    key: &str,
    digest: &str,
) -> sqlx::Result<Option<Result<Placed, PlaceError>>> {
    let existing: Option<(String, String)> = sqlx::query_as(
        "SELECT order_id, request_digest FROM orders WHERE customer_id = $1 AND idempotency_key = $2",
    )
    .bind(customer_id)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((order_id, existing_digest)) = existing else {
        return Ok(None);
    };
    if existing_digest != digest {
        return Ok(Some(Err(PlaceError::KeyReused { existing: order_id })));
    }
    let mut order = load(conn, &order_id)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    order.history = history_after(conn, &order_id, 0).await?;
    Ok(Some(Ok(Placed::Existing(order))))
}

/// A new PENDING order for `order`, at version 1.
fn new_order(order: &NewOrder) -> Order {
    let now = time::now_micros();
    Order {
        order_id: uuid::Uuid::now_v7().to_string(),
        customer_id: order.customer_id.clone(),
        items: order
            .lines
            .iter()
            .map(|l| Item {
                sku: l.sku.clone(),
                quantity: l.quantity,
                unit_price_cents: None,
                name: None,
            })
            .collect(),
        total_cents: None,
        status: Status::Pending,
        version: 1,
        failure_reason: String::new(),
        transaction_id: None,
        idempotency_key: order.idempotency_key.clone(),
        stock_released_at: None,
        created_at: now,
        updated_at: now,
        history: vec![Change {
            version: 1,
            status: Status::Pending,
            reason: String::new(),
            at: now,
        }],
    }
}

fn created_event(new: &Order, order: &NewOrder) -> pb::OrderCreated {
    pb::OrderCreated {
        order_id: new.order_id.clone(),
        customer_id: order.customer_id.clone(),
        items: order
            .lines
            .iter()
            .map(|l| pb::OrderLine {
                sku: l.sku.clone(),
                quantity: l.quantity,
            })
            .collect(),
        created_at: Some(timestamp(new.created_at)),
    }
}

/// New orders per INSERT: nine parameters each stays under SQLite's oldest limit of 999.
const ORDERS_PER_INSERT: usize = 100;

/// Adds the inserts of `orders` (new, with their request digests) and of their first history
/// rows to `writes`.
fn insert_orders(writes: &mut Writes, orders: &[Order], digests: &[String]) -> sqlx::Result<()> {
    for (chunk, digests) in orders
        .chunks(ORDERS_PER_INSERT)
        .zip(digests.chunks(ORDERS_PER_INSERT))
    {
        let sql = format!(
            "INSERT INTO orders (order_id, customer_id, items, status, version, idempotency_key, request_digest, created_at, updated_at) VALUES {}",
            db::values(writes.backend(), chunk.len(), 9)
        );
        writes.statement(sql, chunk.len());
        for (order, digest) in chunk.iter().zip(digests) {
            let items =
                serde_json::to_string(&order.items).map_err(|e| sqlx::Error::Encode(e.into()))?;
            writes
                .bind(order.order_id.clone())
                .bind(order.customer_id.clone())
                .bind(items)
                .bind(Status::Pending.as_str())
                .bind(1_i64)
                .bind(order.idempotency_key.clone())
                .bind(digest.clone())
                .bind(order.created_at)
                .bind(order.updated_at);
        }

        let first: Vec<Change> = chunk
            .iter()
            .map(|order| Change {
                version: 1,
                status: Status::Pending,
                reason: String::new(),
                at: order.created_at,
            })
            .collect();
        let rows: Vec<(&str, &Change)> = chunk
            .iter()
            .zip(&first)
            .map(|(order, change)| (order.order_id.as_str(), change))
            .collect();
        insert_changes(writes, &rows);
    }
    Ok(())
}

/// One order with its full history.
pub async fn get(pool: &AnyPool, order_id: &str) -> sqlx::Result<Option<Order>> {
    let mut conn = pool.acquire().await?;
    let Some(mut order) = load(&mut conn, order_id).await? else {
        return Ok(None);
    };
    order.history = history_after(&mut conn, order_id, 0).await?;
    Ok(Some(order))
}

/// One order without history, on the caller's connection (e.g. inside a transaction).
pub async fn load(conn: &mut AnyConnection, order_id: &str) -> sqlx::Result<Option<Order>> {
    load_locked(conn, order_id, "").await
}

/// [`load`], appending `for_update` (` FOR UPDATE` where concurrent writers must be kept
/// off the row until this transaction ends).
pub async fn load_locked(
    conn: &mut AnyConnection,
    order_id: &str,
    for_update: &str,
) -> sqlx::Result<Option<Order>> {
    let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1{for_update}");
    let row: Option<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(order_id)
        .fetch_optional(conn)
        .await?;
    row.map(Order::try_from).transpose()
}

/// Status changes of an order with a version above `after`, oldest first.
pub async fn history_after(
    conn: &mut AnyConnection,
    order_id: &str,
    after: u64,
) -> sqlx::Result<Vec<Change>> {
    let rows: Vec<ChangeRow> = sqlx::query_as(
        "SELECT version, status, reason, at FROM order_history WHERE order_id = $1 AND version > $2 ORDER BY version",
    )
    .bind(order_id)
    .bind(after as i64)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(Change::try_from).collect()
}

/// A page of orders, newest first: those older than `before` (an order id), optionally of
/// one customer. Asks for one extra row to know whether another page exists.
pub async fn list(
    pool: &AnyPool,
    customer_id: Option<&str>,
    before: Option<&str>,
    limit: u32,
) -> sqlx::Result<(Vec<Order>, bool)> {
    let sql = format!(
        "SELECT {ORDER_COLUMNS} FROM orders
         WHERE (CAST($1 AS TEXT) IS NULL OR customer_id = $1) AND (CAST($2 AS TEXT) IS NULL OR order_id < $2)
         ORDER BY order_id DESC LIMIT $3"
    );
    let rows: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(customer_id)
        .bind(before)
        .bind(i64::from(limit) + 1)
        .fetch_all(pool)
        .await?;
    let more = rows.len() > limit as usize;
    let orders = rows
        .into_iter()
        .take(limit as usize)
        .map(Order::try_from)
        .collect::<Result<_, _>>()?;
    Ok((orders, more))
}

/// The history rows that move `order` through `statuses`, at `at`: one version each, with
/// `reason` on the failures.
pub fn changes(order: &Order, statuses: &[Status], reason: &str, at: i64) -> Vec<Change> {
    statuses
        .iter()
        .zip(order.version + 1..)
        .map(|(&status, version)| Change {
            version,
            status,
            reason: if status.is_terminal() && status != Status::Completed {
                reason.to_owned()
            } else {
                String::new()
            },
            at,
        })
        .collect()
}

/// Loads the orders `ids`, appending `for_update` (see [`load_locked`]). Rows are read, and on
/// PostgreSQL locked, in `order_id` order, so two batches never wait on each other in a cycle.
pub async fn load_many(
    conn: &mut AnyConnection,
    ids: &[&str],
    for_update: &str,
) -> sqlx::Result<Vec<Order>> {
    let mut orders = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_SELECT) {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id IN ({}) ORDER BY order_id{for_update}",
            db::params(db::Backend::of(conn), chunk.len())
        );
        let mut query = sqlx::query_as::<_, OrderRow>(sqlx::AssertSqlSafe(sql))
            .persistent(db::worth_caching(chunk.len()));
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            orders.push(Order::try_from(row)?);
        }
    }
    Ok(orders)
}

/// Adds the update of the changeable columns of `orders` (as changed in memory), at `now`, to
/// `writes`.
pub fn update_many(writes: &mut Writes, orders: &[&Order], now: i64) -> sqlx::Result<()> {
    for chunk in orders.chunks(ORDERS_PER_INSERT) {
        // Both engines name a VALUES list's columns column1, column2, …
        let sql = format!(
            "UPDATE orders SET items = v.column2, total_cents = v.column3, status = v.column4,
                    version = v.column5, failure_reason = v.column6, transaction_id = v.column7,
                    stock_released_at = v.column8, updated_at = v.column9
             FROM (VALUES {}) AS v WHERE orders.order_id = v.column1",
            db::values(writes.backend(), chunk.len(), 9)
        );
        writes.statement(sql, chunk.len());
        for order in chunk {
            let items =
                serde_json::to_string(&order.items).map_err(|e| sqlx::Error::Encode(e.into()))?;
            writes
                .bind(order.order_id.clone())
                .bind(items)
                .bind(order.total_cents)
                .bind(order.status.as_str())
                .bind(order.version as i64)
                .bind(order.failure_reason.clone())
                .bind(order.transaction_id.clone())
                .bind(order.stock_released_at)
                .bind(now);
        }
    }
    Ok(())
}

/// Adds the insert of status changes, each with the id of its order, to `writes`.
pub fn insert_changes(writes: &mut Writes, rows: &[(&str, &Change)]) {
    for chunk in rows.chunks(CHANGES_PER_INSERT) {
        let sql = format!(
            "INSERT INTO order_history (order_id, version, status, reason, at) VALUES {}",
            db::values(writes.backend(), chunk.len(), 5)
        );
        writes.statement(sql, chunk.len());
        for (order_id, change) in chunk {
            writes
                .bind(order_id.to_string())
                .bind(change.version as i64)
                .bind(change.status.as_str())
                .bind(change.reason.clone())
                .bind(change.at);
        }
    }
}

/// Order ids per `IN (…)` list, and history rows per INSERT (five parameters each): both stay
/// under SQLite's oldest limit of 999 parameters.
const IDS_PER_SELECT: usize = 500;
const CHANGES_PER_INSERT: usize = 150;

/// Whether the order's history contains `status`.
pub async fn has_reached(
    conn: &mut AnyConnection,
    order_id: &str,
    status: Status,
) -> sqlx::Result<bool> {
    let (reached,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM order_history WHERE order_id = $1 AND status = $2")
            .bind(order_id)
            .bind(status.as_str())
            .fetch_one(conn)
            .await?;
    Ok(reached > 0)
}

/// Changes recorded after `seq` (any order), for following changes made by other processes.
pub async fn changes_since(
    pool: &AnyPool,
    seq: i64,
    limit: i64,
) -> sqlx::Result<Vec<(i64, String, u64)>> {
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT seq, order_id, version FROM order_history WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(seq)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(s, o, v)| (s, o, v as u64)).collect())
}

/// The newest history `seq`, 0 for none.
pub async fn last_change_seq(pool: &AnyPool) -> sqlx::Result<i64> {
    let (seq,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM order_history")
        .fetch_one(pool)
        .await?;
    Ok(seq.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{db, order::Line, service::Service};

    fn request(customer: &str, quantity: u32, key: Option<&str>) -> NewOrder {
        NewOrder {
            customer_id: customer.to_owned(),
            lines: vec![Line {
                sku: "KB-001".to_owned(),
                quantity,
            }],
            idempotency_key: key.map(str::to_owned),
        }
    }

    fn created(result: &Result<Placed, PlaceError>) -> &str {
        match result {
            Ok(Placed::Created(order)) => &order.order_id,
            other => panic!("expected a new order, got {other:?}"),
        }
    }

    /// Concurrent retries with one key usually land in the same batch, where the database
    /// cannot see the first of them yet.
    #[tokio::test]
    async fn a_key_used_twice_in_one_batch_names_one_order() {
        let (_dir, db) = db::scratch(Service::Order).await;
        let trace = opentelemetry::Context::new();
        let batch = [
            request("alice", 1, Some("k")),
            request("alice", 1, Some("k")),
            request("alice", 2, Some("k")),
            request("bob", 1, Some("k")),
            request("alice", 1, None),
        ];
        let orders: Vec<_> = batch.iter().map(|r| (r, &trace)).collect();
        let mut staged = Vec::new();
        let mut tx = db.begin().await.unwrap();
        let mut writes = Writes::new(db.backend());
        let results = place(&mut tx, &mut writes, &orders, &mut staged)
            .await
            .unwrap();
        writes.execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();

        let first = created(&results[0]);
        match &results[1] {
            Ok(Placed::Existing(order)) => assert_eq!(order.order_id, first),
            other => panic!("a retry in the same batch gets the first order: {other:?}"),
        }
        match &results[2] {
            Err(PlaceError::KeyReused { existing }) => assert_eq!(existing, first),
            other => panic!("a different request with the key is refused: {other:?}"),
        }
        assert_ne!(created(&results[3]), first, "keys are per customer");
        created(&results[4]);
        assert_eq!(staged.len(), 3, "one OrderCreated per new order");

        let (orders, history): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM orders), (SELECT COUNT(*) FROM order_history)",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!((orders, history), (3, 3));

        // A later batch finds the stored order by its key.
        let retry = request("alice", 1, Some("k"));
        let mut tx = db.begin().await.unwrap();
        let mut writes = Writes::new(db.backend());
        let again = place(&mut tx, &mut writes, &[(&retry, &trace)], &mut Vec::new())
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        match &again[0] {
            Ok(Placed::Existing(order)) => {
                assert_eq!(order.order_id, first);
                assert_eq!(order.history.len(), 1);
            }
            other => panic!("expected the stored order, got {other:?}"),
        }
    }
}
