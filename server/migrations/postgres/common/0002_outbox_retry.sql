-- Per-row retry state of the outbox relay, so one row the broker refuses (unroutable, nacked)
-- waits out its own backoff while later rows keep flowing, across restarts and across the
-- instances whose relays claim rows with FOR UPDATE SKIP LOCKED.
-- `attempts`: publishes the broker refused so far. `next_attempt_at`: microseconds since the
-- epoch before which no relay takes the row (0 = due now). `first_failed_at`: when the first
-- refusal happened (NULL until then), for the parked message's headers.
ALTER TABLE outbox ADD COLUMN attempts        BIGINT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN next_attempt_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN first_failed_at BIGINT;
-- No index on next_attempt_at: the relay walks `seq` in order and skips the rows that are
-- backing off (few, unless a route is missing under load), cheaper than an index every insert pays.
