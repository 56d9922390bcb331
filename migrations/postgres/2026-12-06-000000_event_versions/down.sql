ALTER TABLE txbus_deliveries DROP COLUMN event_version;
