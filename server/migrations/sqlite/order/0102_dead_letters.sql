-- Dead letters of the whole namespace, kept by Order, which consumes the dead-letter intake.
-- Browsing reads this table and never the broker, so looking costs a dead letter nothing.
-- `seq` is arrival order. `properties` is what a replay publishes again (JSON).
CREATE TABLE dead_letters (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    source               TEXT    NOT NULL,
    message_id           TEXT    NOT NULL,
    message_type         TEXT    NOT NULL,
    correlation_id       TEXT    NOT NULL,
    body                 BLOB    NOT NULL,
    properties           TEXT    NOT NULL,
    -- JSON object of every header as text.
    headers              TEXT    NOT NULL,
    reason               TEXT    NOT NULL,
    last_error           TEXT    NOT NULL,
    attempts             INTEGER NOT NULL,
    failing_service      TEXT    NOT NULL,
    original_exchange    TEXT    NOT NULL,
    original_routing_key TEXT    NOT NULL,
    first_failure_at     INTEGER,
    last_failure_at      INTEGER,
    replay_exchange      TEXT    NOT NULL,
    replay_routing_key   TEXT    NOT NULL,
    stored_at            INTEGER NOT NULL
);

CREATE INDEX dead_letters_source ON dead_letters (source, seq);
CREATE INDEX dead_letters_message ON dead_letters (source, message_id);
