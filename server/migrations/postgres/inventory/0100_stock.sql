-- Units available per SKU. Catalog entries are inserted once; afterwards only reservations and
-- releases change `available`, so a restart never resets stock.
CREATE TABLE stock (
    sku         TEXT   PRIMARY KEY,
    name        TEXT   NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    available   BIGINT NOT NULL CHECK (available >= 0)
);

-- What was decided for each order: 'reserved', 'released' (after a failed payment) or
-- 'rejected'. One row per order makes the decision stable under redelivery.
CREATE TABLE reservations (
    order_id    TEXT   PRIMARY KEY,
    status      TEXT   NOT NULL,
    -- JSON array of {sku, quantity, unit_price_cents, name}.
    lines       TEXT   NOT NULL,
    total_cents BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
