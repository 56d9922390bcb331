-- One row per ordering key ever emitted: a keyed emit locks its key's row (an upsert) before it
-- takes its event id, so that the emits of one key take their ids in the order they commit.
CREATE TABLE txbus_key_locks (
    ordering_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY
)
