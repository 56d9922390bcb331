DROP INDEX txbus_deliveries_key;
ALTER TABLE txbus_deliveries DROP COLUMN key_hold;
ALTER TABLE txbus_deliveries DROP COLUMN ordering_key;
