-- One row per listener and ordering key that a claim ever parked a delivery of: a claim locks
-- it (skipping it when taken) before it parks, and the claim of the key's head locks it
-- (waiting) before it looks, so that it never misses a delivery being parked at that moment.
-- Apart from txbus_key_locks, which the emits of a key lock.
CREATE TABLE txbus_key_parks (
    listener     VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    ordering_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    PRIMARY KEY (listener, ordering_key)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
