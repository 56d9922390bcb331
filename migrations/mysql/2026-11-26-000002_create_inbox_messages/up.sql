-- The InboxStore: messages kept for pull-style consumers until they delete them.
CREATE TABLE txbus_inbox_messages (
    source       VARCHAR(255) NOT NULL,
    message_key  VARCHAR(255) NOT NULL,
    payload      LONGTEXT NOT NULL,
    received_at  DATETIME(6) NOT NULL,
    -- When a consumer may take it next: now, or the end of another consumer's lease.
    available_at DATETIME(6) NOT NULL,
    -- How many times it was handed out; also the fence of its delete.
    deliveries   INT NOT NULL DEFAULT 0,
    PRIMARY KEY (source, message_key),
    -- Serves `next_message`: oldest first.
    INDEX txbus_inbox_messages_received (received_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
