DROP TABLE txbus_deliveries;
DROP SEQUENCE txbus_event_ids;
