-- One charge decision per order, so a redelivered request never charges twice.
CREATE TABLE payments (
    order_id       TEXT   PRIMARY KEY,
    status         TEXT   NOT NULL, -- 'processed' or 'declined'
    amount_cents   BIGINT NOT NULL,
    transaction_id TEXT,
    reason         TEXT   NOT NULL DEFAULT '',
    created_at     BIGINT NOT NULL
);
