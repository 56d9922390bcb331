-- One row per emitted event; deleted when every delivery of it has succeeded.
-- MySQL commits each DDL statement by itself: one statement per migration.
CREATE TABLE txbus_events (
    id         BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name       VARCHAR(255) NOT NULL,
    payload    LONGTEXT NOT NULL,
    emitted_at DATETIME(6) NOT NULL,
    -- How long a run may hold a delivery (the event's max_execution_time).
    lease_ms   BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
