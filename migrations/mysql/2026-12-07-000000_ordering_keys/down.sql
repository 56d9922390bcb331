ALTER TABLE txbus_deliveries
    DROP INDEX txbus_deliveries_key,
    DROP COLUMN key_hold,
    DROP COLUMN ordering_key
