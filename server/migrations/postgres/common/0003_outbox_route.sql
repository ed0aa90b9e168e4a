-- Rows that are not the service's own events: a replayed dead letter goes to its work queue
-- through the default exchange with the properties it was stored with (JSON). NULL means the
-- events exchange and the contract's properties.
ALTER TABLE outbox ADD COLUMN exchange TEXT;
ALTER TABLE outbox ADD COLUMN properties TEXT;
