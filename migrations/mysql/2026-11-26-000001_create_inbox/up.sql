-- Messages received from outside, by id, for the dedup window: a second receipt of an id found
-- here (and younger than the window) is a duplicate. Times are UTC.
CREATE TABLE txbus_inbox (
    source      VARCHAR(255) NOT NULL,
    message_key VARCHAR(255) NOT NULL,
    received_at DATETIME(6) NOT NULL,
    PRIMARY KEY (source, message_key),
    -- Serves the purge of records older than the window.
    INDEX txbus_inbox_received (received_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
