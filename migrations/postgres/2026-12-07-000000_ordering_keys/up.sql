-- The event's ordering key (Event::ordering_key): for each listener, the deliveries of one key
-- run one at a time, in event-id order. key_hold: a dead letter of this delivery holds the later
-- ones of its key (EventSettings::block_key_on_dead).
ALTER TABLE txbus_deliveries ADD COLUMN ordering_key TEXT;
ALTER TABLE txbus_deliveries ADD COLUMN key_hold BOOLEAN NOT NULL DEFAULT FALSE;

-- Serves the claim's look for an earlier delivery of the same listener and key that is still
-- pending (or dead and holding its key). Unkeyed rows, and finished ones, stay out of it.
CREATE INDEX txbus_deliveries_key ON txbus_deliveries (listener, ordering_key, event_id)
    WHERE ordering_key IS NOT NULL AND delivered_at IS NULL AND (dead_at IS NULL OR key_hold);
