-- Without delivered_at, a delivery kept after its success would look pending and run again.
DELETE FROM txbus_deliveries WHERE delivered_at IS NOT NULL;
DROP INDEX txbus_deliveries_delivered;
DROP INDEX txbus_deliveries_dead;
DROP INDEX txbus_deliveries_due;
ALTER TABLE txbus_deliveries DROP COLUMN delivered_at;
ALTER TABLE txbus_deliveries DROP COLUMN leased_at;
CREATE INDEX txbus_deliveries_due ON txbus_deliveries (available_at) WHERE dead_at IS NULL;
