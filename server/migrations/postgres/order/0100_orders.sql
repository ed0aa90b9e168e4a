-- Orders and their status history. `order_id` is a UUIDv7, so ordering by it is ordering by
-- creation time (newest first = order_id DESC).
CREATE TABLE orders (
    order_id          TEXT   PRIMARY KEY,
    customer_id       TEXT   NOT NULL,
    -- JSON array of {sku, quantity, unit_price_cents?, name?}.
    items             TEXT   NOT NULL,
    total_cents       BIGINT,
    status            TEXT   NOT NULL,
    version           BIGINT NOT NULL,
    failure_reason    TEXT   NOT NULL DEFAULT '',
    transaction_id    TEXT,
    idempotency_key   TEXT,
    -- Canonical form of the request, to tell a retry from a reused key.
    request_digest    TEXT   NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    stock_released_at BIGINT
);

CREATE UNIQUE INDEX orders_idempotency ON orders (customer_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX orders_customer ON orders (customer_id, order_id);

-- One row per status change. `seq` is global, so instances can follow every order's changes.
CREATE TABLE order_history (
    seq      BIGSERIAL PRIMARY KEY,
    order_id TEXT   NOT NULL,
    version  BIGINT NOT NULL,
    status   TEXT   NOT NULL,
    reason   TEXT   NOT NULL DEFAULT '',
    at       BIGINT NOT NULL,
    UNIQUE (order_id, version)
);
