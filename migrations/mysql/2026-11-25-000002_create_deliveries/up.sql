-- One row per (event, listener), carrying the event: written in the emitting transaction,
-- deleted when the listener has succeeded, kept as a dead letter when it gave up. Times are UTC.
CREATE TABLE txbus_deliveries (
    event_id     BIGINT NOT NULL,
    listener     VARCHAR(255) NOT NULL,
    event_name   VARCHAR(255) NOT NULL,
    payload      LONGTEXT NOT NULL,
    emitted_at   DATETIME(6) NOT NULL,
    -- How long a run may hold the delivery (the event's max_execution_time).
    lease_ms     BIGINT NOT NULL,
    -- Runs started so far; also the fence that completes only the run holding the lease.
    attempts     INT NOT NULL DEFAULT 0,
    -- When the delivery may be claimed next: a retry time, or the end of a lease.
    available_at DATETIME(6) NOT NULL,
    expires_at   DATETIME(6) NOT NULL,
    last_error   LONGTEXT NULL,
    -- Set for dead letters, with the reason: expired, max_attempts, aborted or no_listener.
    dead_at      DATETIME(6) NULL,
    dead_reason  VARCHAR(32) NULL,
    PRIMARY KEY (event_id, listener),
    -- Serves the poller's claim (dead_at IS NULL, soonest available first) and the expiry sweep.
    INDEX txbus_deliveries_due (dead_at, available_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
