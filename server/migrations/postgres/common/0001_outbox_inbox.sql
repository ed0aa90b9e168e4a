-- Transactional outbox: events committed together with the state change that caused them.
-- Relays (one per service instance) claim rows with FOR UPDATE SKIP LOCKED, publish them with
-- publisher confirms and delete them once confirmed.
CREATE TABLE outbox (
    seq            BIGSERIAL PRIMARY KEY,
    message_id     TEXT   NOT NULL UNIQUE,
    routing_key    TEXT   NOT NULL,
    message_type   TEXT   NOT NULL,
    correlation_id TEXT   NOT NULL,
    body           BYTEA  NOT NULL,
    -- W3C trace context of the transaction that staged the event (JSON object).
    trace_context  TEXT   NOT NULL DEFAULT '{}',
    created_at     BIGINT NOT NULL
);

-- Inbox: ids of the messages whose effects are committed, per queue. Two instances handling
-- the same message serialise on this primary key: the second sees it and does nothing.
CREATE TABLE inbox (
    queue        TEXT   NOT NULL,
    message_id   TEXT   NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (queue, message_id)
);

CREATE INDEX inbox_processed_at ON inbox (processed_at);
