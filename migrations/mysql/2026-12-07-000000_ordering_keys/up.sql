-- The event's ordering key (Event::ordering_key): for each listener, the deliveries of one key
-- run one at a time, in event-id order. key_hold: a dead letter of this delivery holds the later
-- ones of its key (EventSettings::block_key_on_dead).
--
-- The index serves the claim's look for an earlier delivery of the same listener and key that
-- is still pending (or dead and holding its key). Keys compare byte for byte.
ALTER TABLE txbus_deliveries
    ADD COLUMN ordering_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    ADD COLUMN key_hold BOOLEAN NOT NULL DEFAULT FALSE,
    ADD INDEX txbus_deliveries_key (listener, ordering_key, event_id)
