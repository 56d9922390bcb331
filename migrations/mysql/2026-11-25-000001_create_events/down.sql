DROP TABLE txbus_events
