-- Transactional outbox: events committed together with the state change that caused them.
-- The relay publishes rows in `seq` order with publisher confirms and deletes them once confirmed.
CREATE TABLE outbox (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id     TEXT    NOT NULL UNIQUE,
    routing_key    TEXT    NOT NULL,
    message_type   TEXT    NOT NULL,
    correlation_id TEXT    NOT NULL,
    body           BLOB    NOT NULL,
    -- W3C trace context of the transaction that staged the event (JSON object).
    trace_context  TEXT    NOT NULL DEFAULT '{}',
    created_at     INTEGER NOT NULL
);

-- Inbox: ids of the messages whose effects are committed, per queue, so a redelivery or a
-- duplicate publish is acknowledged without applying its effects twice.
CREATE TABLE inbox (
    queue        TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (queue, message_id)
) WITHOUT ROWID;

CREATE INDEX inbox_processed_at ON inbox (processed_at);
