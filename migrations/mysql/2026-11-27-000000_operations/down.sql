ALTER TABLE txbus_deliveries
    DROP INDEX txbus_deliveries_due,
    DROP COLUMN delivered_at,
    DROP COLUMN leased_at,
    ADD INDEX txbus_deliveries_due (dead_at, available_at)
