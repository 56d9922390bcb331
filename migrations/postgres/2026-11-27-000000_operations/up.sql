-- When the running lease of a delivery started (NULL when it is not leased): tells a running
-- delivery from one waiting for its retry, which both have a future available_at.
ALTER TABLE txbus_deliveries ADD COLUMN leased_at TIMESTAMPTZ;
-- When the listener succeeded, for deliveries kept after success (retain_delivered).
ALTER TABLE txbus_deliveries ADD COLUMN delivered_at TIMESTAMPTZ;

-- Pending deliveries only: neither dead nor delivered.
DROP INDEX txbus_deliveries_due;
CREATE INDEX txbus_deliveries_due ON txbus_deliveries (available_at)
    WHERE dead_at IS NULL AND delivered_at IS NULL;
-- Serve the dead-letter list (newest first), its purge, and the retention of delivered ones.
-- Rows enter them only when they die or are delivered: an emit does not write them.
CREATE INDEX txbus_deliveries_dead ON txbus_deliveries (dead_at) WHERE dead_at IS NOT NULL;
CREATE INDEX txbus_deliveries_delivered ON txbus_deliveries (delivered_at)
    WHERE delivered_at IS NOT NULL;
