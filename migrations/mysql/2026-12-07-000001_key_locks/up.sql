-- One row per bucket of ordering keys (the low 16 bits of the key's CRC-32: at most 65,536
-- rows, however many keys there are): a keyed emit locks its key's bucket row (an upsert) before
-- it takes its event id, so that the emits of one key take their ids in the order they commit.
-- Keys that share a bucket only share the lock, for the moment an emit holds it.
CREATE TABLE txbus_key_locks (
    bucket INT UNSIGNED NOT NULL PRIMARY KEY
)
