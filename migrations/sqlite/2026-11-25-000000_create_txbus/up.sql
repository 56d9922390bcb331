-- Event ids: the last one handed out. SQLite has one writer, so the emitting transaction owns it.
CREATE TABLE txbus_sequence (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
INSERT INTO txbus_sequence (name, value) VALUES ('event_id', 0);

-- One row per (event, listener), carrying the event: written in the emitting transaction,
-- deleted when the listener has succeeded, kept as a dead letter when it gave up.
-- Times are milliseconds since the Unix epoch.
CREATE TABLE txbus_deliveries (
    event_id     INTEGER NOT NULL,
    listener     TEXT NOT NULL,
    event_name   TEXT NOT NULL,
    payload      TEXT NOT NULL,
    emitted_at   INTEGER NOT NULL,
    -- How long a run may hold the delivery (the event's max_execution_time).
    lease_ms     INTEGER NOT NULL,
    -- Runs started so far; also the fence that completes only the run holding the lease.
    attempts     INTEGER NOT NULL DEFAULT 0,
    -- When the delivery may be claimed next: a retry time, or the end of a lease.
    available_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    last_error   TEXT,
    -- Set for dead letters, with the reason: expired, max_attempts, aborted or no_listener.
    dead_at      INTEGER,
    dead_reason  TEXT,
    PRIMARY KEY (event_id, listener)
) WITHOUT ROWID;

-- Serves the poller's claim (live deliveries, soonest available first) and the expiry sweep.
CREATE INDEX txbus_deliveries_due ON txbus_deliveries (available_at) WHERE dead_at IS NULL;
