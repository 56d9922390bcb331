-- Times are milliseconds since the Unix epoch.
-- Messages received from outside, by id, for the dedup window: a second receipt of an id found
-- here (and younger than the window) is a duplicate.
CREATE TABLE txbus_inbox (
    source      TEXT NOT NULL,
    message_key TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (source, message_key)
) WITHOUT ROWID;

-- Serves the purge of records older than the window.
CREATE INDEX txbus_inbox_received ON txbus_inbox (received_at);

-- The InboxStore: messages kept for pull-style consumers until they delete them.
CREATE TABLE txbus_inbox_messages (
    source       TEXT NOT NULL,
    message_key  TEXT NOT NULL,
    payload      TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    -- When a consumer may take it next: now, or the end of another consumer's lease.
    available_at INTEGER NOT NULL,
    -- How many times it was handed out; also the fence of its delete.
    deliveries   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, message_key)
) WITHOUT ROWID;

-- Serves `next_message`: oldest first.
CREATE INDEX txbus_inbox_messages_received ON txbus_inbox_messages (received_at);
