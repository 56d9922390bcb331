-- One row per listener and bucket of ordering keys (as in txbus_key_locks) under which a claim
-- ever parked a delivery: a claim locks its key's row (skipping it when taken) before it parks,
-- and the claim of the key's head locks it (waiting) before it looks, so that it never misses a
-- delivery being parked at that moment. Keys that share a bucket share the lock; the table holds
-- at most 65,536 rows per listener. Apart from txbus_key_locks, which the emits of a key lock.
CREATE TABLE txbus_key_parks (
    listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    bucket   INT UNSIGNED NOT NULL,
    PRIMARY KEY (listener, bucket)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
