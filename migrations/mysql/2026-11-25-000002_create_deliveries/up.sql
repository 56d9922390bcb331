-- One row per (event, listener); deleted when the listener has succeeded. Times are UTC.
CREATE TABLE txbus_deliveries (
    event_id     BIGINT NOT NULL,
    listener     VARCHAR(255) NOT NULL,
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
    -- Serves the poller's claim (dead_at IS NULL, soonest available first).
    INDEX txbus_deliveries_due (dead_at, available_at),
    -- Serves the expiry sweep.
    INDEX txbus_deliveries_expiry (dead_at, expires_at),
    CONSTRAINT txbus_deliveries_event FOREIGN KEY (event_id)
        REFERENCES txbus_events (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
