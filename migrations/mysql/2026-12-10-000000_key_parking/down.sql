ALTER TABLE txbus_deliveries DROP COLUMN parked
