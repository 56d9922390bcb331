-- Event ids: one per emitted event, shared by its deliveries.
CREATE SEQUENCE txbus_event_ids;

-- One row per (event, listener), carrying the event: written in the emitting transaction,
-- deleted when the listener has succeeded, kept as a dead letter when it gave up.
CREATE TABLE txbus_deliveries (
    event_id     BIGINT NOT NULL,
    listener     TEXT NOT NULL,
    event_name   TEXT NOT NULL,
    payload      JSONB NOT NULL,
    emitted_at   TIMESTAMPTZ NOT NULL,
    -- How long a run may hold the delivery (the event's max_execution_time).
    lease_ms     BIGINT NOT NULL,
    -- Runs started so far; also the fence that completes only the run holding the lease.
    attempts     INTEGER NOT NULL DEFAULT 0,
    -- When the delivery may be claimed next: a retry time, or the end of a lease.
    available_at TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    last_error   TEXT,
    -- Set for dead letters, with the reason: expired, max_attempts, aborted or no_listener.
    dead_at      TIMESTAMPTZ,
    dead_reason  TEXT,
    PRIMARY KEY (event_id, listener)
);

-- Serves the poller's claim (live deliveries, soonest available first) and the expiry sweep.
CREATE INDEX txbus_deliveries_due ON txbus_deliveries (available_at) WHERE dead_at IS NULL;
